"""Dataset specs, loading and weighted mixing: the one place where records enter LLM-Lab.

    specs = parse_dataset_specs(["HuggingFaceFW/fineweb-2 | fra_Latn | 1.0", "data/*.jsonl | | 2.0"])
    ds = load_sources(specs, seed=42)            # datasets.IterableDataset of {"text", "source"}

Spec lines (spec "Dataset Configuration"): `name | subset | weight`, subset and weight optional
(weight defaults to 1.0), plus optional `key=value` fields `column=...`, `split=...`. `name | | 2.0`
gives a weight without a subset; a lone second field that is a number (`name | 2.0`) is also read as the
weight. In config JSON an item is such a line or an object `{name, subset, weight, column, split}`; a
multi-line string is several lines; blank lines and `#` comments are skipped.

A name is one of:
- `bundled:<name>` — data shipped with LLM-Lab (see `llmlab.data.bundled`), written once as jsonl;
- a local file, folder or glob of `.jsonl/.json/.parquet/.txt/.md` files;
- otherwise a Hugging Face Hub id, streamed: `load_dataset(name, subset, split="train", streaming=True)`.
Every kind goes through `datasets.load_dataset` (local files via the `json`/`parquet`/`text` builders), so
they behave alike. Local files load into an Arrow table and get a fresh permutation each epoch; hub
streams are read in their stored order (a shuffle buffer would make resuming inexact).

Plain `.txt`/`.md` files are read one document per paragraph (`sample_by="paragraph"`: the text between
blank lines, leading newlines and trailing whitespace stripped), not one per line: the lines of a paragraph
(a verse, a speech, a code block without blank lines) stay together and in order, blank lines make no
empty documents, and a single file still has enough documents for the content-hash validation split (one document per file
would put a lone file wholly in train or wholly in validation). Paragraphs are shuffled and split like
any documents; for whole files as documents, write them as jsonl `{"text": ...}` lines.

Pretraining text: the text column is chosen once per source (from its features, or its first rows for a
stream without features), never per row; rows whose text is null, empty or whitespace are skipped.

Each source is normalised to one schema before mixing, so sources with different columns and types can
be combined: `{"text": str, "source": int}` for pretraining (the text column is named with `column=`, or
detected: `text`, `content`, ...) or `{"record": <canonical JSON>, "source": int}` for structured data
(SFT, preference, prompts), decoded again by the consumer. Several sources are interleaved with
`datasets.interleave_datasets(probabilities=normalised weights, seed=..., stopping_strategy="all_exhausted")`:
every draw picks a source with probability weight / sum(weights); a source that runs out restarts while
the others continue.

Validation split: a document belongs to validation iff the first 8 bytes of blake2b(text), read as an
integer and divided by 2**64, fall below `val_fraction` (for structured records the hash is over the
canonical JSON of the content columns only — messages, prompt, answers, ... (`CONTENT_KEYS`) — not ids
or other metadata). The split depends only on the content, never on the seed, order, rank or source, so
training and validation never share a document (identical duplicates land on the same side).

Determinism and resuming: everything is a function of (seed, epoch). `RecordStream` is the infinite,
rank-split, split-filtered stream the batch iterators build on; its `state_dict()` holds the epoch, the
number of rows read and the `datasets` iterator state, so a resumed stream continues exactly.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import math
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import datasets

from llmlab.errors import DataError

TEXT_COLUMNS = ("text", "content", "document", "body", "raw_content", "markdown", "article", "story", "passage")
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".md": "text"}
# Plain text files: one document per paragraph (text between blank lines), not the `text` builder's
# default of one per line. See the module docstring.
TEXT_FILE_OPTIONS = {"sample_by": "paragraph"}
SPEC_KEYS = ("name", "subset", "weight", "column", "split")
Split = Literal["train", "val"]

TEXT_FEATURES = datasets.Features({"text": datasets.Value("string"), "source": datasets.Value("int32")})
RECORD_FEATURES = datasets.Features({"record": datasets.Value("string"), "source": datasets.Value("int32")})


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset line: where the data is, which subset, its relative weight and text column."""

    name: str
    subset: str | None = None
    weight: float = 1.0
    column: str | None = None
    split: str = "train"

    def line(self) -> str:
        """The spec line that parses back to this spec."""
        parts = [self.name, self.subset or "", f"{self.weight:g}"]
        if self.column:
            parts.append(f"column={self.column}")
        if self.split != "train":
            parts.append(f"split={self.split}")
        return " | ".join(parts)


def _weight(where: str, raw: Any, example: str) -> float:
    try:
        w = float(raw)
    except (TypeError, ValueError):
        raise DataError(f"{where}: weight {raw!r} is not a number; write {example}") from None
    if not math.isfinite(w) or w <= 0:
        raise DataError(f"{where}: weight must be a positive number, got {raw!r}; write {example}")
    return w


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _parse_line(where: str, line: str) -> DatasetSpec:
    parts = [p.strip() for p in line.split("|")]
    name = parts[0]
    example = f'"{name or "name"} | subset | 2.0"'
    if not name:
        raise DataError(f"{where}: missing dataset name in {line.strip()!r}; write {example}")
    fields: dict[str, Any] = {"name": name}
    positional = []
    for p in parts[1:]:
        if "=" in p:
            key, value = (s.strip() for s in p.split("=", 1))
            if key not in SPEC_KEYS[1:]:
                raise DataError(f"{where}: unknown field {key!r} in {line.strip()!r}; allowed: "
                                f"{', '.join(SPEC_KEYS[1:])}")
            fields[key] = value or None
        else:
            positional.append(p)
    if len(positional) > 2:
        raise DataError(f"{where}: too many fields in {line.strip()!r}; write {example} "
                        f"(extra options as column=...)")
    if len(positional) == 1 and _is_number(positional[0]) and "weight" not in fields:
        positional = ["", positional[0]]  # "name | 2.0": a weight, not a subset
    if positional and positional[0] and "subset" not in fields:
        fields["subset"] = positional[0]
    if len(positional) == 2 and positional[1] and "weight" not in fields:
        fields["weight"] = positional[1]
    return _make_spec(where, fields, example)


def _make_spec(where: str, fields: dict[str, Any], example: str) -> DatasetSpec:
    name = fields.get("name")
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"{where}: 'name' must be a non-empty string; write {example}")
    weight = _weight(where, fields["weight"], example) if fields.get("weight") is not None else 1.0
    for key in ("subset", "column", "split"):
        v = fields.get(key)
        if v is not None and not isinstance(v, str):
            raise DataError(f"{where}: {key} must be a string, got {v!r}")
    return DatasetSpec(
        name=name.strip(),
        subset=(fields.get("subset") or None),
        weight=weight,
        column=(fields.get("column") or None),
        split=(fields.get("split") or "train"),
    )


def parse_dataset_specs(items: Any, *, field: str = "datasets") -> list[DatasetSpec]:
    """Parse config `datasets` (a string, a list of lines/objects, or DatasetSpecs) into DatasetSpecs.

    Errors name the item (`datasets[1]`) and show a line that would work.
    """
    if isinstance(items, (str, DatasetSpec, dict)):
        items = [items]
    if not isinstance(items, (list, tuple)):
        raise DataError(f"{field}: expected a list of dataset lines, got {type(items).__name__}")
    specs: list[DatasetSpec] = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        if isinstance(item, DatasetSpec):
            specs.append(item)
        elif isinstance(item, str):
            for line in item.splitlines():
                if line.strip() and not line.strip().startswith("#"):
                    specs.append(_parse_line(where, line))
        elif isinstance(item, dict):
            unknown = sorted(set(item) - set(SPEC_KEYS))
            if unknown:
                raise DataError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(SPEC_KEYS)}")
            specs.append(_make_spec(where, dict(item), '{"name": "...", "subset": null, "weight": 1.0}'))
        else:
            raise DataError(f"{where}: expected a line \"name | subset | weight\" or an object, got {item!r}")
    if not specs:
        raise DataError(f"{field}: no dataset given; write at least one line \"name | subset | weight\"")
    return specs


# --------------------------------------------------------------------------------------------------
# Resolving names and loading one source
# --------------------------------------------------------------------------------------------------


def _looks_local(name: str) -> bool:
    return (name.startswith((".", "/", "~")) or any(c in name for c in "*?[")
            or Path(name).suffix.lower() in LOCAL_BUILDERS or os.path.exists(name))


def local_files(where: str, name: str) -> list[str]:
    """Files behind a local file, folder or glob (sorted), or a DataError saying what was not found."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        files = [str(p) for p in sorted(Path(path).rglob("*"))
                 if p.is_file() and p.suffix.lower() in LOCAL_BUILDERS and not p.name.startswith(".")]
    elif os.path.isfile(path):
        files = [path]
    else:
        files = sorted(f for f in globlib.glob(path, recursive=True) if os.path.isfile(f))
    if not files:
        raise DataError(f"{where}: no data files at {name!r}; give a .jsonl/.json/.parquet/.txt/.md file, "
                        f"a folder or glob of them, a hub id, or a bundled:<name> dataset")
    suffixes = {Path(f).suffix.lower() for f in files}
    unknown = suffixes - set(LOCAL_BUILDERS)
    if unknown:
        raise DataError(f"{where}: unsupported file type(s) {', '.join(sorted(unknown))} at {name!r}; "
                        f"use {', '.join(LOCAL_BUILDERS)}")
    builders = {LOCAL_BUILDERS[s] for s in suffixes}
    if len(builders) > 1:
        raise DataError(f"{where}: {name!r} mixes file types ({', '.join(sorted(suffixes))}); "
                        f"give each type as its own dataset line")
    return files


def resolve(spec: DatasetSpec, where: str = "datasets") -> tuple[str, dict[str, Any], bool]:
    """Map a spec to `load_dataset` arguments: (path, kwargs, is_local)."""
    name = spec.name
    if name.startswith("bundled:"):
        from llmlab.data import bundled

        name = str(bundled.materialize(name[len("bundled:"):], spec.subset, where=where))
        return "json", {"data_files": [name], "split": "train"}, True
    if _looks_local(name):
        files = local_files(where, name)
        builder = LOCAL_BUILDERS[Path(files[0]).suffix.lower()]
        options = TEXT_FILE_OPTIONS if builder == "text" else {}
        return builder, {"data_files": files, "split": "train", **options}, True
    return name, {"name": spec.subset, "split": spec.split}, False


def resolve_builder(spec: DatasetSpec) -> str | None:
    """The local `datasets` builder of a local spec (`json`, `parquet`, `text`), None for hub and bundled."""
    if spec.name.startswith("bundled:") or not _looks_local(spec.name):
        return None
    files = local_files("datasets", spec.name)
    return LOCAL_BUILDERS[Path(files[0]).suffix.lower()]


@lru_cache(maxsize=32)
def _load_local(builder: str, files: tuple[str, ...], stamps: tuple[float, ...],
                options: tuple[tuple[str, Any], ...] = ()) -> datasets.Dataset:
    # `stamps` (mtimes) makes an edited file load again; the cache spares re-reading per epoch.
    return datasets.load_dataset(builder, data_files=list(files), split="train", **dict(options))


# Exceptions that only wrap the real one (`datasets` raises them around a builder's error).
_WRAPPERS = ("DatasetGenerationError",)


def _reason(e: BaseException) -> str:
    """`Type: first line` of the real error behind `e`: wrappers such as `DatasetGenerationError` ("An
    error occurred while generating the dataset") are followed to their `__cause__`/`__context__`."""
    seen: set[int] = set()
    while type(e).__name__ in _WRAPPERS and id(e) not in seen:
        seen.add(id(e))
        inner = e.__cause__ or e.__context__
        if inner is None:
            break
        e = inner
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _json_error(error: json.JSONDecodeError) -> str:
    return f"{error.msg} at column {error.colno}"


def _bad_line(path: str, builder: str) -> str | None:
    """What is wrong with one local file, found by reading it: `line N is not valid JSON (...)`, `line N is
    not UTF-8 text (...)`, `line N is a JSON array, not an object`; None when nothing is found. Only run
    after a load failed, so a good file costs nothing."""
    first = None  # (line number, error) of the first bad line
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            if n == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return (f"line {n} is not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line); "
                        f"save the file as UTF-8")
            if builder != "json" or not line.strip():
                continue
            if first is None:
                first = n
            try:
                value = json.loads(line.rstrip("\r\n"))  # a line cut short: its end's column, not "column 1"
            except json.JSONDecodeError as e:
                if n == first:  # maybe a whole JSON document (a .json array or a pretty-printed object)
                    return _bad_document(path)
                return f"line {n} is not valid JSON ({_json_error(e)}); fix or remove that line"
            if not isinstance(value, dict):
                kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")
                return f"line {n} is a JSON {kind}, not an object {{...}}; write one object per line"
    return None


def _bad_document(path: str) -> str | None:
    """The error of a file read as one JSON document, or None when it is one (something else is wrong)."""
    with open(path, encoding="utf-8-sig") as fh:
        try:
            json.load(fh)
        except json.JSONDecodeError as e:
            return f"line {e.lineno} is not valid JSON ({_json_error(e)}); fix that line"
    return None


def _file_columns(path: str, builder: str) -> list[str] | None:
    """The columns of one local json/parquet file (its first record's keys, or the parquet schema), None
    when they cannot be told cheaply."""
    if builder == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    with open(path, encoding="utf-8-sig") as fh:
        first = next((line for line in fh if line.strip()), "")
        try:
            value = json.loads(first)
        except json.JSONDecodeError:  # a whole-document .json file (an array or a pretty-printed object)
            fh.seek(0)
            value = json.load(fh)
    value = value[0] if isinstance(value, list) and value else value
    return list(value) if isinstance(value, dict) else None


def _mixed_columns(files: list[str], builder: str) -> str | None:
    """`a.jsonl: x, y; b.jsonl: z` when the files of one source have different columns (`datasets` loads
    one source as one table and fails with a bare "Couldn't cast"), else None."""
    if builder not in ("json", "parquet") or len(files) < 2:
        return None
    columns = {}
    for f in files:
        try:
            found = _file_columns(f, builder)
        except (ValueError, OSError):
            return None
        if found is not None:
            columns[f] = tuple(sorted(found))
    if len(set(columns.values())) < 2:
        return None
    return "; ".join(f"{os.path.basename(f)}: {', '.join(c)}" for f, c in columns.items())


def _has_content(path: str) -> bool:
    """True when the file holds anything but whitespace (read in blocks, stops at the first)."""
    with open(path, "rb") as fh:
        while block := fh.read(1 << 16):
            if block.strip(b" \t\r\n\x0b\x0c\xef\xbb\xbf"):
                return True
    return False


def _local_failure(spec: DatasetSpec, builder: str, files: list[str], error: BaseException, where: str) -> DataError:
    """A one-line DataError for a local source that `datasets` could not load: an empty source, the first
    bad line of a file (JSON, UTF-8), else the underlying error."""
    try:
        if not any(_has_content(f) if builder != "parquet" else os.path.getsize(f) > 0 for f in files):
            return DataError(f"{where}: {spec.name!r} is empty (no records); add records to it or remove it "
                             f"from {where.split('[')[0]}")
        if builder in ("json", "text"):
            for f in files:
                found = _bad_line(f, builder)
                if found:
                    return DataError(f"{where}: {f!r} {found}")
        if mixed := _mixed_columns(files, builder):
            return DataError(f"{where}: the files of {spec.name!r} have different columns ({mixed}); one dataset "
                             f"line is one table: give each kind of file its own line (weights set the mix)")
    except OSError as e:  # unreadable (permissions, a file removed meanwhile): say so
        return DataError(f"{where}: cannot read {spec.name!r} ({_reason(e)})")
    return DataError(f"{where}: cannot read {spec.name!r} ({_reason(error)}); check the file format")


def load_one(spec: DatasetSpec, *, streaming: bool | None = None, where: str = "datasets"):
    """Load one source through `datasets.load_dataset`: a `Dataset` (local, in memory) or `IterableDataset`.

    `streaming=None` streams hub datasets and loads local files; True/False force either way.
    """
    path, kwargs, is_local = resolve(spec, where)
    stream = (not is_local) if streaming is None else streaming
    try:
        if is_local and not stream:
            files = tuple(kwargs["data_files"])
            options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in ("data_files", "split")))
            return _load_local(path, files, tuple(os.path.getmtime(f) for f in files), options)
        return datasets.load_dataset(path, **kwargs, streaming=stream)
    except DataError:
        raise
    except Exception as e:  # hub unreachable, unknown name, bad subset, unreadable file
        if is_local:
            raise _local_failure(spec, path, list(kwargs["data_files"]), e, where) from e
        raise DataError(f"{where}: cannot load {spec.name!r} from the Hugging Face Hub ({_reason(e)}); "
                        f"check the name, subset and network, or use a local file or a bundled:<name> dataset"
                        ) from None


# --------------------------------------------------------------------------------------------------
# Normalising and mixing
# --------------------------------------------------------------------------------------------------


def detect_text_column(columns: list[str], string_columns: set[str]) -> str | None:
    """The text column among a source's columns: a known name (`text`, `content`, ...) that holds strings,
    else its only string column."""
    for c in TEXT_COLUMNS:
        if c in string_columns:
            return c
    strings = [c for c in columns if c in string_columns]
    return strings[0] if len(strings) == 1 else None


PEEK_ROWS = 100  # rows read to find the columns of a stream whose features are unknown


def _columns(ds: Any) -> tuple[list[str], set[str]]:
    """(all columns, string columns) of a source: from its features, else from its first rows."""
    features = getattr(ds, "features", None)
    if features is not None:
        return list(features), {k for k, f in features.items()
                                if isinstance(f, datasets.Value) and f.dtype in ("string", "large_string")}
    columns: dict[str, None] = {}
    strings: set[str] = set()
    for _, row in zip(range(PEEK_ROWS), ds):
        for k, v in row.items():
            columns.setdefault(k)
            if isinstance(v, str):
                strings.add(k)
    return list(columns), strings


def text_column_of(ds: Any, spec: DatasetSpec, column: str | None, where: str) -> str:
    """The one text column of a source, chosen once (not per row, where a null would pick another column)."""
    columns, strings = _columns(ds)
    fix = f"name the text column: \"{spec.name} | | {spec.weight:g} | column=...\""
    if column is not None:
        if columns and column not in columns:
            raise DataError(f"{where}: {spec.name!r} has no column {column!r} (keys: {', '.join(columns)}); {fix}")
        return column
    found = detect_text_column(columns, strings)
    if found is None:
        raise DataError(f"{where}: cannot tell the text column of {spec.name!r} (keys: {', '.join(columns)}); {fix}")
    return found


def canonical_json(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, sort_keys=True, default=str)


def _to_text(index: int, column: str, strip_newlines: bool):
    def fn(record: dict[str, Any]) -> dict[str, Any]:
        value = record.get(column)
        text = "" if value is None else value if isinstance(value, str) else str(value)
        return {"text": text.lstrip("\n").rstrip() if strip_newlines else text, "source": index}

    return fn


def _has_text(row: dict[str, Any]) -> bool:
    """Rows whose text is null, empty or only whitespace are skipped (they would be an eos-only document)."""
    return bool(row["text"].strip())


def _to_record(index: int):
    def fn(record: dict[str, Any]) -> dict[str, Any]:
        # Arrow gives every row every column of its file; a null is a key the record did not have.
        present = {k: v for k, v in record.items() if v is not None}
        return {"record": canonical_json(present), "source": index}

    return fn


def _rank_part(ds: datasets.IterableDataset, rank: int, world_size: int) -> datasets.IterableDataset:
    """This rank's disjoint part of one source, taken before mixing.

    Whole shards (files) per rank when their number divides evenly, else every world_size-th row.
    Splitting the mixed stream instead (what `split_dataset_by_node` does after interleaving) would
    let a source that restarts under "all_exhausted" hand the same row to two ranks.
    """
    if ds.num_shards >= world_size and ds.num_shards % world_size == 0:
        return ds.shard(num_shards=world_size, index=rank)
    return ds.filter(lambda _, i: i % world_size == rank, with_indices=True)


def load_sources(
    specs: list[DatasetSpec] | Any,
    *,
    seed: int = 42,
    epoch: int = 0,
    streaming: bool | None = None,
    as_text: bool = True,
    text_column: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    stopping_strategy: str = "all_exhausted",
) -> datasets.IterableDataset:
    """Load, normalise and interleave the sources by weight; one `datasets.IterableDataset`.

    Rows are `{"text", "source"}` (as_text) or `{"record", "source"}`; `source` is the spec's index.
    Deterministic for (seed, epoch). With world_size > 1 each rank gets a disjoint part of every source
    (see `_rank_part`).
    """
    if not isinstance(specs, list) or not all(isinstance(s, DatasetSpec) for s in specs):
        specs = parse_dataset_specs(specs)
    parts = []
    for i, spec in enumerate(specs):
        where = f"datasets[{i}]"
        ds = load_one(spec, streaming=streaming, where=where)
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(f"{where}: {spec.name!r} has several splits; name one with split=...")
        if isinstance(ds, datasets.Dataset):
            if len(ds) == 0:
                raise DataError(f"{where}: {spec.name!r} is empty (no records); add records to it or remove it "
                                f"from datasets")
            ds = ds.shuffle(seed=seed + 1000 * epoch + i).to_iterable_dataset()
        if as_text:
            column = text_column_of(ds, spec, spec.column or text_column, where)
            is_text_file = resolve_builder(spec) == "text"
            ds = ds.map(_to_text(i, column, is_text_file), features=TEXT_FEATURES)
            ds = ds.select_columns(["text", "source"]).filter(_has_text)
        else:
            if spec.column:  # records are read by their format (messages, prompt, chosen, ...), never one column
                raise DataError(f"{where}: column={spec.column} picks the text column of pretraining data; SFT, "
                                f"preference and prompt records are read by their format: remove column=")
            ds = ds.map(_to_record(i), features=RECORD_FEATURES).select_columns(["record", "source"])
        if world_size > 1:
            ds = _rank_part(ds, rank, world_size)
        parts.append(ds)
    if len(parts) == 1:
        return parts[0]
    total = sum(s.weight for s in specs)
    return datasets.interleave_datasets(
        parts, probabilities=[s.weight / total for s in specs], seed=seed + epoch,
        stopping_strategy=stopping_strategy,
    )


# --------------------------------------------------------------------------------------------------
# Validation split and the resumable stream
# --------------------------------------------------------------------------------------------------


def hash_fraction(text: str) -> float:
    """A number in [0, 1) fixed by the content: blake2b's first 8 bytes / 2**64."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


# The columns that make up a structured record's content (SFT, preference and prompt formats); ids,
# sources, urls, task names and other metadata are left out of the split hash.
CONTENT_KEYS = ("messages", "conversations", "system", "instruction", "input", "response", "output", "prompt",
                "question", "completion", "chosen", "rejected", "answer", "chosen_response", "rejected_response")


def content_key(record_json: str) -> str:
    """What a structured record's validation split is hashed over: the canonical JSON of its content
    columns (`CONTENT_KEYS`), so that the same conversation with another id or source lands on the same
    side; the whole record when it has none of them."""
    record = json.loads(record_json)
    content = {k: record[k] for k in CONTENT_KEYS if k in record} if isinstance(record, dict) else {}
    return canonical_json(content) if content else record_json


def in_split(text: str, split: Split, val_fraction: float) -> bool:
    """True iff the document with this content belongs to `split` (see the module docstring)."""
    is_val = hash_fraction(text) < val_fraction
    return is_val if split == "val" else not is_val


def check_split_args(split: str, val_fraction: float, rank: int, world_size: int) -> None:
    if split not in ("train", "val"):
        raise DataError(f"split: {split!r} is not one of 'train', 'val'")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction: must be in [0, 1), got {val_fraction}")
    if split == "val" and val_fraction == 0.0:
        raise DataError("val_fraction: 0 leaves no validation documents; set it above 0 (e.g. 0.02)")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank: {rank} is not in [0, world_size={world_size})")


class RecordStream:
    """Infinite stream of one split's rows for one rank; starts a new epoch (new seed) when sources end.

    Yields `(key, row)` where key is the text (`as_text`) or the canonical record JSON. `state_dict()`
    taken between two rows resumes exactly after the last row yielded.
    """

    def __init__(self, specs: Any, *, seed: int = 42, split: Split = "train", val_fraction: float = 0.02,
                 rank: int = 0, world_size: int = 1, as_text: bool = True, text_column: str | None = None,
                 streaming: bool | None = None) -> None:
        check_split_args(split, val_fraction, rank, world_size)
        self.specs = specs if isinstance(specs, list) and all(isinstance(s, DatasetSpec) for s in specs) \
            else parse_dataset_specs(specs)
        self.seed, self.split, self.val_fraction = seed, split, val_fraction
        self.rank, self.world_size = rank, world_size
        self.as_text, self.text_column, self.streaming = as_text, text_column, streaming
        self.epoch = 0
        self.rows_read = 0  # rows of the mixed stream read in this epoch (before the split filter)
        self._ds: datasets.IterableDataset | None = None
        self._pending: dict[str, Any] | None = None

    def _dataset(self) -> datasets.IterableDataset:
        return load_sources(self.specs, seed=self.seed, epoch=self.epoch, streaming=self.streaming,
                            as_text=self.as_text, text_column=self.text_column, rank=self.rank,
                            world_size=self.world_size)

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        key_name = "text" if self.as_text else "record"
        while True:
            ds = self._dataset()
            skip = 0
            fresh = self._pending is None
            if self._pending is not None:
                try:
                    ds.load_state_dict(self._pending["source"])
                except Exception:  # a state from another datasets version: replay instead
                    skip = self.rows_read
                self._pending = None
            self._ds = ds
            kept = 0
            for row in ds:
                if skip:
                    skip -= 1
                    continue
                self.rows_read += 1
                key = row[key_name]
                if in_split(key if self.as_text else content_key(key), self.split, self.val_fraction):
                    kept += 1
                    yield key, row
            if kept == 0 and fresh:
                raise DataError(f"datasets: the {self.split} split is empty "
                                f"(val_fraction={self.val_fraction}); add data or change val_fraction")
            self.epoch += 1
            self.rows_read = 0

    def state_dict(self) -> dict[str, Any]:
        source = self._ds.state_dict() if self._ds is not None else (self._pending or {}).get("source")
        return {"epoch": self.epoch, "rows_read": self.rows_read, "source": source}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume; takes effect when iteration (re)starts."""
        self.epoch = int(state["epoch"])
        self.rows_read = int(state["rows_read"])
        self._ds = None
        self._pending = {"source": state["source"]} if state.get("source") is not None else None


def iter_texts(specs: Any, *, seed: int = 42, split: Split = "train", val_fraction: float = 0.02,
               text_column: str | None = None, max_docs: int | None = None) -> Iterable[str]:
    """One pass (one epoch) over the documents of a split, for tokenizer training and shard writing."""
    n = 0
    for row in load_sources(specs, seed=seed, text_column=text_column):
        if max_docs is not None and n >= max_docs:
            return
        if in_split(row["text"], split, val_fraction):
            n += 1
            yield row["text"]


class RecordIterator:
    """Infinite, resumable iterator of decoded records (dicts) of one split and rank, for structured data.

    `where` names the record in error messages: the source line and the row number in this epoch.
    """

    def __init__(self, specs: Any, *, seed: int = 42, split: Split = "train", val_fraction: float = 0.02,
                 rank: int = 0, world_size: int = 1, streaming: bool | None = None) -> None:
        self.stream = RecordStream(specs, seed=seed, split=split, val_fraction=val_fraction, rank=rank,
                                   world_size=world_size, as_text=False, streaming=streaming)
        self._rows: Iterator | None = None
        self.where = "record"

    def __iter__(self) -> RecordIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._rows is None:
            self._rows = iter(self.stream)
        key, row = next(self._rows)
        spec = self.stream.specs[row["source"]]
        # the position is in the shuffled, mixed stream, not the file: a preview makes the record findable
        preview = key if len(key) <= 72 else key[:69] + "..."
        self.where = (f"{spec.name}: record {self.stream.rows_read - 1} of the mixed stream, epoch "
                      f"{self.stream.epoch} ({preview})")
        return json.loads(key)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
        self._rows = None


_NOTICED: set[Any] = set()


def reset_notices() -> None:
    """Forget which once-per-process notices were said (here and the chat template's in `data.chat`): each
    stage run calls it, so a second run in one Python process says its first cut or fallback again."""
    from llmlab.data import chat

    _NOTICED.clear()
    chat._NOTICED.clear()


def notice_once(key: Any, rank: int, line: str) -> None:
    """Print `line` on stderr once per process for `key` (rank 0 only): data notices that would otherwise
    repeat per record or per iterator (later occurrences are counted by their iterator, if at all)."""
    if rank == 0 and key not in _NOTICED:
        _NOTICED.add(key)
        print(line, file=sys.stderr, flush=True)


class RecordBatches:
    """Shared life cycle of the structured-data batch iterators (SFT, preference, prompts).

    Subclasses implement `encode(record, where)` (an example, or None when the record is valid but has
    nothing to train on) and `collate(examples)`. Records in no known format raise their DataError, or
    with `skip_invalid=True` are skipped and counted in `skipped_invalid`; None results are counted in
    `skipped_empty`. The state (source position and counters) resumes exactly.
    """

    def __init__(self, datasets: Any, tokenizer: Any, seq_len: int | None, batch_size: int, *, seed: int = 42,
                 split: Split = "train", val_fraction: float = 0.02, rank: int = 0, world_size: int = 1,
                 skip_invalid: bool = False, streaming: bool | None = None) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if seq_len is not None and seq_len < 2:
            raise DataError(f"seq_len must be >= 2, got {seq_len}")
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.batch_size, self.skip_invalid = batch_size, skip_invalid
        self.records = RecordIterator(datasets, seed=seed, split=split, val_fraction=val_fraction, rank=rank,
                                      world_size=world_size, streaming=streaming)
        self.skipped_invalid = 0
        self.skipped_empty = 0
        self.batches_yielded = 0
        self._dry: list[int] | None = None  # [epoch, rows_read, invalid, empty] since the last usable example

    def encode(self, record: dict[str, Any], where: str) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def collate(self, examples: list[Any]) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def __iter__(self) -> RecordBatches:
        return self

    def next_example(self) -> Any:
        """The next usable example, skipping (and counting) what cannot be trained on.

        A DataError when a full pass over the split (one whole epoch) gives no usable example, instead of
        skipping forever.
        """
        stream = self.records.stream
        while True:
            if self._dry is None:
                self._dry = [stream.epoch, stream.rows_read, 0, 0]
            record = next(self.records)
            try:
                example = self.encode(record, self.records.where)
            except DataError:
                if not self.skip_invalid:
                    raise
                self.skipped_invalid += 1
                self._dry[2] += 1
                self._check_dry()
                continue
            if example is None:
                self.skipped_empty += 1
                self._dry[3] += 1
                self._check_dry()
                continue
            self._dry = None
            return example

    def _check_dry(self) -> None:
        """Raise once every record of one whole epoch was skipped: the skipping began at an epoch's start
        and the next epoch has begun, or it began within epoch e and epoch e + 2 has begun (each epoch has
        its own order, so only a whole epoch proves that no record is usable)."""
        epoch, rows, invalid, empty = self._dry
        stream = self.records.stream
        if stream.epoch < (epoch + 1 if rows == 0 else epoch + 2):
            return
        limit = f"seq_len={self.seq_len}" if self.seq_len is not None else "the length limit"
        raise DataError(
            f"datasets: no usable record in a full pass over the {stream.split} split ({invalid + empty} skipped "
            f"in a row: {invalid} in no known format, {empty} with nothing to train on (a blank answer, or none "
            f"left within {limit})); raise max_seq_len so the answers fit, or check the record format")

    def __next__(self) -> Any:
        batch = self.collate([self.next_example() for _ in range(self.batch_size)])
        self.batches_yielded += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"records": self.records.state_dict(), "batches": self.batches_yielded,
                "skipped_invalid": self.skipped_invalid, "skipped_empty": self.skipped_empty}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records.load_state_dict(state["records"])
        self._dry = None
        self.batches_yielded = int(state.get("batches", 0))
        self.skipped_invalid = int(state.get("skipped_invalid", 0))
        self.skipped_empty = int(state.get("skipped_empty", 0))
