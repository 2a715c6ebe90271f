"""Dataset specs, loading through one `datasets` path, weighted mixing, validation split, ranks, bundled data."""

import json

import datasets
import pytest

from llmlab.data import bundled, sources
from llmlab.data.sources import DatasetSpec, RecordStream, load_sources, parse_dataset_specs
from llmlab.errors import DataError


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def one_epoch(stream: RecordStream) -> list[str]:
    out = []
    for key, _ in stream:
        if stream.epoch > 0:
            break
        out.append(key)
    return out


@pytest.fixture(autouse=True)
def _bundled_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path_factory.getbasetemp() / "llmlab-cache"))


def test_parse_lines_objects_and_multiline():
    specs = parse_dataset_specs([
        "HuggingFaceFW/fineweb-2 | fra_Latn | 2.5",
        "a.jsonl | | 3 | column=body",
        "b.jsonl | 0.5",
        {"name": "org/x", "subset": "en", "weight": 2, "split": "validation"},
        "c.txt\n# a comment\n\nd.txt | | 4",
    ])
    assert specs == [
        DatasetSpec("HuggingFaceFW/fineweb-2", "fra_Latn", 2.5),
        DatasetSpec("a.jsonl", None, 3.0, column="body"),
        DatasetSpec("b.jsonl", None, 0.5),
        DatasetSpec("org/x", "en", 2.0, split="validation"),
        DatasetSpec("c.txt"),
        DatasetSpec("d.txt", None, 4.0),
    ]
    assert parse_dataset_specs(specs[0].line()) == [specs[0]]


@pytest.mark.parametrize("item, needle", [
    ("x | sub | abc", "datasets[1]: weight 'abc' is not a number"),
    ("x | sub | -1", "datasets[1]: weight must be a positive number"),
    ("x | a | 1 | 2", "datasets[1]: too many fields"),
    ({"name": "x", "wieght": 2}, "datasets[1]: unknown key(s) wieght"),
    (" | a", "datasets[1]: missing dataset name"),
])
def test_parse_errors_are_one_line_and_name_the_item(item, needle):
    with pytest.raises(DataError) as e:
        parse_dataset_specs(["ok", item])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_weights_two_to_one_give_two_thirds(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(600)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(600)])
    ds = load_sources([f"{a} | | 2", f"{b} | | 1"], seed=3)
    rows = [r for _, r in zip(range(900), ds)]
    share = sum(r["source"] == 0 for r in rows) / len(rows)
    # binomial sd = sqrt(2/9/900) = 0.016; 0.06 is almost 4 sd, and a 1:1 mix (0.5) would fail
    assert abs(share - 2 / 3) < 0.06
    assert all(r["text"].startswith("a" if r["source"] == 0 else "b") for r in rows)
    again = [r["text"] for _, r in zip(range(900), load_sources([f"{a} | | 2", f"{b} | | 1"], seed=3))]
    other = [r["text"] for _, r in zip(range(900), load_sources([f"{a} | | 2", f"{b} | | 1"], seed=4))]
    assert again == [r["text"] for r in rows] and other != again


def test_local_and_hub_names_go_through_load_dataset(tmp_path, monkeypatch):
    hub_file = write_jsonl(tmp_path / "hub.jsonl", [{"content": f"hub doc {i}", "n": i} for i in range(20)])
    local = write_jsonl(tmp_path / "local.jsonl", [{"text": f"local doc {i}"} for i in range(20)])
    real = datasets.load_dataset
    calls = []

    def spy(path, *args, **kwargs):
        calls.append((path, kwargs))
        if path == "someorg/tiny":  # stands in for the hub: same function, same streaming arguments
            return real("json", data_files=[hub_file], split=kwargs["split"], streaming=kwargs["streaming"])
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    ds = load_sources(["someorg/tiny | en_sub | 1", f"{local} | | 1"], seed=0)
    texts = {r["text"] for r in ds}
    assert {f"hub doc {i}" for i in range(20)} | {f"local doc {i}" for i in range(20)} == texts
    hub_call = [c for c in calls if c[0] == "someorg/tiny"][0]
    assert hub_call[1] == {"name": "en_sub", "split": "train", "streaming": True}
    assert any(c[0] == "json" and c[1]["data_files"] == [local] for c in calls)


def test_hub_failure_is_a_one_line_data_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\nlong details")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as e:
        load_sources(["someorg/missing"])
    msg = str(e.value)
    assert "datasets[0]" in msg and "someorg/missing" in msg and "bundled:" in msg and "\n" not in msg


def test_missing_local_file_and_unknown_text_column(tmp_path):
    with pytest.raises(DataError, match="no data files at"):
        load_sources([str(tmp_path / "nope.jsonl")])
    f = write_jsonl(tmp_path / "two.jsonl", [{"title": "t", "summary": "s"}])
    with pytest.raises(DataError, match=r"cannot tell the text column .*keys: title, summary.*column="):
        list(load_sources([f]))
    assert [r["text"] for r in load_sources([f"{f} | | 1 | column=summary"])] == ["s"]



def load_error(spec) -> str:
    with pytest.raises(DataError) as e:
        list(load_sources([spec]))
    msg = str(e.value)
    assert "\n" not in msg and "An error occurred while generating" not in msg, msg
    return msg


def test_malformed_json_line_names_the_file_line_and_cause(tmp_path):
    path = tmp_path / "malformed.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c" "d"}\n{"text": "e"}\n')
    msg = load_error(str(path))
    assert msg.startswith(f"datasets[0]: '{path}' line 4 is not valid JSON (Expecting ',' delimiter at column 14)")
    # in a folder: the file inside it is named
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"text": "ok"}])
    (folder / "b.jsonl").write_text('{"text": "ok"}\n{"text": "x"} trailing\n')
    assert f"'{folder / 'b.jsonl'}' line 2 is not valid JSON (Extra data at column 15)" in load_error(str(folder))
    # a whole-document .json file: the line of the document where it breaks
    doc = tmp_path / "doc.json"
    doc.write_text('[\n  {"text": "a"},\n  {"text": }\n]\n')
    assert f"'{doc}' line 3 is not valid JSON (Expecting value at column 12)" in load_error(str(doc))


def test_json_lines_that_are_not_objects_or_not_utf8_are_named(tmp_path):
    arr = tmp_path / "arr.jsonl"
    arr.write_text('{"text": "a"}\n[1, 2]\n')
    assert f"'{arr}' line 2 is a JSON array, not an object" in load_error(str(arr))
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes(b'{"text": "a"}\n\xff{"text": "b"}\n')
    assert f"'{raw}' line 2 is not UTF-8 text" in load_error(str(raw))
    txt = tmp_path / "raw.txt"
    txt.write_bytes(b"fine\n\nstill fine\n\xff bad\n")
    assert f"'{txt}' line 4 is not UTF-8 text" in load_error(str(txt))


def test_empty_files_and_folders_say_empty(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert load_error(str(empty)).startswith(f"datasets[0]: '{empty}' is empty (no records)")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    assert load_error(str(blank)).startswith(f"datasets[0]: '{blank}' is empty (no records)")
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("")
    assert load_error(str(folder)).startswith(f"datasets[0]: '{folder}' is empty (no records)")


def test_other_local_failures_keep_the_underlying_cause(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    msg = load_error(str(bad))
    assert f"'{bad}'" in msg and "ArrowInvalid: Parquet magic bytes not found" in msg

def test_mixed_schemas_and_text_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"content": "x" * 3, "score": 1.5}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "yy", "score": "high"}])
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "one.txt").write_text("line one\nline two\n")
    texts = sorted(r["text"] for r in load_sources([a, b, str(tmp_path / "c")], stopping_strategy="all_exhausted"))
    assert set(texts) == {"xxx", "yy", "line one\nline two"}  # a text file's paragraph is one document


@pytest.mark.parametrize("streaming", [False, True])
def test_text_files_are_paragraph_documents_in_order(tmp_path, streaming):
    # A verse of 3 lines, blank lines (also several in a row, and whitespace-only ones), a .md file.
    (tmp_path / "poem.txt").write_text("Roses are red,\nviolets are blue,\nsugar is sweet.\n\n\n\n"
                                       "Second verse\nends here.\n  \n\nlast line\n")
    (tmp_path / "notes.md").write_text("# Title\n\nbody line 1\nbody line 2\n")
    poem = [r["text"] for r in load_sources([str(tmp_path / "poem.txt")], streaming=streaming)]
    assert sorted(poem) == sorted(["Roses are red,\nviolets are blue,\nsugar is sweet.",
                                   "Second verse\nends here.", "last line"])  # no empty or EOS-only documents
    md = [r["text"] for r in load_sources([str(tmp_path / "notes.md")], streaming=streaming)]
    assert sorted(md) == ["# Title", "body line 1\nbody line 2"]


def test_text_file_lines_of_a_paragraph_share_one_side_of_the_split(tmp_path):
    paragraphs = [f"paragraph {i} first line\nparagraph {i} second line" for i in range(200)]
    (tmp_path / "book.txt").write_text("\n\n".join(paragraphs) + "\n")
    train = one_epoch(RecordStream([str(tmp_path / "book.txt")], split="train", val_fraction=0.2))
    val = one_epoch(RecordStream([str(tmp_path / "book.txt")], split="val", val_fraction=0.2))
    assert sorted(train + val) == sorted(paragraphs)  # whole paragraphs, each on exactly one side
    assert 15 <= len(val) <= 65  # one file still gives a validation split (40 expected, sd about 5.7)


@pytest.mark.parametrize("streaming", [False, True])
def test_null_or_empty_text_is_skipped_never_another_column(tmp_path, streaming):
    f = write_jsonl(tmp_path / "web.jsonl", [
        {"text": None, "url": "http://one.example"},
        {"text": "real document", "url": "http://two.example"},
        {"text": "", "url": "http://three.example"},
        {"text": " \n ", "url": "http://four.example"},
        {"url": "http://five.example"},
    ])
    assert [r["text"] for r in load_sources([f], streaming=streaming)] == ["real document"]
    assert [k for _, (k, _) in zip(range(3), RecordStream([f], val_fraction=0.0, streaming=streaming))] == \
        ["real document"] * 3
    with pytest.raises(DataError) as e:
        load_sources([f"{f} | | 1 | column=body"], streaming=streaming)
    assert "no column 'body'" in str(e.value) and "keys: text, url" in str(e.value) and "\n" not in str(e.value)


def test_validation_split_disjoint_and_sized(tmp_path):
    f = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"document number {i}"} for i in range(1000)])
    train = one_epoch(RecordStream([f], split="train", val_fraction=0.1))
    val = one_epoch(RecordStream([f], split="val", val_fraction=0.1))
    assert not set(train) & set(val)
    assert len(train) + len(val) == 1000
    assert 60 <= len(val) <= 140  # 100 expected, sd about 9.5
    other_seed = one_epoch(RecordStream([f], split="val", val_fraction=0.1, seed=7))
    assert sorted(other_seed) == sorted(val)  # the split depends on content only


def test_ranks_read_disjoint_parts(tmp_path):
    f = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"doc {i}"} for i in range(200)])
    g = write_jsonl(tmp_path / "more.jsonl", [{"text": f"more {i}"} for i in range(200)])
    parts = [set(one_epoch(RecordStream([f, g], rank=r, world_size=2, val_fraction=0.0))) for r in range(2)]
    assert not parts[0] & parts[1]
    assert len(parts[0]) > 50 and len(parts[1]) > 50


def test_stream_resumes_exactly_across_epochs(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(30)])
    g = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(20)])
    spec = [f"{f} | | 2", g]
    ref = RecordStream(spec, seed=5, val_fraction=0.0)
    full = [k for _, (k, _) in zip(range(150), ref)]
    assert ref.epoch >= 1
    part = RecordStream(spec, seed=5, val_fraction=0.0)
    it = iter(part)
    head = [next(it)[0] for _ in range(70)]
    state = json.loads(json.dumps(part.state_dict()))
    resumed = RecordStream(spec, seed=5, val_fraction=0.0)
    resumed.load_state_dict(state)
    tail = [k for _, (k, _) in zip(range(80), resumed)]
    assert head + tail == full


def test_bundled_names_subsets_and_determinism(tmp_path):
    shakespeare = [r["text"] for r in load_sources(["bundled:shakespeare | macbeth"])]
    assert len(shakespeare) > 50
    assert all("**" not in t and "_" not in t and "#" not in t for t in shakespeare)
    assert any("MACBETH:" in t for t in shakespeare)
    adds = [json.loads(r["record"]) for r in load_sources(["bundled:prompts | add"], as_text=False)]
    assert len(adds) == bundled.N_RECORDS and {r["task"] for r in adds} == {"add"}
    for r in adds[:50]:
        a, b = map(int, r["prompt"].removeprefix("What is ").rstrip("?").split(" + "))
        assert r["answer"] == str(a + b)
    prefs = list(bundled.records("preference"))
    assert all(p["chosen"] != p["rejected"] for p in prefs)
    sft = list(bundled.records("sft"))
    assert sum(sum(m["role"] == "assistant" for m in r["messages"]) == 2 for r in sft) > 300
    assert list(bundled.records("sft")) == sft
    with pytest.raises(DataError, match="available: bundled:shakespeare"):
        load_sources(["bundled:nothing"])


def test_hash_fraction_is_uniform_enough():
    values = [sources.hash_fraction(f"doc {i}") for i in range(2000)]
    assert 0.45 < sum(values) / len(values) < 0.55
    assert 150 < sum(v < 0.1 for v in values) < 250


def test_bundled_tasks_are_question_answer_text_with_correct_answers():
    tasks = list(bundled.records("tasks"))
    assert len(tasks) == bundled.N_RECORDS and tasks == list(bundled.records("tasks"))
    adds = [t for t in tasks if t["task"] == "add"]
    assert adds
    for t in adds[:50]:
        question, answer = t["text"].removeprefix("Question:\n").split("\nAnswer:\n")
        a, b = map(int, question.removeprefix("What is ").rstrip("?").split(" + "))
        assert answer == str(a + b)
    texts = [r["text"] for r in load_sources(["bundled:tasks"])]
    assert all(t.startswith("Question:\n") for t in texts)


# --------------------------------------------------------------------------------------------------
# Structured records: no endless skipping, content-only split; prepared shards' val_fraction
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def bounded_reads(monkeypatch):
    """Turn an endless skip loop into a failure: more than 300 records read is an AssertionError."""
    real = sources.RecordIterator.__next__
    reads = [0]

    def guarded(self):
        reads[0] += 1
        assert reads[0] <= 300, "endless loop: 300 records read without an example or an error"
        return real(self)

    monkeypatch.setattr(sources.RecordIterator, "__next__", guarded)
    return reads


def _batches(kind, path, tok, **kw):
    from llmlab.data.preference import PreferenceBatches
    from llmlab.data.sft import SFTBatches

    cls = SFTBatches if kind == "sft" else PreferenceBatches
    return cls([str(path)], tok, kw.pop("seq_len", 16), 1, **{"val_fraction": 0.0, **kw})


LONG = " ".join(["hello world"] * 40)
UNUSABLE = {  # (kind, records, skip_invalid, words the error must contain)
    "sft-prompt-too-long": ("sft", [{"instruction": f"{LONG} {i}", "response": "ok"} for i in range(3)], False,
                            "4 with nothing to train on"),
    "sft-unknown-format-skipped": ("sft", [{"title": f"t{i}"} for i in range(3)], True, "4 in no known format"),
    "dpo-blank-answers": ("dpo", [{"prompt": f"q{i}", "chosen": " ", "rejected": ""} for i in range(3)], False,
                          "4 with nothing to train on"),
}


@pytest.mark.parametrize("case", sorted(UNUSABLE))
def test_no_usable_record_is_a_data_error_not_an_endless_loop(tmp_path, tok, bounded_reads, case):
    kind, records, skip_invalid, counts = UNUSABLE[case]
    f = write_jsonl(tmp_path / "data.jsonl", records)
    with pytest.raises(DataError) as e:
        next(_batches(kind, f, tok, skip_invalid=skip_invalid))
    msg = str(e.value)
    assert "no usable record in a full pass over the train split" in msg and "\n" not in msg, msg
    assert "4 skipped in a row" in msg and counts in msg, msg  # one whole epoch, plus the next one's first row
    assert "raise max_seq_len" in msg and "check the record format" in msg
    assert bounded_reads[0] <= 2 * len(records) + 1


def test_startup_validation_check_fails_fast_on_unusable_val_split(tmp_path, tok, bounded_reads):
    import copy

    # train/sft.py checks the val split at startup: state, next(val), restore. Nearly all records are val.
    f = write_jsonl(tmp_path / "data.jsonl", [{"instruction": f"{LONG} {i}", "response": "ok"} for i in range(3)])
    val = _batches("sft", f, tok, split="val", val_fraction=0.999)
    position = copy.deepcopy(val.state_dict())
    with pytest.raises(DataError, match="no usable record in a full pass over the val split"):
        next(val)
    val.load_state_dict(position)


def test_one_usable_record_among_many_unusable_is_found_every_epoch(tmp_path, tok, bounded_reads):
    records = [{"instruction": f"{LONG} {i}", "response": "ok"} for i in range(8)] + [{"title": "x"}] * 3
    records.append({"instruction": "hi", "response": "the only usable answer"})
    batches = _batches("sft", write_jsonl(tmp_path / "data.jsonl", records), tok, skip_invalid=True, seq_len=24)
    for _ in range(8):  # 8 epochs (the usable record once per epoch, at a different place each time)
        assert (next(batches)["labels"] != -100).any()
    assert batches.skipped_empty >= 8 * 7 and batches.skipped_invalid >= 8 * 2


def test_record_split_hashes_content_not_ids(tmp_path):
    convs = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
             for i in range(60)]
    records = [{"id": f"a{i}", "source": "one", "messages": c} for i, c in enumerate(convs)]
    records += [{"id": f"b{i}", "source": "two", "messages": c} for i, c in enumerate(convs)]
    records += [{"uid": i, "prompt": f"p{i}", "chosen": "yes", "rejected": "no"} for i in range(30)]
    records += [{"uid": i + 100, "prompt": f"p{i}", "chosen": "yes", "rejected": "no"} for i in range(30)]
    f = write_jsonl(tmp_path / "sft.jsonl", records)
    sides = {}
    for split in ("train", "val"):
        for key in one_epoch(RecordStream([f], split=split, val_fraction=0.5, as_text=False)):
            r = json.loads(key)
            content = json.dumps(r.get("messages") or r["prompt"])
            sides.setdefault(content, set()).add(split)
    assert len(sides) == 90 and all(len(s) == 1 for s in sides.values())  # both copies on one side
    assert 20 < sum(s == {"val"} for s in sides.values()) < 70  # and the split still splits (45 expected)


def test_prepared_shards_say_when_the_run_val_fraction_is_ignored(tmp_path, tok, capsys):
    from llmlab.data.pretrain import PretrainBatches, prepare_shards

    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"document {i}: hello world " * 3} for i in range(80)])
    folder = str(prepare_shards([docs], tok, tmp_path / "shards", val_fraction=0.1))
    capsys.readouterr()
    PretrainBatches([folder], tok, 8, 1, val_fraction=0.1)
    assert capsys.readouterr().err == ""  # same value: nothing to say
    PretrainBatches([folder], tok, 8, 1, val_fraction=0.3, rank=1, world_size=2)
    assert capsys.readouterr().err == ""  # rank 0 speaks for all ranks
    PretrainBatches([folder], tok, 8, 1, val_fraction=0.3)
    PretrainBatches([folder], tok, 8, 1, val_fraction=0.3, split="val")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("notice: datasets:"), err  # one line, once per run
    assert "val_fraction=0.1" in err and "val_fraction=0.3 is ignored" in err and "prepare the shards again" in err


def test_an_out_folder_that_cannot_be_made_is_refused_before_the_work(tmp_path, tok):
    from llmlab.data.pretrain import prepare_shards
    from llmlab.errors import ConfigError

    (tmp_path / "file").write_text("x")
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": "hello world"}])
    with pytest.raises(ConfigError, match=r"--out: cannot create .*file \(a file is in the way\); pick a folder"):
        prepare_shards([docs], tok, tmp_path / "file" / "shards")  # was FileExistsError from mkdir, a traceback


def test_ultrafeedback_answers_are_part_of_the_split_hash():
    rows = [{"id": i, "instruction": "Say hi", "chosen_response": f"hi {i}", "rejected_response": "no"}
            for i in range(40)]
    keys = {sources.content_key(json.dumps(r)) for r in rows}
    assert len(keys) == 40  # not all on the side of 'Say hi' alone
    again = {**rows[0], "id": "other", "source": "elsewhere"}
    assert sources.content_key(json.dumps(again)) == sources.content_key(json.dumps(rows[0]))  # ids left out
    sides = {sources.in_split(k, "val", 0.5) for k in keys}
    assert sides == {True, False}


def test_a_folder_of_files_with_different_columns_names_them(tmp_path):
    """One dataset line is one table: `datasets` failed with a bare "Couldn't cast" for a folder holding
    alpaca and prompt/completion files; the error names each file's columns and the fix."""
    folder = tmp_path / "sft"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"instruction": "q", "output": "a"}])
    write_jsonl(folder / "b.jsonl", [{"prompt": "q", "completion": "a"}])
    msg = load_error(str(folder))
    assert msg.startswith(f"datasets[0]: the files of '{folder}' have different columns (a.jsonl: instruction, "
                          f"output; b.jsonl: completion, prompt)") and "own line" in msg
    (folder / "b.jsonl").unlink()
    (folder / "c.json").write_text(json.dumps([{"output": "b", "instruction": "r"}], indent=2))
    assert len(list(load_sources([str(folder)], as_text=False))) == 2  # same columns: one table


def test_a_truncated_json_line_points_at_its_end(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"\n')
    assert load_error(str(path)).endswith("line 2 is not valid JSON (Expecting ',' delimiter at column 13); "
                                          "fix or remove that line")


def test_column_field_is_refused_for_structured_records(tmp_path):
    """column= picks pretraining's text column; SFT/preference/prompt records ignored it without a word."""
    f = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"^datasets\[0\]: column=question picks the text column"):
        load_sources([f"{f} | | 1 | column=question"], as_text=False)
