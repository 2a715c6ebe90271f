"""Inference: the chat REPL and one-shot generation, a thin shell over `llmlab.generate.generate_tokens`.

    llm-lab chat --checkpoint sft_checkpoints/best

Base (pretrain) checkpoints complete raw text (after a BOS the tokenizer itself adds); SFT, RLHF and merged
checkpoints (and any checkpoint with `--adapter`) talk through the tokenizer's chat template with the whole conversation as context
(the oldest turns are dropped when it no longer fits in max_seq_len; said the first time). Tokens are
decoded incrementally and printed as they come; a byte sequence cut in the middle of a character waits
for its next token.

REPL commands: /reset, /temp X, /top_p X, /top_k N, /max_tokens N, /help, /exit (`/help` and `chat --help`
print the one list, `COMMANDS_HELP`). Ctrl-C during a reply stops the reply; Ctrl-C
(or Ctrl-D) at the prompt leaves. A reply capped to fit max_seq_len is said once per session (again only
when the cap drops a lot), and `--compile` says once that it is compiling before the first reply.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from llmlab.errors import ConfigError, DataError

CHAT_KINDS = ("sft", "rlhf", "merged")
HELP = ("/reset clears the conversation; /temp X, /top_p X, /top_k N, /max_tokens N change sampling; "
        "/help lists the commands; /exit or Ctrl-C leaves")
COMPILE_NOTICE = "compiling the decoder for this model (once, may take a while)..."


# Every REPL command with a line each: what /help prints and `llm-lab chat --help` ends with (one text)
COMMANDS_HELP = """commands typed at the you> prompt (llmlab.cli.chat):
  /reset              clear the conversation
  /temp X             sampling temperature (also /temperature X; 0 = greedy)
  /top_p X            nucleus sampling
  /top_k N            top-k sampling (0 = off)
  /max_tokens N       longest reply
  /help               list these commands
  /exit, /quit        leave (so does Ctrl-C or Ctrl-D)"""


@dataclass
class Settings:
    """Sampling settings; the defaults are the spec's (temperature 0.7, top_p 0.9, 256 tokens)."""

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    max_new_tokens: int = 256
    compile: bool = False  # decode steps through torch.compile (generate_tokens(compile=True))

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ConfigError(f"temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k: must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")


def settings_from_args(args: Any) -> Settings:
    return Settings(args.temperature, args.top_p, args.top_k, args.max_new_tokens, args.compile)


class StreamDecoder:
    """Turns token ids into text pieces as they arrive (special tokens skipped, partial characters held)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.ids, self.emitted = tokenizer, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece

    def flush(self) -> str:
        """What is still held at the end of a reply (bytes of a character that never completed, printed as
        U+FFFD as `decode` gives them), so the printed reply equals `text`."""
        text = self.text
        piece, self.emitted = text[len(self.emitted):], text
        return piece

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


def raw_prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """Raw completion's prompt: the text's tokens after the special tokens the tokenizer itself puts before
    them (a Llama-style BOS, as transformers' `tokenizer(text)` and llama.cpp's add_bos_token do), without
    any it appends (an EOS would end the text the model is to continue)."""
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = tokenizer(text)["input_ids"]
    for lead in range(len(full) - len(plain) + 1):
        if plain and full[lead:lead + len(plain)] == plain:
            return full[:lead] + plain
    return plain


def load_for_inference(checkpoint: str, adapter: str | None = None, device: str = "auto"):
    """(model in eval mode, tokenizer, checkpoint kind). The adapter, if given, is merged into the weights:
    on top of the checkpoint's own adapter when it holds one, unless both were trained on the same base
    weights (`llmlab.lora.base_model_for_adapter`, as `merge_adapter_folder` does)."""
    from llmlab.checkpoint import attach_adapter, load_model, read_checkpoint
    from llmlab.data.tokenizer import load_tokenizer
    from llmlab.device import pick_device

    target = pick_device(device)  # a bad --device is a one-line error before anything is loaded
    ckpt = read_checkpoint(checkpoint)
    tokenizer_source = str(ckpt.tokenizer_path) if ckpt.tokenizer_path else ckpt.model_config.tokenizer_name
    kind = ckpt.meta.get("kind", "pretrain")
    if adapter is None:
        model = load_model(ckpt.path)
    else:
        from llmlab.lora import base_model_for_adapter

        folder = Path(adapter)
        # its own adapter merged (what a further adapter was trained on), unless both come from one LoRA run
        model = base_model_for_adapter(folder, ckpt)
        model = attach_adapter(model, folder, where=str(ckpt.path)).merge_and_unload()
        if (folder / "tokenizer").is_dir():
            tokenizer_source = str(folder / "tokenizer")
        kind = "adapter"
    model = model.to(target).eval()
    return model, load_tokenizer(tokenizer_source), kind


@dataclass
class ChatSession:
    """A model, its tokenizer, the sampling settings and (in chat mode) the conversation so far."""

    model: Any
    tokenizer: Any
    chat: bool
    settings: Settings = field(default_factory=Settings)
    system: str | None = None
    seed: int | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    name: str = "model"
    _stops: list[int] | None = field(default=None, init=False, repr=False)  # stop_ids, found once
    # (max_new_tokens, tokens allowed) when a capped reply was last said (context_notice); None: not yet
    _cap_said: tuple[int, int] | None = field(default=None, init=False, repr=False)
    _compile_said: bool = field(default=False, init=False, repr=False)  # the compile line, once a session
    _dropped: int = field(default=0, init=False, repr=False)  # exchanges the last prompt left out
    _dropped_said: bool = field(default=False, init=False, repr=False)  # that line, once a session

    @classmethod
    def open(cls, checkpoint: str, *, adapter: str | None = None, mode: str | None = None,
             settings: Settings | None = None, system: str | None = None, seed: int | None = None,
             device: str = "auto") -> ChatSession:
        model, tokenizer, kind = load_for_inference(checkpoint, adapter, device)
        chat = mode == "chat" if mode else (kind in CHAT_KINDS or kind == "adapter"
                                            or (kind == "imported" and bool(getattr(tokenizer, "chat_template", None))))
        session = cls(model, tokenizer, chat, settings or Settings(), system, seed, name=f"{checkpoint} ({kind})")
        if chat and system:
            session.check_system()
        session.stop_ids()  # once per session: it reads generation_config.json and renders a probe
        return session

    # ---- prompts -------------------------------------------------------------------------------

    def check_system(self) -> None:
        """A one-line ConfigError naming --system when the chat template renders a conversation but refuses
        one with a system message (Gemma's and Mistral's raise_exception); found before the first message."""
        from llmlab.data.chat import render

        probe = [{"role": "user", "content": "Probe question"}]
        try:
            render(self.tokenizer, [{"role": "system", "content": self.system}, *probe], add_generation_prompt=True)
        except DataError as e:
            render(self.tokenizer, probe, add_generation_prompt=True)  # a template that fails anyway says so
            raise ConfigError(f"--system: {e}; this model's chat template takes no system message, drop "
                              f"--system") from None

    def _messages(self, user_text: str, history: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + (self.history if history is None else history) + [{"role": "user", "content": user_text}]

    def prompt_ids(self, user_text: str) -> list[int]:
        """Token ids to generate from: raw text, or the rendered conversation with the generation prompt.
        In chat mode the oldest exchanges are dropped until the prompt leaves room for the reply."""
        if not self.chat:
            return raw_prompt_ids(self.tokenizer, user_text)
        from llmlab.data.chat import encode_messages

        limit = self.model.config.max_seq_len - min(self.settings.max_new_tokens, self.model.config.max_seq_len // 2)
        history = self.history
        while True:  # the training rendering: effective_chat_template, content control tokens as text
            ids = encode_messages(self.tokenizer, self._messages(user_text, history), add_generation_prompt=True)
            if len(ids) <= limit or not history:
                break
            history = history[2:]
        context = self.model.config.max_seq_len
        if len(ids) > context - 1:  # refused before any turn is dropped: the conversation is kept
            # cutting it from the left would drop the chat template's header (and the system message)
            raise ConfigError(f"message: {len(ids)} tokens with the chat template, but the model's context "
                              f"(max_seq_len) is {context}; shorten the message"
                              f"{' or the --system message' if self.system else ''}, or use --raw")
        self._dropped = (len(self.history) - len(history)) // 2
        self.history = history
        return ids

    def context_notice(self, prompt_len: int) -> str | None:
        """One line when the prompt is cut from the left or the reply capped to fit max_seq_len, else None.
        A cut prompt is said every time (it is this message's text). A capped reply is said the first time
        in the session, then again only when it is news: max_new_tokens changed since (/max_tokens), or the
        cap fell to 3/4 or less of the one last said (the history grew). A default max_new_tokens at or
        above a small model's context caps every reply by a little; that line on every turn was noise."""
        from llmlab.generate import fit_to_context

        context, wanted = self.model.config.max_seq_len, self.settings.max_new_tokens
        cut, allowed = fit_to_context(prompt_len, wanted, context)
        parts = []
        if self._dropped and not self._dropped_said:  # from here on every turn drops some: said once
            self._dropped_said = True
            parts.append(f"the oldest {self._dropped} exchange(s) of the conversation are left out (older ones "
                         f"will be as it grows; /reset starts afresh, a lower /max_tokens leaves more room)")
        if cut:
            parts.append(f"the prompt ({prompt_len} tokens) is cut to its last {prompt_len - cut} tokens")
        said = self._cap_said
        if allowed < wanted and (said is None or said[0] != wanted or 4 * allowed <= 3 * said[1]):
            self._cap_said = (wanted, allowed)
            parts.append(f"the reply is limited to {allowed} tokens (max_new_tokens {wanted})")
        if not parts:
            return None
        return f"notice: {' and '.join(parts)} to fit the model's context (max_seq_len {context})"

    def stop_ids(self) -> list[int]:
        """Token ids that end a reply, found on the first call and kept for the session."""
        from llmlab.data.tokenizer import stop_token_ids

        if self._stops is None:
            eos = self.tokenizer.eos_token_id
            self._stops = stop_token_ids(self.tokenizer) if self.chat else [eos] if eos is not None else []
        return self._stops

    # ---- generation ----------------------------------------------------------------------------

    def reply(self, user_text: str, stream: TextIO | None = None, notices: TextIO | None = None, *,
              ids: list[int] | None = None, prefix: str = "") -> str:
        """Generate the answer to `user_text`, writing it to `stream` piece by piece; returns the text.
        `ids` are `prompt_ids(user_text)` when the caller has them already (the REPL's length check);
        `prefix` goes on `stream` after the notices, before the reply (the REPL's "model> ").
        Ctrl-C stops the reply early (what was generated is kept). A prompt cut or a reply capped to fit
        max_seq_len is said in one line on `notices` (default stderr; a capped reply as `context_notice`
        rules), and so is compiling, before the session's first compiled reply; an empty raw prompt, or a
        chat message longer than the context, is a ConfigError."""
        import torch

        from llmlab.device import model_device
        from llmlab.generate import generate_tokens

        decoder = StreamDecoder(self.tokenizer)
        stops = set(self.stop_ids())
        done = [False]

        def on_tokens(next_ids: torch.Tensor) -> None:
            token = int(next_ids[0])
            if done[0] or token in stops:
                done[0] = True
                return
            piece = decoder.push(token)
            if stream is not None and piece:
                stream.write(piece)
                stream.flush()

        generator = None
        if self.seed is not None:
            generator = torch.Generator(model_device(self.model)).manual_seed(self.seed)
        s = self.settings
        ids = self.prompt_ids(user_text) if ids is None else ids
        if not ids:
            raise ConfigError("prompt: empty; it tokenizes to no tokens, give some text")
        out = notices if notices is not None else sys.stderr
        notice = self.context_notice(len(ids))
        if s.compile and not self._compile_said:  # the first compiled reply waits 10-30 s: say why, once
            self._compile_said = True
            notice = f"{notice}\n{COMPILE_NOTICE}" if notice else COMPILE_NOTICE
        if notice:
            out.write(notice + "\n")
            out.flush()
        if stream is not None and prefix:
            stream.write(prefix)
            stream.flush()
        try:
            generate_tokens(self.model, [ids], max_new_tokens=s.max_new_tokens,
                            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                            eos_token_id=sorted(stops) or None, pad_token_id=self.tokenizer.pad_token_id,
                            generator=generator, on_tokens=on_tokens, compile=s.compile)
        except KeyboardInterrupt:
            if stream is not None:
                stream.write(decoder.flush() + " [stopped]")
        if stream is not None:
            stream.write(decoder.flush() + "\n")
            stream.flush()
        answer = decoder.text
        if self.chat:
            self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]
        return answer

    # ---- the REPL ------------------------------------------------------------------------------

    def command(self, line: str, out: TextIO) -> bool:
        """Run one /command; False means leave."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.history = []
            out.write("conversation cleared\n")
            return True
        if name == "/help":
            out.write(COMMANDS_HELP + "\n")
            return True
        fields = {"/temp": ("temperature", float), "/temperature": ("temperature", float),
                  "/top_p": ("top_p", float), "/top_k": ("top_k", int), "/max_tokens": ("max_new_tokens", int)}
        if name not in fields:
            out.write(f"error: unknown command {name}; /help lists the commands\n")
            return True
        key, kind = fields[name]
        try:
            value = kind(arg)
            self.settings = Settings(**{**self.settings.__dict__, key: value})
        except ValueError as e:
            reason = str(e) if isinstance(e, ConfigError) else f"{key}: expected {kind.__name__}, got {arg!r}"
            out.write(f"error: {reason}\n")
            return True
        out.write(f"{key} = {value}\n")
        return True

    def repl(self, input_fn: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
        s = self.settings
        mode = "chat template" if self.chat else "raw completion"
        out.write(f"{self.name}: {mode}; temperature {s.temperature}, top_p {s.top_p}, max_tokens "
                  f"{s.max_new_tokens}.\n{HELP}\n")
        out.flush()
        while True:
            try:
                line = input_fn("you> ")
            except (KeyboardInterrupt, EOFError):
                out.write("\nbye\n")
                return
            if not line.strip():
                continue
            if line.startswith("/"):
                if not self.command(line, out):
                    out.write("bye\n")
                    return
                continue
            try:
                ids = self.prompt_ids(line)  # a message too long for the context: an error line, the session goes on
            except (ConfigError, DataError) as e:  # DataError: the template cannot render this conversation
                out.write(f"error: {e}\n")
                continue
            self.reply(line, stream=out, notices=out, ids=ids, prefix="model> ")  # notices on their own lines
