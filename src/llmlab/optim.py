"""Optimizers (adamw, adafactor, lion, sophia, muon) and learning-rate schedules for every stage.

    optimizer = build_optimizer(model, cfg)      # cfg: TrainConfig, SFTConfig or RLHFConfig
    scheduler = build_scheduler(optimizer, cfg)  # sets each group's lr for update 0
    for step in range(max_steps):
        loss.backward(); optimizer.step(); scheduler.step(); optimizer.zero_grad()
        if getattr(optimizer, "wants_hessian", None) and optimizer.wants_hessian(step):
            optimizer.refresh_hessian(closure, batch_tokens=n_tokens)  # Sophia only
        # or, the same: refresh_hessian_if_due(optimizer, step, lambda: (closure, n_tokens))

Which parameters decay: weight decay (decoupled, `p *= 1 - lr * wd`) applies to trainable matrices
(dim >= 2) that are not embeddings (`nn.Embedding` modules or names containing `embed_tokens`; a tied
`lm_head` is the embedding). Norm weights, biases and other 1-D parameters never decay: shrinking them
towards 0 changes the function without regularising anything. Frozen parameters are left out.

Every group carries `base_lr` (the stage's peak lr) and `lr_scale` (1.0, or 0.1 for the 1-D parameters
under Muon);
the schedule sets `lr = base_lr * lr_scale * lr_factor(step, cfg)`, a closed form of the step alone,
so resuming needs only the step counter. Optimizer state dicts hold only tensors, numbers, strings,
tuples, lists and dicts, so `torch.load(weights_only=True)` reads them back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from llmlab.errors import ConfigError

# --------------------------------------------------------------------------------------------------
# Which parameter goes where
# --------------------------------------------------------------------------------------------------


def _embedding_params(model: nn.Module) -> set[int]:
    """ids of parameters owned by an embedding (by module type or the `embed_tokens` name)."""
    ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    ids |= {id(p) for n, p in model.named_parameters() if "embed_tokens" in n}
    return ids


def _is_output_head(name: str) -> bool:
    """`lm_head.weight`, a value head `v_head.weight`, ...: output projections, kept off Muon."""
    parts = name.split(".")
    return any(part.endswith("head") for part in parts[:-1])


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # tied weights appear once
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=False everywhere)")
    return params


def _groups(named: list[tuple[str, nn.Parameter]], embeddings: set[int], cfg: Any,
            scale: float = 1.0) -> list[dict[str, Any]]:
    """Split into a decayed group (non-embedding matrices) and an undecayed one; drop empty groups."""
    decay = [p for _, p in named if p.dim() >= 2 and id(p) not in embeddings]
    keep = [p for _, p in named if not (p.dim() >= 2 and id(p) not in embeddings)]
    lr = cfg.peak_lr * scale
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": keep, "weight_decay": 0.0},
    ]
    return [dict(g, lr=lr, base_lr=cfg.peak_lr, lr_scale=scale) for g in groups if g["params"]]


def _adamw(groups: list[dict[str, Any]], cfg: Any) -> torch.optim.AdamW:
    """AdamW: the fused kernel when every parameter is on one device type that has it (CUDA, or CPU: 5x
    faster than foreach there, ~10 ms vs ~50 ms a step for the 16M-parameter bench model), else the
    multi-tensor (foreach) path."""
    kinds = {p.device.type for g in groups for p in g["params"]}
    speed = {"fused": True} if len(kinds) == 1 and kinds <= {"cuda", "cpu"} else {"foreach": True}
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=(cfg.adamw_beta1, cfg.adamw_beta2),
                             eps=cfg.adamw_eps, **speed)


def _evaluate(closure: Callable[[], Any] | None) -> Any:
    """The usual `step(closure)` contract: re-evaluate the loss with gradients enabled, if given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


# --------------------------------------------------------------------------------------------------
# Sophia (SophiaG: Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer")
# --------------------------------------------------------------------------------------------------


def gnb_sampled_loss(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Cross-entropy of `logits` (..., V) against labels sampled from the model's own softmax.

    The gradient g of this loss gives the Gauss-Newton-Bartlett estimate B * g * g of the Hessian
    diagonal (Sophia's GNB estimator): with y ~ softmax(logits), E[grad] = 0 and E[grad grad^T] is the
    Gauss-Newton matrix of the cross-entropy. Labels are sampled without gradient; `mask` (...) picks the
    positions that count (all when None). Returns the mean over counted positions.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    with torch.no_grad():
        labels = torch.multinomial(torch.softmax(flat.float(), dim=-1), 1).squeeze(-1)
    losses = nn.functional.cross_entropy(flat.float(), labels, reduction="none")
    if mask is None:
        return losses.mean()
    m = mask.reshape(-1).to(losses.dtype)
    return (losses * m).sum() / m.sum().clamp(min=1.0)


HESSIAN_REFRESHED = "hessian_refreshed"  # SophiaG's param-group flag: refresh_hessian has run


class SophiaG(torch.optim.Optimizer):
    """Sophia with the Gauss-Newton-Bartlett Hessian estimator (Liu et al. 2023, Algorithm 3).

    Per parameter: m = beta1 * m + (1 - beta1) * g every step; every k steps the loop calls
    `refresh_hessian`, which sets h = beta2 * h + (1 - beta2) * B * g_hat * g_hat, where g_hat is the
    gradient of `gnb_sampled_loss` (labels drawn from the model) averaged over B tokens. The update is
    decoupled weight decay then `p -= lr * clip(m / max(rho * h, eps), 1)`, clip to [-1, 1] per coordinate:
    a Newton-like step m / h where curvature is known and large, at most lr per coordinate where it is
    small, flat or negative-looking (h = 0 before the first refresh gives sign(m) * lr).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.04, weight_decay: float = 0.1, eps: float = 1e-12, update_k: int = 10):
        if update_k < 1:
            raise ValueError(f"update_k must be >= 1, got {update_k}")
        self.update_k = update_k
        super().__init__(params, dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, eps=eps))

    def wants_hessian(self, step: int) -> bool:
        """True on updates 0, k, 2k, ... (step = 0-based index of the update the loop is at), and on any
        update while the Hessian was never refreshed: a fresh optimizer on a resumed run (its count restored,
        load_optimizer_state=False) would otherwise make up to k - 1 sign steps on h = 0."""
        return step % self.update_k == 0 or not self.hessian_refreshed

    @property
    def hessian_refreshed(self) -> bool:
        """Whether `refresh_hessian` ever ran on this optimizer or the one whose state it loaded: a param-group
        key (HESSIAN_REFRESHED), so `state_dict()` / `load_state_dict()` (FSDP's too) carry it. A fresh
        optimizer's groups lack the key, so restoring a config's hyperparameters from a fresh optimizer's
        groups after loading (as the trainers do) keeps it."""
        return any(g.get(HESSIAN_REFRESHED, False) for g in self.param_groups)

    def _state(self, p: Tensor) -> dict[str, Tensor]:
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def refresh_hessian(self, closure: Callable[[], Any], batch_tokens: int) -> None:
        """Update the Hessian EMA from one GNB estimate.

        `closure()` must run forward and backward of `gnb_sampled_loss` (a mean over `batch_tokens`
        tokens, summed over accumulation micro-batches and ranks if any: the count behind the averaged
        gradient). Gradients present before the call are set aside and put back afterwards, so this may
        run anywhere in a step; the estimate's own gradients never reach `step()`.
        """
        if batch_tokens <= 0:
            raise ValueError(f"batch_tokens must be > 0, got {batch_tokens}")
        params = [p for g in self.param_groups for p in g["params"]]
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            with torch.enable_grad():
                closure()
            for group in self.param_groups:
                beta2 = group["betas"][1]
                for p in group["params"]:
                    if p.grad is not None:
                        h = self._state(p)["hessian"]
                        g = p.grad.to(h.dtype)
                        h.mul_(beta2).addcmul_(g, g, value=(1 - beta2) * batch_tokens)
        finally:
            for p, g in zip(params, saved):
                p.grad = g
        for group in self.param_groups:
            group[HESSIAN_REFRESHED] = True

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = _evaluate(closure)
        for group in self.param_groups:
            lr, wd, rho, eps = group["lr"], group["weight_decay"], group["rho"], group["eps"]
            beta1 = group["betas"][0]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p)
                m, h = state["exp_avg"], state["hessian"]
                m.lerp_(p.grad.to(m.dtype), 1 - beta1)
                if wd != 0:
                    p.mul_(1 - lr * wd)
                ratio = (m.abs() / (h * rho).clamp(min=eps)).clamp(max=1.0)  # |clip(m / max(rho h, eps), 1)|
                p.addcmul_(m.sign(), ratio, value=-lr)
        return loss


def refresh_hessian_if_due(optimizer: torch.optim.Optimizer, update: int,
                           estimate: Callable[[], tuple[Callable[[], Any], int]]) -> bool:
    """After update `update` (0-based, counted over the whole run), refresh Sophia's Hessian when the
    optimizer wants it (updates 0, k, 2k, ...); any other optimizer: nothing. `estimate()` is called only
    then and returns `(closure, batch_tokens)` for `SophiaG.refresh_hessian`: the closure runs forward and
    backward of a Gauss-Newton-Bartlett loss (`gnb_sampled_loss`, a mean over `batch_tokens` tokens).
    Returns True when it refreshed."""
    wants = getattr(optimizer, "wants_hessian", None)
    if wants is None or not wants(update):
        return False
    closure, batch_tokens = estimate()
    optimizer.refresh_hessian(closure, batch_tokens=max(1, int(batch_tokens)))
    return True


# --------------------------------------------------------------------------------------------------
# Muon: two optimizers behind one object
# --------------------------------------------------------------------------------------------------


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, seen as one (Muon + AdamW).

    `param_groups` is the concatenation of the children's group dicts (the same objects, so a schedule
    that sets `group["lr"]` reaches the child), and all children share this object's `state`, so
    `state_dict()` / `load_state_dict()` are the plain `torch.optim.Optimizer` ones over every group.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)
        super().__init__([g for o in self.optimizers for g in o.param_groups], defaults={})
        self._share()

    def _share(self) -> None:
        """Point each child at its slice of `param_groups` and at the shared `state`."""
        start = 0
        for o in self.optimizers:
            n = len(o.param_groups)
            o.param_groups = self.param_groups[start:start + n]
            o.state = self.state
            start += n

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = _evaluate(closure)
        for o in self.optimizers:
            o.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # replaces param_groups and state with new objects
        self._share()


def _muon_class() -> type[torch.optim.Optimizer]:
    """`torch.optim.Muon` (PyTorch 2.9 and newer, with `adjust_lr_fn`), or a one-line ConfigError."""
    import inspect

    muon = getattr(torch.optim, "Muon", None)
    if muon is None or "adjust_lr_fn" not in inspect.signature(muon).parameters:
        raise ConfigError(f"optimizer: muon needs torch.optim.Muon (PyTorch 2.9 or newer) and this is torch "
                          f"{torch.__version__}; upgrade torch (pip install -U 'torch>=2.9') or pick another "
                          f"optimizer (adamw, adafactor, lion, sophia)")
    return muon


def _muon(model: nn.Module, cfg: Any) -> CombinedOptimizer:
    """Muon on 2-D hidden matrices; embeddings and output heads on AdamW at the full lr; 1-D parameters
    (norm weights, biases) on AdamW at 0.1x lr, as the spec says.

    Muon's update is an orthogonalised momentum matrix; `adjust_lr_fn="match_rms_adamw"` scales it to
    AdamW's update RMS (Moonshot, "Muon is Scalable for LLM Training"), so the stage's lr, tuned for
    AdamW, serves the Muon part and the AdamW matrices alike. Embeddings and heads (`lm_head`, an RLHF
    value head) stay off Muon, as in the Muon and Moonshot recipes: their rows are per-token lookups or
    per-output read-outs, which an orthogonalised whole-matrix update does not suit. The AdamW part uses
    the `adamw_*` betas and eps. Groups: Muon (hidden, decayed); AdamW lr x1 decayed (heads), AdamW lr x1
    undecayed (embeddings, tied head), AdamW lr x0.1 undecayed (1-D); empty groups are left out.
    """
    muon_cls = _muon_class()
    named = _trainable(model)
    embeddings = _embedding_params(model)
    hidden = [(n, p) for n, p in named if p.dim() == 2 and id(p) not in embeddings and not _is_output_head(n)]
    hidden_ids = {id(p) for _, p in hidden}
    matrices = [(n, p) for n, p in named if id(p) not in hidden_ids and p.dim() >= 2]
    vectors = [(n, p) for n, p in named if p.dim() < 2]
    children: list[torch.optim.Optimizer] = []
    if hidden:
        groups = _groups(hidden, embeddings, cfg)
        children.append(muon_cls(groups, lr=cfg.peak_lr, momentum=cfg.muon_momentum,
                                 nesterov=cfg.muon_nesterov, adjust_lr_fn="match_rms_adamw"))
    rest = _groups(matrices, embeddings, cfg) + _groups(vectors, embeddings, cfg, scale=0.1)
    if rest:
        children.append(_adamw(rest, cfg))
    return CombinedOptimizer(children)


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


def build_optimizer(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` names, over the model's trainable parameters.

    - adamw: `torch.optim.AdamW` (adamw_beta1/2, adamw_eps).
    - adafactor: `transformers` Adafactor driven by our schedule: relative_step, scale_parameter and
      warmup_init off, so its step is lr times its RMS-normalised, clipped update (no internal lr).
    - lion: `lion_pytorch.Lion` (lion_beta1, lion_beta2); the update is lr * sign(...), so Lion usually
      wants a 3-10x smaller lr than AdamW.
    - sophia: `SophiaG` here (sophia_beta1/2, sophia_rho, sophia_update_k).
    - muon: `CombinedOptimizer` of Muon and AdamW (see `_muon`).
    Decay applies as the module docstring says, for every optimizer.
    """
    name = cfg.optimizer
    if name == "muon":
        return _muon(model, cfg)
    groups = _groups(_trainable(model), _embedding_params(model), cfg)
    lr = cfg.peak_lr
    if name == "adamw":
        return _adamw(groups, cfg)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    if name == "lion":
        from lion_pytorch import Lion

        return Lion(groups, lr=lr, betas=(cfg.lion_beta1, cfg.lion_beta2))
    if name == "sophia":
        return SophiaG(groups, lr=lr, betas=(cfg.sophia_beta1, cfg.sophia_beta2), rho=cfg.sophia_rho,
                       update_k=cfg.sophia_update_k)
    raise ConfigError(f"optimizer: {name!r} is not one of 'adamw', 'adafactor', 'lion', 'sophia', 'muon'")


# --------------------------------------------------------------------------------------------------
# Learning-rate schedules
# --------------------------------------------------------------------------------------------------


def lr_factor(step: int, cfg: Any) -> float:
    """Multiplier of the peak lr for update `step` (0-based), in closed form.

    With n = step + 1 (the update's 1-based number) and W = warmup_steps, M = max_steps:
    warmup n / W for n <= W, so update 0 already moves and update W - 1 is at exactly 1.0; then, with
    progress p = (n - W) / (M - W) clamped to [0, 1] (the last update, step M - 1, has p = 1):
    none 1; linear 1 - p; cosine (1 + cos(pi p)) / 2; polynomial (1 - p) ** poly_power, each mapped onto
    [min_lr_ratio, 1]. Warmup applies to every scheduler, `none` included.
    """
    n, warmup, total = step + 1, cfg.warmup_steps, cfg.max_steps
    if n <= warmup:
        return n / warmup
    shape = SCHEDULE_SHAPES.get(cfg.scheduler)
    if shape is None:
        raise ConfigError(f"scheduler: {cfg.scheduler!r} is not one of {', '.join(map(repr, SCHEDULE_SHAPES))}")
    p = min(1.0, (n - warmup) / (total - warmup)) if total > warmup else 1.0
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape(p, cfg)


# The decay after warmup, progress p in [0, 1] -> [0, 1] (mapped onto [min_lr_ratio, 1] by `lr_factor`)
SCHEDULE_SHAPES: dict[str, Callable[[float, Any], float]] = {
    "none": lambda p, cfg: 1.0,
    "linear": lambda p, cfg: 1.0 - p,
    "cosine": lambda p, cfg: 0.5 * (1.0 + math.cos(math.pi * p)),
    "polynomial": lambda p, cfg: (1.0 - p) ** cfg.poly_power,
}


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: Any) -> float:
    """Set every group's lr for update `step`: base_lr * lr_scale * lr_factor. Returns the factor."""
    factor = lr_factor(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * group.get("lr_scale", 1.0) * factor
    return factor


class Scheduler:
    """Closed-form schedule over `optimizer`; its only state is the number of updates done."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: Any, step: int = 0):
        self.optimizer, self.cfg, self.last_step = optimizer, cfg, step
        set_lr(optimizer, step, cfg)

    def step(self) -> None:
        """Call after `optimizer.step()`: sets the lr of the next update."""
        self.last_step += 1
        set_lr(self.optimizer, self.last_step, self.cfg)

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, int]:
        return {"step": self.last_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.last_step = int(state["step"])
        set_lr(self.optimizer, self.last_step, self.cfg)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any) -> Scheduler:
    """A `Scheduler` for `cfg.scheduler`, warmup and decay as `lr_factor` says; lr is set for update 0."""
    return Scheduler(optimizer, cfg)
