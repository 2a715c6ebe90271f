"""DPO preference data: a prompt and two answers, rendered so the answers are what the model would say.

    batches = PreferenceBatches(["bundled:preference"], tokenizer, seq_len=256, batch_size=8)
    batch = next(batches)   # chosen_/rejected_ input_ids, labels, attention_mask: (B, T), right-padded

Formats (spec "DPO Dataset Requirements"):
- `prompt` / `chosen` / `rejected` as strings, or as message lists (TRL's conversational layout; a
  chosen list may also hold the whole conversation, whose last assistant message is the answer);
- the Anthropic HH layout: `chosen` and `rejected` are whole transcripts "\\n\\nHuman: ...\\n\\nAssistant: ...";
  the prompt is the shared conversation up to and including the last "\\n\\nAssistant:", every earlier
  turn kept (as user/assistant messages), and the answers are what follows.

The prompt is rendered with the chat template and its generation prompt; each answer is the text the
template puts after it for an assistant message, ending with the end-of-turn token (`<|im_end|>`).
Labels are -100 on the prompt and on padding. A prompt longer than `max_prompt_len` keeps its last tokens
(DPO's `max_prompt_len`, as TRL's `max_prompt_length`); too long examples then lose prompt tokens from the
left first (the prompt keeps at least half of `max_len`), then answer tokens from the right.
"""

from __future__ import annotations

from typing import Any

import torch

from llmlab.data.chat import (
    IGNORE_INDEX,
    _has_controls,
    _refuse_controls,
    check_messages,
    content_ranges,
    effective_chat_template,
    encode_rendered,
    encode_text,
    fallback_template,
    is_hh,
    refuse_message_tree,
    render,
    right_pad,
    split_hh,
)
from llmlab.data.sources import RecordBatches, notice_once
from llmlab.errors import DataError

PREFERENCE_FORMATS = ("'prompt' + 'chosen' + 'rejected' (strings or message lists), HH transcripts in "
                      "'chosen' + 'rejected', or 'instruction' + 'chosen_response' + 'rejected_response'")


def _answer(value: Any, where: str, name: str) -> tuple[list[dict[str, str]] | None, str]:
    """(conversation before the answer or None, answer text) of a chosen/rejected value."""
    if isinstance(value, str):
        return None, value
    messages = check_messages(value, where, name)
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: {name} must end with an assistant message")
    return messages[:-1] or None, messages[-1]["content"]


def preference_parts(record: dict[str, Any], where: str = "record") -> tuple[list[dict[str, str]], str, str]:
    """(prompt messages, chosen answer, rejected answer) of a record in any supported layout."""
    refuse_message_tree(record, where)
    if "chosen" not in record and {"chosen_response", "rejected_response"} <= set(record):
        # argilla/ultrafeedback-binarized-preferences: instruction / chosen_response / rejected_response
        prompt = record.get("instruction", record.get("prompt"))
        if not isinstance(prompt, str) or not all(isinstance(record[k], str)
                                                  for k in ("chosen_response", "rejected_response")):
            raise DataError(f"{where}: 'instruction', 'chosen_response' and 'rejected_response' must be strings")
        return [{"role": "user", "content": prompt}], record["chosen_response"], record["rejected_response"]
    if "chosen" not in record or "rejected" not in record:
        raise DataError(f"{where}: no known preference format (keys: {', '.join(sorted(record)) or 'none'}); "
                        f"expected {PREFERENCE_FORMATS}")
    if is_hh(record):
        return split_hh(record["chosen"], record["rejected"], where)
    before, chosen = _answer(record["chosen"], where, "chosen")
    _, rejected = _answer(record["rejected"], where, "rejected")
    prompt = record.get("prompt")
    if isinstance(prompt, str) and prompt:
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt:
        messages = check_messages(prompt, where, "prompt")
    elif before:
        messages = before
    else:
        raise DataError(f"{where}: no prompt (keys: {', '.join(sorted(record))}); expected {PREFERENCE_FORMATS}")
    return messages, chosen, rejected


def _template_for(tokenizer: Any, prompt_messages: list[dict[str, str]], answer: str) -> str:
    """The effective chat template, or ChatML when it renders this conversation inconsistently."""
    template = effective_chat_template(tokenizer)
    prompt = render(tokenizer, prompt_messages, add_generation_prompt=True, template=template)
    full = render(tokenizer, [*prompt_messages, {"role": "assistant", "content": answer}], template=template)
    return template if full.rstrip().startswith(prompt) else fallback_template(tokenizer)


def answer_text(tokenizer: Any, prompt_messages: list[dict[str, str]], answer: str) -> tuple[str, str]:
    """(rendered prompt with generation prompt, the template's text for the answer incl. end-of-turn)."""
    template = _template_for(tokenizer, prompt_messages, answer)
    prompt = render(tokenizer, prompt_messages, add_generation_prompt=True, template=template)
    full = render(tokenizer, [*prompt_messages, {"role": "assistant", "content": answer}], template=template)
    return prompt, full.rstrip()[len(prompt):]


def encode_pair_side(tokenizer: Any, prompt_messages: list[dict[str, str]], answer: str
                     ) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids incl. end-of-turn); control tokens inside any content stay plain text."""
    template = _template_for(tokenizer, prompt_messages, answer)
    messages = [*prompt_messages, {"role": "assistant", "content": answer}]
    prompt = render(tokenizer, prompt_messages, add_generation_prompt=True, template=template)
    full = render(tokenizer, messages, template=template)
    prompt_ids = encode_rendered(tokenizer, prompt_messages, prompt, template, add_generation_prompt=True)[0]
    text = full.rstrip()[len(prompt):]
    ranges = []  # no control token in any content: the template's markers (end-of-turn) are the only ones
    if _has_controls(tokenizer, [m["content"] for m in messages]):
        found = content_ranges(tokenizer, messages, full, template)
        if found is None:  # the template transforms content: its control tokens cannot be told apart
            _refuse_controls(tokenizer, messages)
        a, b = found[-1]
        ranges = [(max(a - len(prompt), 0), min(b - len(prompt), len(text)))]
    return prompt_ids, encode_text(tokenizer, text, ranges)[0]


def encode_preference_example(record: dict[str, Any], tokenizer: Any, max_len: int | None = None,
                              where: str = "record") -> dict[str, list[int]]:
    """`{"prompt_ids", "chosen_ids", "rejected_ids"}`; prompt + answer fits in `max_len` tokens. A blank
    answer gives no ids (the pair is skipped): it would teach only the end-of-turn token."""
    messages, chosen, rejected = preference_parts(record, where)
    p, c = encode_pair_side(tokenizer, messages, chosen)
    r = encode_pair_side(tokenizer, messages, rejected)[1]
    c, r = (c if chosen.strip() else []), (r if rejected.strip() else [])
    return fit_pair({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}, max_len)


def fit_pair(example: dict[str, list[int]], max_len: int | None,
             max_prompt_len: int | None = None) -> dict[str, list[int]]:
    """Cut a pair to `max_len` tokens of prompt + the longer answer: the prompt loses its start (to its last
    `max_prompt_len` tokens, and keeping at least half of max_len when the answers are long), then the
    answers lose their ends. The same object when it fits."""
    p, c, r = example["prompt_ids"], example["chosen_ids"], example["rejected_ids"]
    if max_prompt_len is not None and len(p) > max_prompt_len:
        p = p[-max_prompt_len:]
        example = {**example, "prompt_ids": p}
    if max_len is None or len(p) + max(len(c), len(r)) <= max_len:
        return example
    keep = max(max_len - max(len(c), len(r)), max_len // 2)
    p = p[-keep:] if keep > 0 else []
    return {"prompt_ids": p, "chosen_ids": c[:max_len - len(p)], "rejected_ids": r[:max_len - len(p)]}


class PreferenceBatches(RecordBatches):
    """Infinite, resumable iterator of DPO batches for one split and rank.

    Yields `chosen_input_ids`, `chosen_labels`, `chosen_attention_mask` and the same for `rejected`, all
    padded to one length T, plus `prompt_lengths` (B,). Invalid records raise, or with
    `skip_invalid=True` are skipped and counted in `skipped_invalid`; pairs with an empty answer, or
    the same answer twice, are skipped and counted in `skipped_empty`.
    """

    truncated = 0  # pairs cut to max_prompt_len or seq_len in this process (said once, then counted)

    def __init__(self, datasets: Any, tokenizer: Any, seq_len: int | None, batch_size: int, *,
                 max_prompt_len: int | None = None, **kwargs: Any) -> None:
        super().__init__(datasets, tokenizer, seq_len, batch_size, **kwargs)
        self.max_prompt_len = max_prompt_len  # DPO's max_prompt_len: prompts keep their last tokens

    def encode(self, record: dict[str, Any], where: str) -> dict[str, list[int]] | None:
        whole = encode_preference_example(record, self.tokenizer, None, where=where)
        ex = fit_pair(whole, self.seq_len, self.max_prompt_len)
        if ex is not whole:
            self.truncated += 1
            answer = max(len(whole["chosen_ids"]), len(whole["rejected_ids"]))
            prompt = len(whole["prompt_ids"])
            kept_prompt = len(fit_pair(whole, None, self.max_prompt_len)["prompt_ids"])  # after max_prompt_len alone
            limits = [f"max_prompt_len={self.max_prompt_len} (the prompt)"] if kept_prompt < prompt else []
            if self.seq_len is not None and kept_prompt + answer > self.seq_len:
                limits.append(f"max_seq_len={self.seq_len}")
            notice_once("preference cut", self.records.stream.rank,
                        f"notice: data: a preference pair ({where}: prompt {prompt} + answer {answer} tokens) is "
                        f"longer than {' and '.join(limits)}; its prompt keeps its last "
                        f"{len(ex['prompt_ids'])} tokens and the answers their first "
                        f"{max(len(ex['chosen_ids']), len(ex['rejected_ids']))}. Further cuts are counted; raise "
                        f"those limits or shorten the data")
        # a blank answer, or the same answer on both sides (no preference to learn: its DPO gradient is
        # zero), is skipped and counted in skipped_empty
        usable = ex["chosen_ids"] and ex["rejected_ids"] and ex["chosen_ids"] != ex["rejected_ids"]
        return ex if usable else None

    def collate(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples)
        batch: dict[str, torch.Tensor] = {}
        for side in ("chosen", "rejected"):
            ids = [e["prompt_ids"] + e[f"{side}_ids"] for e in examples]
            labels = [[IGNORE_INDEX] * len(e["prompt_ids"]) + e[f"{side}_ids"] for e in examples]
            batch[f"{side}_input_ids"] = right_pad(ids, self.tokenizer.pad_token_id, length)
            batch[f"{side}_labels"] = right_pad(labels, IGNORE_INDEX, length)
            batch[f"{side}_attention_mask"] = right_pad([[1] * len(x) for x in ids], 0, length)
        batch["prompt_lengths"] = torch.tensor([len(e["prompt_ids"]) for e in examples], dtype=torch.long)
        return batch
