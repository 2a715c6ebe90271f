"""Multi-process training under torchrun: process group, DDP / FSDP2 wrapping, rank-0 helpers.

    torchrun --nproc_per_node=2 -m llmlab.train.pretrain --config train.json --model-config model.json

`init_distributed()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); without it (or with
WORLD_SIZE=1) everything here is a no-op and training is a single process. Backend: nccl when CUDA is
available, gloo on CPU. Besides the main group a small gloo group carries control messages (the stop flag
after Ctrl-C/SIGTERM) on the CPU, so checking it every step never waits on the GPU.

Data parallelism: `wrap_model` applies DDP, or FSDP2 (`fully_shard` on every transformer block, then on
the root) when `distributed="fsdp"`. Gradients are averaged over ranks by both, so the loop scales each
rank's loss by world_size / global_tokens to get the token-weighted mean over the global batch.
Saving happens on rank 0; under FSDP the full state dicts (model and optimizer) are gathered first with
`torch.distributed.checkpoint.state_dict` (full_state_dict=True, cpu_offload=True) — a collective, so
every rank calls it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llmlab.device import available_cores, oversubscription_notice, pick_device, tune_cpu_allocator


@dataclass
class DistInfo:
    """Where this process stands: rank, world size, device. `group_cpu` is the gloo control group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: pick_device())
    owns_group: bool = False  # this module initialised the process group (and will destroy it)
    group_cpu: Any = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | torch.device | None = None) -> DistInfo:
    """Join the torchrun process group if there is one (idempotent); else a single-process DistInfo.
    Training on the CPU keeps freed memory in the process (`llmlab.device.tune_cpu_allocator`)."""
    info = _init_distributed(device)
    if info.device.type == "cpu":
        tune_cpu_allocator()
    return info


def _init_distributed(device: str | torch.device | None) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DistInfo(device=torch.device(device) if device is not None else pick_device())
    owns = False
    if not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
        owns = True
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count() or 1)))
    if device is not None:
        dev = torch.device(device)
    elif dist.get_backend() == "nccl":
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    group_cpu = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    if owns and rank == 0:  # once per run, when the group is created
        notice = thread_notice()
        if notice:
            print(notice, flush=True)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev, owns_group=owns,
                    group_cpu=group_cpu)


def thread_notice() -> str | None:
    """`oversubscription_notice` for this process: torch's thread count (what set_threads chose from
    LLMLAB_THREADS / OMP_NUM_THREADS), torchrun's LOCAL_WORLD_SIZE and the cores this process may use."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    local_ranks = int(local) if local.isdigit() else 1
    return oversubscription_notice(torch.get_num_threads(), local_ranks, available_cores())


def shutdown(info: DistInfo) -> None:
    """Destroy the process group if `init_distributed` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# Collectives (no-ops in a single process)
# --------------------------------------------------------------------------------------------------


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks in place (asynchronous on the GPU stream; no host sync)."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True when `flag` is true on any rank (a CPU gloo collective: does not wait for the GPU)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=info.group_cpu)
    return bool(t.item())


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj, group=info.group_cpu)
    return out


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier(group=info.group_cpu)


def rank0_print(info: DistInfo, *args: Any, **kwargs: Any) -> None:
    if info.is_main:
        print(*args, **kwargs, flush=True)


# --------------------------------------------------------------------------------------------------
# Wrapping and state
# --------------------------------------------------------------------------------------------------


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks under any wrapper (PEFT included): what FSDP shards one by one."""
    from llmlab.checkpoint import base_transformer

    base = base_transformer(model)
    layers = getattr(base, "layers", None)
    return list(layers) if layers is not None else []


def wrap_model(module: nn.Module, inner: nn.Module, info: DistInfo, strategy: str = "ddp") -> nn.Module:
    """Wrap `module` (the loss module holding `inner`, the model) for data parallelism.

    ddp: `DistributedDataParallel` (device_ids on CUDA). fsdp: FSDP2, `fully_shard` on each block of the
    model, then on `module` (root: embeddings, final norm and lm_head stay gathered through the loss).
    Single process: `module` unchanged.
    """
    if not info.distributed:
        return module
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in _blocks(inner):
            fully_shard(block)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    kw = {"device_ids": [info.device.index]} if info.device.type == "cuda" else {}
    return DDP(module, **kw)


def is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - old torch
        return False
    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-batches (all but the last of a step)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(wrapped, DDP) and not enabled:
        with wrapped.no_sync():
            yield
        return
    if is_fsdp(wrapped):
        wrapped.set_requires_gradient_sync(enabled)
    yield


def full_model_state(wrapped: nn.Module, inner: nn.Module, info: DistInfo) -> dict[str, torch.Tensor] | None:
    """Under FSDP the full, unsharded state dict of `inner` on rank 0 (CPU), None on other ranks;
    collective: every rank must call it. Otherwise None (the caller reads the model itself)."""
    if not is_fsdp(wrapped):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not info.is_main:
        return None
    cfg = getattr(inner, "config", None)
    if cfg is not None and getattr(cfg, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def optimizer_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> dict[str, Any] | None:
    """The optimizer's state dict to save: gathered in full under FSDP (collective), plain otherwise.
    Returned on rank 0 only (None elsewhere)."""
    if is_fsdp(wrapped):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(wrapped, optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if info.is_main else None
    return optimizer.state_dict() if info.is_main else None


def load_optimizer_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of `optimizer_state` (every rank passes the full saved state)."""
    if is_fsdp(wrapped):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(wrapped, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)
