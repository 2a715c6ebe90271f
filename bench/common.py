"""Shared pieces of the benchmarks: the benchmark shape, the Hugging Face twin with the same weights,
interleaved timing with medians, this machine's fp32 matmul peak, peak memory of a fresh process.

    .venv/bin/python bench/common.py   # prints the machine description and the measured matmul peak

Every comparison runs both sides in one process, alternating A, B, A, B ... so that a neighbour's load
hits both sides alike, and reports medians. Peak memory is measured in a fresh child process per side
(`peak_rss_of`), because the allocator keeps freed memory and a process's peak never goes down.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from llmlab.config import ModelConfig  # noqa: E402

# The small model: d_model 384, 6 layers, 6 heads (head_dim 64), 2 KV heads, d_ff 1024.
SHAPE = dict(d_model=384, n_layers=6, n_heads=6, n_kv_heads=2, d_ff=1024, attention_type="gqa",
             positional_encoding="rope", norm_type="rmsnorm", activation="swiglu", tie_embeddings=False)
BENCH_VOCAB = 8192  # speed runs; the chunked-loss memory run uses Qwen's 151,936
QWEN_VOCAB = 151_936


def bench_config(vocab_size: int = BENCH_VOCAB, max_seq_len: int = 512, **overrides: Any) -> ModelConfig:
    return ModelConfig(tokenizer_name="bench", vocab_size=vocab_size, max_seq_len=max_seq_len,
                       **{**SHAPE, **overrides})


def bench_tokenizer(vocab_size: int = 4096, max_docs: int = 400):
    """A byte-level BPE trained on `bundled:shakespeare` (offline), cached in the temp folder across runs."""
    import tempfile

    from llmlab.data.tokenizer import load_tokenizer, train_tokenizer

    folder = Path(tempfile.gettempdir()) / f"llmlab-bench-tokenizer-{vocab_size}-{max_docs}"
    if (folder / "tokenizer.json").is_file():
        return load_tokenizer(str(folder))
    return train_tokenizer(["bundled:shakespeare"], vocab_size, folder, max_docs=max_docs)


def hf_twin(model: torch.nn.Module, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """transformers' LlamaForCausalLM of the same shape holding the same weights (converted through
    `llmlab.hf.llmlab_state_to_hf`)."""
    import transformers

    from llmlab.hf import llmlab_state_to_hf

    cfg = model.config
    hf_cfg = transformers.LlamaConfig(
        hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, attn_implementation=attn_implementation,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = transformers.LlamaForCausalLM(hf_cfg)
    hf.load_state_dict(llmlab_state_to_hf(model.state_dict()), strict=True)
    return hf.to(next(model.parameters()).device)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall seconds of each callable, run round-robin `repeats` times after `warmup` untimed rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_speedup(ours: list[float], theirs: list[float]) -> dict[str, float]:
    """Speed ratio round by round (their time / ours, from `interleaved`'s adjacent calls): the median and
    the quartiles. Drift of the machine between rounds cancels in each pair, which the ratio of the two
    medians does not guarantee."""
    ratios = sorted(t / o for o, t in zip(ours, theirs))
    q1, q2, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return {"median": round(q2, 3), "q1": round(q1, 3), "q3": round(q3, 3), "pairs": len(ratios)}


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def matmul_peak_flops(n: int = 2048, repeats: int = 7, dtype: torch.dtype = torch.float32,
                      device: str = "cpu") -> float:
    """This machine's practical matmul throughput (FLOP/s): the best of `repeats` n x n x n products
    (the best, not the median: the peak is what the hardware can do when the neighbours let it). On CPU
    in fp32 the best of MKL (`a @ b`) and oneDNN (`llmlab.model.linear.matmul_t`, faster on this AMD
    machine), so the MFU of a model using either stays a fraction of what the machine reaches."""
    from llmlab.model.linear import matmul_t

    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    products = [lambda: a @ b]
    if device == "cpu" and dtype == torch.float32:
        products.append(lambda: matmul_t(a, b))
    best = float("inf")
    for product in products:
        product()
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            product()
            sync()
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def gemm_gflops(shapes: list[tuple[int, int, int]], repeats: int = 9) -> dict[str, dict[str, float]]:
    """fp32 CPU GFLOP/s of x (M, K) @ W (N, K)^T through MKL (`F.linear`) and through oneDNN
    (`llmlab.model.linear.matmul_t`), interleaved medians, per "MxKxN"."""
    import torch.nn.functional as F

    from llmlab.model.linear import matmul_t, onednn_ready

    out: dict[str, dict[str, float]] = {}
    for M, K, N in shapes:
        x, w = torch.randn(M, K), torch.randn(N, K)
        fns = {"mkl": lambda x=x, w=w: F.linear(x, w)}
        if onednn_ready():
            fns["onednn"] = lambda x=x, w=w: matmul_t(x, w)
        times = interleaved(fns, repeats)
        out[f"{M}x{K}x{N}"] = {k: round(2 * M * K * N / median(v) / 1e9, 1) for k, v in times.items()}
    return out


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs per trained token (forward + backward): 6 x matmul parameters (every linear layer
    and the LM head; not the embedding lookup) + 12 x layers x d_model x seq_len for attention scores
    and values (PaLM's convention, no discount for causality)."""
    d, L, hd = cfg.d_model, cfg.n_layers, cfg.head_dim
    attn = d * cfg.n_heads * hd + 2 * d * cfg.n_kv_heads * hd + cfg.n_heads * hd * d
    mlp = (3 if cfg.activation == "swiglu" else 2) * d * cfg.d_ff
    n_matmul = L * (attn + mlp) + d * cfg.vocab_size
    return 6 * n_matmul + 12 * L * d * seq_len


def machine() -> dict[str, Any]:
    """What the numbers were measured on, including the load the neighbours put on it."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    info: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "cpu": cpu, "usable_cores": cores,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# --------------------------------------------------------------------------------------------------
# Peak memory of a fresh process
# --------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    """The process's high-water resident set (VmHWM), MiB."""
    return _status_kib("VmHWM") / 1024


def peak_rss_of(script: str, args: list[str], timeout: float = 600) -> dict[str, Any]:
    """Run `bench/<script> --child args...` in a fresh Python and return the JSON object it prints last
    (the child measures its own VmHWM around the work). Threads follow this process's setting."""
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--child", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"{script} child failed: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def emit(result: dict[str, Any]) -> dict[str, Any]:
    """Print one benchmark's JSON (one object, indented) and return it."""
    print(json.dumps(result, indent=2), flush=True)
    return result


def script_main(doc: str, run, extra: dict[str, str] | None = None) -> None:
    """The command line of a single benchmark script: --quick (fewer repeats) plus boolean `extra`
    flags passed to `run` as keywords; prints the machine and the result as one JSON object."""
    import argparse

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    for flag, help_ in (extra or {}).items():
        p.add_argument(f"--{flag}", action="store_true", help=help_)
    a = vars(p.parse_args())
    emit({"machine": machine(), **run(**{k.replace("-", "_") + ("_" if k == "compile" else ""): v
                                         for k, v in a.items()})})


def rounded(x: float, digits: int = 3) -> float:
    return float(f"{x:.{digits}g}") if x == x and abs(x) != float("inf") else x


if __name__ == "__main__":
    emit({"machine": machine(), "fp32_matmul_peak_gflops": rounded(matmul_peak_flops() / 1e9)})


def with_attr(module: str, attr: str, value: Any) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Decorator: the function runs with `module.attr` set to `value`, restored after each call."""
    mod = importlib.import_module(module)

    def wrap(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            real = getattr(mod, attr)
            setattr(mod, attr, value)
            try:
                return fn()
            finally:
                setattr(mod, attr, real)

        return run

    return wrap


# `fn` with `llmlab.model.decode`'s packed batched decoding turned off while it runs: on CPU,
# `generate_tokens(compile=True)` at 4+ rows runs the eager packed decode; this shows what the compiled
# decode itself does there.
unpacked = with_attr("llmlab.model.decode", "PACK_MIN_ROWS", 1 << 30)
