"""SFT data: conversations in any of the three formats, rendered with the chat template, loss on answers.

    batches = SFTBatches(["bundled:sft"], tokenizer, seq_len=256, batch_size=8, seed=42)
    batch = next(batches)   # input_ids, labels, attention_mask: (B, T) long, right-padded

Formats (spec "SFT Dataset Format"), detected per record: `messages` (roles system/user/assistant; ShareGPT
`conversations` with from/value also works), `instruction`/`response` with optional `input` (alpaca's
`output` is accepted as the response), and `prompt`/`completion`. Labels are -100 everywhere except the
assistant turns, whose end-of-turn token (`<|im_end|>`) is included so the model learns to stop; every
assistant turn of a multi-turn conversation is trained (see `llmlab.data.chat`).

A record in no known format raises a one-line DataError naming its keys and the formats expected; with
`skip_invalid=True` it is skipped and counted in `skipped_invalid`. Examples truncated to `seq_len` so
far that no answer token is left are skipped and counted in `skipped_empty`.
"""

from __future__ import annotations

from typing import Any

import torch

from llmlab.data.chat import IGNORE_INDEX, encode_chat, right_pad, sft_messages
from llmlab.data.sources import RecordBatches


def encode_sft_example(record: dict[str, Any], tokenizer: Any, max_len: int | None = None,
                       where: str = "record") -> dict[str, list[int]]:
    """`{"input_ids", "labels"}` of one SFT record (labels -100 outside assistant turns)."""
    ids, labels = encode_chat(tokenizer, sft_messages(record, where), max_len)
    return {"input_ids": ids, "labels": labels}


class SFTBatches(RecordBatches):
    """Infinite, resumable iterator of right-padded SFT batches for one split and rank.

    Each batch is padded to its longest example (at most `seq_len`); pad positions have attention_mask 0
    and label -100. `skipped_invalid` counts records in no known format (with skip_invalid=True),
    `skipped_empty` examples truncated so far that no answer token was left.
    """

    def encode(self, record: dict[str, Any], where: str) -> dict[str, list[int]] | None:
        ex = encode_sft_example(record, self.tokenizer, self.seq_len, where=where)
        return None if all(label == IGNORE_INDEX for label in ex["labels"]) else ex

    def collate(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        ids = [e["input_ids"] for e in examples]
        return {
            "input_ids": right_pad(ids, self.tokenizer.pad_token_id),
            "labels": right_pad([e["labels"] for e in examples], IGNORE_INDEX),
            "attention_mask": right_pad([[1] * len(x) for x in ids], 0),
        }
