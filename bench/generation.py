"""Generation with the KV cache: `llmlab.generate.generate_tokens` vs transformers' `generate()` on the
same weights (LlamaForCausalLM, converted with `llmlab.hf.llmlab_state_to_hf`), greedy, batch 1 and 8.

    OMP_NUM_THREADS=2 .venv/bin/python bench/generation.py            # prints JSON
    OMP_NUM_THREADS=2 .venv/bin/python bench/generation.py --compile  # also generate_tokens(compile=True)

Tokens/s = batch x new tokens / wall time of the whole call (prefill included). `sampled_batch_1`: batch 1
with temperature 0.7 and top-p 0.9 on both sides (speed only: the random streams differ);
`sampler_ms_qwen_vocab`: one such sampling step alone at Qwen's 151,936-token vocabulary. Both sides generate
exactly `new` tokens (no stop token), and the greedy tokens are checked to agree. With --compile the
compiled decode (`generate_tokens(..., compile=True)`: torch.compile over a static KV cache) is timed too;
its first call, which compiles, is reported apart as `compile_s`. On CPU, `compile=True` at 4+ rows runs
the eager decode with packed weights (faster there, `llmlab.model.decode`); `ours_compiled` turns that
off, so it always times the compiled decode.
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

PROMPT, NEW = 32, 64


def ours_fn(model, ids: torch.Tensor, new: int, compile_: bool = False):
    return lambda: generate_tokens(model, ids, max_new_tokens=new, temperature=0.0, compile=compile_).sequences


def hf_fn(hf, ids: torch.Tensor, new: int):
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(ids))
    return lambda: hf.generate(ids, **kw)


def run(quick: bool = False, compile_: bool = False, device: str = "cpu", dtype: torch.dtype = torch.float32,
        cfg=None, batches: tuple[int, ...] = (1, 8), new: int = NEW) -> dict[str, Any]:
    repeats = 3 if quick else 5
    cfg = cfg or common.bench_config()
    torch.manual_seed(0)
    model = build_model(cfg).to(device=device, dtype=dtype).eval()
    hf = common.hf_twin(model).to(dtype=dtype).eval()
    out: dict[str, Any] = {"bench": "generation", "prompt_len": PROMPT, "new_tokens": new, "greedy": True,
                           "repeats": repeats, "vocab_size": cfg.vocab_size, "dtype": str(dtype).replace("torch.", "")}
    for B in batches:
        ids = torch.randint(0, cfg.vocab_size, (B, PROMPT), generator=torch.Generator().manual_seed(B)).to(device)
        fns = {"ours": ours_fn(model, ids, new), "hf": hf_fn(hf, ids, new)}
        compile_s = None
        if compile_:  # the compiled decode itself (at 4+ rows on CPU compile=True decodes eagerly, packed)
            fns["ours_compiled"] = common.unpacked(ours_fn(model, ids, new, compile_=True))
            t0 = time.perf_counter()
            fns["ours_compiled"]()
            compile_s = round(time.perf_counter() - t0, 1)
        same = bool(torch.equal(fns["ours"]().cpu(), fns["hf"]().cpu()))
        times = common.interleaved(fns, repeats)
        row: dict[str, Any] = {}
        for name, t in times.items():
            s = common.median(t)
            row[name] = {"tokens_per_s": round(B * new / s, 1), "ms_per_token_step": round(1000 * s / new, 2)}
        row["speedup_vs_hf"] = round(row["ours"]["tokens_per_s"] / row["hf"]["tokens_per_s"], 2)
        if compile_:
            row["compiled_vs_eager"] = round(row["ours_compiled"]["tokens_per_s"] / row["ours"]["tokens_per_s"], 2)
            row["compiled_speedup_vs_hf"] = round(row["ours_compiled"]["tokens_per_s"] / row["hf"]["tokens_per_s"], 2)
            row["compile_s"] = compile_s
            row["compiled_tokens_match"] = bool(torch.equal(fns["ours_compiled"]().cpu(), fns["ours"]().cpu()))
        row["greedy_tokens_match_hf"] = same
        out[f"batch_{B}"] = row
    out["sampled_batch_1"] = sampled(model, hf, cfg, repeats, new, device)
    out["sampler_ms_qwen_vocab"] = sampler_ms(device)
    return out


def sampler_ms(device: str, vocab: int = common.QWEN_VOCAB, repeats: int = 15) -> dict[str, Any]:
    """One sampling of one row at Qwen's vocabulary with the chat defaults (temperature 0.7, top-p 0.9):
    `llmlab.generate.sample_next` vs HF's logits warpers and `torch.multinomial`, on logits as peaked as
    a trained model's (scale 8: a nucleus of a few tokens) and flatter (scale 2: hundreds), ms, medians."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    from llmlab.generate import sample_next

    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopPLogitsWarper(0.9)])
    ids = torch.zeros((1, 1), dtype=torch.long, device=device)
    out: dict[str, Any] = {"vocab_size": vocab}
    for name, scale in (("peaked", 8.0), ("flatter", 2.0)):
        logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(0)).to(device) * scale
        fns = {"ours": lambda x=logits: sample_next(x, 0.7, 0, 0.9),
               "hf": lambda x=logits: torch.multinomial(warpers(ids, x.clone()).softmax(-1), 1)}
        times = common.interleaved(fns, repeats)
        out[name] = {k: round(common.median(t) * 1e3, 3) for k, t in times.items()}
    return out


def sampled(model, hf, cfg, repeats: int, new: int, device: str) -> dict[str, Any]:
    """Batch 1 with the chat defaults' sampling (temperature 0.7, nucleus 0.9, no top-k) on both sides:
    speed only (the random streams differ)."""
    ids = torch.randint(0, cfg.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(7)).to(device)
    fns = {"ours": lambda: generate_tokens(model, ids, max_new_tokens=new, temperature=0.7, top_p=0.9),
           "hf": lambda: hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=0.7,
                                     top_p=0.9, top_k=0, pad_token_id=0, attention_mask=torch.ones_like(ids))}
    times = common.interleaved(fns, repeats)
    row: dict[str, Any] = {k: {"tokens_per_s": round(new / common.median(t), 1)} for k, t in times.items()}
    row["speedup_vs_hf"] = round(row["ours"]["tokens_per_s"] / row["hf"]["tokens_per_s"], 2)
    return row


def main() -> None:
    common.script_main(__doc__, run, {"compile": "also time generate_tokens(compile=True)"})


if __name__ == "__main__":
    main()
