"""GRPO rollouts: batched `generate_tokens` over prompts x group vs a loop generating one sequence at a
time; and one GRPO step (`llmlab.rlhf.grpo`) split into rollout, scoring and update.

    OMP_NUM_THREADS=2 .venv/bin/python bench/grpo_step.py   # prints JSON

The model is the benchmark shape (d_model 384, 6 layers, vocab 4096 from a BPE trained on
`bundled:shakespeare`); sampling at temperature 1 with a seeded generator and no stop token, so every
sequence generates exactly `new` tokens and both sides produce the same number of tokens.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
from llmlab.generate import generate_tokens  # noqa: E402
from llmlab.model import build_model  # noqa: E402

PROMPTS, GROUP, NEW = 4, 4, 32


def _prompts(tok) -> list[dict[str, Any]]:
    texts = ["To be, or not to be", "Now is the winter of our discontent", "All the world's a stage",
             "O Romeo, Romeo, wherefore art thou"]
    return [{"prompt": t, "prompt_ids": tok(t, add_special_tokens=False)["input_ids"]} for t in texts[:PROMPTS]]


def run(quick: bool = False, device: str = "cpu") -> dict[str, Any]:
    repeats = 2 if quick else 3
    tok = common.bench_tokenizer()
    cfg = common.bench_config(vocab_size=len(tok))
    torch.manual_seed(0)
    policy = build_model(cfg).to(device)
    examples = _prompts(tok)
    rows = [ex["prompt_ids"] for ex in examples for _ in range(GROUP)]
    n_tokens = len(rows) * NEW

    def batched():
        return generate_tokens(policy, rows, max_new_tokens=NEW, temperature=1.0, top_p=1.0,
                               generator=torch.Generator(device).manual_seed(0))

    @common.unpacked  # the compiled decode itself: at these 16 rows on CPU, compile=True decodes eagerly, packed
    def batched_compiled():  # compile=True (the warm-up round compiles)
        return generate_tokens(policy, rows, max_new_tokens=NEW, temperature=1.0, top_p=1.0,
                               generator=torch.Generator(device).manual_seed(0), compile=True)

    def one_at_a_time():
        g = torch.Generator(device).manual_seed(0)
        return [generate_tokens(policy, [r], max_new_tokens=NEW, temperature=1.0, top_p=1.0, generator=g) for r in rows]

    times = common.interleaved({"batched": batched, "batched_compiled": batched_compiled, "loop": one_at_a_time},
                               repeats)
    b, bc, loop = (n_tokens / common.median(times[k]) for k in ("batched", "batched_compiled", "loop"))
    out: dict[str, Any] = {
        "bench": "grpo_step", "prompts": PROMPTS, "group_size": GROUP, "sequences": len(rows), "new_tokens": NEW,
        "vocab_size": cfg.vocab_size, "repeats": repeats, "device": device,
        "rollout_tokens_per_s": {"batched": round(b, 1), "batched_compiled": round(bc, 1),
                                 "one_at_a_time": round(loop, 1)},
        "batched_speedup": round(b / loop, 2),
        "compiled_vs_eager": round(bc / b, 2),
    }
    out["grpo_step_split_s"] = grpo_split(policy, tok, examples, repeats, device)
    return out


def grpo_split(policy, tok, examples, repeats: int, device: str = "cpu") -> dict[str, Any]:
    """Median seconds of the three parts of one GRPO step as `GRPOStage.step` runs them."""
    try:
        from llmlab.rlhf.grpo import grpo_update
        from llmlab.rlhf.rollout import generate_rollout, score_rollout
        from llmlab.rlhf.scoring import build_reference
    except ImportError as e:
        return {"skipped": f"llmlab.rlhf.grpo not available ({e})"}
    reference = build_reference(policy)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5, fused=True)
    rows = [ex["prompt_ids"] for ex in examples for _ in range(GROUP)]

    def reward_fn(prompts, completions, **columns):  # cheap and deterministic: favours longer words
        return [sum(len(w) for w in c.split()) / max(1, len(c.split())) for c in completions]

    parts: dict[str, list[float]] = {"rollout": [], "of_which_generation": [], "scoring": [], "update": []}
    def now() -> float:  # wall time once the device's queued work is done
        common.sync()
        return time.perf_counter()

    for r in range(repeats):
        t0 = now()
        generate_tokens(policy, rows, max_new_tokens=NEW, temperature=1.0, top_p=1.0,
                        generator=torch.Generator(device).manual_seed(r))
        t1 = now()
        rollout = generate_rollout(policy, rows, max_new_tokens=NEW, temperature=1.0, top_p=1.0,
                                   generator=torch.Generator(device).manual_seed(r), reference=reference)
        t2 = now()
        rewards, _ = score_rollout(reward_fn, tok, examples, rollout, [], repeat=GROUP)
        t3 = now()
        policy.train()
        grpo_update(policy, opt, rollout, rewards, group_size=GROUP, clip_range=0.2, kl_coef=0.04, ppo_epochs=1,
                    mini_batch_size=PROMPTS, temperature=1.0)
        t4 = now()
        for k, v in zip(parts, (t2 - t1, t1 - t0, t3 - t2, t4 - t3)):
            parts[k].append(v)
    med = {k: round(common.median(v), 3) for k, v in parts.items()}
    total = med["rollout"] + med["scoring"] + med["update"]
    med["step_total"] = round(total, 3)
    med["note"] = ("rollout = generate_rollout (sampling + policy and reference log-prob passes); "
                   "of_which_generation = generate_tokens alone, timed separately")
    return med


def main() -> None:
    common.script_main(__doc__, run)


if __name__ == "__main__":
    main()
