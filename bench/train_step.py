"""Training step: LLM-Lab's transformer vs transformers' LlamaForCausalLM of the identical shape, same
weights, same optimizer (torch AdamW, fused: what LLM-Lab uses), same batch, fp32 on CPU; plus the chunked loss and
activation checkpointing, and their peak memory.

    OMP_NUM_THREADS=2 .venv/bin/python bench/train_step.py            # prints JSON
    OMP_NUM_THREADS=2 .venv/bin/python bench/train_step.py --quick    # fewer repeats
    OMP_NUM_THREADS=2 .venv/bin/python bench/train_step.py --quick --compile   # + torch.compile (minutes)

Tokens/s counts the batch's tokens (batch x seq) per optimizer step (zero_grad, forward, loss, backward,
AdamW step). MFU = model FLOPs/s (`common.train_flops_per_token`) over this machine's fp32 matmul peak
measured in the same run (the best of MKL and oneDNN). `ours_chunked_mkl` is the default step with
LLM-Lab's oneDNN products turned off (`llmlab.model.linear`), and `gemm_gflops` compares the two
libraries on the step's product shapes: together they show what oneDNN buys. `attention_fwd_bwd_ms`
times one layer's causal attention through SDPA and through `llmlab.model.causal_blocks`.
`sft_masked_prompts`: an SFT-shaped step (half of every sequence a -100 prompt), the trainer's step
(the LM head on the counted rows only) vs the same on every row vs HF. `--compile`
adds `compiled`: the trainer's step (`llmlab.train.loop.LMLoss`, model and chunked loss) eager and with
`compile: true` (the module compiled, as the trainer does), HF eager and compiled, interleaved, with
each compile's time. Peak memory
is the rise of a fresh process's high-water RSS over what the
model and optimizer objects held before the first step (activations, gradients, AdamW moments).
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
from llmlab.model import build_model  # noqa: E402

BATCH, SEQ = 8, 256


def chunked_loss_fn() -> Callable | None:
    """The project's chunked LM loss `(model, hidden, labels) -> loss`, adapted from
    `llmlab.train.losses` when it has landed; None otherwise."""
    try:
        losses = importlib.import_module("llmlab.train.losses")
    except ImportError:
        return None
    fn = getattr(losses, "chunked_cross_entropy", None) or getattr(losses, "chunked_lm_loss", None)
    if fn is None:
        return None
    params = list(inspect.signature(fn).parameters)

    def loss(model, hidden, labels):
        if params[0] in ("model", "lm_head", "head"):
            return fn(model.lm_head if params[0] != "model" else model, hidden, labels)
        return fn(hidden, model.lm_head.weight, labels)

    return loss


def full_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the full (B, T, V) logits."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))


def make_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)


def step_fn(kind: str, model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> Callable[[], float]:
    """One optimizer step for `kind` in ours | ours_chunked | ours_chunked_mkl | hf. `_mkl`: the same
    step with LLM-Lab's oneDNN products turned off (every product on MKL, as F.linear does)."""
    if kind.endswith("_mkl"):
        return without_onednn(step_fn(kind.removesuffix("_mkl"), model, opt, ids))
    chunked = chunked_loss_fn() if kind == "ours_chunked" else None

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        if kind == "hf":
            loss = model(input_ids=ids, labels=ids).loss
        elif chunked is not None:
            loss = chunked(model, model(ids, output_hidden=True), ids)
        else:
            loss = full_loss(model(ids), ids)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


# `step` with `llmlab.model.linear`'s oneDNN products turned off while it runs
without_onednn = common.with_attr("llmlab.model.linear", "_onednn", lambda *a, **kw: False)


def build(kind: str, vocab: int, checkpointing: bool = False):
    torch.manual_seed(0)
    model = build_model(common.bench_config(vocab))
    if kind == "hf":
        model = common.hf_twin(model)
        if checkpointing:
            model.gradient_checkpointing_enable()
    else:
        model.gradient_checkpointing = checkpointing
    model.train()
    return model, adamw(model)


def steps_child(args: list[str]) -> None:
    """Fresh-process step times: kind n. Applies LLM-Lab's CPU allocator setting first when
    LLMLAB_CPU_MALLOC says so (as CPU training does), then times n steps after two warm-up steps; prints
    the median step seconds and the minor page faults a step."""
    import resource
    import time

    from llmlab.device import tune_cpu_allocator

    kind, n = args[0], int(args[1])
    applied = tune_cpu_allocator()
    vocab = common.bench_config().vocab_size
    model, opt = build(kind, vocab)
    step = step_fn(kind, model, opt, make_batch(vocab, BATCH, SEQ))
    for _ in range(2):
        step()
    faults, times = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / n
    print(json.dumps({"step_s": common.median(times), "faults_per_step": round(faults), "tuned": applied}))


def allocator(rounds: int) -> dict[str, Any]:
    """The CPU allocator setting CPU training applies (`llmlab.device.tune_cpu_allocator`), on and off,
    for our step and HF's: fresh processes alternating (the setting is per process), `rounds` each,
    medians of their median step times. It applies to any PyTorch code in the process, HF's included; the
    in-process comparisons above run with glibc's default on both sides."""
    import os

    runs: dict[str, list[dict]] = {}
    for _ in range(rounds):
        for kind in ("ours_chunked", "hf"):
            for setting in ("default", "tuned"):
                os.environ["LLMLAB_CPU_MALLOC"] = setting
                try:
                    runs.setdefault(f"{kind}_{setting}", []).append(common.peak_rss_of("train_step.py", ["steps", kind, "5"]))
                finally:
                    os.environ.pop("LLMLAB_CPU_MALLOC", None)
    if any("error" in r for rs in runs.values() for r in rs):
        return {"error": next(r["error"] for rs in runs.values() for r in rs if "error" in r)}
    step = {k: common.median([r["step_s"] for r in rs]) for k, rs in runs.items()}
    out: dict[str, Any] = {"rounds": rounds, "tokens_per_s": {k: round(BATCH * SEQ / v) for k, v in step.items()},
                           "faults_per_step": {k: round(common.median([r["faults_per_step"] for r in rs]))
                                               for k, rs in runs.items()}}
    out["tuned_vs_default_ours"] = round(step["ours_chunked_default"] / step["ours_chunked_tuned"], 3)
    out["tuned_vs_default_hf"] = round(step["hf_default"] / step["hf_tuned"], 3)
    out["ours_tuned_vs_hf_default"] = round(step["hf_default"] / step["ours_chunked_tuned"], 3)
    return out


def child(args: list[str]) -> None:
    """Fresh-process peak memory: kind vocab batch checkpointing [fb]. Two optimizer steps (the second
    with the AdamW moments allocated); with `fb`, one forward+backward without an optimizer, so the
    loss's own memory (the logits) is not hidden under the optimizer state."""
    kind, vocab, batch, ckpt = args[0], int(args[1]), int(args[2]), args[3] == "1"
    fb_only = len(args) > 4 and args[4] == "fb"
    model, opt = build(kind, vocab, ckpt)
    ids = make_batch(vocab, batch, SEQ)
    base = common.rss_mib()
    if fb_only:
        chunked = chunked_loss_fn() if kind == "ours_chunked" else None
        loss = chunked(model, model(ids, output_hidden=True), ids) if chunked else full_loss(model(ids), ids)
        loss.backward()
    else:
        step = step_fn(kind, model, opt, ids)
        for _ in range(2):
            step()
    print(json.dumps({"peak_mib": round(common.peak_rss_mib() - base, 1)}))


def quick_tokens_per_s(repeats: int = 2) -> float:
    """LLM-Lab's training tokens/s alone (no comparison), for the loader benchmark."""
    cfg = common.bench_config()
    model, opt = build("ours", cfg.vocab_size)
    times = common.interleaved({"ours": step_fn("ours", model, opt, make_batch(cfg.vocab_size, BATCH, SEQ))}, repeats)
    return tokens_per_s(times["ours"])


def tokens_per_s(times: list[float], batch: int = BATCH, seq: int = SEQ) -> float:
    return batch * seq / common.median(times)


def run(quick: bool = False, compile_: bool = False) -> dict[str, Any]:
    repeats = 3 if quick else 7
    cfg = common.bench_config()
    peak = common.matmul_peak_flops()
    flops_tok = common.train_flops_per_token(cfg, SEQ)
    ids = make_batch(cfg.vocab_size, BATCH, SEQ)
    kinds = ["ours", "hf"] + (["ours_chunked", "ours_chunked_mkl"] if chunked_loss_fn() else [])
    steps = {}
    for kind in kinds:
        model, opt = build(kind, cfg.vocab_size)
        steps[kind] = step_fn(kind, model, opt, ids)
    times = common.interleaved(steps, repeats)
    tps = {k: tokens_per_s(v) for k, v in times.items()}
    speed = {k: {"tokens_per_s": round(v), "step_s_median": round(common.median(times[k]), 3),
                 "mfu": round(v * flops_tok / peak, 3)} for k, v in tps.items()}
    result: dict[str, Any] = {
        "bench": "train_step",
        "shape": {**common.SHAPE, "vocab_size": cfg.vocab_size, "seq_len": SEQ, "batch": BATCH,
                  "dtype": "float32", "optimizer": "torch AdamW fused", "hf_attn": "sdpa"},
        "fp32_matmul_peak_gflops": round(peak / 1e9, 1),
        "flops_per_token": round(flops_tok),
        "repeats": repeats,
        **speed,
        "speedup_vs_hf": round(tps["ours"] / tps["hf"], 3),
    }
    if "ours_chunked" in tps:
        result["speedup_chunked_vs_hf"] = round(tps["ours_chunked"] / tps["hf"], 3)
        result["speedup_chunked_vs_hf_paired"] = common.paired_speedup(times["ours_chunked"], times["hf"])
        result["speedup_chunked_mkl_vs_hf"] = round(tps["ours_chunked_mkl"] / tps["hf"], 3)
    else:
        result["chunked_loss"] = "skipped: llmlab.train.losses has no chunked loss yet"

    rows = BATCH * SEQ
    result["gemm_gflops"] = common.gemm_gflops([(rows, 384, 1024), (rows, 1024, 384), (rows, 384, 384),
                                                (rows, 384, 8192), (256, 384, 1024)])
    result["attention_fwd_bwd_ms"] = attention_fwd_bwd(repeats)

    # Peak memory, each in a fresh process.
    mem = {k: common.peak_rss_of("train_step.py", [k, str(cfg.vocab_size), str(BATCH), "0"]) for k in ("ours", "hf")}
    result["peak_mib"] = {k: v.get("peak_mib", v.get("error")) for k, v in mem.items()}
    result["memory_vs_hf"] = _ratio(mem["ours"], mem["hf"])

    # Chunked loss at Qwen's vocabulary (batch 4): one forward+backward, no optimizer state on top.
    if chunked_loss_fn():
        big = {k: common.peak_rss_of("train_step.py", [k, str(common.QWEN_VOCAB), "4", "0", "fb"])
               for k in ("ours", "ours_chunked")}
        result["qwen_vocab_batch4_fwd_bwd_peak_mib"] = {k: v.get("peak_mib", v.get("error")) for k, v in big.items()}
        result["chunked_memory_ratio"] = _ratio(big["ours_chunked"], big["ours"])
    result["gradient_checkpointing"] = checkpointing(cfg, repeats, ids)
    result["cpu_allocator"] = allocator(2 if quick else 3)
    result["sft_masked_prompts"] = sft_masked(cfg, repeats, ids)
    if compile_:
        result["compiled"] = compiled(cfg, 2 * repeats, ids)
    return result


def compiled(cfg, repeats: int, ids: torch.Tensor) -> dict[str, Any]:
    """The trainer's step (`LMLoss`: model + chunked loss, loss summed over tokens as the trainer does)
    eager vs `compile: true`, and HF eager vs compiled; tokens/s (interleaved medians), compile seconds."""
    import time

    from llmlab.train.loop import LMLoss

    steps, compile_s = {}, {}
    for kind in ("trainer", "trainer_compiled", "hf", "hf_compiled"):
        model, opt = build("hf" if kind.startswith("hf") else "ours", cfg.vocab_size)
        module = model if kind.startswith("hf") else LMLoss(model)
        if kind.endswith("_compiled"):
            module.compile()

        def step(module=module, opt=opt, hf=kind.startswith("hf")) -> float:
            opt.zero_grad(set_to_none=True)
            loss = module(input_ids=ids, labels=ids).loss if hf else module(ids, ids) / ids[:, 1:].numel()
            loss.backward()
            opt.step()
            return float(loss.detach())

        start = time.perf_counter()
        step()  # the first call compiles
        compile_s[kind] = round(time.perf_counter() - start, 1)
        steps[kind] = step
    times = common.interleaved(steps, repeats)
    tps = {k: tokens_per_s(v) for k, v in times.items()}
    return {"tokens_per_s": {k: round(v) for k, v in tps.items()}, "first_step_s": compile_s,
            "compiled_vs_eager": round(tps["trainer_compiled"] / tps["trainer"], 3),
            "compiled_vs_hf_compiled": round(tps["trainer_compiled"] / tps["hf_compiled"], 3),
            "hf_compiled_vs_hf": round(tps["hf_compiled"] / tps["hf"], 3)}


def sft_masked(cfg, repeats: int, ids: torch.Tensor) -> dict[str, Any]:
    """An SFT-shaped step: the first half of every sequence is prompt (labels -100). The trainer's step
    (`LMLoss` through `forward_backward`: the head on the counted rows only) vs the same with every row
    (`select_rows=False`, as under compile) vs HF with the same labels; tokens/s over all batch x seq."""
    from llmlab.train.loop import LMLoss, forward_backward

    labels = ids.clone()
    labels[:, : SEQ // 2] = -100
    batch = {"input_ids": ids, "labels": labels}
    steps = {}
    for kind in ("trainer", "trainer_all_rows", "hf"):
        model, opt = build("hf" if kind == "hf" else "ours", cfg.vocab_size)
        module = model if kind == "hf" else LMLoss(model)

        def step(module=module, opt=opt, kind=kind) -> None:
            opt.zero_grad(set_to_none=True)
            if kind == "hf":
                module(input_ids=ids, labels=labels).loss.backward()
            else:
                forward_backward(module, [batch], torch.device("cpu"), select_rows=kind == "trainer")
            opt.step()

        steps[kind] = step
    times = common.interleaved(steps, repeats)
    tps = {k: tokens_per_s(v) for k, v in times.items()}
    return {"prompt_share": 0.5, "tokens_per_s": {k: round(v) for k, v in tps.items()},
            "trainer_vs_all_rows": round(tps["trainer"] / tps["trainer_all_rows"], 3),
            "trainer_vs_hf": round(tps["trainer"] / tps["hf"], 3)}


def attention_fwd_bwd(repeats: int) -> dict[str, dict[str, float]]:
    """One layer's causal attention, forward + backward, 2,048 tokens (6 heads of 64, 2 KV heads):
    SDPA's CPU kernel vs `llmlab.model.causal_blocks` in the blocks the model uses, per sequence length."""
    return {f"T{T}": _attention_times(T, 3 * repeats) for T in (256, 512)}


def _attention_times(T: int, repeats: int) -> dict[str, float]:
    from llmlab.model.causal_blocks import block_causal_attention, rows_for

    B, rows = BATCH * SEQ // T, rows_for(T, 3)
    q, k, v = (torch.randn(B, T, h, 64).transpose(1, 2).requires_grad_() for h in (6, 2, 2))
    g = torch.randn(B, 6, T, 64)
    fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(g),
           "blocked": lambda: block_causal_attention(q, k, v, rows).backward(g)}
    times = common.interleaved(fns, repeats)
    return {name: round(common.median(t) * 1e3, 2) for name, t in times.items()}


def _ratio(a: dict, b: dict) -> float | None:
    if "peak_mib" in a and "peak_mib" in b and b["peak_mib"]:
        return round(a["peak_mib"] / b["peak_mib"], 3)
    return None


def checkpointing(cfg, repeats: int, ids: torch.Tensor) -> dict[str, Any]:
    """Speed and peak memory of `gradient_checkpointing: true` vs false (our model, full loss)."""
    steps = {}
    for flag in (False, True):
        model, opt = build("ours", cfg.vocab_size, flag)
        steps[f"checkpointing_{str(flag).lower()}"] = step_fn("ours", model, opt, ids)
    times = common.interleaved(steps, max(2, repeats - 2))
    mem = {flag: common.peak_rss_of("train_step.py", ["ours", str(cfg.vocab_size), str(BATCH), str(int(flag))])
           for flag in (False, True)}
    off, on = tokens_per_s(times["checkpointing_false"]), tokens_per_s(times["checkpointing_true"])
    return {"tokens_per_s_off": round(off), "tokens_per_s_on": round(on), "speed_ratio_on_off": round(on / off, 3),
            "peak_mib_off": mem[False].get("peak_mib"), "peak_mib_on": mem[True].get("peak_mib"),
            "memory_ratio_on_off": _ratio(mem[True], mem[False])}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1:3] == ["--child", "steps"]:
        return steps_child(sys.argv[3:])
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    common.script_main(__doc__, run, {"compile": "also time the trainer's compile: true and HF compiled"})


if __name__ == "__main__":
    main()
