"""All CPU benchmarks (`make bench`): training step, generation, data loader, GRPO rollouts, RLHF scoring,
threads.

    OMP_NUM_THREADS=2 .venv/bin/python bench/run_all.py                 # what `make bench` runs
    .venv/bin/python bench/run_all.py --quick --only train,generation   # a subset, fewer repeats
    .venv/bin/python bench/run_all.py --out bench/results.json          # also write the JSON there

Threads come from `llmlab.device.set_threads()` (OMP_NUM_THREADS / LLMLAB_THREADS, else the cores this
process may use). The `threads` entry times one decode-heavy call at 1 thread and at the default,
interleaved, because on a shared 2-core machine two threads fighting a busy neighbour can be far slower
than one. Prints one JSON object at the end (each benchmark's own JSON as it finishes, on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
from llmlab.device import available_cores, set_threads  # noqa: E402

ALL = ("train", "generation", "loader", "grpo", "rl", "threads")


def threads_check(default: int) -> dict[str, Any]:
    from llmlab.generate import generate_tokens
    from llmlab.model import build_model

    torch.manual_seed(0)
    model = build_model(common.bench_config()).eval()
    ids = torch.randint(0, 8192, (1, 32))
    counts = sorted({1, default})

    def at(n: int):
        def fn():
            torch.set_num_threads(n)
            generate_tokens(model, ids, max_new_tokens=32, temperature=0.0)
        return fn

    times = common.interleaved({f"threads_{n}": at(n) for n in counts}, 3)
    torch.set_num_threads(default)
    out: dict[str, Any] = {"usable_cores": available_cores(), "default_threads": default,
                           "env_OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                           "env_LLMLAB_THREADS": os.environ.get("LLMLAB_THREADS")}
    out.update({k: {"decode_tokens_per_s": round(32 / common.median(v), 1)} for k, v in times.items()})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--only", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    a = p.parse_args()
    only = [x.strip() for x in a.only.split(",") if x.strip()]
    unknown = set(only) - set(ALL)
    if unknown:
        p.error(f"--only: unknown {sorted(unknown)}; choose from {', '.join(ALL)}")
    threads = set_threads()
    t0 = time.perf_counter()
    result: dict[str, Any] = {"machine": {**common.machine(), "loadavg_1m_start": round(os.getloadavg()[0], 2)}}

    def part(name: str, fn):
        start = time.perf_counter()
        result[name] = fn()
        result[name]["wall_s"] = round(time.perf_counter() - start, 1)
        print(json.dumps({name: result[name]}, indent=2), file=sys.stderr, flush=True)

    if "train" in only:
        import train_step

        part("train", lambda: train_step.run(a.quick))
    if "generation" in only:
        import generation

        part("generation", lambda: generation.run(a.quick, compile_=True))
    if "loader" in only:
        import loader

        train_tps = result.get("train", {}).get("ours", {}).get("tokens_per_s")
        part("loader", lambda: loader.run(train_tps))
    if "grpo" in only:
        import grpo_step

        part("grpo", lambda: grpo_step.run(a.quick))
    if "rl" in only:
        import rl_logprobs

        part("rl", lambda: rl_logprobs.run(a.quick))
    if "threads" in only:
        part("threads", lambda: threads_check(threads))
    result["machine"]["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
