"""RLHF scoring: the log-probs DPO, PPO and GRPO train on, LLM-Lab's way vs from the full logits.

    OMP_NUM_THREADS=2 .venv/bin/python bench/rl_logprobs.py            # prints JSON
    OMP_NUM_THREADS=2 .venv/bin/python bench/rl_logprobs.py --quick

LLM-Lab scores with `llmlab.train.losses.token_logprobs`: the LM head only on the positions that predict
a scored token, in chunks (checkpointed when there are several) so the (rows, V) logits never exist at
once. The other side is what a plain implementation does (and LLM-Lab did before): the head on every
position, `log_softmax`, gather. Both give the same numbers (tests/test_rlhf_dpo.py).

- `dpo_speed`: one forward+backward of DPO's summed log-probs (`preference_logps`, chosen and rejected
  in one pass), 4 pairs x 256 tokens, the first half of each sequence prompt, bench model (vocab 8,192),
  interleaved medians.
- `peak_mib_qwen_vocab`: peak memory of one forward+backward at Qwen's 151,936-token vocabulary, each in
  a fresh process: DPO (2 pairs x 512 tokens, half prompt) and PPO/GRPO's `response_logprobs`
  (16 sequences, 64 prompt + 128 response tokens).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
from llmlab.model import build_model  # noqa: E402
from llmlab.rlhf.dpo import preference_logps  # noqa: E402
from llmlab.rlhf.scoring import response_logprobs  # noqa: E402


def full_preference_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's summed log-probs from the full (2B, T, V) logits."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    logp = torch.log_softmax(model(ids)[:, :-1].float(), -1)
    keep = labels[:, 1:] != -100
    sums = (logp.gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1) * keep).sum(-1)
    n = batch["chosen_input_ids"].shape[0]
    return sums[:n], sums[n:]


def full_response_logprobs(model: torch.nn.Module, sequences: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """The response tokens' log-probs from the (B, N, V) logits of the response positions."""
    hidden = model(sequences, output_hidden=True)[:, prompt_len - 1:-1]
    logits = model.lm_head(hidden).float()
    return logits.gather(-1, sequences[:, prompt_len:, None]).squeeze(-1) - torch.logsumexp(logits, -1)


def dpo_batch(vocab: int, pairs: int, seq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2 * pairs, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    return {"chosen_input_ids": ids[:pairs], "chosen_labels": labels[:pairs],
            "rejected_input_ids": ids[pairs:], "rejected_labels": labels[pairs:]}


def model_for(vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(common.bench_config(vocab)).train()


def dpo_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], full: bool) -> None:
    chosen, rejected = (full_preference_logps if full else preference_logps)(model, batch)
    (chosen - rejected).sum().backward()


def child(args: list[str]) -> None:
    """Fresh-process peak memory of one forward+backward: what (dpo | response), side (ours | full)."""
    what, side = args
    model = model_for(common.QWEN_VOCAB)
    if what == "dpo":
        batch = dpo_batch(common.QWEN_VOCAB, 2, 512)
        base = common.rss_mib()
        dpo_step(model, batch, side == "full")
    else:
        seqs = torch.randint(0, common.QWEN_VOCAB, (16, 64 + 128), generator=torch.Generator().manual_seed(0))
        base = common.rss_mib()
        logp = full_response_logprobs(model, seqs, 64) if side == "full" else response_logprobs(model, seqs, 64)[0]
        logp.sum().backward()
    print(json.dumps({"peak_mib": round(common.peak_rss_mib() - base, 1)}))


def run(quick: bool = False) -> dict[str, Any]:
    repeats = 4 if quick else 8
    model, batch = model_for(common.BENCH_VOCAB), dpo_batch(common.BENCH_VOCAB, 4, 256)
    times = common.interleaved({"ours": lambda: dpo_step(model, batch, False),
                                "full_logits": lambda: dpo_step(model, batch, True)}, repeats)
    ms = {k: round(common.median(v) * 1e3, 1) for k, v in times.items()}
    result: dict[str, Any] = {
        "bench": "rl_logprobs",
        "dpo_speed": {"pairs": 4, "seq_len": 256, "prompt_share": 0.5, "vocab_size": common.BENCH_VOCAB,
                      "fwd_bwd_ms": ms, "speedup": round(ms["full_logits"] / ms["ours"], 3)},
        "peak_mib_qwen_vocab": {},
    }
    for what in ("dpo", "response"):
        mem = {side: common.peak_rss_of("rl_logprobs.py", [what, side]) for side in ("ours", "full")}
        result["peak_mib_qwen_vocab"][what] = {
            **{side: m.get("peak_mib", m.get("error")) for side, m in mem.items()},
            "ratio": (round(mem["ours"]["peak_mib"] / mem["full"]["peak_mib"], 3)
                      if "peak_mib" in mem["ours"] and "peak_mib" in mem["full"] else None)}
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    common.script_main(__doc__, run)


if __name__ == "__main__":
    main()
