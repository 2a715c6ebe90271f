"""Data loader throughput: `llmlab.data.pretrain.PretrainBatches` on `bundled:shakespeare` (tokenize, pack
into (batch, seq) blocks) vs what one training step consumes.

    OMP_NUM_THREADS=2 .venv/bin/python bench/loader.py            # prints JSON
    OMP_NUM_THREADS=2 .venv/bin/python bench/loader.py --train-tokens-per-s 1300

The loader's tokens/s is the median over several timed runs of `batches` consecutive batches from a
fresh iterator (tokenizing included); the first batch's latency (source loading) is reported apart.
The step's consumption is the LLM-Lab training tokens/s from `bench/train_step.py` (passed in by
`run_all.py`, or measured here with a short run when not given). Target: loader >= 20x the step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

BATCH, SEQ = 8, 256


def run(train_tokens_per_s: float | None = None, batches: int = 40, repeats: int = 3) -> dict[str, Any]:
    try:
        from llmlab.data.pretrain import PretrainBatches
    except ImportError as e:
        return {"bench": "loader", "skipped": f"llmlab.data.pretrain not available ({e})"}
    tok = common.bench_tokenizer()
    t0 = time.perf_counter()
    it = PretrainBatches(["bundled:shakespeare"], tok, seq_len=SEQ, batch_size=BATCH, seed=0)
    next(it)
    first = time.perf_counter() - t0
    rates = []
    for r in range(repeats):
        it = PretrainBatches(["bundled:shakespeare"], tok, seq_len=SEQ, batch_size=BATCH, seed=r + 1)
        next(it)  # source opened, first documents read
        t0 = time.perf_counter()
        for _ in range(batches):
            b = next(it)
        rates.append(batches * b["input_ids"].numel() / (time.perf_counter() - t0))
    loader = common.median(rates)
    if train_tokens_per_s is None:
        import train_step

        train_tokens_per_s = train_step.quick_tokens_per_s()
    return {"bench": "loader", "dataset": "bundled:shakespeare", "tokenizer": f"BPE {len(tok)} (trained here)",
            "batch": BATCH, "seq_len": SEQ, "batches_per_run": batches, "repeats": repeats,
            "first_batch_s": round(first, 2), "loader_tokens_per_s": round(loader),
            "train_step_tokens_per_s": round(train_tokens_per_s), "ratio": round(loader / train_tokens_per_s, 1),
            "target_ratio": 20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-tokens-per-s", type=float, default=None)
    a = p.parse_args()
    common.emit({"machine": common.machine(), **run(a.train_tokens_per_s)})


if __name__ == "__main__":
    main()
