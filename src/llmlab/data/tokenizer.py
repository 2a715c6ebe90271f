"""Tokenizers: load one (hub id, folder, tokenizer.json) or train a byte-level BPE with chat tokens.

    llm-lab tokenizer train --datasets "bundled:shakespeare" --vocab-size 512 --out runs/tok

A trained tokenizer has the special tokens chat needs from pretraining on — `<|endoftext|>` (end of a
document, the eos), `<|im_start|>`, `<|im_end|>` (ChatML turns) and `<|pad|>` — so SFT never adds
embedding rows that were never trained. It is saved with a ChatML chat template (Qwen style,
`<|im_start|>role\\ncontent<|im_end|>\\n`, with `add_generation_prompt`), so
`AutoTokenizer.from_pretrained(out_dir)` loads it and `apply_chat_template` works.

The model's `vocab_size` is `model_vocab_size(tokenizer)`: `len(tokenizer)`, added tokens included,
optionally rounded up to a multiple (64 is friendly to matrix kernels).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmlab.errors import ConfigError, DataError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS_TOKEN, IM_START, IM_END, PAD_TOKEN]

# ChatML as Qwen renders it, without a default system message. Used for trained tokenizers and for any
# tokenizer that has no chat template of its own.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# ChatML for tokenizers without `<|im_start|>`/`<|im_end|>` tokens (gpt2, Llama-2 base): a turn ends with the
# tokenizer's own eos token, one token the model already knows (pretraining ends documents with it) and that
# generation stops on, so no embedding row is added and the model's vocab_size needs no room.
CHATML_EOS_TEMPLATE = CHATML_TEMPLATE.replace("'<|im_end|>'", "eos_token")


def in_vocabulary(tokenizer: Any, token: str) -> bool:
    """Whether `token` is one entry of the vocabulary (added tokens included), without building the whole
    vocabulary: `get_vocab()` copies it (~0.1 s for 150k tokens), too slow for anything per record."""
    tid = tokenizer.convert_tokens_to_ids(token)
    return isinstance(tid, int) and (tid != tokenizer.unk_token_id or token == tokenizer.unk_token)


def vocabulary_fingerprint(tokenizer: Any) -> str:
    """A short hash of the whole vocabulary (every token and its id, added tokens included): equal for
    tokenizers that map text to the same ids, different as soon as one token or id differs. Builds the
    vocabulary once (~0.1 s for 150k tokens): for set-up checks, not per record."""
    import hashlib

    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.blake2b(json.dumps(items, ensure_ascii=False).encode("utf-8"), digest_size=8).hexdigest()


def _ensure_pad(tok: Any, source: str) -> Any:
    """Give the tokenizer a pad token from its own vocabulary (pad, else eos); never add a row."""
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif in_vocabulary(tok, EOS_TOKEN):
            tok.eos_token = EOS_TOKEN
            tok.pad_token = EOS_TOKEN
        else:
            raise DataError(f"tokenizer_name: {source!r} has neither a pad nor an eos token; "
                            f"train one with `llm-lab tokenizer train`")
    if tok.eos_token is None and in_vocabulary(tok, EOS_TOKEN):
        tok.eos_token = EOS_TOKEN
    return tok


def load_tokenizer(name_or_path: str):
    """Load a tokenizer from a hub id, a local folder, or a `tokenizer.json` file.

    The result always has a pad token (its own, else its eos). A hub id that cannot be fetched gives a
    one-line DataError suggesting a local path or `llm-lab tokenizer train`.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = os.path.expanduser(str(name_or_path))
    if os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        if os.path.basename(path) == "tokenizer.json" and os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
            return load_tokenizer(folder)
        try:
            tok = PreTrainedTokenizerFast(tokenizer_file=path)
        except Exception as e:
            raise DataError(f"tokenizer_name: {path} is not a valid tokenizer.json ({_first_line(e)})") from None
        tok.add_special_tokens({k: v for k, v in (("eos_token", EOS_TOKEN), ("pad_token", PAD_TOKEN))
                                if in_vocabulary(tok, v)})  # names existing tokens only; adds no rows
        return _ensure_pad(tok, path)
    if os.path.isdir(path):
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception as e:
            raise DataError(f"tokenizer_name: cannot load a tokenizer from folder {path} ({_first_line(e)}); "
                            f"it needs tokenizer.json or the files save_pretrained writes") from None
        return _ensure_pad(tok, path)
    if path.startswith((".", "/", "~")) or path.endswith(".json"):
        raise DataError(f"tokenizer_name: {name_or_path!r} does not exist; give a hub id, a folder or a "
                        f"tokenizer.json, or train one with `llm-lab tokenizer train`")
    from llmlab.hub import hub_kwargs, offline_note

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, **hub_kwargs(name_or_path))
    except Exception as e:  # OSError when offline or unknown, ValueError for odd repos
        raise DataError(
            f"tokenizer_name: cannot load {name_or_path!r} from the Hugging Face Hub "
            f"({offline_note(name_or_path) or _first_line(e)}); "
            f"check the name and network, or use a local folder / tokenizer.json, or train one with "
            f"`llm-lab tokenizer train --datasets bundled:shakespeare --vocab-size 4096 --out DIR`"
        ) from None
    return _ensure_pad(tok, name_or_path)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def check_new_folder(out_dir: str | os.PathLike, force: bool) -> Path:
    """Refuse to replace an existing, non-empty `--out` (it may hold checkpoints or shards) unless `force`, and
    one whose parent folder cannot be made."""
    out = Path(out_dir)
    if not force and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out: {out} already exists and is not empty; pass --force (force=True) to replace "
                          f"it or choose another folder")
    from llmlab.atomic import make_dir

    make_dir(out.parent, "--out")  # before the work, not after it
    return out


def train_tokenizer(datasets: Any, vocab_size: int, out_dir: str | os.PathLike, *, text_column: str | None = None,
                    max_docs: int | None = None, seed: int = 42, val_fraction: float = 0.02, force: bool = False):
    """Train a byte-level BPE on the training split of `datasets` and save it to `out_dir` (an existing,
    non-empty `out_dir` is replaced only with force=True).

    Returns the tokenizer loaded back from `out_dir` (what every later stage will see). Validation
    documents are left out so evaluation text stays unseen.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from llmlab.atomic import atomic_dir
    from llmlab.data.sources import iter_texts

    check_new_folder(out_dir, force)
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise DataError(f"vocab_size: {vocab_size} is too small for a byte-level BPE; use at least {minimum}")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    docs = iter_texts(datasets, seed=seed, split="train", val_fraction=val_fraction, text_column=text_column,
                      max_docs=max_docs)
    count = [0]

    def counted():
        for d in docs:
            count[0] += 1
            yield d

    core.train_from_iterator(counted(), trainer=trainer)
    if count[0] == 0:
        raise DataError("datasets: no training documents to train the tokenizer on")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                  additional_special_tokens=[IM_START, IM_END], model_max_length=1_000_000)
    tok.chat_template = CHATML_TEMPLATE
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        tok.save_pretrained(str(tmp))
    return load_tokenizer(str(out))


def model_vocab_size(tokenizer: Any, multiple_of: int | None = None) -> int:
    """Embedding rows the model needs: `len(tokenizer)` (added tokens included), optionally rounded up."""
    n = len(tokenizer)
    if multiple_of:
        n = -(-n // multiple_of) * multiple_of
    return n


def chat_template_of(tokenizer: Any) -> str:
    """The chat template training and inference use (`llmlab.data.chat.effective_chat_template`): the
    tokenizer's own when it renders prefixes consistently, else ChatML (turns ending with eos when the
    vocabulary has no `<|im_end|>` token)."""
    from llmlab.data.chat import effective_chat_template

    return effective_chat_template(tokenizer)


def generation_config_file(tokenizer: Any) -> Path | None:
    """The generation_config.json that goes with a tokenizer: in its folder or, when that folder is an
    LLM-Lab checkpoint's `tokenizer/` (the folder above holds llmlab.json), in the checkpoint (`import_hf`
    saves it there, beside `tokenizer/`, and every checkpoint saved with that tokenizer carries it on); None
    when there is none. Any other parent folder is not read: it may hold an unrelated model's file."""
    source = getattr(tokenizer, "name_or_path", None)
    if not source or not os.path.isdir(source):
        return None
    parent = Path(source).resolve().parent
    folders = [Path(source)] + ([parent] if (parent / "llmlab.json").is_file() else [])
    return next((f for f in (folder / "generation_config.json" for folder in folders) if f.is_file()), None)


def generation_config_eos_ids(tokenizer: Any) -> list[int]:
    """`eos_token_id` (an id or a list) of the tokenizer's `generation_config_file`; [] when there is none."""
    import json

    f = generation_config_file(tokenizer)
    if f is None:
        return []
    try:
        value = json.loads(f.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return []
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and 0 <= v < len(tokenizer)]


def end_of_turn_token(tokenizer: Any) -> str | None:
    """The special token the chat template writes right after an assistant's content (`<|im_end|>`,
    `<|eot_id|>`, `<end_of_turn>`, `<|end|>`, ...), found by rendering a probe conversation; None when the
    template puts no special token there."""
    from llmlab.data.chat import control_tokens, render

    answer = "Probe answer 7"
    try:
        text = render(tokenizer, [{"role": "user", "content": "Probe question"},
                                  {"role": "assistant", "content": answer}])
    except DataError:
        return None
    cut = text.rfind(answer)
    if cut < 0:
        return None
    rest = text[cut + len(answer):]
    found = [(rest.find(t), t) for t in control_tokens(tokenizer) if t in rest]
    found = [(i, t) for i, t in found if not rest[:i].strip()]
    return min(found, key=lambda x: (x[0], -len(x[1])))[1] if found else None


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end a generated reply: eos, the eos ids of a generation_config.json beside the
    tokenizer or its checkpoint, the chat template's end-of-turn token and, when the vocabulary has it,
    `<|im_end|>`."""
    ids: list[int] = []

    def add(i: Any) -> None:
        if isinstance(i, int) and i not in ids:
            ids.append(i)

    add(tokenizer.eos_token_id)
    for i in generation_config_eos_ids(tokenizer):
        add(i)
    turn_end = end_of_turn_token(tokenizer)
    if turn_end is not None:
        add(tokenizer.convert_tokens_to_ids(turn_end))
    if in_vocabulary(tokenizer, IM_END):
        add(tokenizer.convert_tokens_to_ids(IM_END))
    return ids
