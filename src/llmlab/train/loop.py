"""The training loop every stage shares: accumulation, clipping, schedule, evaluation, checkpoints, resume.

    result = train_loop(model, cfg, train_batches, val_batches, output_dir="runs/x", kind="pretrain",
                        tokenizer=tok, start_state=resume_state("runs/x/latest"))

`train_batches` is an iterator of dicts with `input_ids` and `labels` (B, T) LongTensors, labels aligned
with the inputs and -100 where no loss is taken; it should have `state_dict()` / `load_state_dict()` so a
resumed run reads exactly the data an uninterrupted one would. Under torchrun it must already read this
rank's part of the data. `val_batches` is a callable returning a fresh iterator, or an iterator; an
iterator with `state_dict()` is rewound to its starting position before every evaluation, so each
evaluation sees the same batches. `model` must accept `model(input_ids, output_hidden=True)` and return the
final hidden states (the LLM-Lab Transformer, or a PEFT wrapper of it); the loss is the chunked cross
entropy of `llmlab.train.losses` over its `lm_head`.

What a step is. One step is one optimizer update over `batch_size x gradient_accumulation_steps`
sequences per rank. All micro-batches of the step are read first; the step's loss is the sum of the token
losses divided by the number of label tokens in the whole step (over all ranks), so N accumulated
micro-batches give exactly the gradient of one batch N times larger, and a rank or micro-batch with more
tokens weighs more. Then: gradient clipping at `cfg.clip_norm` (the norm is logged either way), the
update (skipped under `nan_policy="skip"` when the loss or gradient is not finite), Sophia's Hessian
refresh on the step's last micro-batch when the optimizer asks for it, the schedule (a closed form of the
step), then evaluation and saving. max_steps, warmup, eval_every, save_every and log_every all count steps.

Checkpoints (`save_checkpoint` folders, see `llmlab.checkpoint`):
- `best/` after an evaluation that improves the validation loss;
- `latest/` every `save_every` steps and at the end of training, unless `save_best_only`; with
  `save_best_only` at the end anyway when the run wrote no best/ (no validation loss: val_fraction=0 or
  an empty validation set; or a resumed run that never beat the best it started from);
- `latest/` also when the run is interrupted (Ctrl-C or SIGTERM: the current step finishes first), even
  with `save_best_only`, so the run can always be resumed. There is no separate `final/`: at the end the
  model is evaluated once more (best/ may be updated) and, unless save_best_only, `latest/` is the final state.
Each holds the weights, model and training configs, the tokenizer, `trainer_state.json` (step, tokens
seen, best loss, data positions per rank, ...) and `trainer_state.pt` (optimizer, scheduler and the RNG
states of torch, CUDA, numpy and Python per rank). Resuming restores all of it, so on CPU with the same
seed a resumed run's losses equal an uninterrupted run's bit for bit.

How the run ended goes to `{output_dir}/run_state.json` (`"stopped"`: finished, interrupted or nan; read
it with `last_run_status(output_dir)`), so callers of a stage that returns only a folder can tell an
interrupted run from a finished one.

NaN/Inf: with `nan_policy="stop"` the run stops at the first non-finite loss or gradient norm with a
`TrainingError` naming the step and the last good checkpoint; the broken model is never saved. To keep the
GPU queue full the check reads the device only at log, eval and save steps (every step on CPU, where it
costs nothing), so a NaN is noticed at most `log_every` steps late; the step reported is the first bad
one. With `nan_policy="skip"` the update of a bad step is skipped (data and schedule move on), counted,
and the run stops after `max_nan_skips` skips; deciding that needs the flag on the host, so skip mode
synchronises once per step.

Out of memory (CUDA's torch.OutOfMemoryError, a failed CPU allocation) in a step, an evaluation or a save
stops the run with a one-line `TrainingError` naming the fields to lower (batch_size with a
gradient_accumulation_steps that keeps the effective batch, max_seq_len, gradient_checkpointing) and the
last good checkpoint; the gradients and optimizer state are freed first.

Host synchronisation otherwise happens only at log steps (the loss is accumulated on the device),
evaluations and saves. Inputs go to the GPU from pinned memory without blocking.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from llmlab.checkpoint import base_transformer, read_checkpoint, save_checkpoint, saved_step
from llmlab.device import autocast
from llmlab.errors import CheckpointError, ConfigError, LLMLabError
from llmlab.optim import Scheduler, build_optimizer, refresh_hessian_if_due
from llmlab.train.distributed import (
    DistInfo,
    all_reduce_sum,
    any_rank,
    barrier,
    full_model_state,
    gather_objects,
    gradient_sync,
    init_distributed,
    load_optimizer_state,
    optimizer_state,
    wrap_model,
)
from llmlab.train.losses import (
    IGNORE_INDEX,
    causal_lm_loss,
    chunked_gnb_loss,
    gather_rows,
    gnb_rows_loss,
    label_rows,
)
from llmlab.train.metrics import MetricsLogger

Batch = dict[str, Tensor]
SaveHook = Callable[..., Any]


class TrainingError(LLMLabError):
    """Training cannot go on (NaN/Inf loss, too many skipped steps); the message names the last good
    checkpoint."""


@dataclass
class StartState:
    """Where a resumed run starts: what `resume_state(checkpoint)` read. The weights are loaded by the
    caller (they decide the model class, LoRA, ...); everything else is applied by `train_loop`.
    Set `optimizer = None` to start the optimizer afresh (needed when switching optimizer)."""

    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float | None = None
    last_val_loss: float | None = None
    nan_skips: int = 0
    world_size: int = 1
    data_states: list[Any] | None = None  # per rank
    rng_states: list[dict[str, Any]] | None = None  # per rank
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    interval: dict[str, float] = field(default_factory=dict)  # loss accumulated since the last log step
    checkpoint: Path | None = None
    note: str | None = None  # what could not be restored, said at the start of the run


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    tokens_seen: int
    stopped: Literal["finished", "interrupted"]
    last_loss: float | None = None
    last_val_loss: float | None = None
    best_val_loss: float | None = None
    nan_skips: int = 0
    best_checkpoint: Path | None = None
    latest_checkpoint: Path | None = None


# --------------------------------------------------------------------------------------------------
# The model as a loss: what DDP / FSDP wrap
# --------------------------------------------------------------------------------------------------


def lm_head_of(model: nn.Module) -> nn.Module:
    head = getattr(base_transformer(model), "lm_head", None)
    if head is None:
        raise TypeError(f"{type(model).__name__} has no lm_head; train_loop needs an LLM-Lab Transformer")
    return head


class LMLoss(nn.Module):
    """`model` plus its loss, in one forward, so DDP and FSDP see every parameter use inside forward.

    forward(input_ids, labels) -> sum of the token cross entropies (chunked, see `losses`);
    forward(input_ids, labels, rows=rows) -> the same, the head run on the counted rows only (`rows`:
        `losses.label_rows` of the CPU labels, moved to the model's device; see `loss_inputs`);
    forward(input_ids, labels, gnb=True) -> Sophia's Gauss-Newton-Bartlett sampled loss (a mean, chunked).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, labels: Tensor, gnb: bool = False, rows: Tensor | None = None) -> Tensor:
        hidden = self.model(input_ids, output_hidden=True)  # (B, T, D)
        head = lm_head_of(self.model)
        if gnb and rows is not None:
            return gnb_rows_loss(gather_rows(hidden, rows), head)
        if gnb:
            return chunked_gnb_loss(hidden, head, labels)
        loss_sum, _ = causal_lm_loss(hidden, head, labels, rows=rows)
        return loss_sum


# --------------------------------------------------------------------------------------------------
# Pieces of a step (usable on their own: SFT and RLHF reuse them, tests check them)
# --------------------------------------------------------------------------------------------------


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """Move a batch tensor; from pinned memory without blocking when going CPU -> CUDA."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def label_tokens(labels: Tensor, device: torch.device) -> Tensor:
    """Number of label tokens as a float tensor on `device`, without a host sync (counted on the CPU
    when the labels are there, then written by a fill kernel)."""
    n = (labels[:, 1:] != IGNORE_INDEX).sum()
    if labels.device.type == "cpu" and device.type != "cpu":
        return torch.full((), float(n), device=device)
    return n.to(device=device, dtype=torch.float32)


def loss_inputs(mb: Batch, device: torch.device, select_rows: bool) -> tuple[tuple[Tensor, Tensor], dict[str, Tensor]]:
    """A micro-batch's (input_ids, labels) on `device`, and `rows=`, the positions that carry a loss
    (`losses.label_rows`, found on the CPU before the move), when `select_rows` and skipping the others
    pays (SFT's masked prompts and padding)."""
    rows = label_rows(mb["labels"]) if select_rows else None
    args = (to_device(mb["input_ids"], device), to_device(mb["labels"], device))
    return args, ({"rows": to_device(rows, device)} if rows is not None else {})


def forward_backward(wrapped: nn.Module, micro_batches: list[Batch], device: torch.device,
                     info: DistInfo | None = None, *, select_rows: bool = True) -> tuple[Tensor, Tensor]:
    """Accumulate the gradients of one step into `.grad`; returns (this rank's share of the step's mean
    loss, global label-token count), both detached device tensors.

    Each micro-batch's loss sum is divided by the token count of the whole step over all ranks (and
    multiplied by world_size, which DDP/FSDP's gradient averaging divides back out), so the accumulated
    gradient is that of sum(token losses) / total tokens, whatever the split into micro-batches and ranks.
    `select_rows`: the LM head runs only on the positions that carry a loss (`loss_inputs`); off under
    torch.compile (their number changes every batch).
    """
    info = info or DistInfo(device=device)
    counts = torch.stack([label_tokens(mb["labels"], device) for mb in micro_batches]).sum()
    n_global = all_reduce_sum(counts, info)
    scale = info.world_size / n_global.clamp(min=1.0)
    total = torch.zeros((), device=device)
    last = len(micro_batches) - 1
    for i, mb in enumerate(micro_batches):
        args, rows = loss_inputs(mb, device, select_rows)
        with gradient_sync(wrapped, enabled=i == last):
            with autocast(device):
                loss_sum = wrapped(*args, **rows)
            (loss_sum * scale).backward()
        total += loss_sum.detach().float()
    return total / n_global.clamp(min=1.0), n_global


@torch.no_grad()
def evaluate(wrapped: nn.Module, batches: Iterator[Batch], steps: int, device: torch.device,
             info: DistInfo | None = None, *, select_rows: bool = True) -> tuple[float | None, int]:
    """Mean token loss over up to `steps` batches (fewer if the iterator ends), over all ranks; returns
    (loss or None when there were no tokens, number of tokens). The model is put back in train mode.
    `select_rows`: as in `forward_backward`."""
    info = info or DistInfo(device=device)
    wrapped.eval()
    acc = torch.zeros(2, device=device, dtype=torch.float64)
    try:
        for _ in range(steps):
            try:
                mb = next(batches)
            except StopIteration:
                break
            (input_ids, labels), rows = loss_inputs(mb, device, select_rows)
            with autocast(device):
                loss_sum = wrapped(input_ids, labels, **rows)
            acc[0] += loss_sum.double()
            acc[1] += (labels[:, 1:] != IGNORE_INDEX).sum()
    finally:
        wrapped.train()
    total, n = all_reduce_sum(acc, info).tolist()
    return (total / n if n > 0 else None), int(n)


def grad_norm_and_clip(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """Global gradient norm (a device tensor); grads are clipped to `max_norm` when it is > 0."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(grads, max_norm, foreach=True)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in grads], foreach=True)
    if hasattr(norm, "full_tensor"):  # FSDP: a DTensor
        norm = norm.full_tensor()
    return norm


# --------------------------------------------------------------------------------------------------
# RNG and resume state
# --------------------------------------------------------------------------------------------------


def capture_rng(device: torch.device) -> dict[str, Any]:
    """torch (CPU and this device's CUDA), numpy and Python RNG states, as weights_only-loadable objects."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def resume_state(checkpoint_dir: str | Path, optimizer: bool = True) -> StartState:
    """Read what `train_loop` needs to continue from a checkpoint folder (not the weights).

    `trainer_state.pt` holds the optimizer and RNG states: missing or unreadable, it is an error, unless
    `optimizer=False` (--no-optimizer-state), which needs only the RNG states from it: then the run goes on
    with fresh ones and `StartState.note` says so."""
    ckpt = read_checkpoint(checkpoint_dir)
    meta = ckpt.trainer_state()
    if meta is None:
        raise CheckpointError(f"{ckpt.path}: no trainer_state.json, so training cannot resume from it; use it "
                              f"as a starting model instead (init_checkpoint for pretrain, policy_checkpoint for "
                              f"sft and rlhf), or pick a latest/ or best/ folder written by training")
    step = saved_step(ckpt.path, meta)
    tensors, note = ckpt.resume_tensors(optimizer)
    note = note and f"note: {note}"
    tensors = tensors or {}
    data = meta.get("data")
    if data is None and "data" in tensors:
        data = tensors["data"]
    return StartState(
        step=step, tokens_seen=int(meta.get("tokens_seen", 0)),
        best_val_loss=meta.get("best_val_loss"), last_val_loss=meta.get("last_val_loss"),
        nan_skips=int(meta.get("nan_skips", 0)), world_size=int(meta.get("world_size", 1)),
        data_states=data, rng_states=tensors.get("rng"), optimizer=tensors.get("optimizer"),
        scheduler=tensors.get("scheduler"), interval=dict(meta.get("interval", {})), checkpoint=ckpt.path,
        note=note)


def _json_or_none(obj: Any) -> Any:
    try:
        json.dumps(obj)
        return obj
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------
# Interruption: Ctrl-C / SIGTERM finish the step, save latest/, return
# --------------------------------------------------------------------------------------------------


class StopFlag:
    """Set by SIGINT/SIGTERM while installed (main thread only). A second Ctrl-C aborts at once."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.requested = False
        self.signal_name = ""
        self._say = say
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            self.requested = True
            self.signal_name = signal.Signals(signum).name
            self._say(f"{self.signal_name}: finishing the current step, then saving latest/ "
                      f"(Ctrl-C again to abort without saving)")

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


# --------------------------------------------------------------------------------------------------
# How the last run in an output folder ended: run_state.json
# --------------------------------------------------------------------------------------------------

RUN_STATE_FILE = "run_state.json"
StopReason = Literal["running", "finished", "interrupted", "nan", "oom", "error"]


@dataclass(frozen=True)
class RunStatus:
    """What `{output_dir}/run_state.json` says about the last run there. `stopped` is "finished" (max_steps
    reached), "interrupted" (Ctrl-C/SIGTERM: latest/ saved, `resume` continues it), "nan" (stopped by a
    NaN/Inf loss or gradient), "oom" (stopped by running out of memory, in setup or a step), "error" (stopped
    by another exception in a step, an evaluation or a save, e.g. a bad record or a reward function that
    raised) or "running" (still running, or killed)."""

    stopped: StopReason
    step: int
    max_steps: int
    kind: str
    resume: str | None = None


def resume_command(kind: str, output_dir: str | Path, config: str | Path | None = None) -> str:
    """The command that continues an interrupted run from its latest/ checkpoint."""
    return f"llm-lab {kind}" + (f" --config {config}" if config else "") + f" --resume {Path(output_dir) / 'latest'}"


def write_run_status(output_dir: str | Path, stopped: StopReason, *, step: int, max_steps: int, kind: str,
                     resume: str | None = None) -> None:
    """Record how the run in `output_dir` stands (rank 0 calls this at the start and the end of a run)."""
    from llmlab.atomic import atomic_write_text

    status = RunStatus(stopped=stopped, step=step, max_steps=max_steps, kind=kind, resume=resume)
    Path(output_dir).mkdir(parents=True, exist_ok=True)  # a setup failure can come before anything made it
    atomic_write_text(Path(output_dir) / RUN_STATE_FILE, json.dumps(dataclasses.asdict(status), indent=2) + "\n")


def replaced_run_notice(output_dir: str | Path) -> str | None:
    """For a new (not resumed) run: the line saying that `output_dir` holds a finished run whose
    checkpoints this one will replace as it saves, else None."""
    status = last_run_status(output_dir)
    if status is None or status.stopped != "finished":
        return None
    return (f"note: {output_dir} holds a finished {status.kind} run ({status.step} steps); this new run replaces its "
            f"checkpoints and metrics there as it saves (set output_dir elsewhere to keep them, or resume it "
            f"with --resume {Path(output_dir) / 'latest'} max_steps=N to continue it)")


def last_run_status(output_dir: str | Path) -> RunStatus | None:
    """How the last run in `output_dir` ended (see RunStatus); None when no run wrote run_state.json there."""
    path = Path(output_dir) / RUN_STATE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return RunStatus(stopped=data["stopped"], step=int(data["step"]), max_steps=int(data["max_steps"]),
                         kind=str(data.get("kind", "")), resume=data.get("resume"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def _val_iterator(val_batches: Any) -> Callable[[], Iterator[Batch]] | None:
    """A function giving the same validation batches at every evaluation."""
    if val_batches is None:
        return None
    if callable(val_batches) and not hasattr(val_batches, "__next__"):
        return val_batches
    if hasattr(val_batches, "state_dict") and hasattr(val_batches, "load_state_dict"):
        start = copy.deepcopy(val_batches.state_dict())

        def rewound() -> Iterator[Batch]:
            val_batches.load_state_dict(copy.deepcopy(start))
            return val_batches

        return rewound
    return lambda: val_batches  # a plain iterator: consecutive evaluations read on


DATA_COUNTERS = ("skipped_invalid", "skipped_empty")  # records a data iterator skipped, if it counts them


def data_counters(batches: Any, info: DistInfo) -> dict[str, int]:
    """The iterator's DATA_COUNTERS summed over ranks (collective), the non-zero ones: logged each log step."""
    local = {k: getattr(batches, k, 0) for k in DATA_COUNTERS}
    local = {k: v if isinstance(v, int) else 0 for k, v in local.items()}
    per_rank = gather_objects(local, info) if info.distributed else [local]
    total = {k: sum(r[k] for r in per_rank) for k in DATA_COUNTERS}
    return {k: v for k, v in total.items() if v}


def lr_clip_fields(cfg: Any) -> tuple[str, str]:
    """The names the stage's config gives the peak lr and the clip threshold: pretraining's `lr` and
    `grad_clip`, SFT's and RLHF's `learning_rate` and `max_grad_norm`."""
    names = {f.name for f in dataclasses.fields(cfg)} if dataclasses.is_dataclass(cfg) else set(vars(cfg))
    return ("learning_rate" if "learning_rate" in names else "lr",
            "max_grad_norm" if "max_grad_norm" in names else "grad_clip")


def nan_hint(cfg: Any) -> str:
    """What to try after a NaN/Inf, in the stage config's own field names."""
    lr, clip = lr_clip_fields(cfg)
    return f"Try a lower {lr}, more warmup_steps, {clip} > 0, or nan_policy=skip"


_CPU_OOM = ("DefaultCPUAllocator: can't allocate memory", "not enough memory", "MPS backend out of memory")


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's torch.OutOfMemoryError, or the RuntimeError of a failed CPU (or MPS) allocation."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(m in str(e) for m in _CPU_OOM))


def free_memory(optimizer: torch.optim.Optimizer | None = None) -> None:
    """After an out-of-memory error: drop the gradients (and optimizer state: the run is over), collect,
    and give cached CUDA blocks back, so a notebook that keeps the traceback does not keep the memory."""
    import gc

    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def smaller_batch(batch_size: int, accumulation: int) -> tuple[int, int] | None:
    """(batch_size, accumulation) split by the smallest factor of batch_size, so their product (the
    effective batch) stays the same; None when batch_size is already 1."""
    d = next((d for d in range(2, batch_size + 1) if batch_size % d == 0), None)
    return None if d is None else (batch_size // d, accumulation * d)


def oom_text(cfg: Any, *, where: str, device: torch.device, setting: str, fixes: list[str],
             last_good: Any) -> str:
    """The one-line TrainingError text for an out-of-memory in any stage (`where`: "step 7"; `setting`: what
    ran, in brackets): the stage's `fixes`, then gradient_checkpointing=true when it is off, then the last
    good checkpoint. `oom_message` here and `llmlab.rlhf.run.oom_message` give the fixes."""
    if not cfg.gradient_checkpointing:
        fixes = [*fixes, "gradient_checkpointing=true"]
    return (f"out of memory on {device.type} in {where} ({setting}); try {', or '.join(fixes)}. "
            f"Last good checkpoint: {last_good or 'none'}")


def oom_message(cfg: Any, *, where: str, device: torch.device, seq_len: int | None, last_good: Any) -> str:
    """The one-line TrainingError text for an out-of-memory in a pretraining or SFT run (`where`: "step 7"):
    the fields to lower, with a batch_size / gradient_accumulation_steps pair that keeps the effective batch."""
    b, g = cfg.batch_size, cfg.gradient_accumulation_steps
    fixes = []
    split = smaller_batch(b, g)
    if split is not None:
        fixes.append(f"batch_size={split[0]} gradient_accumulation_steps={split[1]} (the same {b * g} sequences "
                     f"a step)")
    fixes.append(f"a lower max_seq_len (now {seq_len or cfg.max_seq_len})")
    return oom_text(cfg, where=where, device=device, setting=f"batch_size={b}, gradient_accumulation_steps={g}",
                    fixes=fixes, last_good=last_good)


def setup_oom_message(cfg: Any, *, device: torch.device, what: str, last_good: Any) -> str:
    """The one-line TrainingError text for an out-of-memory while setting a run up (`what`: the model on the
    device, the optimizer and its state, ...): the weights and optimizer state do not fit, whatever the batch."""
    fixes = []
    if hasattr(cfg, "use_lora") and not cfg.use_lora:
        fixes.append("use_lora=true (the optimizer keeps state for the adapters only)")
    if cfg.optimizer in ("adamw", "sophia"):
        fixes.append(f"an optimizer with less state than {cfg.optimizer} (lion or adafactor)")
    fixes.append("a smaller model or a device with more memory")
    return (f"out of memory on {device.type} while setting up the run ({what}); try {', or '.join(fixes)}. "
            f"Last good checkpoint: {last_good or 'none'}")


def _optimizer_hparams(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def train_loop(
    model: nn.Module,
    cfg: Any,
    train_batches: Iterator[Batch],
    val_batches: Any = None,
    *,
    output_dir: str | Path,
    kind: str = "pretrain",
    tokenizer: Any = None,
    start_state: StartState | None = None,
    save_hook: SaveHook | None = None,
    progress: bool = True,
    dist_info: DistInfo | None = None,
) -> TrainResult:
    """Train `model` for `cfg.max_steps` optimizer updates (see the module docstring).

    cfg: a TrainConfig, SFTConfig or RLHFConfig (reads max_steps, batch_size is the iterator's business,
    gradient_accumulation_steps, peak_lr/clip_norm, optimizer and schedule fields, eval_every, eval_steps,
    log_every, save_every, save_best_only, nan_policy, max_nan_skips, compile, gradient_checkpointing,
    distributed). The model is moved to the device and trained in place; its trainable parameters are
    those with requires_grad (LoRA: the adapters).
    save_hook(path, model, **kwargs) writes a checkpoint; kwargs are `save_checkpoint`'s (state_dict is the
    gathered full state under FSDP, None otherwise). Defaults to `llmlab.checkpoint.save_checkpoint`.
    """
    info = dist_info or init_distributed()
    device = info.device
    output_dir = Path(output_dir)
    start = start_state or StartState()
    save_hook = save_hook or save_checkpoint
    if cfg.max_steps <= start.step:
        raise ConfigError(f"max_steps: {cfg.max_steps} is not above the checkpoint's step {start.step}; pass "
                          f"max_steps=N with N > {start.step} to train further")

    strategy = getattr(cfg, "distributed", "ddp")
    if info.distributed and strategy == "fsdp" and cfg.optimizer == "adafactor":
        raise ConfigError("distributed: adafactor (transformers) cannot update FSDP's sharded parameters; use "
                          "distributed=ddp or another optimizer (adamw, lion, sophia, muon)")
    optimizer: torch.optim.Optimizer | None = None
    oom: str | None = None
    try:  # the weights and the optimizer state: an out-of-memory here is one line too
        model.to(device)
        model.train()
        if cfg.gradient_checkpointing:
            base_transformer(model).gradient_checkpointing = True
        loss_module = LMLoss(model)
        if cfg.compile:
            # the model and its chunked loss as one graph (in place on the loss module: the model's parameter
            # names, and so checkpoints, stay the plain model's); on an H200 a full-logits loss compiled with
            # the model made the step 1.23x that of the compiled model with the loss eager (bench/README.md)
            loss_module.compile()
        wrapped = wrap_model(loss_module, model, info, strategy)
        optimizer = build_optimizer(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        if start.optimizer is not None:
            fresh = _optimizer_hparams(optimizer)
            try:
                load_optimizer_state(wrapped, optimizer, start.optimizer)
            except (ValueError, KeyError, RuntimeError) as e:
                if is_out_of_memory(e):
                    raise
                raise CheckpointError(f"optimizer state in {start.checkpoint} does not fit this optimizer "
                                      f"({cfg.optimizer}): {e}; resume with --no-optimizer-state "
                                      f"(load_optimizer_state=False)") from None
            if len(fresh) != len(optimizer.param_groups):
                raise CheckpointError(f"optimizer state in {start.checkpoint} has {len(optimizer.param_groups)} "
                                      f"parameter groups, {cfg.optimizer} has {len(fresh)}; resume with "
                                      f"--no-optimizer-state")
            for group, hp in zip(optimizer.param_groups, fresh):  # the config's hyperparameters win
                group.update(hp)
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        oom = setup_oom_message(cfg, device=device, what=f"the model on {device.type}, the {cfg.optimizer} optimizer"
                                f"{' and its saved state' if start.optimizer is not None else ''}",
                                last_good=start.checkpoint)
    if oom is not None:  # raised outside the except clause, so what was allocated can be freed
        if info.is_main:
            write_run_status(output_dir, "oom", step=start.step, max_steps=cfg.max_steps, kind=kind)
        free_memory(optimizer)
        raise TrainingError(oom)
    scheduler = Scheduler(optimizer, cfg, step=start.step)

    same_world = start.world_size == info.world_size
    if start.data_states is not None and hasattr(train_batches, "load_state_dict"):
        if same_world:
            train_batches.load_state_dict(start.data_states[info.rank])
    if start.rng_states is not None and same_world:
        restore_rng(start.rng_states[info.rank], device)
    val_source = _val_iterator(val_batches)

    logger = MetricsLogger(output_dir, total_steps=cfg.max_steps, start_step=start.step, enabled=info.is_main,
                           progress=progress, description=kind)
    if start.note:
        logger.message(start.note, always=True)
    if start.checkpoint is not None and not same_world:
        logger.message(f"warning: {start.checkpoint} was written by {start.world_size} process(es), this run has "
                       f"{info.world_size}: data positions and random states start afresh", always=True)

    stop = StopFlag(lambda m: logger.message(m, always=True))
    stop.install()

    step = start.step
    tokens_seen = start.tokens_seen
    best_val, last_val = start.best_val_loss, start.last_val_loss
    nan_skips = start.nan_skips
    accum = cfg.gradient_accumulation_steps
    interval_loss = torch.zeros((), device=device)
    if info.is_main and start.interval.get("loss_sum"):
        interval_loss += float(start.interval["loss_sum"])
    interval_steps = int(start.interval.get("steps", 0))
    interval_tokens = 0
    interval_time = time.perf_counter()
    bad_seen = torch.zeros((), dtype=torch.bool, device=device)  # stop policy: any non-finite step so far
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    paths = {"best": None, "latest": None}
    last_loss: float | None = None
    stopped: Literal["finished", "interrupted"] = "finished"
    is_cpu = device.type == "cpu"

    def record_status(stopped: StopReason) -> None:
        if info.is_main:
            write_run_status(output_dir, stopped, step=step, max_steps=cfg.max_steps, kind=kind,
                             resume=resume_command(kind, output_dir) if stopped == "interrupted" else None)

    record_status("running")

    def check_finite() -> None:
        """stop policy: raise if any step so far had a non-finite loss or gradient (a host sync)."""
        if cfg.nan_policy != "stop":
            return
        if any_rank(bool(bad_seen.item()), info):
            bad_step = int(first_bad.item())
            record_status("nan")
            last = paths["latest"] or paths["best"] or start.checkpoint
            raise TrainingError(
                f"loss or gradient became NaN/Inf at step {bad_step if bad_step >= 0 else step}; stopped without "
                f"saving that model. Last good checkpoint: {last or 'none'}. {nan_hint(cfg)}")

    def save(which: str) -> Path:
        check_finite()
        path = output_dir / which
        full_state = full_model_state(wrapped, model, info)
        opt_state = optimizer_state(wrapped, optimizer, info)
        data = gather_objects(train_batches.state_dict() if hasattr(train_batches, "state_dict") else None, info)
        rngs = gather_objects(capture_rng(device), info)
        interval_sum = float(all_reduce_sum(interval_loss.clone(), info))
        if info.is_main:
            data_json = _json_or_none(data)
            trainer_state = {
                "step": step, "tokens_seen": tokens_seen, "best_val_loss": best_val, "last_val_loss": last_val,
                "nan_skips": nan_skips, "world_size": info.world_size, "kind": kind, "max_steps": cfg.max_steps,
                "optimizer": cfg.optimizer, "interval": {"loss_sum": interval_sum, "steps": interval_steps},
                "data": data_json,
            }
            tensors: dict[str, Any] = {"optimizer": opt_state, "scheduler": scheduler.state_dict(), "rng": rngs}
            if data_json is None and data is not None:
                tensors["data"] = data
            save_hook(path, model, state_dict=full_state, kind=kind, train_config=cfg, trainer_state=trainer_state,
                      trainer_tensors=tensors, tokenizer=tokenizer,
                      metrics={"step": step, "val_loss": last_val, "best_val_loss": best_val})
        barrier(info)
        paths["latest" if which == "latest" else "best"] = path
        return path

    def run_eval() -> dict[str, Any]:
        """Validation loss and perplexity; saves best/ when the loss improves. Returns the numbers to log."""
        nonlocal best_val, last_val
        if val_source is None:
            return {}
        check_finite()
        val, n = evaluate(wrapped, val_source(), cfg.eval_steps, device, info, select_rows=not cfg.compile)
        if val is None:
            return {}
        last_val = val
        if best_val is None or val < best_val:
            best_val = val
            save("best")
        return {"val_loss": val, "val_ppl": math.exp(min(val, 700.0)), "val_tokens": n}

    oom = None
    where = f"step {step + 1}"  # what an out-of-memory error interrupted
    seq_len: int | None = None
    try:
        optimizer.zero_grad(set_to_none=True)
        while step < cfg.max_steps:
            where = f"step {step + 1}"
            try:
                micro = [next(train_batches) for _ in range(accum)]
            except StopIteration:
                raise TrainingError(f"the training data ended during step {step + 1}; training iterators must be "
                                    f"endless (the LLM-Lab batch iterators start a new epoch by themselves)") from None
            seq_len = int(micro[0]["input_ids"].shape[-1])
            step_tokens = sum(int(mb["input_ids"].numel()) for mb in micro) * info.world_size
            step_loss, _ = forward_backward(wrapped, micro, device, info, select_rows=not cfg.compile)
            norm = grad_norm_and_clip(params, cfg.clip_norm).to(device)
            finite = torch.isfinite(step_loss) & torch.isfinite(norm)
            group = optimizer.param_groups[0]
            lr = group["lr"] / group.get("lr_scale", 1.0)
            skipped = False
            if cfg.nan_policy == "skip" and any_rank(not bool(finite.item()), info):
                skipped = True
                nan_skips += 1
                logger.message(f"step {step + 1}: non-finite loss or gradient, update skipped "
                               f"({nan_skips}/{cfg.max_nan_skips})", always=True)
            else:
                bad_now = ~finite
                first_bad = torch.where(bad_now & ~bad_seen, torch.full_like(first_bad, step + 1), first_bad)
                bad_seen |= bad_now
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not skipped:
                refresh_hessian_if_due(optimizer, step,
                                       lambda mb=micro[-1]: _hessian_estimate(wrapped, mb, device, info,
                                                                            not cfg.compile))
            scheduler.step()
            step += 1
            tokens_seen += step_tokens
            interval_tokens += step_tokens
            if not skipped:
                interval_loss += step_loss
                interval_steps += 1
            logger.advance(step)

            if skipped and nan_skips >= cfg.max_nan_skips:
                record_status("nan")
                last = paths["latest"] or paths["best"] or start.checkpoint
                raise TrainingError(f"{nan_skips} steps had a NaN/Inf loss or gradient (max_nan_skips="
                                    f"{cfg.max_nan_skips}); stopped at step {step}. Last good checkpoint: "
                                    f"{last or 'none'}. Try a lower {lr_clip_fields(cfg)[0]} or more warmup_steps")
            if is_cpu:
                check_finite()
            final = step == cfg.max_steps
            record: dict[str, Any] = {}
            if step % cfg.log_every == 0 or final:
                check_finite()
                loss_total = float(all_reduce_sum(interval_loss.clone(), info))
                now = time.perf_counter()
                record = {"step": step, "loss": loss_total / interval_steps if interval_steps else None, "lr": lr,
                          "grad_norm": float(norm), "tokens_per_sec": interval_tokens / max(now - interval_time, 1e-9),
                          "tokens_seen": tokens_seen, "nan_skips": nan_skips or None, "skipped": skipped or None,
                          **data_counters(train_batches, info)}
                last_loss = record["loss"]
                interval_loss.zero_()
                interval_steps, interval_tokens, interval_time = 0, 0, now
            paused = time.perf_counter()  # evaluation and saving do not count against tokens/s
            where = f"the evaluation or save after step {step}"
            if step % cfg.eval_every == 0 or final:
                evaluated = run_eval()
                if evaluated:
                    record = {"step": step, **record, **evaluated}
            if record:
                logger.log(record)
            interrupted = any_rank(stop.requested, info)
            # save_best_only where this run wrote no best/ (no validation loss: val_fraction=0 or an empty
            # validation set; or a resumed run that never beat the best it started from): the final state
            # goes to latest/ rather than the run's steps being lost
            unsaved = final and cfg.save_best_only and paths["best"] is None
            if not cfg.save_best_only and (step % cfg.save_every == 0 or final) or interrupted or unsaved:
                save("latest")
            interval_time += time.perf_counter() - paused
            if interrupted and not final:
                stopped = "interrupted"
                logger.message(f"interrupted at step {step}; saved {output_dir / 'latest'}. Resume with:\n  "
                               f"{resume_command(kind, output_dir)}", always=True)
                break
    except Exception as e:
        if not is_out_of_memory(e):
            if not isinstance(e, TrainingError):  # (NaN stops recorded "nan" themselves)
                record_status("error")
            raise
        last = paths["latest"] or paths["best"] or start.checkpoint
        oom = oom_message(cfg, where=where, device=device, seq_len=seq_len, last_good=last)
    finally:
        stop.restore()
        logger.close()
    if oom is not None:  # raised here, outside the except clause, so the failed step's tensors can be freed
        record_status("oom")
        free_memory(optimizer)
        raise TrainingError(oom)

    record_status(stopped)
    if stopped == "finished" and info.is_main:
        where = ", ".join(f"{k}/" for k, v in paths.items() if v is not None) or "no checkpoint"
        if cfg.save_best_only and best_val is None:
            where += " (no validation loss, so no best/: the final state went to latest/ despite save_best_only)"
        elif cfg.save_best_only and paths["best"] is None:
            where += (f" (no evaluation of this run beat the best val loss it started from, {round(best_val, 4)}, "
                      f"so no new best/: the final state went to latest/ despite save_best_only)")
        val = ("no validation loss (no validation data, or no evaluation ran)" if best_val is None
               else f"best val loss {round(best_val, 4)}")
        logger.message(f"done: {step} step{'' if step == 1 else 's'}, {tokens_seen:,} tokens; {val}; saved {where} in {output_dir}")
    return TrainResult(output_dir=output_dir, step=step, tokens_seen=tokens_seen, stopped=stopped,
                       last_loss=last_loss, last_val_loss=last_val, best_val_loss=best_val, nan_skips=nan_skips,
                       best_checkpoint=paths["best"], latest_checkpoint=paths["latest"])


def _hessian_estimate(wrapped: nn.Module, mb: Batch, device: torch.device, info: DistInfo,
                      select_rows: bool = True) -> tuple[Callable[[], Tensor], int]:
    """Sophia: `(closure, batch_tokens)` for one Gauss-Newton-Bartlett estimate from a micro-batch
    (labels sampled from the model), what `refresh_hessian_if_due` asks for; the head on the counted
    rows only when `select_rows` (as in `forward_backward`)."""
    args, rows = loss_inputs(mb, device, select_rows)
    n_tokens = int((mb["labels"][:, 1:] != IGNORE_INDEX).sum()) * info.world_size

    def closure() -> Tensor:
        with autocast(device):
            loss = wrapped(*args, gnb=True, **rows)
        loss.backward()
        return loss

    return closure, n_tokens
