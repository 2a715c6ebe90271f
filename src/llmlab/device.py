"""Device, precision and threads: CUDA with bf16 autocast when available, else CPU in fp32.

This CPU has no fast bf16, so CPU runs stay fp32. The default torch thread count follows the cores this
process may use (`os.sched_getaffinity`), overridable with `LLMLAB_THREADS` or `set_threads(n)`.
"""

from __future__ import annotations

import contextlib
import os

import torch


def pick_device(preference: str = "auto") -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


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


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads: n, else $LLMLAB_THREADS, else $OMP_NUM_THREADS, else usable cores."""
    if n is None:
        env = os.environ.get("LLMLAB_THREADS") or os.environ.get("OMP_NUM_THREADS")
        n = int(env) if env and env.isdigit() else available_cores()
    n = max(1, n)
    torch.set_num_threads(n)
    return n


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
