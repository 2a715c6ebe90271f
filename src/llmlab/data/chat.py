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
A template that does not render prefixes consistently (e.g. one that rewrites earlier turns) falls back
to ChatML for that conversation.
"""

from __future__ import annotations

import re
from typing import Any

from llmlab.data.tokenizer import CHATML_TEMPLATE
from llmlab.errors import DataError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
SFT_FORMATS = ("'messages' (list of {role, content}), 'instruction' + 'response' (optional 'input'), "
               "or 'prompt' + 'completion'")
IGNORE_INDEX = -100
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")
HH_ASSISTANT = "\n\nAssistant:"


def _keys(record: dict[str, Any]) -> str:
    return ", ".join(sorted(record)) or "none"


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """Validate a message list (also ShareGPT `from`/`value`) and return plain {role, content} dicts."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {j} is not an object with role and content")
        role = m.get("role", SHAREGPT_ROLES.get(str(m.get("from", "")).lower()))
        content = m.get("content", m.get("value"))
        if role not in ROLES:
            raise DataError(f"{where}: message {j} has role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {j} ({role}) has no text content")
        out.append({"role": role, "content": content})
    return out


def _as_messages(value: Any, role: str, where: str) -> list[dict[str, str]]:
    """A prompt or answer that is either a string or already a message list."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return check_messages(value, where)


def instruction_text(record: dict[str, Any]) -> str:
    extra = record.get("input")
    return f"{record['instruction']}\n\n{extra}" if isinstance(extra, str) and extra.strip() else record["instruction"]


def sft_messages(record: dict[str, Any], where: str = "record") -> list[dict[str, str]]:
    """The conversation of an SFT record in any of the three formats (detected per record)."""
    if "messages" in record or "conversations" in record:
        messages = check_messages(record.get("messages", record.get("conversations")), where)
    elif isinstance(record.get("instruction"), str) and any(
            isinstance(record.get(k), str) for k in ("response", "output")):
        answer = record["response"] if isinstance(record.get("response"), str) else record["output"]
        messages = [{"role": "user", "content": instruction_text(record)}, {"role": "assistant", "content": answer}]
    elif "prompt" in record and "completion" in record:
        messages = (_as_messages(record["prompt"], "user", where)
                    + _as_messages(record["completion"], "assistant", where))
    else:
        raise DataError(f"{where}: no known SFT format (keys: {_keys(record)}); expected {SFT_FORMATS}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant message to learn from")
    return messages


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


def render(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool = False,
           template: str | None = None) -> str:
    """Chat-template text of the messages (the tokenizer's template, or ChatML when it has none)."""
    if not messages and not add_generation_prompt:
        return ""
    template = template or getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             chat_template=template)
    except Exception as e:
        if not messages:
            return ""  # some templates cannot render an empty conversation
        raise DataError(f"chat template: cannot render the conversation ({str(e).splitlines()[0]})") from None


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]], template: str | None = None
                    ) -> tuple[str, list[tuple[int, int]]] | None:
    """Full text and the character spans (answer + end-of-turn) of every assistant turn; None when the
    template does not render prefixes consistently."""
    text = render(tokenizer, messages, template=template)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True, template=template)
        after = render(tokenizer, messages[:i + 1], template=template).rstrip()
        if not (after.startswith(before) and text.startswith(after)):
            return None
        spans.append((len(before), len(after)))
    return text, spans


def _token_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    # Slow tokenizers have no offsets: measure each token's end by tokenizing growing prefixes.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    offsets, prev = [], 0
    for k in range(1, len(ids) + 1):
        end = len(tokenizer.decode(ids[:k]))
        offsets.append((prev, end))
        prev = end
    return ids, offsets


def encode_chat(tokenizer: Any, messages: list[dict[str, str]], max_len: int | None = None
                ) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels: the id on assistant tokens (end-of-turn
    included), -100 elsewhere. Truncated on the right to `max_len`."""
    found = assistant_spans(tokenizer, messages)
    if found is None:
        found = assistant_spans(tokenizer, messages, template=CHATML_TEMPLATE)
    text, spans = found
    ids, offsets = _token_offsets(tokenizer, text)
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
