"""PPO/GRPO prompts: any supported record reduced to the conversation the policy must answer.

    prompts = PromptBatches(["bundled:prompts"], tokenizer, batch_size=8, max_prompt_len=128)
    batch = next(prompts)   # [{"prompt": rendered text, "prompt_ids": [...], "answer": "7", ...}, ...]

Reductions: `prompt` (string or message list) or `question` as the user turn; `instruction` (+ `input`);
`messages` without the final assistant answer(s); HH transcripts (`chosen`) up to the last
"\\n\\nAssistant:". The prompt is rendered with the chat template and its generation prompt. Every other
column of the record (a reference `answer`, a `task` name, ...) is passed on unchanged for reward
functions. Prompts longer than `max_prompt_len` tokens lose tokens from the left (the generation prompt
at the end is kept), and `prompt` is then the decoded kept tokens.
"""

from __future__ import annotations

from typing import Any

from llmlab.data.chat import (
    check_messages,
    encode_rendered,
    instruction_text,
    is_hh,
    refuse_message_tree,
    render,
    split_hh,
)
from llmlab.data.sources import RecordBatches, Split, notice_once
from llmlab.errors import DataError

PROMPT_KEYS = ("messages", "conversations", "prompt", "question", "instruction", "input", "chosen", "rejected")
PROMPT_FORMATS = "'prompt' or 'question', 'instruction' (+ 'input'), 'messages', or HH 'chosen' transcripts"


def prompt_messages(record: dict[str, Any], where: str = "record") -> list[dict[str, str]]:
    """The conversation up to (not including) the answer the policy should generate."""
    refuse_message_tree(record, where)
    if is_hh(record):
        return split_hh(record["chosen"], record.get("rejected", record["chosen"]), where)[0]
    if "messages" in record or "conversations" in record:
        messages = check_messages(record.get("messages", record.get("conversations")), where)
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise DataError(f"{where}: the conversation has no user turn to use as a prompt")
        return messages
    for key in ("prompt", "question"):
        value = record.get(key)
        if isinstance(value, str) and value:
            return [{"role": "user", "content": value}]
        if isinstance(value, list) and value:
            return check_messages(value, where)
    if isinstance(record.get("instruction"), str):
        return [{"role": "user", "content": instruction_text(record)}]
    raise DataError(f"{where}: no prompt found (keys: {', '.join(sorted(record)) or 'none'}); expected "
                    f"{PROMPT_FORMATS}")


def encode_prompt(record: dict[str, Any], tokenizer: Any, max_prompt_len: int | None = None,
                  where: str = "record") -> dict[str, Any]:
    """`{"prompt": rendered text, "prompt_ids": [...], "prompt_messages": [...], **other columns}` for one
    record; `prompt_messages` (the conversation before the answer) lets a reward model read the prompt as
    plain turns whatever the policy's chat template (`rlhf.rewards.RewardModel`)."""
    messages = prompt_messages(record, where)
    text = render(tokenizer, messages, add_generation_prompt=True)
    ids = list(encode_rendered(tokenizer, messages, text, add_generation_prompt=True)[0])
    extras = {k: v for k, v in record.items() if k not in PROMPT_KEYS}
    return fit_prompt({**extras, "prompt": text, "prompt_ids": ids, "prompt_messages": messages}, tokenizer,
                      max_prompt_len)


def fit_prompt(example: dict[str, Any], tokenizer: Any, max_prompt_len: int | None) -> dict[str, Any]:
    """The example with its prompt cut to its last `max_prompt_len` tokens (the text decoded from them);
    the same object when it fits."""
    ids = example["prompt_ids"]
    if max_prompt_len is None or len(ids) <= max_prompt_len:
        return example
    ids = ids[-max_prompt_len:]
    return {**example, "prompt": tokenizer.decode(ids), "prompt_ids": ids}


class PromptBatches(RecordBatches):
    """Infinite, resumable iterator of prompt batches (lists of dicts) for one split and rank."""

    def __init__(self, datasets: Any, tokenizer: Any, batch_size: int, *, max_prompt_len: int | None = None,
                 seed: int = 42, split: Split = "train", val_fraction: float = 0.02, rank: int = 0,
                 world_size: int = 1, skip_invalid: bool = False, streaming: bool | None = None) -> None:
        super().__init__(datasets, tokenizer, None, batch_size, seed=seed, split=split, val_fraction=val_fraction,
                         rank=rank, world_size=world_size, skip_invalid=skip_invalid, streaming=streaming)
        self.max_prompt_len = max_prompt_len

    truncated = 0  # prompts cut to max_prompt_len in this process (said once, then counted)

    def encode(self, record: dict[str, Any], where: str) -> dict[str, Any]:
        whole = encode_prompt(record, self.tokenizer, None, where=where)
        ex = fit_prompt(whole, self.tokenizer, self.max_prompt_len)
        if ex is not whole:
            self.truncated += 1
            notice_once("prompt cut", self.records.stream.rank,
                        f"notice: data: a prompt ({where}: {len(whole['prompt_ids'])} tokens) is longer than the "
                        f"{self.max_prompt_len} tokens it may have (min(max_prompt_len, max_seq_len - "
                        f"max_new_tokens)); it keeps its last {self.max_prompt_len}. Further cuts are counted; "
                        f"raise those limits or shorten the prompts")
        return ex

    def collate(self, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return examples
