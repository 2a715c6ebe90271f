"""Configuration dataclasses for every stage, with JSON load/save, `key=value` overrides and validation.

One rule for where a setting comes from: dataclass default, then the JSON file, then CLI overrides.
Unknown keys are an error. Every field name is the spec's parameter name. Options are `Literal`
strings, validated once in `__post_init__`; modules are chosen from them at build time.

    cfg = ModelConfig.load("model_config.json", ["n_layers=4"])   # file, then overrides, validated once
    cfg.save("model_config.json")
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from llmlab.errors import ConfigError

PositionalEncoding = Literal["sinusoidal", "rope", "alibi", "yarn"]
AttentionType = Literal["mha", "mqa", "gqa"]
NormType = Literal["layernorm", "rmsnorm"]
Activation = Literal["relu", "gelu", "silu", "leaky_relu", "swiglu"]
OptimizerName = Literal["adamw", "adafactor", "lion", "sophia", "muon"]
SchedulerName = Literal["none", "cosine", "linear", "polynomial"]
LoraPreset = Literal["minimal", "attention_only", "ffn_only", "all", "custom"]
Algorithm = Literal["ppo", "dpo", "grpo"]

FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Generic machinery: typed coercion, unknown-key checks, overrides, JSON round trip.
# --------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return "a list"
    return _PLAIN_TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


_PLAIN_TYPE_NAMES = {int: "an integer (int)", float: "a number (float)", str: "a string", bool: "true or false",
                     type(None): "null (none)"}


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert `value` to the annotated type `tp`, or raise ConfigError naming the field."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{name}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin is list:
        (item_tp,) = get_args(tp) or (Any,)
        if isinstance(value, str):
            # "a,b" or a JSON list given on the command line
            s = value.strip()
            if s.startswith("["):
                try:
                    value = json.loads(s)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{name}: not a valid JSON list ({e.msg})") from None
            else:
                value = [v.strip() for v in s.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(f"{name}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
            if f.is_integer():
                return int(f)
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            try:
                v = float(value)
            except OverflowError:  # an integer beyond float range (JSON allows any number of digits)
                raise ConfigError(f"{name}: must be a finite number, got an integer too large for a "
                                  f"float ({value.bit_length()} bits)") from None
        elif isinstance(value, str):
            try:
                v = float(value)
            except ValueError:
                raise ConfigError(f"{name}: expected a number, got {value!r}") from None
        else:
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        if not math.isfinite(v):
            raise ConfigError(f"{name}: must be a finite number, got {value!r}")
        return v
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{name}: expected an object, got {value!r}")
    return value


def _parse_override_value(raw: str) -> Any:
    """`key=value` values: JSON when it parses (numbers, true, null, lists), else the raw string."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, ValueError):
        return raw


def read_config_json(path: str | os.PathLike) -> Any:
    """A config file's JSON, or a one-line ConfigError naming the file and the fix."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found; create it with `llm-lab configure` or check the path")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid JSON ({e}); fix the file or recreate it") from None


class ConfigBase:
    """Shared behaviour of all config dataclasses."""

    config_name: typing.ClassVar[str] = "config"

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        self.validate()

    # Subclasses add their checks; each raises ConfigError naming the field and the fix.
    def validate(self) -> None:  # pragma: no cover - overridden
        pass

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> typing.Self:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object with {cls.__name__} fields")
        data = {k: v for k, v in data.items() if not k.startswith("_")}  # "_comment" keys allowed
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ConfigError(
                f"{source}: unknown key(s) {', '.join(k if k.isidentifier() else repr(k) for k in unknown)} "
                f"for {cls.__name__}{cls._did_you_mean(unknown)}; "
                f"allowed: {', '.join(cls.field_names())}"
            )
        return cls(**data)

    # one setting under the names of different stages (the spec's names differ between stages)
    _SIBLING_NAMES: typing.ClassVar[tuple[tuple[str, str], ...]] = (("lr", "learning_rate"),
                                                                    ("grad_clip", "max_grad_norm"))

    @classmethod
    def _did_you_mean(cls, unknown: list[str]) -> str:
        """' (did you mean lr?)' for keys that are another stage's name or a near miss, else ''."""
        import difflib

        names, hints = cls.field_names(), []
        for key in unknown:
            same = [n for pair in cls._SIBLING_NAMES if key in pair for n in pair if n != key and n in names]
            close = same or difflib.get_close_matches(key, names, n=1, cutoff=0.75)
            if close:
                hints.append(f"{close[0]} for {key}" if len(unknown) > 1 else close[0])
        return f" (did you mean {', '.join(hints)}?)" if hints else ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def load(cls, path: str | os.PathLike, overrides: typing.Iterable[str] | dict[str, Any] = ()) -> typing.Self:
        """The JSON file, then `overrides` (`with_overrides`' key=value strings), validated once as a whole:
        an override can fix what the file alone gets wrong (warmup_steps above the file's max_steps)."""
        data = read_config_json(path)
        if overrides and isinstance(data, dict):
            data = {**data, **cls._override_updates(overrides)}
        return cls.from_dict(data, source=str(path))

    def save(self, path: str | os.PathLike) -> Path:
        from llmlab.atomic import atomic_write_text

        p = Path(path)
        atomic_write_text(p, json.dumps(self.to_dict(), indent=2) + "\n")
        return p

    def with_overrides(self, overrides: typing.Iterable[str] | dict[str, Any]) -> typing.Self:
        """Apply `key=value` strings (or a dict); values are parsed as JSON when they parse."""
        return dataclasses.replace(self, **self._override_updates(overrides))

    @classmethod
    def _override_updates(cls, overrides: typing.Iterable[str] | dict[str, Any]) -> dict[str, Any]:
        """`key=value` strings (or a dict) -> {field: value}, keys checked, values parsed as JSON when they parse."""
        updates: dict[str, Any] = {}
        items = overrides.items() if isinstance(overrides, dict) else overrides
        for item in items:
            if isinstance(item, tuple):
                key, value = item
            else:
                if "=" not in item:
                    raise ConfigError(f"override {item!r}: expected key=value, e.g. max_steps=100")
                key, raw = item.split("=", 1)
                key, value = key.strip(), _parse_override_value(raw.strip())
            if key not in cls.field_names():
                raise ConfigError(
                    f"override {key!r}: unknown key for {cls.__name__}{cls._did_you_mean([key])}; "
                    f"allowed: {', '.join(cls.field_names())}"
                )
            updates[key] = value
        return updates


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _positive(cfg: Any, *names: str) -> None:
    for n in names:
        v = getattr(cfg, n)
        _check(v > 0, f"{n}: must be > 0, got {v}")


def _non_negative(cfg: Any, *names: str) -> None:
    for n in names:
        v = getattr(cfg, n)
        _check(v >= 0, f"{n}: must be >= 0, got {v}")


def _unit_interval(cfg: Any, *names: str, closed_right: bool = False) -> None:
    for n in names:
        v = getattr(cfg, n)
        ok = 0.0 <= v <= 1.0 if closed_right else 0.0 <= v < 1.0
        _check(ok, f"{n}: must be in [0, 1{']' if closed_right else ')'}, got {v}")


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig(ConfigBase):
    """Architecture of an LLM-Lab transformer (spec: "Model Configuration")."""

    config_name: typing.ClassVar[str] = "model_config.json"

    tokenizer_name: str = _help("Hub id, local folder or tokenizer.json (or one `llm-lab tokenizer train` made)",
                                default="Qwen/Qwen2.5-0.5B")
    positional_encoding: PositionalEncoding = _help("sinusoidal | rope | alibi | yarn", default="rope")
    attention_type: AttentionType = _help("mha | mqa | gqa (mha uses n_heads KV heads, mqa one)", default="gqa")
    norm_type: NormType = _help("layernorm | rmsnorm", default="rmsnorm")
    activation: Activation = _help("relu | gelu | silu | leaky_relu | swiglu", default="swiglu")
    d_model: int = _help("Hidden size; divisible by n_heads", default=896)
    n_heads: int = _help("Attention heads", default=14)
    n_kv_heads: int = _help("KV heads for gqa; n_heads must divide by it", default=2)
    d_ff: int = _help("Feed-forward hidden size", default=4864)
    n_layers: int = _help("Transformer blocks", default=24)
    vocab_size: int = _help("Embedding rows; set from the tokenizer", default=151936)
    max_seq_len: int = _help("Longest sequence the model processes", default=1024)
    dropout: float = _help("Dropout on attention and residual paths, 0-1", default=0.0)
    sliding_window: int | None = _help("Tokens each position may attend to (itself included); None = all",
                                       default=None)
    attention_bias: bool = _help("Bias on q/k/v projections (Qwen2 style)", default=False)
    norm_eps: float = _help("Epsilon of the norms", default=1e-6)
    rope_theta: float = _help("RoPE/YaRN base frequency", default=10000.0)
    rope_scaling_factor: float = _help("YaRN: context extension factor, > 1 for yarn (4 = 4x the trained context; "
                                       "1 would be plain rope)", default=1.0)
    original_max_seq_len: int | None = _help("YaRN: context length the model was trained at", default=None)
    yarn_beta_fast: float = _help("YaRN: high-frequency boundary (rotations)", default=32.0)
    yarn_beta_slow: float = _help("YaRN: low-frequency boundary (rotations)", default=1.0)
    tie_embeddings: bool = _help("Share embed_tokens and lm_head weights", default=False)
    init_std: float = _help("Std of the normal weight init", default=0.02)

    def validate(self) -> None:
        _positive(self, "d_model", "n_heads", "d_ff", "n_layers", "vocab_size", "max_seq_len", "norm_eps",
                  "rope_theta", "init_std")
        _check(self.d_model % self.n_heads == 0,
               f"d_model: {self.d_model} is not divisible by n_heads={self.n_heads}; "
               f"pick d_model a multiple of n_heads")
        _check((self.d_model // self.n_heads) % 2 == 0 or self.positional_encoding not in ("rope", "yarn"),
               f"d_model/n_heads = {self.d_model // self.n_heads} must be even for {self.positional_encoding}")
        # mha and mqa fix the KV head count; n_kv_heads is a gqa setting. Normalise so that the saved
        # config says what the model really has.
        if self.attention_type == "mha":
            self.n_kv_heads = self.n_heads
        elif self.attention_type == "mqa":
            self.n_kv_heads = 1
        else:
            _positive(self, "n_kv_heads")
            _check(self.n_kv_heads <= self.n_heads,
                   f"n_kv_heads: {self.n_kv_heads} is more than n_heads={self.n_heads}")
            _check(self.n_heads % self.n_kv_heads == 0,
                   f"n_kv_heads: n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; "
                   f"use a divisor of n_heads")
        _unit_interval(self, "dropout")
        if self.sliding_window is not None:
            _check(self.sliding_window >= 1, f"sliding_window: must be >= 1 or None, got {self.sliding_window}")
        _check(self.rope_scaling_factor >= 1.0,
               f"rope_scaling_factor: must be >= 1, got {self.rope_scaling_factor}")
        if self.original_max_seq_len is not None:
            _positive(self, "original_max_seq_len")
        if self.positional_encoding == "yarn":  # last, so the checks above name their own fields first
            _check(self.rope_scaling_factor > 1.0,
                   f"rope_scaling_factor: positional_encoding=yarn with rope_scaling_factor="
                   f"{self.rope_scaling_factor} is plain RoPE; set rope_scaling_factor > 1 (e.g. 4 for 4x the "
                   f"trained context) or use positional_encoding=rope")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def yarn_original_len(self) -> int:
        """Training context that YaRN extends from (defaults to max_seq_len / factor)."""
        if self.original_max_seq_len is not None:
            return self.original_max_seq_len
        return max(1, int(self.max_seq_len / self.rope_scaling_factor))


def vocab_slack(n_tokens: int) -> int:
    """How many rows vocab_size may have beyond a tokenizer's `n_tokens` before LLM-Lab says they are
    wasted: room for rounding up to a multiple of 64 and for padding like Qwen2.5's (151936 rows, the
    spec's default, for 151665 tokens)."""
    return 64 + n_tokens // 100


# --------------------------------------------------------------------------------------------------
# Training stages. The optimizer fields are shared by every stage.
# --------------------------------------------------------------------------------------------------

OPTIMIZER_PARAMS: dict[str, tuple[str, ...]] = {
    "adamw": ("adamw_beta1", "adamw_beta2", "adamw_eps"),
    "adafactor": (),
    "lion": ("lion_beta1", "lion_beta2"),
    "sophia": ("sophia_beta1", "sophia_beta2", "sophia_rho", "sophia_update_k"),
    "muon": ("muon_momentum", "muon_nesterov"),
}


@dataclass
class OptimizerFields:
    """Each optimizer's own parameters; only the chosen optimizer's are read."""

    adamw_beta1: float = _help("AdamW first-moment decay", default=0.9)
    adamw_beta2: float = _help("AdamW second-moment decay", default=0.999)
    adamw_eps: float = _help("AdamW epsilon", default=1e-8)
    lion_beta1: float = _help("Lion: momentum for the update direction interpolation", default=0.9)
    lion_beta2: float = _help("Lion: momentum of the gradient EMA", default=0.99)
    sophia_beta1: float = _help("Sophia first-moment decay", default=0.965)
    sophia_beta2: float = _help("Sophia Hessian-diagonal EMA decay", default=0.99)
    sophia_rho: float = _help("Sophia update clipping threshold", default=0.04)
    sophia_update_k: int = _help("Sophia: refresh the Hessian estimate every k steps", default=10)
    muon_momentum: float = _help("Muon momentum", default=0.95)
    muon_nesterov: bool = _help("Muon Nesterov momentum", default=True)

    def _validate_optimizer(self) -> None:
        _unit_interval(self, "adamw_beta1", "adamw_beta2", "lion_beta1", "lion_beta2", "sophia_beta1",
                       "sophia_beta2", "muon_momentum")
        _positive(self, "adamw_eps", "sophia_rho", "sophia_update_k")


@dataclass
class LoraFields:
    use_lora: bool = _help("Train LoRA adapters (PEFT) instead of all weights", default=False)
    lora_preset: LoraPreset = _help("minimal | attention_only | ffn_only | all | custom", default="minimal")
    lora_r: int = _help("LoRA rank", default=8)
    lora_alpha: int = _help("LoRA scaling numerator (scale = alpha / r)", default=16)
    lora_dropout: float = _help("Dropout on the LoRA path", default=0.05)
    lora_target_modules: list[str] | None = _help("Module names for the custom preset", default=None)

    def _validate_lora(self) -> None:
        _positive(self, "lora_r", "lora_alpha")
        _unit_interval(self, "lora_dropout")
        if self.lora_preset == "custom":
            _check(bool(self.lora_target_modules),
                   "lora_target_modules: the custom preset needs a list of module names, "
                   'e.g. ["q_proj", "v_proj", "gate_proj"]')


@dataclass
class RunFields:
    """Fields every training stage has besides the spec's: where, how often, how."""

    output_dir: str = _help("Where checkpoints, metrics and plots go", default="checkpoints")
    seed: int = _help("Random seed (data order, init, sampling)", default=42)
    log_every: int = _help("Log metrics every N steps", default=10)
    save_every: int = _help("Save latest/ every N steps (unless save_best_only)", default=500)
    eval_every: int = _help("Evaluate every N steps", default=500)
    compile: bool = _help("torch.compile the model with its loss, one graph (a GPU gain; on CPU training runs "
                          "level with eager, after minutes of compiling); RLHF: its generation, each decode step a CUDA graph on GPU, not on CPU with "
                          "4+ sequences a batch, where the eager packed decode is faster; the update stays eager",
                          default=False)
    gradient_checkpointing: bool = _help("Recompute each block's activations in backward", default=False)
    nan_policy: Literal["stop", "skip"] = _help("On NaN/Inf loss: stop (keep last good checkpoint) or skip the step",
                                                default="stop")
    max_nan_skips: int = _help("With nan_policy=skip: stop after this many skipped steps", default=20)
    distributed: Literal["ddp", "fsdp"] = _help("Under torchrun: ddp or fsdp (FSDP2 fully_shard)", default="ddp")
    text_column: str | None = _help("Pretraining: column holding the text (auto-detected when None); SFT and RLHF "
                                    "read records by their format and refuse it", default=None)
    max_seq_len: int | None = _help("Training sequence length (None = the model's max_seq_len)", default=None)
    val_fraction: float = _help("Share of documents (by content hash) held out for validation", default=0.02)


@dataclass
class ScheduleFields:
    """Shape of the decay after warmup (all stages; `scheduler` and `warmup_steps` are per stage)."""

    min_lr_ratio: float = _help("Schedules decay to lr x min_lr_ratio", default=0.0)
    poly_power: float = _help("Polynomial schedule power", default=2.0)


class FineTuneLR:
    """SFT and RLHF name the peak lr `learning_rate` and the clip `max_grad_norm` (the spec's names);
    the loop reads `peak_lr` and `clip_norm` from every stage."""

    @property
    def peak_lr(self) -> float:
        return self.learning_rate

    @property
    def clip_norm(self) -> float:
        return self.max_grad_norm


def _no_text_column(cfg: Any, reads: str) -> None:
    """SFT and RLHF read records by their format, not one text column: a set text_column would do nothing."""
    _check(cfg.text_column is None,
           f"text_column: only pretraining reads one text column; {reads}, so {cfg.text_column!r} would be "
           f"ignored; remove text_column (null)")


def _validate_training(cfg: Any, lr_field: str, clip_field: str) -> None:
    """Checks every training stage shares; each stage adds its own."""
    _positive(cfg, "max_steps", lr_field, "batch_size", "eval_every", "eval_steps", "log_every", "save_every")
    _non_negative(cfg, "weight_decay", clip_field, "warmup_steps")
    _unit_interval(cfg, "min_lr_ratio", closed_right=True)
    _check(cfg.warmup_steps <= cfg.max_steps or cfg.max_steps == 0,
           f"warmup_steps: {cfg.warmup_steps} is more than max_steps={cfg.max_steps}")
    _check(cfg.max_seq_len is None or cfg.max_seq_len >= 2,  # 0 would silently mean "the model's"
           f"max_seq_len: must be >= 2, or null for the model's max_seq_len; got {cfg.max_seq_len}")
    cfg._validate_optimizer()
    _check(len(cfg.datasets) > 0, "datasets: give at least one dataset line")


@dataclass
class TrainConfig(OptimizerFields, ScheduleFields, RunFields, ConfigBase):
    """Base training (pretraining). Spec: "Base Training (Pretraining)"."""

    config_name: typing.ClassVar[str] = "train_config.json"

    max_steps: int = _help("Optimizer updates (one = batch_size x gradient_accumulation_steps sequences)",
                           default=10000)
    optimizer: OptimizerName = _help("adamw | adafactor | lion | sophia | muon", default="adamw")
    lr: float = _help("Peak learning rate", default=3e-4)
    weight_decay: float = _help("Decoupled weight decay (matrices only; not norms, biases, embeddings)",
                                default=0.1)
    scheduler: SchedulerName = _help("none | cosine | linear | polynomial (after linear warmup)", default="cosine")
    warmup_steps: int = _help("Linear warmup steps from 0 to lr", default=1000)
    batch_size: int = _help("Sequences per micro-batch per device", default=1)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer update", default=64)
    grad_clip: float = _help("Max global gradient norm (0 = off)", default=1.0)
    eval_steps: int = _help("Validation batches per evaluation", default=100)
    save_best_only: bool = _help("Only save best/ when validation loss improves", default=True)
    datasets: list[Any] = _help('Dataset lines "name | subset | weight" or {name, subset, weight} objects',
                                default_factory=lambda: ["HuggingFaceFW/fineweb-edu"])
    init_checkpoint: str | None = _help("Continue pretraining from this checkpoint's weights (a training "
                                        "checkpoint, a merged or imported model; its model config and "
                                        "tokenizer come with it); None = from scratch", default=None)

    @property
    def peak_lr(self) -> float:
        return self.lr

    @property
    def clip_norm(self) -> float:
        return self.grad_clip

    def validate(self) -> None:
        _validate_training(self, "lr", "grad_clip")
        _positive(self, "gradient_accumulation_steps")


@dataclass
class SFTConfig(FineTuneLR, OptimizerFields, LoraFields, ScheduleFields, RunFields, ConfigBase):
    """Supervised fine-tuning. Spec: "Supervised Fine-Tuning (SFT)" and "LoRA for SFT"."""

    config_name: typing.ClassVar[str] = "sft_config.json"

    policy_checkpoint: str = _help("Base model checkpoint folder (the spec's best_model.pt maps to best/)",
                                   default="checkpoints/best_model.pt")
    batch_size: int = _help("Sequences per micro-batch", default=4)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer update", default=16)
    max_steps: int = _help("Optimizer updates", default=5000)
    learning_rate: float = _help("Peak learning rate", default=5e-6)
    weight_decay: float = _help("Decoupled weight decay", default=0.01)
    max_grad_norm: float = _help("Gradient clipping threshold (0 = off)", default=1.0)
    optimizer: OptimizerName = _help("adamw | adafactor | lion | sophia | muon", default="adamw")
    scheduler: SchedulerName = _help("none | cosine | linear | polynomial", default="cosine")
    warmup_steps: int = _help("Linear warmup steps", default=100)
    eval_steps: int = _help("Validation batches per evaluation", default=50)
    save_best_only: bool = _help("Only save best/ when validation loss improves", default=True)
    datasets: list[Any] = _help("SFT datasets (messages, instruction/response or prompt/completion)",
                                default_factory=lambda: ["tatsu-lab/alpaca"])
    skip_invalid_records: bool = _help("Skip (and count) records in no known format instead of failing",
                                       default=False)

    output_dir: str = _help("Where checkpoints, metrics and plots go", default="sft_checkpoints")

    def validate(self) -> None:
        _validate_training(self, "learning_rate", "max_grad_norm")
        _positive(self, "gradient_accumulation_steps")
        _no_text_column(self, "SFT reads each record by its format (messages, instruction/response, "
                              "prompt/completion)")
        self._validate_lora()


@dataclass
class RLHFConfig(FineTuneLR, OptimizerFields, LoraFields, ScheduleFields, RunFields, ConfigBase):
    """RLHF with PPO, DPO or GRPO. Spec: "RLHF Training" and "Common RLHF Parameters"."""

    config_name: typing.ClassVar[str] = "rlhf_config.json"

    algorithm: Algorithm = _help("ppo | dpo | grpo", default="ppo")
    policy_checkpoint: str = _help("SFT model checkpoint folder to optimise", default="sft_checkpoints/best_model.pt")
    reference_checkpoint: str | None = _help("Frozen reference (None = the policy's starting weights)",
                                             default=None)
    reward_model_name: str | None = _help("HF sequence-classification reward model (hub id or folder); "
                                          "None when reward_functions suffice",
                                          default="OpenAssistant/reward-model-deberta-v3-large-v2")
    reward_functions: list[Any] = _help('Reward callables "module:function" or {"name": ..., "weight": ...}',
                                        default_factory=list)
    reward_model_weight: float = _help("Weight of the reward model's score when combined with functions",
                                       default=1.0)
    reward_answer_column: str | None = _help("Column with reference answers passed to reward functions",
                                             default=None)
    # PPO
    ppo_epochs: int = _help("Optimisation epochs per rollout batch (PPO and GRPO)", default=4)
    clip_range: float = _help("PPO/GRPO ratio clip (and DPO beta when beta is None)", default=0.2)
    vf_coef: float = _help("PPO value-loss weight", default=0.1)
    cliprange_value: float = _help("PPO value clip range", default=0.2)
    gamma: float = _help("PPO discount", default=1.0)
    gae_lambda: float = _help("PPO GAE lambda", default=0.95)
    kl_coef: float = _help("KL penalty coefficient (PPO reward, GRPO loss; GRPO at 0 builds no reference model)",
                           default=0.05)
    adaptive_kl: bool = _help("PPO: adapt kl_coef towards target_kl (needs kl_coef > 0, target_kl > 0)",
                              default=False)
    target_kl: float = _help("PPO adaptive KL target (nats per sequence, > 0)", default=6.0)
    whiten_advantages: bool = _help("PPO: normalise advantages per batch", default=True)
    # DPO
    beta: float | None = _help("DPO beta (None = clip_range, 0.2 unless set, as the spec reuses it)", default=None)
    # GRPO
    group_size: int = _help("GRPO: responses per prompt", default=4)
    grpo_temperature: float = _help("GRPO sampling temperature", default=1.0)
    # batches
    batch_size: int = _help("Prompts (PPO/GRPO) or preference pairs (DPO) per step", default=128)
    mini_batch_size: int = _help("Mini-batch for updates; batch_size must divide by it", default=32)
    # generation
    max_new_tokens: int = _help("Longest response", default=128)
    max_prompt_len: int = _help("Prompts are left-truncated to this many tokens (PPO/GRPO: also to max_seq_len - "
                                "max_new_tokens; DPO: the pair then fits max_seq_len)", default=256)
    temperature: float = _help("Sampling temperature (PPO; GRPO uses grpo_temperature)", default=1.0)
    top_k: int = _help("Top-k sampling of PPO and GRPO rollouts (0 = off)", default=0)
    top_p: float = _help("Nucleus sampling of PPO and GRPO rollouts (1 = off)", default=1.0)
    # common
    optimizer: OptimizerName = _help("adamw | adafactor | lion | sophia | muon", default="adamw")
    learning_rate: float = _help("Peak learning rate", default=1.4e-5)
    weight_decay: float = _help("Decoupled weight decay", default=0.0)
    max_grad_norm: float = _help("Gradient clipping threshold", default=1.0)
    max_steps: int = _help("RL steps (one rollout batch and its updates)", default=10000)
    scheduler: SchedulerName = _help("none | cosine | linear | polynomial", default="none")
    warmup_steps: int = _help("Linear warmup steps", default=0)
    eval_steps: int = _help("Validation batches per evaluation", default=4)
    save_best_only: bool = _help("Only save best/ (by mean reward or DPO val accuracy); save_every is then unused",
                                 default=True)
    save_every: int = _help("Save latest/ every N steps; does nothing while save_best_only is true (the "
                            "default): then latest/ is written only on Ctrl-C, or at the end if no best/",
                            default=500)
    lora_dropout: float = _help("Dropout on the LoRA path; RLHF turns every dropout off, this one included (so "
                                "rollout and update log-probs agree), with a notice when > 0", default=0.05)
    datasets: list[Any] = _help("Prompt datasets (PPO/GRPO) or preference pairs (DPO)",
                                default_factory=lambda: ["Anthropic/hh-rlhf"])

    output_dir: str = _help("Where checkpoints, metrics and plots go", default="rlhf_checkpoints")

    @property
    def dpo_beta(self) -> float:
        return self.beta if self.beta is not None else self.clip_range

    def validate(self) -> None:
        _validate_training(self, "learning_rate", "max_grad_norm")
        _positive(self, "mini_batch_size", "ppo_epochs", "max_new_tokens", "max_prompt_len", "group_size",
                  "clip_range", "grpo_temperature")
        _non_negative(self, "vf_coef", "kl_coef", "temperature", "top_k", "cliprange_value")
        _unit_interval(self, "gamma", "gae_lambda", closed_right=True)
        _check(0.0 < self.top_p <= 1.0, f"top_p: must be in (0, 1], got {self.top_p}")
        _check(self.batch_size % self.mini_batch_size == 0,
               f"mini_batch_size: batch_size={self.batch_size} is not divisible by "
               f"mini_batch_size={self.mini_batch_size}; pick a divisor of batch_size")
        if self.beta is not None:
            _check(self.beta > 0, f"beta: must be > 0, got {self.beta}")
        if self.adaptive_kl:
            _check(self.target_kl > 0,
                   f"target_kl: must be > 0 with adaptive_kl=true (the KL the controller steers towards, in "
                   f"nats per sequence), got {self.target_kl}; set e.g. target_kl=6")
            _check(self.kl_coef > 0, "kl_coef: adaptive_kl=true scales kl_coef, so 0 stays 0; set kl_coef > 0 "
                                     "(e.g. 0.05) or adaptive_kl=false")
        if self.algorithm == "grpo":
            _check(self.group_size >= 2, f"group_size: GRPO needs at least 2 responses per prompt, got "
                                         f"{self.group_size}")
        _no_text_column(self, "RLHF reads each record by its format (prompt, messages, chosen/rejected, ...)")
        self._validate_lora()


STAGE_CONFIGS: dict[str, type[ConfigBase]] = {
    "model": ModelConfig,
    "pretrain": TrainConfig,
    "sft": SFTConfig,
    "rlhf": RLHFConfig,
}
