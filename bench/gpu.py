"""The CUDA benchmarks behind `bench/gpu.sh`: a ~125M model (d_model 768, 12 layers, 12 heads, 4 KV heads,
d_ff 2048, vocab 32,000) in bf16 autocast, LLM-Lab vs transformers' LlamaForCausalLM on the same weights:
training tokens/s and MFU (eager and torch.compile, flash SDPA), generation tokens/s at batch 1 and 8
(eager, and `compile=True`: CUDA graphs), GRPO's batched rollouts vs one sequence at a time (the CPU
bench's model, `grpo_step.py`), and the chunked loss's peak memory at Qwen's vocabulary.

    bash bench/gpu.sh                               # on a CUDA machine; JSON to stdout and $OUT/gpu_bench.json
    python3 bench/gpu.py --dry-run                  # the same code paths on CPU with a tiny model

Imports only torch, transformers and llmlab (from src/). Every part is guarded: a part that fails is
reported as an error string in the JSON and the others still run; parts are skipped once the time budget
(BENCH_GPU_BUDGET_S, default 250 s) is spent, so the whole run stays under 5 minutes.
MFU = model FLOPs/s (6 x matmul params + 12 x layers x d_model x seq per token) / peak dense bf16
FLOP/s of the card (table by name; measured with a large bf16 matmul for unknown cards).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
from llmlab.model import build_model  # noqa: E402

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, by substring of the device name.
PEAK_BF16 = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12), ("A100", 312e12),
             ("L40S", 362e12), ("A10G", 70e12), ("L4", 121e12), ("4090", 165e12)]

START = time.perf_counter()
BUDGET = float(os.environ.get("BENCH_GPU_BUDGET_S", "250"))


def left() -> float:
    return BUDGET - (time.perf_counter() - START)


def guarded(name: str, fn, *args, need_s: float = 20, **kw) -> Any:
    if left() < need_s:
        return {"skipped": f"time budget spent ({BUDGET:.0f} s)"}
    t0 = time.perf_counter()
    try:
        out = fn(*args, **kw)
    except Exception as e:  # report and go on: one broken part must not hide the others
        traceback.print_exc(file=sys.stderr)
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
    print(f"[gpu bench] {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return out


def peak_flops(device: str) -> tuple[float, str]:
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    for key, flops in PEAK_BF16:
        if key in name:
            return flops, f"datasheet ({key})"
    n = 8192 if device == "cuda" else 512
    return common.matmul_peak_flops(n, dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                                    device=device), "measured matmul"


def model_config(dry: bool):
    if dry:
        return common.bench_config(vocab_size=512, max_seq_len=256, d_model=64, n_layers=2, n_heads=4,
                                   n_kv_heads=2, d_ff=128)
    return common.bench_config(vocab_size=32000, max_seq_len=2048, d_model=768, n_layers=12, n_heads=12,
                               n_kv_heads=4, d_ff=2048)


def sdpa_flash():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def train(cfg, device: str, batch: int, seq: int, peak: float, compile_: bool, steps: int) -> dict[str, Any]:
    """Interleaved medians of optimizer steps (AdamW fused on CUDA), bf16 autocast. Ours two ways:
    `ours_trainer` what `llmlab.train.loop` runs (`LMLoss`: the model to hidden states, then the chunked
    loss; compiled as one module), and eager `ours` (the full-logits loss after the model) or compiled
    `ours_whole` (the model and the full-logits loss in one compiled function, as HF's loss is inside its
    compiled forward)."""
    import train_step as ts
    from llmlab.train.loop import LMLoss

    torch.manual_seed(0)
    ours = build_model(cfg).to(device).train()
    hf = common.hf_twin(ours).to(device).train()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    fused = {"fused": True}  # CUDA and CPU (--dry-run) both have the fused kernel
    flash = sdpa_flash if device == "cuda" else contextlib.nullcontext
    fwd, hf_fwd = (torch.compile(ours), torch.compile(hf)) if compile_ else (ours, hf)
    trainer = LMLoss(ours)  # what llmlab.train.loop steps through; compiled whole with compile: true
    if compile_:
        trainer.compile()
    losses = {
        "ours_trainer": lambda: trainer(ids, ids) / (ids.numel() - ids.shape[0]),  # a sum over the label tokens
        "hf": lambda: hf_fwd(input_ids=ids, labels=ids).loss,
    }
    if compile_:  # the model compiled with its loss eager would cost another ~25 s compile: 0.92x HF in round 9
        whole = torch.compile(lambda x: ts.full_loss(ours(x), x))
        losses["ours_whole"] = lambda: whole(ids)
    else:
        losses["ours"] = lambda: ts.full_loss(fwd(ids), ids)
    runs = {}
    for name, loss_fn in losses.items():
        model = hf if name == "hf" else ours
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **fused)

        def step(opt=opt, loss_fn=loss_fn, name=name):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16), (contextlib.nullcontext() if name == "hf" else flash()):
                loss = loss_fn()
            loss.backward()
            opt.step()

        runs[name] = step
    times = common.interleaved(runs, steps, warmup=2 if compile_ else 1)
    flops_tok = common.train_flops_per_token(cfg, seq)
    out: dict[str, Any] = {"batch": batch, "seq_len": seq, "compiled": compile_, "ours_sdpa": "flash (forced)" if device == "cuda" else "default",
                           "hf_attn": "sdpa (default backend choice)"}
    for name, t in times.items():
        tps = batch * seq / common.median(t)
        out[name] = {"tokens_per_s": round(tps), "mfu": round(tps * flops_tok / peak, 3)}
    for name in ("ours", "ours_trainer", "ours_whole"):
        if name in out:
            out["speedup_vs_hf" if name == "ours" else f"{name}_vs_hf"] = round(out[name]["tokens_per_s"] / out["hf"]["tokens_per_s"], 3)
    return out


def chunk_sizes(cfg, device: str, batch: int, seq: int, budgets_mib: tuple[int, ...]) -> dict[str, Any]:
    """Compiled training steps of the trainer's loss form (the model to hidden states, then
    `causal_lm_loss`, in one compiled function) at several chunk budgets, and the model with the full-logits
    loss, interleaved medians in tokens/s (each compiles: ~25-40 s apiece on an H200)."""
    import train_step as ts
    from llmlab.train.losses import causal_lm_loss, default_chunk_rows

    torch.manual_seed(0)
    ours = build_model(cfg).to(device).train()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-5, fused=True)
    flash = sdpa_flash if device == "cuda" else contextlib.nullcontext
    n_labels = ids.numel() - batch

    def step_of(fn):
        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16), flash():
                loss = fn(ids)
            loss.backward()
            opt.step()
        return step

    runs, rows_of = {}, {}
    for mib in budgets_mib:
        rows = default_chunk_rows(cfg.vocab_size, mib * 2**20)
        rows_of[f"chunk_{mib}_mib"] = rows
        runs[f"chunk_{mib}_mib"] = step_of(torch.compile(
            lambda x, rows=rows: causal_lm_loss(ours(x, output_hidden=True), ours.lm_head, x, chunk_rows=rows)[0] / n_labels))
    runs["full_logits"] = step_of(torch.compile(lambda x: ts.full_loss(ours(x), x)))
    times = common.interleaved(runs, 6 if device == "cuda" else 2, warmup=2)
    return {"batch": batch, "seq_len": seq, "compiled": True,
            **{name: {"tokens_per_s": round(batch * seq / common.median(t)), "chunk_rows": rows_of.get(name)}
               for name, t in times.items()}}


def chunked_memory(cfg, device: str, batch: int, seq: int) -> dict[str, Any]:
    """Peak CUDA memory of one forward+backward with the full-logits loss vs the chunked loss, Qwen vocab."""
    import train_step as ts

    if device != "cuda":
        return {"skipped": "needs CUDA memory statistics"}
    chunked = ts.chunked_loss_fn()
    if chunked is None:
        return {"skipped": "llmlab.train.losses has no chunked loss"}
    big = common.bench_config(**{**{k: getattr(cfg, k) for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")},
                                 "vocab_size": common.QWEN_VOCAB, "max_seq_len": seq})
    torch.manual_seed(0)
    model = build_model(big).to(device).train()
    ids = torch.randint(0, big.vocab_size, (batch, seq), device=device)
    out = {"vocab_size": big.vocab_size, "batch": batch, "seq_len": seq}
    for name in ("full", "chunked"):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = chunked(model, model(ids, output_hidden=True), ids) if name == "chunked" else ts.full_loss(model(ids), ids)
        loss.backward()
        torch.cuda.synchronize()
        out[f"{name}_peak_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20)
    out["chunked_over_full"] = round(out["chunked_peak_mib"] / out["full_peak_mib"], 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model: check the code paths")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile runs")
    p.add_argument("--parts", default="train,generation,grpo,memory",
                   help="comma-separated subset to run; 'chunks' (not in the default) times compiled training at "
                        "several loss chunk sizes")
    a = p.parse_args()
    device = "cpu" if a.dry_run else "cuda"
    result: dict[str, Any] = {"bench": "gpu", "machine": common.machine(), "dry_run": a.dry_run}
    if device == "cuda" and not torch.cuda.is_available():
        result["skipped"] = "no CUDA device visible to torch"
        return finish(result)
    torch.backends.cuda.matmul.allow_tf32 = True
    peak, source = peak_flops(device)
    cfg = model_config(a.dry_run)
    from llmlab.model.estimate import count_parameters

    result.update(model={"d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                         "n_kv_heads": cfg.n_kv_heads, "d_ff": cfg.d_ff, "vocab_size": cfg.vocab_size,
                         "parameters": count_parameters(cfg)},
                  peak_bf16_tflops=round(peak / 1e12, 1), peak_source=source, dtype="bf16 autocast, fp32 weights")
    batch, seq, steps = (2, 64, 2) if a.dry_run else (16, 1024, 5)
    parts = set(a.parts.split(","))
    compile_ = not a.no_compile
    if "train" in parts:
        result["train_eager"] = guarded("train eager", train, cfg, device, batch, seq, peak, False, steps, need_s=30)
    if "train" in parts and compile_:  # three compiles, ~75 s on an H200
        result["train_compiled"] = guarded("train compiled", train, cfg, device, batch, seq, peak, True, steps,
                                           need_s=90)
    if "generation" in parts:
        import generation

        # compile=True on CUDA: each decode step replayed as a CUDA graph (llmlab.generate.graph_cache)
        result["generation"] = guarded("generation", generation.run, quick=True, compile_=compile_, device=device,
                                       dtype=torch.bfloat16 if device == "cuda" else torch.float32, cfg=cfg,
                                       new=32 if a.dry_run else 128, need_s=80 if compile_ else 40)
    if "grpo" in parts:  # (d): batched rollouts vs one sequence at a time (bench model, 16 sequences)
        import grpo_step

        result["grpo_rollout"] = guarded("grpo rollout", grpo_step.run, quick=True, device=device, need_s=30)
    if "memory" in parts:
        result["chunked_loss_memory"] = guarded("chunked memory", chunked_memory, cfg, device, 4, 1024, need_s=20)
    if "chunks" in parts:
        result["chunk_sizes"] = guarded("chunk sizes", chunk_sizes, cfg, device, batch, seq,
                                        (1, 4) if a.dry_run else (256, 1024, 4096), need_s=150)
    result["wall_s"] = round(time.perf_counter() - START, 1)
    finish(result)


def finish(result: dict[str, Any]) -> None:
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_bench.json").write_text(text + "\n")
        print(f"[gpu bench] wrote {Path(out) / 'gpu_bench.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
