"""Device, precision and threads: CUDA with bf16 autocast when available, else CPU in fp32.

This CPU has no fast bf16, so CPU runs stay fp32. The default torch thread count follows the cores this
process may use (`os.sched_getaffinity`), overridable with `LLMLAB_THREADS` or `set_threads(n)`; the
`llm-lab` command calls `set_threads()` once at start-up, so every stage follows `LLMLAB_THREADS`.
Under torchrun, rank 0 says (once, `oversubscription_notice`) when threads x local ranks exceed the cores;
the count asked for is kept.
"""

from __future__ import annotations

import contextlib
import os
import re

import torch

from llmlab.errors import ConfigError

_CUDA = re.compile(r"cuda(?::(\d+))?")


def pick_device(preference: str | torch.device = "auto") -> torch.device:
    """auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps; anything else, or a GPU this torch
    cannot use, is a one-line ConfigError naming `device` instead of torch's AssertionError/RuntimeError."""
    if isinstance(preference, torch.device):
        preference = str(preference)
    name = (preference or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if m := _CUDA.fullmatch(name):
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {preference!r} but this torch ({torch.__version__}) sees no CUDA GPU; "
                              f"use auto or cpu")
        count = torch.cuda.device_count()
        if m.group(1) is not None and int(m.group(1)) >= count:
            raise ConfigError(f"device: {preference!r} but there are {count} CUDA device(s) (cuda:0 to "
                              f"cuda:{count - 1}); use one of those, auto or cpu")
        return torch.device(name)
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"device: {preference!r} but MPS (Apple GPU) is not available; use auto or cpu")
        return torch.device("mps")
    raise ConfigError(f"device: {preference!r} is not a device; use auto, cpu, cuda or cuda:N")


def autocast(device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing on CPU (fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def thread_count() -> int:
    """$LLMLAB_THREADS (a positive integer, else a ConfigError), else $OMP_NUM_THREADS, else usable cores."""
    env = os.environ.get("LLMLAB_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ConfigError(f"LLMLAB_THREADS: {env!r} is not a positive integer; set it to a thread count "
                              f"(e.g. LLMLAB_THREADS={available_cores()}) or unset it")
        return int(env)
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(omp) if omp.isdigit() and int(omp) > 0 else available_cores()


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads to n, else `thread_count()`; returns the count. Idempotent: calling it
    again (the CLI at start-up, then the pipeline) changes nothing when the count is already set."""
    n = max(1, thread_count() if n is None else n)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def oversubscription_notice(threads: int, local_ranks: int, cores: int) -> str | None:
    """The one line for rank 0 when the ranks on this machine ask for more threads (`threads` each, times
    `local_ranks`) than the `cores` this process may use, else None. It only advises: the thread count the
    user asked for is kept."""
    if local_ranks <= 1 or threads * local_ranks <= cores:
        return None
    fit = max(1, cores // local_ranks)
    head = (f"notice: {local_ranks} ranks on this machine x {threads} threads each = {threads * local_ranks} "
            f"threads on {cores} cores; oversubscribed ranks slow each other down (DDP can run slower than one "
            f"process)")
    if threads > fit:
        return (f"{head}. Start torchrun with OMP_NUM_THREADS={fit} (or LLMLAB_THREADS={fit}, which wins over it); "
                f"the {threads} threads asked for are kept")
    return f"{head}. Start at most {cores} ranks per machine (--nproc_per_node={cores})"


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
