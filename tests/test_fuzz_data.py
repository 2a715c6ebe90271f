"""Bad data gets a one-line DataError naming where it is, or is skipped and counted, never a traceback.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_fuzz_data.py -q

Hypothesis feeds dataset spec lines and SFT / preference / prompt records (missing fields, wrong types,
empty strings); files add invalid UTF-8, lines that are not JSON and very long lines.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmlab.data.chat import IGNORE_INDEX
from llmlab.data.preference import PreferenceBatches, encode_preference_example
from llmlab.data.prompts import PromptBatches, encode_prompt
from llmlab.data.sft import SFTBatches, encode_sft_example
from llmlab.data.sources import DatasetSpec, parse_dataset_specs
from llmlab.errors import DataError, LLMLabError

FUZZ = settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


def check_error(error: BaseException, *where: str) -> str:
    message = str(error)
    assert isinstance(error, DataError), f"{type(error).__name__}: {message}"
    assert message and "\n" not in message, message
    assert any(w in message for w in where), message
    return message


# --------------------------------------------------------------------------------------------------
# Dataset spec lines
# --------------------------------------------------------------------------------------------------

spec_piece = st.one_of(st.text(max_size=10), st.sampled_from(["", " ", "2.0", "-1", "nan", "inf", "0", "1e999",
                                                                 "column=text", "split=val", "weight=3",
                                                                 "bogus=1", "subset=", "="]))
spec_line = st.lists(spec_piece, min_size=1, max_size=5).map(" | ".join)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))


@settings(max_examples=120, deadline=None, derandomize=True)
@given(items=st.one_of(spec_line, st.lists(st.one_of(spec_line, json_leaf,
                                                     st.dictionaries(st.sampled_from(["name", "subset", "weight",
                                                                                      "column", "split", "x"]),
                                                                     json_leaf, max_size=4)), max_size=3)))
def test_dataset_spec_lines(items):
    try:
        specs = parse_dataset_specs(items)
    except LLMLabError as e:
        check_error(e, "datasets")
        return
    for spec in specs:
        assert spec.name and spec.weight > 0 and spec.weight != float("inf")
        assert "\n" not in spec.name
        assert parse_dataset_specs([spec.line()]) == [spec]  # what parses prints back to the same spec


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------

text_value = st.one_of(st.text(max_size=30), st.just(""), st.just("\n\nHuman: hi\n\nAssistant: yo"),
                       st.sampled_from(["\x00", "\ud7ff", "<|im_start|>", "<|im_end|>", "{{ x }}"]))
message = st.fixed_dictionaries({}, optional={"role": st.one_of(st.sampled_from(["user", "assistant", "system",
                                                                                 "tool"]), json_leaf),
                                              "content": st.one_of(text_value, json_leaf),
                                              "from": st.sampled_from(["human", "gpt", "x"]),
                                              "value": text_value})
field_value = st.one_of(text_value, json_leaf, st.lists(st.one_of(message, json_leaf), max_size=3))
record = st.dictionaries(st.sampled_from(["messages", "conversations", "instruction", "input", "response", "output",
                                          "prompt", "completion", "chosen", "rejected", "question", "answer",
                                          "text"]), field_value, max_size=4)

ENCODERS = {
    "sft": lambda r, tok: encode_sft_example(r, tok, 64, where="rec 7"),
    "preference": lambda r, tok: encode_preference_example(r, tok, 64, where="rec 7"),
    "prompt": lambda r, tok: encode_prompt(r, tok, 64, where="rec 7"),
}


@FUZZ
@given(kind=st.sampled_from(sorted(ENCODERS)), rec=record)
def test_any_record_encodes_or_gets_a_one_line_error(tok, kind, rec):
    try:
        out = ENCODERS[kind](rec, tok)
    except LLMLabError as e:
        check_error(e, "rec 7", "chat template")
        return
    vocab = len(tok)
    if kind == "sft":
        assert len(out["input_ids"]) == len(out["labels"]) <= 64
        assert all(0 <= i < vocab for i in out["input_ids"])
        assert all(label == IGNORE_INDEX or label == i for i, label in zip(out["input_ids"], out["labels"]))
    elif kind == "preference":
        assert len(out["prompt_ids"]) + max(len(out["chosen_ids"]), len(out["rejected_ids"])) <= 64
    else:
        assert 0 < len(out["prompt_ids"]) <= 64 and isinstance(out["prompt"], str)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------

BATCHES = {
    "sft": lambda path, tok, **kw: SFTBatches([path], tok, seq_len=32, batch_size=2, val_fraction=0.0, **kw),
    "preference": lambda path, tok, **kw: PreferenceBatches([path], tok, seq_len=32, batch_size=2, val_fraction=0.0,
                                                            **kw),
    "prompt": lambda path, tok, **kw: PromptBatches([path], tok, batch_size=2, max_prompt_len=32, val_fraction=0.0,
                                                    **kw),
}
GOOD = {
    "sft": {"instruction": "Add 2 and 2.", "response": "4"},
    "preference": {"prompt": "Add 2 and 2.", "chosen": "4", "rejected": "5"},
    "prompt": {"prompt": "Add 2 and 2.", "answer": "4"},
}


@pytest.mark.parametrize("kind", sorted(BATCHES))
@pytest.mark.parametrize("bad", [b"\xff\xfe not utf-8 \x80\n", b"{not json\n", b'["a list"]\n'])
def test_unreadable_files_give_one_line_errors(tmp_path, tok, kind, bad):
    path = tmp_path / "data.jsonl"
    path.write_bytes((json.dumps(GOOD[kind]) + "\n").encode() + bad + (json.dumps(GOOD[kind]) + "\n").encode())
    with pytest.raises(LLMLabError) as info:
        next(BATCHES[kind](str(path), tok))
    check_error(info.value, "datasets[0]", "data.jsonl")


@pytest.mark.parametrize("kind", sorted(BATCHES))
def test_invalid_records_are_counted_never_silently_dropped(tmp_path, tok, kind):
    bad = [{"text": "no known format"}, {"instruction": 3, "prompt": None}, {}]
    rows = [GOOD[kind], *bad, GOOD[kind], GOOD[kind]]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as info:
        for _ in range(3):
            next(BATCHES[kind](str(path), tok))
    check_error(info.value, "data.jsonl: record")
    batches = BATCHES[kind](str(path), tok, skip_invalid=True)
    next(batches)
    next(batches)  # 4 good examples read: the 3 bad ones were passed over (the source has 6 rows)
    assert batches.skipped_invalid >= 3 and batches.state_dict()["skipped_invalid"] == batches.skipped_invalid


def test_very_long_lines_are_truncated_not_fatal(tmp_path, tok):
    long = "word " * 20_000  # a 100 KB line
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"instruction": long, "response": "ok"}) + "\n"
                    + json.dumps({"instruction": "hi", "response": long}) + "\n")
    batches = SFTBatches([str(path)], tok, seq_len=32, batch_size=2, val_fraction=0.0)
    batch = next(batches)
    assert batch["input_ids"].shape[1] <= 32
    # the first record's answer starts after 32 tokens: nothing to learn from, skipped and counted
    assert batches.skipped_empty >= 1 and (batch["labels"] != IGNORE_INDEX).any()


def test_pretraining_text_with_invalid_utf8_is_a_one_line_error(tmp_path, tok):
    from llmlab.data.pretrain import PretrainBatches

    path = tmp_path / "corpus.txt"
    path.write_bytes(b"good line\n\xff\xfe\x80 bad bytes\n" * 50)
    with pytest.raises(LLMLabError) as info:
        next(PretrainBatches([str(path)], tok, seq_len=16, batch_size=2, val_fraction=0.0))
    check_error(info.value, "datasets[0]", "corpus.txt")


def test_empty_strings_and_empty_files(tmp_path, tok):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(LLMLabError) as info:
        next(SFTBatches([str(path)], tok, seq_len=32, batch_size=1, val_fraction=0.0))
    check_error(info.value, "datasets[0]", "empty")
    assert parse_dataset_specs("x.jsonl | | 2")[0] == DatasetSpec("x.jsonl", None, 2.0)
    with pytest.raises(DataError) as info:
        parse_dataset_specs(["   |  | 2"])
    check_error(info.value, "datasets[0]")
