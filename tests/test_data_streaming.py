"""Streaming (`streaming=True`, the path hub datasets take) with local files through the same code path:
weights, rank and split like the in-memory path, and exact resuming."""

import json

import datasets
import pytest

from llmlab.data.sources import RecordStream, load_sources


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture
def load_calls(monkeypatch):
    """Every datasets.load_dataset call, to prove the sources really were streamed."""
    real, calls = datasets.load_dataset, []

    def spy(path, *args, **kwargs):
        calls.append((path, kwargs))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    return calls


def test_streamed_weights_three_to_one_give_three_quarters(tmp_path, load_calls):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(1000)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(1000)])
    ds = load_sources([f"{a} | | 3", f"{b} | | 1"], seed=11, streaming=True)
    assert isinstance(ds, datasets.IterableDataset)
    assert load_calls and all(c[1].get("streaming") is True for c in load_calls)
    rows = [r for _, r in zip(range(800), ds)]
    share = sum(r["source"] == 0 for r in rows) / len(rows)
    # binomial sd = sqrt(3/16/800) = 0.015; 0.05 is over 3 sd, and 1:1 (0.5) or 2:1 (0.667) would fail
    assert abs(share - 0.75) < 0.05, share
    assert all(r["text"].startswith("a" if r["source"] == 0 else "b") for r in rows)
    # a stream is read in its stored order: each source's rows come in file order
    assert [r["text"] for r in rows if r["source"] == 0][:5] == ["a0", "a1", "a2", "a3", "a4"]
    again = [r["text"] for _, r in zip(range(800), load_sources([f"{a} | | 3", f"{b} | | 1"], seed=11,
                                                                 streaming=True))]
    assert again == [r["text"] for r in rows]


def test_streamed_stream_resumes_exactly_across_epochs(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(24)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(8)])
    spec = [f"{a} | | 3", f"{b} | | 1"]

    def stream():
        return RecordStream(spec, seed=5, val_fraction=0.0, streaming=True)

    ref = stream()
    full = [k for _, (k, _) in zip(range(120), ref)]
    assert ref.epoch >= 1  # the reference crosses at least one epoch boundary
    for cut in (1, 37, 61):
        part = stream()
        it = iter(part)
        head = [next(it)[0] for _ in range(cut)]
        state = json.loads(json.dumps(part.state_dict()))  # survives a JSON round trip (the checkpoint)
        resumed = stream()
        resumed.load_state_dict(state)
        tail = [k for _, (k, _) in zip(range(120 - cut), resumed)]
        assert head + tail == full, cut
