"""Device, precision and threads: CUDA with bf16 autocast when available, else CPU in fp32.

This CPU has no fast bf16, so CPU runs stay fp32. The default torch thread count follows the cores this
process may use (`os.sched_getaffinity`), overridable with `LLMLAB_THREADS` or `set_threads(n)`; the
`llm-lab` command calls `set_threads()` once at start-up, so every stage follows `LLMLAB_THREADS`.
Under torchrun, rank 0 says (once, `oversubscription_notice`) when threads x local ranks exceed the cores;
the count asked for is kept.

Training on the CPU also keeps freed memory in the process (`tune_cpu_allocator`): glibc's malloc returns
large blocks to the kernel when they are freed, so every step's activations (megabytes each) come back
as fresh pages that fault in and are zeroed one 4 KiB page at a time, 20,000-110,000 faults a step of the
bench model. `LLMLAB_CPU_MALLOC=default` leaves the allocator as it is.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
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


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_MALLOC_CHOICES = ("tuned", "default")


@functools.cache
def tune_cpu_allocator() -> bool:
    """Make glibc's malloc keep what the process frees (once per process; True when it applied).

    Two `mallopt` settings: no block is served by its own `mmap` (M_MMAP_MAX 0), and the heap's free top is
    never handed back (M_TRIM_THRESHOLD at its maximum). A training step then reuses the same memory for
    its activations instead of faulting in fresh zeroed pages: the bench model's step (2,048 tokens) went
    from 20,000-110,000 minor page faults to a few hundred and ran 3-11 % faster (alternating processes,
    bench/README.md). The cost: the process's resident memory stays at its peak until it exits, as with
    PyTorch's CUDA caching allocator. Skipped where the C library has no `mallopt` (not glibc), and with
    LLMLAB_CPU_MALLOC=default."""
    choice = os.environ.get("LLMLAB_CPU_MALLOC", "tuned").strip().lower() or "tuned"
    if choice not in _MALLOC_CHOICES:
        raise ConfigError(f"LLMLAB_CPU_MALLOC: expected 'tuned' or 'default', got {choice!r}; unset it for the "
                          f"default (tuned)")
    if choice == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


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
