"""The interactive menu (`llm-lab` with no arguments): the spec's options, asked field by field.

    llm-lab

1 Configure new model, 2 Base training, 3 SFT training, 4 RLHF training (PPO/DPO/GRPO), 5 Test model
(inference), 6 Merge LoRA adapters, 0 Exit. The training actions (2-4) first offer to resume a
checkpoint (the spec's steps: the folder, max_steps to extend the run, the optimizer state). Each action
builds the same config objects as the subcommands and calls the same functions (`llmlab.cli.commands`),
so menu and scripts behave alike.

Questions come from the config dataclasses: the prompt shows the field's help and its default, and
only what applies is asked (the chosen optimizer's parameters, the chosen algorithm's, LoRA fields when
LoRA is on, YaRN fields for yarn). Each answer is checked at once by building the config with it; an
answer the config rejects is asked again with the reason. A check that involves a field not asked yet
waits for the end, where the field it names is asked again.

On a terminal the prompts are questionary's; without one (pipes, `LLMLAB_PLAIN_PROMPTS=1`) they are
plain numbered lines, read with input().
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from llmlab.config import (
    OPTIMIZER_PARAMS,
    ConfigBase,
    ModelConfig,
    OptimizerFields,
    RLHFConfig,
    SFTConfig,
    TrainConfig,
)
from llmlab.errors import ConfigError, LLMLabError

Validator = Callable[[str], str | None]  # None when the answer is fine, else the reason

# --------------------------------------------------------------------------------------------------
# Prompt backends
# --------------------------------------------------------------------------------------------------


class Prompter:
    """questionary prompts on a terminal; Ctrl-C raises KeyboardInterrupt."""

    def say(self, text: str) -> None:
        print(text, flush=True)

    def text(self, message: str, default: str = "", validate: Validator | None = None) -> str:
        import questionary

        def check(answer: str) -> bool | str:
            reason = validate(answer) if validate else None
            return True if reason is None else reason

        return questionary.text(message, default=default, validate=check).unsafe_ask()

    def select(self, message: str, choices: list[tuple[str, Any]], default: Any = None) -> Any:
        import questionary

        items = [questionary.Choice(label, value=value, shortcut_key=str(i + 1) if len(choices) < 10 else None)
                 for i, (label, value) in enumerate(choices)]
        start = next((c for c in items if c.value == default), None)
        return questionary.select(message, choices=items, default=start,
                                  use_shortcuts=len(choices) < 10).unsafe_ask()

    def confirm(self, message: str, default: bool = True) -> bool:
        import questionary

        return questionary.confirm(message, default=default).unsafe_ask()


class EndOfInput(KeyboardInterrupt):
    """The input ended (Ctrl-D, or a pipe ran out): inside an action it cancels like Ctrl-C; at the main
    menu it exits cleanly, as a shell does."""


class PlainPrompter(Prompter):
    """Line-based prompts for pipes and dumb terminals: numbered choices, `error: <reason>` then again."""

    def __init__(self, read: Callable[[str], str] = input, out: typing.TextIO = sys.stdout) -> None:
        self.read, self.out = read, out

    def say(self, text: str) -> None:
        self.out.write(text + "\n")

    def _ask(self, prompt: str) -> str:
        try:
            return self.read(prompt)
        except EOFError:
            raise EndOfInput from None

    def text(self, message: str, default: str = "", validate: Validator | None = None) -> str:
        while True:
            answer = self._ask(f"{message} [{default}]: ").strip() or default
            reason = validate(answer) if validate else None
            if reason is None:
                return answer
            self.out.write(f"error: {reason}\n")

    def select(self, message: str, choices: list[tuple[str, Any]], default: Any = None) -> Any:
        self.out.write(message + "\n")
        for i, (label, _) in enumerate(choices):
            self.out.write(f"  {i + 1}) {label}\n")
        pos = next((i for i, (_, v) in enumerate(choices) if v == default), 0)
        while True:
            answer = self._ask(f"choice [{pos + 1}]: ").strip() or str(pos + 1)
            if answer.isdigit() and 1 <= int(answer) <= len(choices):
                return choices[int(answer) - 1][1]
            for label, value in choices:
                if answer in (str(value), label):
                    return value
            self.out.write(f"error: {answer!r} is not a choice; type a number from 1 to {len(choices)}\n")

    def confirm(self, message: str, default: bool = True) -> bool:
        while True:
            answer = self._ask(f"{message} [{'Y/n' if default else 'y/N'}]: ").strip().lower()
            if not answer:
                return default
            if answer in ("y", "yes", "n", "no"):
                return answer.startswith("y")
            self.out.write("error: answer y or n\n")


def default_prompter() -> Prompter:
    plain = os.environ.get("LLMLAB_PLAIN_PROMPTS", "") not in ("", "0")
    return PlainPrompter() if plain or not (sys.stdin.isatty() and sys.stdout.isatty()) else Prompter()


# --------------------------------------------------------------------------------------------------
# Which fields each config asks, and when
# --------------------------------------------------------------------------------------------------

Values = dict[str, Any]


@dataclass(frozen=True)
class Q:
    """A field to ask, when `when(values)` holds."""

    name: str
    when: Callable[[Values], bool] = lambda v: True


@dataclass(frozen=True)
class Section:
    """Questions; a titled section is asked only when the user wants to edit it."""

    questions: tuple[Q, ...]
    title: str | None = None


def _qs(*items: str | Q) -> tuple[Q, ...]:
    return tuple(i if isinstance(i, Q) else Q(i) for i in items)


def _optimizer_questions() -> tuple[Q, ...]:
    params = [f.name for f in dataclasses.fields(OptimizerFields)]
    return (Q("optimizer"),) + tuple(Q(p, lambda v, p=p: p in OPTIMIZER_PARAMS[v["optimizer"]]) for p in params)


def _schedule_questions() -> tuple[Q, ...]:
    return (Q("scheduler"), Q("poly_power", lambda v: v["scheduler"] == "polynomial"),
            Q("min_lr_ratio", lambda v: v["scheduler"] != "none"), Q("warmup_steps"))


def _lora_questions() -> tuple[Q, ...]:
    on = lambda v: bool(v["use_lora"])  # noqa: E731
    return (Q("use_lora"), Q("lora_preset", on), Q("lora_r", on), Q("lora_alpha", on), Q("lora_dropout", on),
            Q("lora_target_modules", lambda v: bool(v["use_lora"]) and v["lora_preset"] == "custom"))


_RUN_ADVANCED = _qs("seed", "log_every", "save_every", "max_seq_len", "val_fraction",
                    "gradient_checkpointing", "compile", "nan_policy",
                    Q("max_nan_skips", lambda v: v["nan_policy"] == "skip"), "distributed")
_ROPE = lambda v: v["positional_encoding"] in ("rope", "yarn")  # noqa: E731
_YARN = lambda v: v["positional_encoding"] == "yarn"  # noqa: E731
_ALGO = lambda *names: (lambda v: v["algorithm"] in names)  # noqa: E731

QUESTIONS: dict[type[ConfigBase], tuple[Section, ...]] = {
    ModelConfig: (
        Section(_qs("tokenizer_name", "positional_encoding", "attention_type", "norm_type", "activation",
                    "d_model", "n_heads", Q("n_kv_heads", lambda v: v["attention_type"] == "gqa"), "d_ff",
                    "n_layers", "vocab_size", "max_seq_len", "dropout",
                    # yarn is plain RoPE until its factor is set: its fields come with it, not in advanced
                    Q("rope_scaling_factor", _YARN), Q("original_max_seq_len", _YARN), Q("yarn_beta_fast", _YARN),
                    Q("yarn_beta_slow", _YARN))),
        Section(_qs("sliding_window", "attention_bias", "norm_eps", Q("rope_theta", _ROPE), "tie_embeddings",
                    "init_std"), "advanced parameters"),
    ),
    TrainConfig: (
        Section(_qs("max_steps") + _optimizer_questions() + _qs("lr", "weight_decay") + _schedule_questions()
                + _qs("batch_size", "gradient_accumulation_steps", "grad_clip", "eval_every", "eval_steps",
                      "save_best_only", "datasets", "output_dir")),
        Section(_RUN_ADVANCED + _qs("text_column", "init_checkpoint"), "advanced parameters"),  # SFT/RLHF refuse it
    ),
    SFTConfig: (
        Section(_qs("policy_checkpoint", "batch_size", "gradient_accumulation_steps", "max_steps", "learning_rate",
                    "weight_decay", "max_grad_norm") + _optimizer_questions() + _schedule_questions()
                + _qs("eval_every", "eval_steps", "save_best_only", "datasets", "output_dir") + _lora_questions()),
        Section(_RUN_ADVANCED + _qs("skip_invalid_records"), "advanced parameters"),
    ),
    RLHFConfig: (
        Section(_qs("algorithm", "policy_checkpoint", "reference_checkpoint",
                    Q("reward_model_name", _ALGO("ppo", "grpo")), Q("reward_functions", _ALGO("ppo", "grpo")),
                    Q("reward_model_weight", _ALGO("ppo", "grpo")), Q("reward_answer_column", _ALGO("ppo", "grpo")),
                    Q("beta", _ALGO("dpo")), Q("group_size", _ALGO("grpo")), Q("grpo_temperature", _ALGO("grpo")),
                    Q("ppo_epochs", _ALGO("ppo", "grpo")), Q("clip_range", _ALGO("ppo", "grpo")),
                    Q("vf_coef", _ALGO("ppo")), Q("cliprange_value", _ALGO("ppo")), Q("gamma", _ALGO("ppo")),
                    Q("gae_lambda", _ALGO("ppo")), Q("kl_coef", _ALGO("ppo", "grpo")), Q("adaptive_kl", _ALGO("ppo")),
                    Q("target_kl", lambda v: v["algorithm"] == "ppo" and bool(v["adaptive_kl"])),
                    Q("whiten_advantages", _ALGO("ppo")), Q("temperature", _ALGO("ppo")),
                    Q("top_k", _ALGO("ppo", "grpo")), Q("top_p", _ALGO("ppo", "grpo")), "batch_size", "mini_batch_size",
                    Q("max_new_tokens", _ALGO("ppo", "grpo")), "max_prompt_len")
                + _optimizer_questions() + _qs("learning_rate", "weight_decay", "max_grad_norm", "max_steps")
                + _schedule_questions() + _qs("eval_every", "eval_steps", "save_best_only", "datasets", "output_dir")
                + _lora_questions()),
        Section(_RUN_ADVANCED, "advanced parameters"),
    ),
}


# --------------------------------------------------------------------------------------------------
# Asking a config
# --------------------------------------------------------------------------------------------------


def show(value: Any) -> str:
    """A field value as the text a user would type back."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ", ".join(value) if all(isinstance(x, str) and "," not in x for x in value) else json.dumps(value)
    return str(value)


_BLAMED = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)")


def blamed_field(error: ConfigError) -> str | None:
    """The field a ConfigError names first (`d_model: ...`, `datasets[1]: ...`)."""
    m = _BLAMED.match(str(error))
    return m.group(1) if m else None


class ConfigAsker:
    """Asks the fields of one config class, checking each answer against the whole config."""

    def __init__(self, prompter: Prompter, cls: type[ConfigBase], start: ConfigBase | None = None) -> None:
        self.p, self.cls = prompter, cls
        self.values: Values = (start or cls()).to_dict()
        self.hints = typing.get_type_hints(cls)
        self.help = cls.field_help()
        self.pending: set[str] = set(self.values)  # not asked yet: errors naming them wait
        self.defaults_hook: dict[str, Callable[[Values], None]] = {}
        if "warmup_steps" in self.values:
            self.defaults_hook["max_steps"] = self._fit_warmup

    def _fit_warmup(self, values: Values) -> None:
        """After max_steps: a warmup default longer than the run would be refused at every Enter; offer a
        tenth of the run instead (what the user typed for warmup_steps is never changed: it comes later)."""
        try:
            steps, warmup = int(values["max_steps"]), int(values["warmup_steps"])
        except (TypeError, ValueError):
            return
        if "warmup_steps" in self.pending and steps > 0 and warmup > steps:
            values["warmup_steps"] = steps // 10
            self.p.say(f"note: warmup_steps default lowered to {steps // 10} (a tenth of max_steps={steps})")

    def build(self, values: Values | None = None) -> ConfigBase:
        return self.cls.from_dict(dict(values or self.values), source=self.cls.config_name)

    def check(self, name: str, answer: Any) -> str | None:
        """None when the config accepts `name=answer` (or blames a field not asked yet), else the reason."""
        try:
            self.build({**self.values, name: answer})
        except ConfigError as e:
            message = str(e)
            later = [f for f in self.pending if f != name and re.search(rf"\b{f}\b", message)]
            if blamed_field(e) == name and not later:
                return message
        return None

    def ask(self, name: str) -> None:
        tp = self.hints[name]
        label = f"{name} ({self.help[name]})" if self.help.get(name) else name
        current = self.values[name]
        if get_origin(tp) is Literal:
            answer = self.p.select(label, [(str(a), a) for a in get_args(tp)], default=current)
        elif tp is bool:
            answer = self.p.confirm(label, default=bool(current))
        else:
            answer = self.p.text(label, default=show(current), validate=lambda a: self.check(name, a))
        self.values[name] = answer
        self.pending.discard(name)
        if name in self.defaults_hook:
            self.defaults_hook[name](self.values)

    def run(self) -> ConfigBase:
        for section in QUESTIONS[self.cls]:
            if section.title and not self.p.confirm(f"Edit {section.title}?", default=False):
                continue
            for q in section.questions:
                if q.when(self.values):
                    self.ask(q.name)
        self.pending.clear()
        while True:  # the checks that waited for later fields
            try:
                return self.build()
            except ConfigError as e:
                name = blamed_field(e)
                if name not in self.values:
                    raise
                self.p.say(f"error: {e}")
                self.ask(name)


def ask_config(p: Prompter, cls: type[ConfigBase], start: ConfigBase | None = None,
               hooks: dict[str, Callable[[Values], None]] | None = None) -> ConfigBase:
    asker = ConfigAsker(p, cls, start)
    asker.defaults_hook.update(hooks or {})
    return asker.run()


def ask_path(p: Prompter, message: str, default: str, load: Callable[[str], Any]) -> tuple[str, Any]:
    """Ask for a file or folder until `load(path)` succeeds; returns (path, what load returned)."""
    def check(answer: str) -> str | None:
        try:
            load(answer.strip())
        except LLMLabError as e:
            return str(e)
        return None

    path = p.text(message, default=default, validate=check).strip()
    return path, load(path)


def existing_or_new(p: Prompter, cls: type[ConfigBase], what: str) -> ConfigBase:
    """The spec's two ways into each action: load a config file, or configure a new one."""
    how = p.select(f"{what}:", [("Use an existing config", "existing"), ("Configure new", "new")],
                   default="new" if not Path(cls.config_name).is_file() else "existing")
    if how == "existing":
        _, cfg = ask_path(p, "Config file", cls.config_name, cls.load)
        return cfg
    return ask_config(p, cls)


def save_config(p: Prompter, cfg: ConfigBase) -> Path:
    path = p.text("Save config as", default=cfg.config_name,
                  validate=lambda a: None if a.strip().endswith(".json") else "give a .json file name")
    saved = cfg.save(path.strip())
    p.say(f"saved {saved}")
    return saved


# --------------------------------------------------------------------------------------------------
# The actions
# --------------------------------------------------------------------------------------------------


def vocab_from_tokenizer(p: Prompter, values: Values) -> None:
    """After tokenizer_name: load it (hub id, folder or tokenizer.json, as training will) and make its size
    vocab_size's default, unless the current value already fits it (at least its size, at most
    `vocab_slack` rows more, e.g. the spec's 151936 for Qwen2.5's 151665 tokens). When it cannot be
    loaded (offline, a typo), a one-line notice says so and the current value stays."""
    from llmlab.config import vocab_slack
    from llmlab.data.tokenizer import load_tokenizer, model_vocab_size

    name, current = str(values["tokenizer_name"]), int(float(values["vocab_size"]))
    try:
        n = model_vocab_size(load_tokenizer(name))
    except LLMLabError as e:
        p.say(f"note: vocab_size stays {current}: the tokenizer could not be loaded to size it ({e})")
        return
    if n <= current <= n + vocab_slack(n):
        p.say(f"vocab_size default stays {current} (fits the tokenizer's {n} tokens)")
        return
    values["vocab_size"] = n
    p.say(f"vocab_size default set from the tokenizer: {n}")


def action_configure(p: Prompter) -> Path:
    from llmlab.cli import commands

    start = None
    if p.select("Model config:", [("Configure new", "new"), ("Start from an existing config", "existing")],
                default="new") == "existing":
        _, start = ask_path(p, "Config file", ModelConfig.config_name, ModelConfig.load)
    cfg = ask_config(p, ModelConfig, start, hooks={"tokenizer_name": lambda v: vocab_from_tokenizer(p, v)})
    commands.print_estimate(cfg)
    return save_config(p, cfg)


def resumed(p: Prompter, cls: type[ConfigBase], run: Callable[..., Any]) -> bool:
    """The spec's resume steps, for every training action: the checkpoint, max_steps (to extend the run),
    whether to load the optimizer state; then `run(cfg, resume=..., load_optimizer_state=...)`. False when
    the user starts a new run instead."""
    from llmlab.cli import commands

    if not p.confirm("Resume from a checkpoint?", default=False):
        return False
    path, cfg = ask_path(p, "Checkpoint folder", f"{cls().output_dir}/latest",
                         lambda a: commands.config_from_checkpoint(cls, a))
    asker = ConfigAsker(p, cls, cfg)
    asker.ask("max_steps")  # extend training beyond the saved max_steps
    cfg = asker.build()
    load_opt = p.confirm("Load the optimizer state? (say no when switching optimizer)", default=True)
    commands.show_stage_estimate(cfg, None, path)
    save_config(p, cfg)
    if p.confirm("Start training?", default=True):
        run(cfg, resume=path, load_optimizer_state=load_opt, estimate=False)
    return True


CHECKPOINT_FIELDS = ("init_checkpoint", "policy_checkpoint", "reference_checkpoint")


def start_training(p: Prompter, cfg: ConfigBase, saved: Path) -> ConfigBase | None:
    """"Start training?"; then each checkpoint field that does not name a checkpoint (the spec's default
    best_model.pt path before any run, a typo) is asked again, so the run does not stop on it after every
    other question; a changed config is saved again to `saved`. None when the user does not start."""
    import dataclasses

    from llmlab.cli import commands

    if not p.confirm("Start training?", default=True):
        return None
    fixed = {}
    for name in CHECKPOINT_FIELDS:
        value = getattr(cfg, name, None)
        try:
            if value is not None:
                commands.check_checkpoint(value)
        except LLMLabError as e:
            p.say(f"{name}: {e}")
            fixed[name], _ = ask_path(p, f"{name} (a checkpoint folder)", value, commands.check_checkpoint)
    if fixed:
        cfg = dataclasses.replace(cfg, **fixed)
        p.say(f"saved {cfg.save(saved)}")
    return cfg


def action_pretrain(p: Prompter) -> None:
    from llmlab.cli import commands

    if resumed(p, TrainConfig, commands.pretrain):
        return
    cfg = existing_or_new(p, TrainConfig, "Training config")
    default = "model_config.json"
    if not Path(default).is_file() and p.confirm("No model_config.json here. Configure a model now?", default=True):
        default = str(action_configure(p))
    _, model_cfg = ask_path(p, "Model config file", default, ModelConfig.load)
    commands.show_stage_estimate(cfg, model_cfg)
    if (cfg := start_training(p, cfg, save_config(p, cfg))) is not None:
        commands.pretrain(cfg, model_cfg, estimate=False)


def action_stage(p: Prompter, cls: type[SFTConfig] | type[RLHFConfig]) -> None:
    from llmlab.cli import commands

    run = commands.sft if cls is SFTConfig else commands.rlhf
    if resumed(p, cls, run):
        return
    cfg = existing_or_new(p, cls, "SFT config" if cls is SFTConfig else "RLHF config")
    commands.show_stage_estimate(cfg, None)
    if (cfg := start_training(p, cfg, save_config(p, cfg))) is not None:
        run(cfg, estimate=False)


def action_inference(p: Prompter) -> None:
    from llmlab.cli import chat, commands

    checkpoint, _ = ask_path(p, "Checkpoint folder", "checkpoints/best", commands.check_checkpoint)
    adapter = p.text("LoRA adapter folder (empty: none)", default="",
                     validate=lambda a: None if not a.strip() or Path(a.strip(), "adapter_config.json").is_file()
                     else f"{a.strip()} has no adapter_config.json")
    session = chat.ChatSession.open(checkpoint, adapter=adapter.strip() or None)
    session.repl()


def action_merge(p: Prompter) -> None:
    from llmlab.cli import commands

    how = p.select("Merge from:", [("Option 1: adapter folder + base checkpoint", "adapter"),
                                   ("Option 2: full checkpoint holding base and adapters", "checkpoint")])
    if how == "adapter":
        adapter = p.text("Adapter folder", default="sft_checkpoints/best_lora_adapters",
                         validate=lambda a: None if Path(a.strip(), "adapter_config.json").is_file()
                         else f"{a.strip()} has no adapter_config.json; check that LoRA training saved adapters")
        base, _ = ask_path(p, "Base checkpoint", "checkpoints/best", commands.check_checkpoint)
        out_default, kw = "merged", {"adapter": adapter.strip(), "base": base}
    else:
        ckpt, _ = ask_path(p, "Checkpoint folder", "sft_checkpoints/best", commands.check_checkpoint)
        out_default, kw = f"{ckpt.rstrip('/')}_merged", {"checkpoint": ckpt}
    out = p.text("Output folder", default=out_default).strip()
    while Path(out).exists() and not p.confirm(f"{out} exists. Overwrite?", default=False):
        out = p.text("Output folder (a new one, or say yes to overwrite)", default=out).strip()
    commands.merge_lora(out=out, force=Path(out).exists(), **kw)


MENU: list[tuple[str, str, Callable[[Prompter], Any] | None]] = [
    ("1", "Configure new model", action_configure),
    ("2", "Base training", action_pretrain),
    ("3", "SFT training (Supervised Fine-Tuning)", lambda p: action_stage(p, SFTConfig)),
    ("4", "RLHF training (PPO/DPO/GRPO)", lambda p: action_stage(p, RLHFConfig)),
    ("5", "Test model (inference)", action_inference),
    ("6", "Merge LoRA adapters", action_merge),
    ("0", "Exit", None),
]


def _menu_key(answer: str) -> str | None:
    keys = [key for key, _, _ in MENU]
    return None if answer.strip() in keys else f"{answer.strip()!r} is not a menu option; type one of {', '.join(keys)}"


def run_menu(prompter: Prompter | None = None) -> int:
    """The menu loop. An action's error or Ctrl-C returns to the menu; Exit (or Ctrl-C here) leaves."""
    import questionary

    p = prompter or default_prompter()
    p.say("LLM-Lab")
    while True:
        if isinstance(p, PlainPrompter):
            p.out.write("Main menu\n" + "".join(f"  {key}. {label}\n" for key, label, _ in MENU))
            try:
                choice = p.text("choice", "", _menu_key).strip()
            except EndOfInput:  # Ctrl-D or the end of piped input at the main menu: leave as 0 does
                p.out.write("\n")
                choice = "0"
        else:
            items = [questionary.Choice(label, value=key, shortcut_key=key) for key, label, _ in MENU]
            choice = questionary.select("Main menu", choices=items, use_shortcuts=True).unsafe_ask()
        action = next(a for key, _, a in MENU if key == choice)
        if action is None:
            p.say("bye")
            return 0
        try:
            action(p)
        except LLMLabError as e:
            if os.environ.get("LLMLAB_DEBUG", "") not in ("", "0"):
                raise
            p.say(f"error: {e}")
        except KeyboardInterrupt:
            p.say("\ncancelled")
