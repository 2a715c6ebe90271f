"""See what the model will see: rendered text, token ids and which tokens carry loss.

    llm-lab data preview --kind sft --datasets "bundled:sft" --tokenizer runs/tok -n 3

Backend of `llm-lab data preview`. Text output shows each example's tokens with the loss-carrying ones
in brackets (`[7][<|im_end|>]`); for preference data the prompt, chosen and rejected parts separately.
`as_json=True` gives one JSON object per example instead (ids, labels and the rendered text), for tools.
Examples come from the training split, in the order training would read them for `seed`.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from llmlab.data.chat import IGNORE_INDEX
from llmlab.errors import DataError

Kind = Literal["pretrain", "sft", "preference", "prompt"]
KINDS = ("pretrain", "sft", "preference", "prompt")


def mark_loss(tokenizer: Any, ids: list[int], labels: list[int] | None = None) -> str:
    """Tokens joined as text, each loss-carrying token (label != -100) in brackets."""
    out = []
    for k, tid in enumerate(ids):
        piece = tokenizer.decode([tid])
        out.append(f"[{piece}]" if labels is not None and labels[k] != IGNORE_INDEX else piece)
    return "".join(out)


def _examples(kind: str, datasets: Any, tokenizer: Any, n: int, seq_len: int, seed: int) -> list[dict[str, Any]]:
    if kind == "pretrain":
        from llmlab.data.pretrain import PretrainBatches

        batches = PretrainBatches(datasets, tokenizer, seq_len, 1, seed=seed)
        rows = [next(batches)["input_ids"][0].tolist() for _ in range(n)]
        return [{"input_ids": r, "labels": r} for r in rows]
    if kind == "sft":
        from llmlab.data.sft import SFTBatches

        it = SFTBatches(datasets, tokenizer, seq_len, 1, seed=seed)
    elif kind == "preference":
        from llmlab.data.preference import PreferenceBatches

        it = PreferenceBatches(datasets, tokenizer, seq_len, 1, seed=seed)
    else:
        from llmlab.data.prompts import PromptBatches

        it = PromptBatches(datasets, tokenizer, 1, max_prompt_len=seq_len, seed=seed)
    return [it.next_example() for _ in range(n)]


def _describe(kind: str, tokenizer: Any, ex: dict[str, Any], as_json: bool) -> str:
    if kind in ("pretrain", "sft"):
        labels = ex["labels"]
        loss = sum(1 for label in labels if label != IGNORE_INDEX)
        if as_json:
            return json.dumps({"kind": kind, "text": tokenizer.decode(ex["input_ids"]), "input_ids": ex["input_ids"],
                               "labels": labels, "loss_tokens": loss}, ensure_ascii=False)
        return (f"--- {kind}: {len(ex['input_ids'])} tokens, {loss} with loss (in brackets)\n"
                f"{mark_loss(tokenizer, ex['input_ids'], labels)}\nids: {ex['input_ids']}")
    if kind == "preference":
        if as_json:
            return json.dumps({"kind": kind, **{k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")},
                               "prompt": tokenizer.decode(ex["prompt_ids"]),
                               "chosen": tokenizer.decode(ex["chosen_ids"]),
                               "rejected": tokenizer.decode(ex["rejected_ids"])}, ensure_ascii=False)
        parts = [f"--- preference: prompt {len(ex['prompt_ids'])} tokens (no loss)",
                 tokenizer.decode(ex["prompt_ids"]), f"ids: {ex['prompt_ids']}"]
        for side in ("chosen", "rejected"):
            ids = ex[f"{side}_ids"]
            parts += [f"{side} ({len(ids)} tokens, all with loss): {mark_loss(tokenizer, ids, ids)}", f"ids: {ids}"]
        return "\n".join(parts)
    extras = {k: v for k, v in ex.items() if k not in ("prompt", "prompt_ids", "prompt_messages")}
    if as_json:
        return json.dumps({"kind": kind, **ex}, ensure_ascii=False, default=str)
    return (f"--- prompt: {len(ex['prompt_ids'])} tokens; extra columns: {json.dumps(extras, default=str)}\n"
            f"{ex['prompt']}\nids: {ex['prompt_ids']}")


def preview(kind: str, datasets: Any, tokenizer_name: Any, n: int = 5, as_json: bool = False, *,
            seq_len: int = 512, seed: int = 42) -> list[str]:
    """Describe the first `n` training examples of `kind` as the model would get them; one string each.

    `tokenizer_name` is a name/path for `load_tokenizer` or an already loaded tokenizer.
    """
    if kind not in KINDS:
        raise DataError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    if n < 1:
        raise DataError(f"n: must be >= 1, got {n}")
    if isinstance(tokenizer_name, str):
        from llmlab.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_name)
    else:
        tokenizer = tokenizer_name
    return [_describe(kind, tokenizer, ex, as_json) for ex in _examples(kind, datasets, tokenizer, n, seq_len, seed)]
