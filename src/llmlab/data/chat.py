"""Conversations: record formats to messages, chat-template rendering, and assistant-only loss masks.

    messages = sft_messages({"instruction": "Explain Python", "response": "A language."})
    ids, labels = encode_chat(tokenizer, messages, max_len=512)   # labels -100 outside assistant turns

One message list is the common form of every format, so the three SFT formats of the same conversation
give the same tokens and masks. Rendering uses the tokenizer's chat template, or the built-in ChatML one
when it has none (`llmlab.data.tokenizer.CHATML_TEMPLATE`).

Loss spans are found from the template itself, not by searching for strings: for assistant turn i, the
text rendered for messages[:i] with a generation prompt is where the answer starts, and the text rendered
for messages[:i+1] (trailing whitespace removed) is where it ends — so the span is the answer plus the
end-of-turn token (`<|im_end|>` in ChatML). Characters map to tokens through the fast tokenizer's offsets.

One template serves training and inference: `effective_chat_template(tokenizer)` is the tokenizer's own
when it renders a probe conversation prefix-consistently, else ChatML (a one-line notice says so once);
ChatML ends turns with `<|im_end|>` when that is one token of the vocabulary, else with the tokenizer's
eos (gpt2, Llama-2 base), so the model learns to stop on a token it has and generation stops on.
SFT, DPO, RL prompts and chat all render through `render`, which uses it.

Messages are checked by `check_messages`: roles system/user/assistant in any case (ShareGPT `from`: human,
gpt), content a string or a list of OpenAI-style text parts `{"type": "text", "text": ...}` (joined; image or
other parts are refused). A wrong type gets a one-line DataError naming the field and the type found.

Message content is text: control tokens written inside it (`<|im_end|>`, `<|endoftext|>`, ...) are
encoded as plain text pieces, never as the special token, so data cannot fake a turn end; only the
template's own markers are special (`encode_rendered`).
"""

from __future__ import annotations

import json
import re
import sys
import weakref
from collections.abc import Callable
from typing import Any

from llmlab.data.tokenizer import CHATML_EOS_TEMPLATE, CHATML_TEMPLATE, IM_END, in_vocabulary
from llmlab.errors import DataError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
SFT_FORMATS = ("'messages' (list of {role, content}), 'instruction' + 'response' (optional 'input'), "
               "or 'prompt' + 'completion' (or 'response'/'output')")
ANSWER_KEYS = ("completion", "response", "output")
IGNORE_INDEX = -100
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")
HH_ASSISTANT = "\n\nAssistant:"


def _keys(record: dict[str, Any]) -> str:
    return ", ".join(sorted(record)) or "none"


def found(value: Any) -> str:
    """What a record holds where another type was expected, for error messages: `number 4`, `null`, ..."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    kind = ("null" if value is None else "boolean" if isinstance(value, bool) else "string" if isinstance(value, str)
            else "number" if isinstance(value, (int, float)) else type(value).__name__)
    text = json.dumps(value, ensure_ascii=False, default=str) if kind != "null" else ""
    return f"{kind} {text[:37] + '...' if len(text) > 40 else text}".rstrip()


MESSAGE_LIST = "a non-empty list of {role, content} messages"
ROLE_NOTE = f"accepted roles: {', '.join(ROLES)} (any case; ShareGPT 'from': human, gpt)"
TEXT_PART = '{"type": "text", "text": ...}'
# Fields whose value may be a string or a message list; older callers name them at the end of `where`
# ("<where> chosen"), which `check_messages` splits off so the message reads "<where>: 'chosen' ...".
_STRING_OR_MESSAGES = ("prompt", "chosen", "rejected", "completion", "response", "output")


def _text_content(content: Any, where: str, label: str) -> str:
    """A message's text: a string, or OpenAI-style parts [{"type": "text", "text": ...}] joined (as chat
    templates render them, without a separator); other parts (images, audio) are refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        what = "an empty list of parts" if isinstance(content, list) else found(content)
        raise DataError(f"{where}: {label} has no text content ({what}); give 'content' as a string or a "
                        f"list of text parts {TEXT_PART}")
    texts = []
    for k, part in enumerate(content):
        if not isinstance(part, dict):
            raise DataError(f"{where}: {label} content part {k} is not an object {TEXT_PART} "
                            f"(found {found(part)})")
        kind = part.get("type", "text" if "text" in part else None)
        if kind != "text":
            raise DataError(f"{where}: {label} content part {k} has type {kind!r}; only text parts ({TEXT_PART}) "
                            f"can be used: remove the other parts or the record")
        if not isinstance(part.get("text"), str):
            raise DataError(f"{where}: {label} content part {k} has no string 'text' (found {found(part.get('text'))})")
        texts.append(part["text"])
    return "".join(texts)


def check_messages(messages: Any, where: str, field: str | None = None) -> list[dict[str, str]]:
    """Validate a message list (also ShareGPT `from`/`value`) and return plain {role, content} dicts.

    Roles are matched in any case and returned in lower case; content may be a string or a list of
    OpenAI-style text parts (joined). `field` names the record's field in error messages (default
    'messages'; 'prompt', 'chosen', ... say that a string would do too).
    """
    field = field or "messages"
    if not isinstance(messages, list) or not messages:
        allowed = f"a string or {MESSAGE_LIST}" if field in _STRING_OR_MESSAGES else MESSAGE_LIST
        raise DataError(f"{where}: {field!r} must be {allowed}, not {found(messages)}")
    prefix = "" if field in ("messages", "conversations") else f"{field!r} "
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: {prefix}message {j} is not an object with role and content "
                            f"(found {found(m)})")
        role = m["role"] if "role" in m else SHAREGPT_ROLES.get(str(m.get("from", "")).strip().lower(), m.get("from"))
        if isinstance(role, str) and role.strip().lower() in ROLES:
            role = role.strip().lower()
        elif role is None:
            raise DataError(f"{where}: {prefix}message {j} has no role; {ROLE_NOTE}")
        else:
            hint = ("; tool calls and results are not supported: drop those messages or fold them into the text"
                    if str(role).lower() in ("tool", "function", "ipython", "tool_call", "tool_response") else "")
            raise DataError(f"{where}: {prefix}message {j} has role {role!r}; {ROLE_NOTE}{hint}")
        content = m["content"] if "content" in m else m.get("value")
        out.append({"role": role, "content": _text_content(content, where, f"{prefix}message {j} ({role})")})
    return out


def _as_messages(value: Any, role: str, where: str, field: str) -> list[dict[str, str]]:
    """A prompt or answer that is either a string or already a message list."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return check_messages(value, where, field)


def instruction_text(record: dict[str, Any]) -> str:
    extra = record.get("input")
    return f"{record['instruction']}\n\n{extra}" if isinstance(extra, str) and extra.strip() else record["instruction"]


def sft_messages(record: dict[str, Any], where: str = "record") -> list[dict[str, str]]:
    """The conversation of an SFT record in any of the three formats (detected per record)."""
    refuse_message_tree(record, where)
    if "messages" in record or "conversations" in record:
        field = "messages" if "messages" in record else "conversations"
        messages = check_messages(record[field], where, field)
    elif isinstance(record.get("instruction"), str) and any(
            isinstance(record.get(k), str) for k in ("response", "output")):
        answer = record["response"] if isinstance(record.get("response"), str) else record["output"]
        messages = [{"role": "user", "content": instruction_text(record)}, {"role": "assistant", "content": answer}]
    elif "prompt" in record and any(k in record for k in ANSWER_KEYS):
        key = next(k for k in ANSWER_KEYS if k in record)
        messages = (_as_messages(record["prompt"], "user", where, "prompt")
                    + _as_messages(record[key], "assistant", where, key))
    elif "instruction" in record and any(k in record for k in ("response", "output")):
        bad = next(k for k in ("instruction", "response", "output") if k in record and not isinstance(record[k], str))
        raise DataError(f"{where}: {bad!r} must be a string, not {found(record[bad])}")
    else:
        raise DataError(f"{where}: no known SFT format (keys: {_keys(record)}); expected {SFT_FORMATS}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant message to learn from")
    return messages


def refuse_message_tree(record: dict[str, Any], where: str) -> None:
    """A one-line DataError for OpenAssistant/oasst1-style rows: one message of a conversation tree each."""
    if "message_tree_id" in record or {"message_id", "parent_id", "text"} <= set(record):
        raise DataError(f"{where}: one message of a conversation tree (OpenAssistant/oasst1 layout, keys: "
                        f"{_keys(record)}); flatten the trees into 'messages' conversations first, or use a "
                        f"flattened dataset (e.g. OpenAssistant/oasst2-derived chat data with 'messages')")


def parse_hh(transcript: str, where: str = "record") -> list[dict[str, str]]:
    """Anthropic HH transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") to user/assistant messages."""
    parts = _HH_TURN.split(transcript)
    if len(parts) < 3:
        raise DataError(f"{where}: not an HH transcript (no \"Human:\"/\"Assistant:\" turns)")
    messages = []
    for role, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    return messages


def split_hh(chosen: str, rejected: str, where: str = "record") -> tuple[list[dict[str, str]], str, str]:
    """HH pair to (prompt messages, chosen answer, rejected answer).

    The prompt is the whole shared conversation up to and including the last "\\n\\nAssistant:"; the
    answers are what follows it. Every earlier turn stays in the prompt.
    """
    cut = chosen.rfind(HH_ASSISTANT)
    if cut < 0:
        raise DataError(f"{where}: 'chosen' has no \"\\n\\nAssistant:\" turn; expected an HH transcript")
    prompt_text = chosen[:cut + len(HH_ASSISTANT)]
    chosen_answer = chosen[cut + len(HH_ASSISTANT):]
    if rejected.startswith(prompt_text):
        rejected_answer = rejected[len(prompt_text):]
    else:  # the transcripts diverge earlier: take what follows the rejected one's own last turn
        rcut = rejected.rfind(HH_ASSISTANT)
        if rcut < 0:
            raise DataError(f"{where}: 'rejected' has no \"\\n\\nAssistant:\" turn; expected an HH transcript")
        rejected_answer = rejected[rcut + len(HH_ASSISTANT):]
    messages = [m for m in parse_hh(prompt_text, where) if m["content"] or m["role"] == "user"]
    if messages and messages[-1]["role"] == "assistant":
        messages.pop()  # the empty final "Assistant:" is the generation prompt
    return messages, chosen_answer.strip(), rejected_answer.strip()


def is_hh(record: dict[str, Any]) -> bool:
    return (not record.get("prompt") and isinstance(record.get("chosen"), str)
            and isinstance(record.get("rejected"), str) and HH_ASSISTANT in record["chosen"])


# --------------------------------------------------------------------------------------------------
# Rendering and masks
# --------------------------------------------------------------------------------------------------


_PROBE = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
          {"role": "user", "content": "And 4 + 4?"}, {"role": "assistant", "content": "8"}]
# Per tokenizer object: {name: (key, value)}. Rendering runs for every SFT/DPO/RL record and chat turn, so
# nothing here may cost O(vocabulary) per call (get_vocab() of a 150k vocabulary takes ~0.1 s).
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_NOTICED: set[tuple[str, str]] = set()


def tokenizer_cached(tokenizer: Any, name: str, key: Any, compute: Callable[[], Any]) -> Any:
    """`compute()`, remembered on the tokenizer object under `name` while `key` (cheap to build) is equal."""
    try:
        slots = _CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: computed each time
        return compute()
    hit = slots.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = compute()
    slots[name] = (key, value)
    return value


def control_tokens(tokenizer: Any) -> list[str]:
    """The tokenizer's special tokens (eos, pad, chat markers, ...), longest first."""
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    specials |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    return sorted((t for t in specials if t), key=lambda t: (-len(t), t))


def _is_token(tokenizer: Any, token: str) -> bool:
    return in_vocabulary(tokenizer, token) and len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1


def fallback_template(tokenizer: Any) -> str:
    """ChatML with `<|im_end|>` when that is one token of the vocabulary, else ChatML whose turns end with
    the tokenizer's eos (a token the model has and generation stops on; no embedding row is added)."""
    if _is_token(tokenizer, IM_END) or tokenizer.eos_token is None:
        return CHATML_TEMPLATE
    return CHATML_EOS_TEMPLATE


def effective_chat_template(tokenizer: Any) -> str:
    """The one chat template SFT, DPO, RL prompts, chat and export use: the tokenizer's own when it
    renders a probe conversation prefix-consistently, else `fallback_template` (said once, in one line).
    Decided once per tokenizer object (again when its chat_template, eos, bos or length change)."""
    own = getattr(tokenizer, "chat_template", None)
    own = own if isinstance(own, str) and own else None
    key = (own, tokenizer.eos_token, tokenizer.bos_token, len(tokenizer))
    return tokenizer_cached(tokenizer, "effective_chat_template", key, lambda: _choose_template(tokenizer, own))


def _choose_template(tokenizer: Any, own: str | None) -> str:
    if own is None:
        return fallback_template(tokenizer)
    try:
        if _spans(tokenizer, _PROBE, own) is not None:
            return own
    except DataError:
        pass
    name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    if (name, own) not in _NOTICED:
        _NOTICED.add((name, own))
        print(f"notice: the chat template of {name} does not render conversations prefix-consistently; "
              f"training and chat use ChatML instead", file=sys.stderr)
    return fallback_template(tokenizer)


def render(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool = False,
           template: str | None = None) -> str:
    """Chat-template text of the messages (default: `effective_chat_template(tokenizer)`)."""
    if not messages and not add_generation_prompt:
        return ""
    template = template or effective_chat_template(tokenizer)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             chat_template=template)
    except Exception as e:
        if not messages:
            return ""  # some templates cannot render an empty conversation
        raise DataError(f"chat template: cannot render the conversation ({str(e).splitlines()[0]})") from None


def _spans(tokenizer: Any, messages: list[dict[str, str]], template: str
           ) -> tuple[str, list[tuple[int, int]]] | None:
    text = render(tokenizer, messages, template=template)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True, template=template)
        after = render(tokenizer, messages[:i + 1], template=template).rstrip()
        if not (after.startswith(before) and text.startswith(after)):
            return None
        if m["content"].strip():  # an empty answer teaches nothing but the end-of-turn: not trained
            spans.append((len(before), len(after)))
    return text, spans


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]], template: str | None = None
                    ) -> tuple[str, list[tuple[int, int]]] | None:
    """Full text and the character spans (answer + end-of-turn) of every non-empty assistant turn; None
    when the template does not render prefixes consistently."""
    return _spans(tokenizer, messages, template or effective_chat_template(tokenizer))


def content_ranges(tokenizer: Any, messages: list[dict[str, str]], text: str, template: str | None = None,
                   add_generation_prompt: bool = False) -> list[tuple[int, int]] | None:
    """Character ranges of the messages' contents in `text` (their rendering), found by rendering the
    conversation with placeholders; None when the template changes content beyond stripping it."""
    marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
    skeleton = render(tokenizer, [{**m, "content": mark} for m, mark in zip(messages, marks)],
                      add_generation_prompt=add_generation_prompt, template=template)
    pieces = re.split("(\ue000\\d+\ue001)", skeleton)
    pos, ranges = 0, []
    for k, piece in enumerate(pieces):
        if k % 2 == 0:
            if not text.startswith(piece, pos):
                return None
            pos += len(piece)
            continue
        content, following = messages[int(piece[1:-1])]["content"], pieces[k + 1]
        for cand in (content, content.strip()):
            if text.startswith(cand, pos) and text.startswith(following, pos + len(cand)):
                ranges.append((pos, pos + len(cand)))
                pos += len(cand)
                break
        else:
            return None
    return ranges if pos == len(text) else None


def _encode_plain(tokenizer: Any, text: str, split_special: bool) -> tuple[list[int], list[tuple[int, int]]]:
    kw = {"split_special_tokens": True} if split_special else {}
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, **kw)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    # Slow tokenizers have no offsets: measure each token's end by decoding growing prefixes.
    ids = tokenizer(text, add_special_tokens=False, **kw)["input_ids"]
    offsets, prev = [], 0
    for k in range(1, len(ids) + 1):
        end = len(tokenizer.decode(ids[:k]))
        offsets.append((prev, end))
        prev = end
    return ids, offsets


def encode_text(tokenizer: Any, text: str, ranges: list[tuple[int, int]] = ()
                ) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of `text`; control tokens written inside `ranges` (message
    content) are encoded as plain text, those outside (the template's markers) as special tokens."""
    cuts = []
    controls = [t for t in control_tokens(tokenizer) if any(t in text[a:b] for a, b in ranges)]
    for a, b in ranges if controls else ():
        k = a
        while True:  # the next control token inside [a, b) (longest first where several start at one place)
            found = [(i, -len(t), t) for t in controls if 0 <= (i := text.find(t, k, b))]
            if not found:
                break
            i, _, hit = min(found)
            cuts.append((i, i + len(hit)))
            k = i + len(hit)
    if not cuts:
        return _encode_plain(tokenizer, text, False)
    ids, offsets, pos = [], [], 0
    for a, b in [*cuts, (len(text), len(text))]:
        for chunk_start, chunk_end, split in ((pos, a, False), (a, b, True)):
            if chunk_end > chunk_start:
                i, o = _encode_plain(tokenizer, text[chunk_start:chunk_end], split)
                ids += i
                offsets += [(s + chunk_start, e + chunk_start) for s, e in o]
        pos = b
    return ids, offsets


def _has_controls(tokenizer: Any, contents: list[str]) -> bool:
    controls = control_tokens(tokenizer)
    return any(t in c for c in contents for t in controls)


def encode_rendered(tokenizer: Any, messages: list[dict[str, str]], text: str, template: str | None = None,
                    add_generation_prompt: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
    """`encode_text` of `text`, the rendering of `messages`, with the messages' contents as plain text."""
    if not _has_controls(tokenizer, [m["content"] for m in messages]):
        return _encode_plain(tokenizer, text, False)
    ranges = content_ranges(tokenizer, messages, text, template, add_generation_prompt)
    if ranges is None:  # the template transforms content: its control tokens cannot be told apart
        _refuse_controls(tokenizer, messages)
    return encode_text(tokenizer, text, ranges)


def _refuse_controls(tokenizer: Any, messages: list[dict[str, str]]) -> None:
    controls = control_tokens(tokenizer)
    for j, m in enumerate(messages):
        hit = next((t for t in controls if t in m["content"]), None)
        if hit:
            raise DataError(f"message {j} ({m['role']}): its content holds the control token {hit!r}, which this "
                            f"chat template cannot keep apart from its own markers; remove it from the data")
    raise AssertionError("unreachable")  # pragma: no cover


def encode_messages(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool = False,
                    template: str | None = None) -> list[int]:
    """Token ids of the rendered conversation (what chat and RL prompts feed the model)."""
    text = render(tokenizer, messages, add_generation_prompt=add_generation_prompt, template=template)
    return encode_rendered(tokenizer, messages, text, template, add_generation_prompt)[0]


def encode_chat(tokenizer: Any, messages: list[dict[str, str]], max_len: int | None = None
                ) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels: the id on non-empty assistant turns (end-of-turn
    included), -100 elsewhere. Truncated on the right to `max_len`."""
    template = effective_chat_template(tokenizer)
    found = _spans(tokenizer, messages, template)
    if found is None:  # this conversation renders inconsistently even so: ChatML for it
        template = fallback_template(tokenizer)
        found = _spans(tokenizer, messages, template)
    text, spans = found
    ids, offsets = encode_rendered(tokenizer, messages, text, template)
    labels = []
    for tid, (s, e) in zip(ids, offsets):
        inside = any(s < b and e > a for a, b in spans)
        labels.append(tid if inside else IGNORE_INDEX)
    if max_len is not None:
        ids, labels = ids[:max_len], labels[:max_len]
    return ids, labels


def right_pad(rows: list[list[int]], value: int, length: int | None = None):
    """(B, T) LongTensor of the rows padded on the right with `value` to `length` (default: the longest)."""
    import torch

    length = length or max(len(r) for r in rows)
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out
