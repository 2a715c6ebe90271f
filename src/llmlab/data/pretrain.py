"""Pretraining batches: tokenize, put EOS between documents, pack into blocks of exactly `seq_len` tokens.

    batches = PretrainBatches(["bundled:shakespeare"], tokenizer, seq_len=256, batch_size=8, seed=42)
    batch = next(batches)          # {"input_ids": (B, T) long, "labels": (B, T) long}, labels == input_ids
    state = batches.state_dict()   # store with the checkpoint; load_state_dict(state) resumes exactly

No padding anywhere: documents are concatenated with the tokenizer's eos after each one and cut into
blocks; a document may continue into the next block. Labels equal the inputs; the loss shifts them.

This is standard GPT-style packing: there is no BOS token and no per-document attention mask, so within
a block the causal attention of a document's tokens also sees the end of the previous document(s); the
eos between them is the only boundary marker, and the model learns that what follows an eos is
unrelated. A document's first tokens may thus be predicted with unrelated context (or, at a block start,
none) — the usual trade-off that wastes no tokens on padding.
The stream is infinite: when the sources run out a new epoch starts with a new shuffle seed.

Each rank reads a disjoint part of the data (see `llmlab.data.sources`), and `split="val"` reads only the
held-out documents. The state holds the source position and the tokens already read but not yet
emitted, so a stream resumed at batch k yields exactly the batches an uninterrupted one would.

`prepare_shards` (backend of `llm-lab data prepare`) tokenizes once into uint16/uint32 memmap files with
a JSON index; give the shard folder as the dataset name and `PretrainBatches` reads blocks from it in a
seeded random order per epoch, which is faster and trivially resumable. The train/val split of shards is
fixed when they are prepared: a run's different `val_fraction` cannot change it and is ignored, with a
one-line notice (on rank 0) naming both values.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmlab.data.sources import (
    RecordStream,
    Split,
    check_split_args,
    load_sources,
    notice_once,
    parse_dataset_specs,
)
from llmlab.data.tokenizer import vocabulary_fingerprint
from llmlab.errors import DataError

SHARD_INDEX = "index.json"
SHARD_FORMAT = "llmlab-token-shards"
SHARD_VERSION = 1
DOCS_PER_ENCODE = 16  # documents tokenized together; bounds the tokens kept in the resume state


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer_name: the tokenizer has no eos token to separate documents; "
                        "use one with an eos token or train one with `llm-lab tokenizer train`")
    return int(tokenizer.eos_token_id)


def encode_documents(tokenizer: Any, texts: list[str]) -> list[int]:
    """Token ids of several documents, each followed by eos (no BOS or other added tokens)."""
    eos = _eos_id(tokenizer)
    out: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        out.extend(ids)
        out.append(eos)
    return out


def shard_folder(specs: Any) -> Path | None:
    """The folder when the datasets are one `prepare_shards` output, else None."""
    specs = parse_dataset_specs(specs)
    folders = [s for s in specs if (Path(os.path.expanduser(s.name)) / SHARD_INDEX).is_file()]
    if not folders:
        return None
    if len(specs) > 1:
        raise DataError(f"datasets: the token-shard folder {folders[0].name!r} must be the only dataset; "
                        f"mix sources when preparing the shards instead")
    return Path(os.path.expanduser(folders[0].name))


class PretrainBatches:
    """Infinite, resumable iterator of packed `(batch_size, seq_len)` blocks for one split and rank."""

    def __init__(self, datasets: Any, tokenizer: Any, seq_len: int, batch_size: int, *, seed: int = 42,
                 split: Split = "train", val_fraction: float = 0.02, rank: int = 0, world_size: int = 1,
                 text_column: str | None = None, streaming: bool | None = None) -> None:
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        check_split_args(split, val_fraction, rank, world_size)
        self.tokenizer, self.seq_len, self.batch_size = tokenizer, seq_len, batch_size
        self.eos_id = _eos_id(tokenizer)
        folder = shard_folder(datasets)
        self._shards = (ShardBlocks(folder, tokenizer, seq_len, batch_size, seed=seed, split=split, rank=rank,
                                    world_size=world_size, val_fraction=val_fraction) if folder else None)
        self._stream = None if folder else RecordStream(
            datasets, seed=seed, split=split, val_fraction=val_fraction, rank=rank, world_size=world_size,
            as_text=True, text_column=text_column, streaming=streaming)
        self._rows = None
        self._buffer: list[int] = []
        self.batches_yielded = 0

    def __iter__(self) -> PretrainBatches:
        return self

    def _refill(self) -> None:
        if self._rows is None:
            self._rows = iter(self._stream)
        texts = [next(self._rows)[0] for _ in range(DOCS_PER_ENCODE)]
        self._buffer.extend(encode_documents(self.tokenizer, texts))

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._shards is not None:
            ids = self._shards.next_batch()
        else:
            need = self.batch_size * self.seq_len
            while len(self._buffer) < need:
                self._refill()
            ids = torch.tensor(self._buffer[:need], dtype=torch.long).view(self.batch_size, self.seq_len)
            del self._buffer[:need]
        self.batches_yielded += 1
        return {"input_ids": ids, "labels": ids.clone()}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: source state plus tokens read but not yet emitted."""
        if self._shards is not None:
            return {"kind": "shards", "batches": self.batches_yielded, **self._shards.state_dict()}
        return {"kind": "stream", "batches": self.batches_yielded, "stream": self._stream.state_dict(),
                "buffer": list(self._buffer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        kind = "shards" if self._shards is not None else "stream"
        if state.get("kind") != kind:
            raise DataError(f"data state: saved for a {state.get('kind')} source but the datasets are a {kind} "
                            f"source; resume with the same datasets")
        self.batches_yielded = int(state.get("batches", 0))
        if self._shards is not None:
            self._shards.load_state_dict(state)
            return
        self._stream.load_state_dict(state["stream"])
        self._rows = None
        self._buffer = [int(t) for t in state["buffer"]]


# --------------------------------------------------------------------------------------------------
# Token shards (`llm-lab data prepare`)
# --------------------------------------------------------------------------------------------------


def prepare_shards(datasets: Any, tokenizer: Any, out_dir: str | os.PathLike, *, seed: int = 42,
                   val_fraction: float = 0.02, text_column: str | None = None, max_tokens: int | None = None,
                   shard_tokens: int = 1 << 27, tokenizer_name: str | None = None, force: bool = False) -> Path:
    """Tokenize one pass over the mixed sources into memmap shards plus `index.json`; returns the folder.

    Documents are split into train and val shards by content hash (as in streaming). `max_tokens` bounds
    the train tokens written (needed for endless hub streams). Tokens are uint16 when the vocabulary fits,
    else uint32. An existing, non-empty `out_dir` is replaced only with force=True.
    """
    from llmlab.atomic import atomic_dir, atomic_write_text
    from llmlab.data.sources import in_split
    from llmlab.data.tokenizer import check_new_folder

    check_new_folder(out_dir, force)

    eos = _eos_id(tokenizer)
    dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32
    out = Path(out_dir)
    counts: dict[str, list[int]] = {"train": [], "val": []}
    handles: dict[str, Any] = {}

    with atomic_dir(out) as tmp:
        def write(split: str, ids: list[int]) -> None:
            if split not in handles or counts[split][-1] >= shard_tokens:
                if split in handles:
                    handles[split].close()
                handles[split] = open(tmp / f"{split}-{len(counts[split]):05d}.bin", "wb")
                counts[split].append(0)
            handles[split].write(np.asarray(ids, dtype=dtype).tobytes())
            counts[split][-1] += len(ids)

        pending: list[str] = []

        def flush() -> None:
            if not pending:
                return
            for text, ids in zip(pending, tokenizer(pending, add_special_tokens=False)["input_ids"]):
                write("train" if in_split(text, "train", val_fraction) else "val", [*ids, eos])
            pending.clear()

        for row in load_sources(datasets, seed=seed, text_column=text_column):
            pending.append(row["text"])
            if len(pending) >= 256:
                flush()
                if max_tokens is not None and sum(counts["train"]) >= max_tokens:
                    break
        flush()
        for h in handles.values():
            h.close()
        if not counts["train"]:
            raise DataError("datasets: no training documents to prepare")
        index = {
            "format": SHARD_FORMAT, "version": SHARD_VERSION, "dtype": np.dtype(dtype).name, "eos_id": eos,
            "vocab_size": len(tokenizer), "tokenizer": tokenizer_name or getattr(tokenizer, "name_or_path", ""),
            "tokenizer_fingerprint": vocabulary_fingerprint(tokenizer),
            "val_fraction": val_fraction, "seed": seed,
            "splits": {s: [{"file": f"{s}-{i:05d}.bin", "tokens": n} for i, n in enumerate(c)]
                       for s, c in counts.items()},
        }
        atomic_write_text(tmp / SHARD_INDEX, json.dumps(index, indent=2) + "\n")
    return out


class ShardBlocks:
    """Blocks of `seq_len` tokens from prepared shards, in a seeded random order per epoch."""

    def __init__(self, folder: Path, tokenizer: Any, seq_len: int, batch_size: int, *, seed: int, split: str,
                 rank: int, world_size: int, val_fraction: float | None = None) -> None:
        try:
            index = json.loads((folder / SHARD_INDEX).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"datasets: {folder / SHARD_INDEX} is unreadable ({e}); run `llm-lab data prepare` "
                            f"again") from None
        if index.get("format") != SHARD_FORMAT:
            raise DataError(f"datasets: {folder} is not an `llm-lab data prepare` folder")
        stored_print = index.get("tokenizer_fingerprint")  # (shards from before it was recorded: the sizes)
        if index["eos_id"] != tokenizer.eos_token_id or index["vocab_size"] != len(tokenizer) or (
                stored_print is not None and stored_print != vocabulary_fingerprint(tokenizer)):
            raise DataError(f"datasets: {folder} was tokenized with another tokenizer ({index['tokenizer']!r}, "
                            f"{index['vocab_size']} tokens) than this run's ({len(tokenizer)} tokens); set "
                            f"tokenizer_name to that one, or prepare the shards again with this one (`llm-lab "
                            f"data prepare --tokenizer ...`)")
        stored = index.get("val_fraction")
        if val_fraction is not None and stored is not None and not math.isclose(stored, val_fraction):
            notice_once(("val_fraction", str(folder), val_fraction), rank,
                        f"notice: datasets: {folder} was prepared with val_fraction={stored:g}, whose train/val "
                        f"split is used as is (val_fraction={val_fraction:g} is ignored); prepare the shards again "
                        f"to change it")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.arrays = []
        blocks = []
        for entry in index["splits"].get(split, []):
            if entry["tokens"] == 0:
                continue
            arr = np.memmap(folder / entry["file"], dtype=np.dtype(index["dtype"]), mode="r")
            for off in range(0, entry["tokens"] - seq_len + 1, seq_len):
                blocks.append((len(self.arrays), off))
            self.arrays.append(arr)
        self.blocks = np.asarray(blocks, dtype=np.int64).reshape(-1, 2)
        if len(self.blocks) // world_size < batch_size:
            raise DataError(f"datasets: {folder} has {len(self.blocks)} {split} blocks of {seq_len} tokens, too "
                            f"few for batch_size={batch_size} on {world_size} rank(s); prepare more data")
        self.epoch, self.pos = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.blocks))
        return perm[self.rank::self.world_size]

    def next_batch(self) -> torch.Tensor:
        if self.pos + self.batch_size > len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._epoch_order()
        rows = []
        for b in self._order[self.pos:self.pos + self.batch_size]:
            a, off = self.blocks[b]
            rows.append(np.asarray(self.arrays[a][off:off + self.seq_len], dtype=np.int64))
        self.pos += self.batch_size
        return torch.from_numpy(np.stack(rows))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._epoch_order()
