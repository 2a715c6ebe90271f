"""The `llm-lab` command: the interactive menu (no arguments) and one table of scriptable subcommands.

    llm-lab pretrain --config configs/pretrain_tiny.json --model-config configs/model_tiny.json max_steps=20

Every subcommand that trains or configures reads a config file (`--config`) and then `key=value`
overrides (dataclass default, then the file, then the overrides; unknown keys are an error). Its
`--help` lists the config's fields from their help metadata. The menu builds the same configs and calls
the same functions (`llmlab.cli.commands`), so both paths behave alike.

Errors: every LLMLabError prints `error: <message>` and exits 2, with no traceback (set LLMLAB_DEBUG=1
to see one). Ctrl-C outside training prints `interrupted` and exits 130. Stage modules are imported
inside the handlers, so `llm-lab --help` is fast and a missing stage only breaks its own command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmlab.cli.chat import COMMANDS_HELP
from llmlab.config import ConfigBase, ModelConfig, RLHFConfig, SFTConfig, TrainConfig
from llmlab.errors import ConfigError, LLMLabError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Command:
    """One subcommand: what it does, the config class it reads (or None), its handler and extra flags."""

    help: str
    handler: Callable[[argparse.Namespace], int | None]
    config: type[ConfigBase] | None = None
    arguments: Callable[[argparse.ArgumentParser], None] | None = None


# --------------------------------------------------------------------------------------------------
# Handlers: turn parsed arguments into calls of llmlab.cli.commands (shared with the menu).
# --------------------------------------------------------------------------------------------------


def _model_config_arg(path: str | None) -> ModelConfig | None:
    return ModelConfig.load(path) if path else None


def _configure(args: argparse.Namespace) -> int:
    from llmlab.cli import commands

    commands.configure(args.cfg, args.out, vocab_from_tokenizer=args.vocab_from_tokenizer,
                       vocab_multiple_of=args.vocab_multiple_of, force=args.force)
    return 0


def _estimate(args: argparse.Namespace) -> int:
    from llmlab.cli import commands

    stage = commands.load_stage_config(args.config) if args.config else TrainConfig()
    # each key=value goes to the config that has the field (model first)
    model_keys = set(ModelConfig.field_names())
    model_over = [o for o in args.overrides if o.split("=", 1)[0].strip() in model_keys]
    stage_over = [o for o in args.overrides if o not in model_over]
    model_cfg = ModelConfig.load(args.model_config, model_over)
    stage = stage.with_overrides(stage_over)
    commands.print_estimate(model_cfg, stage, batch_size=args.batch_size, seq_len=args.seq_len,
                            optimizer=args.optimizer, dtype=args.dtype)
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from llmlab.cli import commands

    commands.pretrain(args.cfg, _model_config_arg(args.model_config), resume=args.resume,
                      load_optimizer_state=not args.no_optimizer_state)
    return 0


def _sft(args: argparse.Namespace) -> int:
    from llmlab.cli import commands

    commands.sft(args.cfg, resume=args.resume, load_optimizer_state=not args.no_optimizer_state)
    return 0


def _rlhf(args: argparse.Namespace) -> int:
    from llmlab.cli import commands

    commands.rlhf(args.cfg, resume=args.resume, load_optimizer_state=not args.no_optimizer_state)
    return 0


def _refuse_system_in_raw_mode(args: argparse.Namespace) -> None:
    if args.mode == "raw" and args.system is not None:
        raise ConfigError("--system is a chat-template message and --raw renders no template: drop --system, "
                          "or use --chat instead of --raw")


def _open_session(args: argparse.Namespace):
    """The chat/generate session; --system is refused when the session completes raw text (explicit --raw,
    before loading, or a base checkpoint's default), never silently dropped."""
    from llmlab.cli import chat

    _refuse_system_in_raw_mode(args)
    session = chat.ChatSession.open(args.checkpoint, adapter=args.adapter, mode=args.mode,
                                    settings=chat.settings_from_args(args), system=args.system,
                                    seed=args.seed, device=args.device)
    if not session.chat and args.system is not None:
        raise ConfigError(f"--system is a chat-template message but {session.name} completes raw text (a base "
                          f"model's default): drop --system, or pass --chat to use the chat template")
    return session


def _chat(args: argparse.Namespace) -> int:
    _open_session(args).repl()
    return 0


def _generate(args: argparse.Namespace) -> int:
    _open_session(args).reply(args.prompt, stream=sys.stdout)
    return 0


def _merge_lora(args: argparse.Namespace) -> int:
    from llmlab.cli import commands

    commands.merge_lora(adapter=args.adapter, base=args.base, checkpoint=args.checkpoint, out=args.out,
                        force=args.force)
    return 0


def _tokenizer_train(args: argparse.Namespace) -> int:
    from llmlab.cli import commands

    commands.train_tokenizer(args.datasets, args.vocab_size, args.out, text_column=args.text_column,
                             max_docs=args.max_docs, seed=args.seed, force=args.force)
    return 0


def _data_preview(args: argparse.Namespace) -> int:
    from llmlab.cli import commands

    commands.data_preview(args.kind, args.datasets, args.tokenizer, n=args.n, as_json=args.json,
                          seq_len=args.seq_len)
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    from llmlab.cli import commands

    commands.data_prepare(args.datasets, args.tokenizer, args.out, max_tokens=args.max_tokens,
                          val_fraction=args.val_fraction, seed=args.seed, text_column=args.text_column,
                          force=args.force)
    return 0


def _import_hf(args: argparse.Namespace) -> int:
    from llmlab.cli import commands

    commands.interop("import_hf", args.source, args.out, force=args.force)
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    from llmlab.cli import commands

    commands.interop("export_hf", args.checkpoint, args.out, force=args.force, adapter=args.adapter)
    return 0


def _export_gguf(args: argparse.Namespace) -> int:
    from llmlab.cli import commands

    commands.interop("export_gguf", args.checkpoint, args.out, force=args.force, dtype=args.dtype)
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    from llmlab.pipeline import run_pipeline

    run_pipeline(args.preset, args.out, force=args.force)
    return 0


# --------------------------------------------------------------------------------------------------
# Extra flags per command
# --------------------------------------------------------------------------------------------------


def _args_configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="model_config.json", help="where to save the model config (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--vocab-from-tokenizer", action="store_true",
                   help="set vocab_size to the size of tokenizer_name's vocabulary (loads the tokenizer)")
    p.add_argument("--vocab-multiple-of", type=int, default=None, metavar="N",
                   help="with --vocab-from-tokenizer: round vocab_size up to a multiple of N (e.g. 64, for "
                        "faster matmuls; the extra rows are never produced by the tokenizer)")


def _positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (argparse prints its name and the value otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _args_estimate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-config", default="model_config.json", metavar="FILE",
                   help="model config JSON (default: %(default)s)")
    p.add_argument("--config", metavar="FILE",
                   help="a pretrain/sft/rlhf config: batch size, sequence length, optimizer and LoRA come from it")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override model or training fields (e.g. n_layers=4 batch_size=8)")
    p.add_argument("--batch-size", type=_positive_int,
                   help="sequences per micro-batch (default: the config's, else 1)")
    p.add_argument("--seq-len", type=_positive_int, help="sequence length (default: the config's, else max_seq_len)")
    p.add_argument("--optimizer", choices=["adamw", "adafactor", "lion", "sophia", "muon"],
                   help="optimizer (default: the config's, else adamw)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="fp32, or bf16 autocast (default: bf16 when CUDA is available)")


def _args_resume(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", metavar="DIR", help="continue from this checkpoint folder (step, data position, "
                                                    "optimizer and RNG state); extend with max_steps=N")
    p.add_argument("--no-optimizer-state", action="store_true",
                   help="when resuming, start the optimizer afresh (needed after switching optimizer)")


def _args_pretrain(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-config", metavar="FILE",
                   help="model config JSON (default: ./model_config.json; the checkpoint's own when resuming)")
    _args_resume(p)


CHAT_COMMANDS_HELP = COMMANDS_HELP  # `chat --help` ends with the REPL's own list (llmlab.cli.chat)


def _args_inference(p: argparse.ArgumentParser, *, one_shot: bool) -> None:
    if not one_shot:
        p.epilog = CHAT_COMMANDS_HELP
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="checkpoint folder (base, SFT, RLHF, merged or imported)")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter folder (PEFT format) applied to the checkpoint")
    if one_shot:
        p.add_argument("--prompt", required=True, help="the prompt (a user message in chat mode)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature, 0 = greedy "
                                                                  "(default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 = off (default: %(default)s)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="mode", action="store_const", const="chat",
                      help="use the chat template (default for SFT, RLHF and merged checkpoints)")
    mode.add_argument("--raw", dest="mode", action="store_const", const="raw",
                      help="raw completion (default for base models)")
    p.add_argument("--system", help="system message in chat mode (refused with --raw)")
    p.add_argument("--seed", type=int, help="sampling seed, for reproducible replies")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (pays 10-30 s once, then faster tokens)")


def _args_merge(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", metavar="DIR", help="option 1: a LoRA adapter folder (with --base)")
    p.add_argument("--base", metavar="DIR", help="option 1: the base checkpoint the adapter was trained on")
    p.add_argument("--checkpoint", metavar="DIR", help="option 2: a full checkpoint holding base and adapter")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the merged checkpoint")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def _datasets_arg(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--datasets", nargs="+", required=required, metavar="SPEC",
                   help='dataset lines "name | subset | weight" (e.g. bundled:shakespeare)')


def _args_tokenizer_train(p: argparse.ArgumentParser) -> None:
    _datasets_arg(p)
    p.add_argument("--vocab-size", type=int, default=4096, help="tokens in the vocabulary (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to save the tokenizer to")
    p.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("--text-column", help="column holding the text (auto-detected by default)")
    p.add_argument("--max-docs", type=int, help="train on at most this many documents")
    p.add_argument("--seed", type=int, default=42, help="data order seed (default: %(default)s)")


def _args_data_preview(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=["pretrain", "sft", "preference", "prompt"], required=True,
                   help="how the records are read")
    _datasets_arg(p)
    p.add_argument("--tokenizer", required=True, help="hub id, folder or tokenizer.json")
    p.add_argument("-n", type=int, default=5, help="examples to show (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="one JSON object per example")
    p.add_argument("--seq-len", type=int, default=256, help="block length / truncation (default: %(default)s)")


def _args_data_prepare(p: argparse.ArgumentParser) -> None:
    _datasets_arg(p)
    p.add_argument("--tokenizer", required=True, help="hub id, folder or tokenizer.json")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the token shards")
    p.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("--max-tokens", type=int, help="stop after this many training tokens")
    p.add_argument("--val-fraction", type=float, default=0.02, help="held-out share (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="mixing seed (default: %(default)s)")
    p.add_argument("--text-column", help="column holding the text (auto-detected by default)")


def _args_import_hf(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="Hugging Face hub id, local folder or .gguf file (Llama, Qwen2, Mistral families)")
    p.add_argument("--out", required=True, metavar="DIR", help="LLM-Lab checkpoint folder to write")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def _args_export(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("checkpoint", help="LLM-Lab checkpoint folder (LoRA adapters are merged on the way out)")
    p.add_argument("--out", required=True, metavar="PATH", help=what)
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def _args_export_hf(p: argparse.ArgumentParser) -> None:
    _args_export(p, "folder for the transformers model")
    p.add_argument("--adapter", nargs="?", const=True, metavar="DIR",
                   help="keep a LoRA adapter apart instead of merging it: write the base it was trained on and, "
                        "in OUT/adapter/, the adapter in PEFT format under transformers' module names "
                        "(PeftModel.from_pretrained(model, OUT/adapter), vLLM, TGI); DIR is an adapter folder "
                        "trained on CHECKPOINT (e.g. best_lora_adapters/), or with no DIR the checkpoint's own "
                        "adapter/")


def _args_export_gguf(p: argparse.ArgumentParser) -> None:
    _args_export(p, "GGUF file to write")
    p.add_argument("--dtype", choices=["f16", "f32"], default="f16",
                   help="matrices in f16 (half the size) or f32 (exact); norms and biases stay f32 "
                        "(default: %(default)s)")


PIPELINE_PRESETS = ("micro", "tiny", "small", "base")  # llmlab.pipeline.PRESETS (kept light to import)


def _args_pipeline(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=PIPELINE_PRESETS, default="tiny",
                   help="micro: seconds (tests); tiny: minutes on 2 CPU cores; small/base: for GPUs "
                        "(default: %(default)s)")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="run folder (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace --out even when it holds files other than an earlier pipeline run")


# --------------------------------------------------------------------------------------------------
# The one command table. Names with a space are nested (`llm-lab data preview`).
# --------------------------------------------------------------------------------------------------

COMMANDS: dict[str, Command] = {
    "configure": Command("create a model config (prints its parameter count and memory estimate)", _configure,
                         ModelConfig, _args_configure),
    "estimate": Command("parameter count and training-memory estimate of a model config", _estimate, None,
                        _args_estimate),
    "pretrain": Command("base training (pretraining) from scratch or from a checkpoint", _pretrain, TrainConfig,
                        _args_pretrain),
    "sft": Command("supervised fine-tuning, full or LoRA", _sft, SFTConfig, _args_resume),
    "rlhf": Command("RLHF with PPO, DPO or GRPO (algorithm=...)", _rlhf, RLHFConfig, _args_resume),
    "chat": Command("interactive chat with a checkpoint (streaming, multi-turn)", _chat, None,
                    lambda p: _args_inference(p, one_shot=False)),
    "generate": Command("one-shot generation from a prompt", _generate, None,
                        lambda p: _args_inference(p, one_shot=True)),
    "merge-lora": Command("merge LoRA adapters into the base weights", _merge_lora, None, _args_merge),
    "tokenizer train": Command("train a byte-level BPE tokenizer with chat tokens", _tokenizer_train, None,
                               _args_tokenizer_train),
    "data preview": Command("show rendered examples, token ids and loss masks", _data_preview, None,
                            _args_data_preview),
    "data prepare": Command("tokenize datasets once into memmap token shards", _data_prepare, None,
                            _args_data_prepare),
    "import-hf": Command("convert a Hugging Face Llama/Qwen2/Mistral model into a checkpoint", _import_hf, None,
                         _args_import_hf),
    "export-hf": Command("write a checkpoint as a Hugging Face transformers model", _export_hf, None,
                         _args_export_hf),
    "export-gguf": Command("write a checkpoint as a GGUF file", _export_gguf, None, _args_export_gguf),
    "pipeline": Command("the whole pipeline on bundled data: tokenizer, pretrain, SFT+LoRA, merge, DPO, GRPO, "
                        "chat", _pipeline, None, _args_pipeline),
}


# --------------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------------


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def fields_help(cls: type[ConfigBase]) -> str:
    """The config's fields, defaults and help text, for a subcommand's --help."""
    lines = [f"{cls.__name__} fields (in the --config JSON, or as key=value overrides), with defaults:"]
    for f in dataclasses.fields(cls):
        head = f"  {f.name}={json.dumps(_default_of(f))}"
        text = f.metadata.get("help", "")
        if len(head) > 34:
            lines.append(head)
            head = ""
        wrapped = textwrap.wrap(text, 70) or [""]
        lines.append(f"{head:<36}{wrapped[0]}")
        lines.extend(f"{'':<36}{w}" for w in wrapped[1:])
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`error: ...`, exit 2) instead of usage plus message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llm-lab", description="LLM-Lab: configure, pretrain, fine-tune, align, chat with and "
                     "merge a transformer language model. Run without arguments for the interactive menu.",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, cmd in COMMANDS.items():
        parent, _, child = name.partition(" ")
        target = subs
        if child:
            if parent not in groups:
                group = subs.add_parser(parent, help=f"{parent} commands: " + ", ".join(
                    n.split(" ", 1)[1] for n in COMMANDS if n.startswith(parent + " ")))
                groups[parent] = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True,
                                                      parser_class=_Parser)
            target = groups[parent]
        p = target.add_parser(child or name, help=cmd.help, description=cmd.help,
                              epilog=fields_help(cmd.config) if cmd.config else None,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        if cmd.config is not None:
            p.add_argument("--config", metavar="FILE",
                           help=f"{cmd.config.config_name}-style JSON (default: the built-in defaults, or the "
                                f"checkpoint's own with --resume)")
            p.add_argument("overrides", nargs="*", metavar="key=value", help="override config fields")
        if cmd.arguments is not None:
            cmd.arguments(p)
        p.set_defaults(_command=name)
    return parser


def build_config(cls: type[ConfigBase], path: str | None, overrides: list[str]) -> ConfigBase:
    """Dataclass defaults, then the JSON file, then `key=value` overrides."""
    # validated once, after the overrides (they may fix what the file alone gets wrong)
    return cls.load(path, overrides) if path else cls().with_overrides(overrides)


def _run(argv: list[str]) -> int:
    if not argv:
        from llmlab.cli.menu import run_menu

        return run_menu()
    args = build_parser().parse_args(argv)
    if getattr(args, "_command", None) is None:
        build_parser().print_help()
        return 0
    cmd = COMMANDS[args._command]
    if cmd.config is not None:
        if args.config is None and getattr(args, "resume", None):
            from llmlab.cli.commands import config_from_checkpoint

            # resuming without --config: the checkpoint's own training config, then the overrides
            args.cfg = config_from_checkpoint(cmd.config, args.resume).with_overrides(args.overrides)
        else:
            args.cfg = build_config(cmd.config, args.config, args.overrides)
    code = cmd.handler(args)
    return 0 if code is None else code


def main(argv: list[str] | None = None) -> int:
    """Entry point of `llm-lab`; returns the exit code (0 ok, 2 user error, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = os.environ.get("LLMLAB_DEBUG", "") not in ("", "0")
    try:
        if not {"-h", "--help"} & set(argv):  # (--help stays fast: no torch import)
            from llmlab.device import set_threads

            set_threads()  # once for every command: LLMLAB_THREADS, else OMP_NUM_THREADS, else usable cores
        return _run(argv)
    except LLMLabError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as e:  # --help and argparse's own exits
        return e.code if isinstance(e.code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
