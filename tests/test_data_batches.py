"""Tokenizer training/loading, pretraining packing, SFT masks, preference (HH) and prompt data, resume, preview."""

import json

import pytest
import torch

from llmlab.data.chat import IGNORE_INDEX
from llmlab.data.preference import PreferenceBatches, encode_preference_example, preference_parts
from llmlab.data.pretrain import PretrainBatches, encode_documents, prepare_shards
from llmlab.data.preview import preview
from llmlab.data.prompts import PromptBatches, encode_prompt
from llmlab.data.sft import SFTBatches, encode_sft_example
from llmlab.data.sources import RecordStream
from llmlab.data.tokenizer import load_tokenizer, model_vocab_size, train_tokenizer
from llmlab.errors import DataError

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "Repeat the word: cat"},
    {"role": "assistant", "content": "cat cat"},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    import os

    os.environ["LLMLAB_CACHE"] = str(tmp_path_factory.getbasetemp() / "llmlab-cache")
    out = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer(["bundled:shakespeare", "bundled:sft | | 0.5"], 400, out, max_docs=400)
    return out


@pytest.fixture(scope="session")
def tok(tok_dir):
    return load_tokenizer(str(tok_dir))


def loss_text(tok, ids, labels):
    return tok.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])


def take(it, n):
    return [next(it) for _ in range(n)]


def same_batches(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def test_trained_tokenizer_loads_with_autotokenizer_and_renders_chatml(tok_dir):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(tok_dir))
    assert len(t) == 400
    vocab = t.get_vocab()
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"):
        assert special in vocab
    assert t.eos_token == "<|endoftext|>" and t.pad_token == "<|pad|>" and t.pad_token_id != t.eos_token_id
    text = t.apply_chat_template(CHAT[1:3], tokenize=False)
    assert text == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
    gen = t.apply_chat_template(CHAT[1:2], tokenize=False, add_generation_prompt=True)
    assert gen.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = t(text, add_special_tokens=False)["input_ids"]
    assert ids.count(t.convert_tokens_to_ids("<|im_end|>")) == 2  # one token each, not split into pieces
    assert t.decode(t("Hath not a Jew eyes?")["input_ids"]) == "Hath not a Jew eyes?"


def test_vocab_size_and_tokenizer_json(tok, tok_dir):
    assert model_vocab_size(tok) == 400
    assert model_vocab_size(tok, 64) == 448
    assert model_vocab_size(tok, 8) == 400
    from_file = load_tokenizer(str(tok_dir / "tokenizer.json"))
    assert from_file("to be or not")["input_ids"] == tok("to be or not")["input_ids"]
    assert from_file.pad_token_id is not None


def test_hub_tokenizer_failure_says_so(monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(DataError) as e:
        load_tokenizer("Qwen/Qwen2.5-0.5B")
    msg = str(e.value)
    assert "Hugging Face Hub" in msg and "llm-lab tokenizer train" in msg and "\n" not in msg


# --------------------------------------------------------------------------------------------------
# Pretraining
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def docs_file(tmp_path):
    return write_jsonl(tmp_path / "docs.jsonl", [{"text": f"Doc {i}: " + "to be or not " * (i % 5 + 1)}
                                                 for i in range(60)])


def test_packing_blocks_are_exact_with_eos_between_documents(tok, docs_file):
    batches = PretrainBatches([docs_file], tok, seq_len=16, batch_size=3, seed=1, val_fraction=0.0)
    got = torch.cat([b["input_ids"].reshape(-1) for b in take(batches, 10)]).tolist()
    order = [k for _, (k, _) in zip(range(60), RecordStream([docs_file], seed=1, val_fraction=0.0))]
    expected = encode_documents(tok, order)
    assert got == expected[:len(got)]  # documents in stream order, nothing dropped or padded
    b = next(batches)
    assert b["input_ids"].shape == (3, 16) and torch.equal(b["labels"], b["input_ids"])
    assert tok.pad_token_id not in got
    n_docs = got.count(tok.eos_token_id)
    assert n_docs >= 5 and len(tok(order[0], add_special_tokens=False)["input_ids"]) + 1 == got.index(
        tok.eos_token_id) + 1


def test_pretrain_resume_is_exact_across_epochs(tok, docs_file):
    def make():
        return PretrainBatches([docs_file], tok, seq_len=32, batch_size=2, seed=4, val_fraction=0.1)

    full = take(make(), 45)  # about two epochs of the ~54 training documents
    for k in (11, 30):  # resume inside the first epoch and inside the second
        first = make()
        take(first, k)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = make()
        resumed.load_state_dict(state)
        assert same_batches(take(resumed, 45 - k), full[k:])
    assert state["stream"]["epoch"] == 1 and resumed._stream.epoch >= 1


def test_pretrain_val_and_ranks_are_disjoint(tok, docs_file):
    def docs(**kw):
        b = PretrainBatches([docs_file], tok, seq_len=8, batch_size=1, seed=0, **kw)
        ids = torch.cat([x["input_ids"].reshape(-1) for x in take(b, 40)]).tolist()
        return {tok.decode(d).strip() for d in _split_on(ids, tok.eos_token_id)[1:-1]}

    train, val = docs(val_fraction=0.3), docs(split="val", val_fraction=0.3)
    r0, r1 = docs(val_fraction=0.0, rank=0, world_size=2), docs(val_fraction=0.0, rank=1, world_size=2)
    assert train and val and not train & val
    assert r0 and r1 and not r0 & r1


def _split_on(ids, sep):
    out, cur = [], []
    for t in ids:
        if t == sep:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out + [cur]


def test_prepared_shards_hold_the_stream_and_resume(tok, docs_file, tmp_path):
    folder = prepare_shards([docs_file], tok, tmp_path / "shards", val_fraction=0.1, shard_tokens=300)
    index = json.loads((folder / "index.json").read_text())
    assert index["dtype"] == "uint16" and len(index["splits"]["train"]) > 1
    import numpy as np

    stored = np.concatenate([np.fromfile(folder / s["file"], dtype=np.uint16) for s in index["splits"]["train"]])
    assert stored.tolist().count(tok.eos_token_id) == 60 - sum(s["tokens"] > 0 for s in []) - _n_val(docs_file)
    full = take(PretrainBatches([str(folder)], tok, 16, 2, seed=3), 25)
    part = PretrainBatches([str(folder)], tok, 16, 2, seed=3)
    take(part, 9)
    resumed = PretrainBatches([str(folder)], tok, 16, 2, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(part.state_dict())))
    assert same_batches(take(resumed, 16), full[9:])


def test_shards_from_another_tokenizer_are_refused(tok, docs_file, tmp_path):
    """Shards hold ids: read with another vocabulary they are other text. A tokenizer of the same size
    trained on other text is caught by the vocabulary fingerprint, and shards without one (older
    index.json) by the size."""
    folder = prepare_shards([docs_file], tok, tmp_path / "shards", val_fraction=0.1)
    index = json.loads((folder / "index.json").read_text())
    assert len(index["tokenizer_fingerprint"]) == 16
    PretrainBatches([str(folder)], tok, 16, 2)  # its own tokenizer reads them
    other = train_tokenizer(["bundled:shakespeare"], 400, tmp_path / "other", max_docs=150)
    assert len(other) == len(tok) and other.eos_token_id == tok.eos_token_id
    with pytest.raises(DataError, match=r"tokenized with another tokenizer .* set tokenizer_name"):
        next(iter(PretrainBatches([str(folder)], other, 16, 2)))
    smaller = train_tokenizer(["bundled:shakespeare"], 300, tmp_path / "small", max_docs=150)
    del index["tokenizer_fingerprint"]
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"400 tokens\) than this run's \(300 tokens\)"):
        next(iter(PretrainBatches([str(folder)], smaller, 16, 2)))


def _n_val(path):
    from llmlab.data.sources import in_split

    return sum(in_split(json.loads(line)["text"], "val", 0.1) for line in open(path))


# --------------------------------------------------------------------------------------------------
# SFT
# --------------------------------------------------------------------------------------------------


def test_three_sft_formats_give_identical_tokens_and_masks(tok):
    conv = [{"role": "user", "content": "Explain Python"}, {"role": "assistant", "content": "A language."}]
    a = encode_sft_example({"messages": conv}, tok)
    b = encode_sft_example({"instruction": "Explain Python", "response": "A language."}, tok)
    c = encode_sft_example({"prompt": "Explain Python", "completion": "A language."}, tok)
    d = encode_sft_example({"instruction": "Explain Python", "output": "A language.", "input": ""}, tok)
    assert a == b == c == d
    assert loss_text(tok, a["input_ids"], a["labels"]) == "A language.<|im_end|>"
    with_input = encode_sft_example({"instruction": "Explain", "input": "Python", "response": "A language."}, tok)
    assert "Explain\n\nPython" in tok.decode(with_input["input_ids"])


def test_mask_covers_exactly_every_assistant_turn(tok):
    ex = encode_sft_example({"messages": CHAT}, tok)
    ids, labels = ex["input_ids"], ex["labels"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert loss_text(tok, ids, labels) == "5<|im_end|>cat cat<|im_end|>"
    # the loss tokens form two contiguous runs, each ending on <|im_end|> and followed by an unlabelled "\n"
    runs, cur = [], []
    for k, label in enumerate(labels):
        if label != IGNORE_INDEX:
            cur.append(k)
        elif cur:
            runs.append(cur)
            cur = []
    assert len(runs) == 2 and all(ids[r[-1]] == im_end and labels[r[-1] + 1] == IGNORE_INDEX for r in runs)
    assert sum(label != IGNORE_INDEX for label in labels) == len(runs[0]) + len(runs[1])
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))
    assert tok.decode(ids[:runs[0][0]]).endswith("<|im_start|>assistant\n")


def test_bad_record_error_and_skip_invalid_count(tok, tmp_path):
    records = [{"messages": CHAT[1:3]}] * 8 + [{"question": "q", "answer": "a"}] * 3
    f = write_jsonl(tmp_path / "mixed.jsonl", records)
    with pytest.raises(DataError) as e:
        encode_sft_example({"question": "q", "answer": "a"}, tok)
    msg = str(e.value)
    assert "keys: answer, question" in msg and "'messages'" in msg and "'prompt' + 'completion'" in msg
    assert "\n" not in msg
    with pytest.raises(DataError, match="keys: answer, question") as bad:
        take(SFTBatches([f], tok, 64, 11, val_fraction=0.0), 1)
    # located by its place in the mixed stream and, since that is not the file's order, by its content
    assert 'of the mixed stream, epoch 0 ({"answer": "a", "question": "q"})' in str(bad.value)
    batches = SFTBatches([f], tok, 64, 8, val_fraction=0.0, skip_invalid=True)
    take(batches, 10)  # exactly 10 epochs of the 8 good records; the 3 bad ones of the last may follow
    assert 27 <= batches.skipped_invalid <= 30
    assert batches.state_dict()["skipped_invalid"] == batches.skipped_invalid


def test_sft_batches_pad_right_and_resume(tok):
    def make():
        return SFTBatches(["bundled:sft"], tok, 48, 4, seed=2)

    full = take(make(), 12)
    b = full[0]
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    lengths = b["attention_mask"].sum(1)
    for row, n in enumerate(lengths.tolist()):
        assert (b["input_ids"][row, n:] == tok.pad_token_id).all() and (b["labels"][row, n:] == IGNORE_INDEX).all()
        assert b["attention_mask"][row, :n].all()
    assert (b["labels"] != IGNORE_INDEX).sum(1).min() >= 2
    part = make()
    take(part, 5)
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(part.state_dict())))
    assert same_batches(take(resumed, 7), full[5:])


# --------------------------------------------------------------------------------------------------
# Preference and prompts
# --------------------------------------------------------------------------------------------------

HH = {
    "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: It is 4.",
    "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: Five.",
}


def test_hh_multi_turn_parsing_keeps_earlier_turns(tok):
    messages, chosen, rejected = preference_parts(HH)
    assert messages == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "What is 2+2?"}]
    assert (chosen, rejected) == ("It is 4.", "Five.")
    ex = encode_preference_example(HH, tok)
    prompt = tok.decode(ex["prompt_ids"])
    assert prompt == ("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
                      "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(ex["chosen_ids"]) == "It is 4.<|im_end|>"
    assert tok.decode(ex["rejected_ids"]) == "Five.<|im_end|>"
    same = encode_preference_example({"prompt": messages, "chosen": [{"role": "assistant", "content": "It is 4."}],
                                      "rejected": "Five."}, tok)
    assert same == ex
    p = encode_prompt(HH, tok)
    assert p["prompt"] == prompt and p["prompt_ids"] == ex["prompt_ids"]


def test_preference_batches_mask_prompt_and_padding(tok):
    b = next(PreferenceBatches(["bundled:preference"], tok, 64, 4, seed=1))
    for side in ("chosen", "rejected"):
        ids, labels, mask = b[f"{side}_input_ids"], b[f"{side}_labels"], b[f"{side}_attention_mask"]
        assert ids.shape == labels.shape == mask.shape == b["chosen_input_ids"].shape
        for row in range(4):
            p, n = b["prompt_lengths"][row].item(), mask[row].sum().item()
            assert (labels[row, :p] == IGNORE_INDEX).all() and (labels[row, n:] == IGNORE_INDEX).all()
            assert torch.equal(labels[row, p:n], ids[row, p:n])
            assert tok.decode(ids[row, p:n]).endswith("<|im_end|>")
    with pytest.raises(DataError, match="keys: text"):
        encode_preference_example({"text": "x"}, tok)


def test_pairs_with_the_same_answer_twice_or_a_blank_one_are_skipped_and_counted(tok, tmp_path):
    """Such a pair has no preference to learn (DPO's gradient is zero for it): skipped, counted."""
    good = {"prompt": "Say yes.", "chosen": "Yes.", "rejected": "No."}
    records = [good] * 4 + [{"prompt": "Say yes.", "chosen": "Yes.", "rejected": "Yes."},
                            {"prompt": "Say yes.", "chosen": "   ", "rejected": "No."}]
    it = PreferenceBatches([write_jsonl(tmp_path / "p.jsonl", records)], tok, 64, 4, val_fraction=0.0, seed=0)
    batch = next(it)
    assert it.skipped_empty in (0, 1, 2) and batch["chosen_input_ids"].shape[0] == 4
    take(it, 5)  # six epochs of six records: the two unusable ones every epoch
    assert 10 <= it.skipped_empty <= 12
    b = next(it)
    assert all(not torch.equal(b["chosen_input_ids"][i], b["rejected_input_ids"][i]) for i in range(4))


def test_cut_pairs_and_prompts_are_said_once_and_counted(tok, tmp_path, capsys, monkeypatch):
    """DPO pairs and RL prompts longer than their budget are cut (prompt from the left): the first cut is
    said in one notice with the lengths, every cut is counted; ones that fit are neither."""
    from llmlab.data import sources

    monkeypatch.setattr(sources, "_NOTICED", set())
    question = "Tell me about the weather in the hills today, " * 3
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": question + str(i), "chosen": "Sunny and warm all day.",
                                                 "rejected": "No."} for i in range(8)])
    whole = encode_preference_example({"prompt": question, "chosen": "Sunny and warm all day.", "rejected": "No."},
                                      tok)
    need = len(whole["prompt_ids"]) + len(whole["chosen_ids"])
    fits = PreferenceBatches([pairs], tok, need + 8, 4, val_fraction=0.0)
    next(fits)
    assert fits.truncated == 0 and "notice" not in capsys.readouterr().err
    cut = PreferenceBatches([pairs], tok, need - 10, 4, val_fraction=0.0)
    batch = next(cut)
    next(cut)
    assert cut.truncated == 8 and batch["chosen_input_ids"].shape[1] <= need - 10
    err = capsys.readouterr().err
    assert err.count("notice: data: a preference pair") == 1 and f"longer than max_seq_len={need - 10}" in err
    short = PreferenceBatches([pairs], tok, need + 8, 4, val_fraction=0.0, max_prompt_len=10)  # DPO's limit
    batch = next(short)
    assert short.truncated == 4 and batch["prompt_lengths"].tolist() == [10] * 4
    assert torch.equal(batch["chosen_input_ids"][0, 10:10 + len(whole["chosen_ids"])], torch.tensor(whole["chosen_ids"]))
    assert "notice" not in capsys.readouterr().err  # said once per process, above
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": question + str(i)} for i in range(4)])
    it = PromptBatches([prompts], tok, 4, max_prompt_len=12, val_fraction=0.0)
    examples = next(it)
    assert it.truncated == 4 and all(len(ex["prompt_ids"]) == 12 for ex in examples)
    assert examples[0]["prompt"] == tok.decode(examples[0]["prompt_ids"])
    err = capsys.readouterr().err
    assert err.count("notice: data: a prompt") == 1 and "it keeps its last 12" in err


def test_prompts_reduce_formats_and_pass_extra_columns(tok):
    gen = "<|im_start|>assistant\n"
    from_messages = encode_prompt({"messages": CHAT, "answer": "cat cat"}, tok)
    assert from_messages["prompt"].endswith("Repeat the word: cat<|im_end|>\n" + gen)
    assert "cat cat" not in from_messages["prompt"] and from_messages["answer"] == "cat cat"
    q = encode_prompt({"question": "What is 2 + 3?", "answer": "5", "level": 1}, tok)
    assert q["prompt"] == f"<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n{gen}" and q["level"] == 1
    assert q == {**encode_prompt({"prompt": "What is 2 + 3?", "answer": "5", "level": 1}, tok)}
    short = encode_prompt({"prompt": "word " * 50}, tok, max_prompt_len=10)
    assert len(short["prompt_ids"]) == 10 and short["prompt"].endswith(gen)

    def make():
        return PromptBatches(["bundled:prompts"], tok, 3, seed=5)

    full = take(make(), 6)
    assert all(set(x) == {"prompt", "prompt_ids", "prompt_messages", "answer", "task"} for batch in full for x in batch)
    part = make()
    take(part, 2)
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(part.state_dict())))
    assert take(resumed, 4) == full[2:]


def test_preview_marks_loss_tokens(tok_dir):
    out = preview("sft", ["bundled:sft"], str(tok_dir), n=2)
    assert len(out) == 2 and all("[<|im_end|>]" in s and "<|im_start|>user" in s for s in out)
    rows = [json.loads(s) for s in preview("preference", "bundled:preference", str(tok_dir), n=3, as_json=True)]
    assert len(rows) == 3 and all(r["chosen"].endswith("<|im_end|>") for r in rows)
    rows = [json.loads(s) for s in preview("pretrain", "bundled:shakespeare", str(tok_dir), n=2, as_json=True,
                                           seq_len=24)]
    assert [len(r["input_ids"]) for r in rows] == [24, 24]
    with pytest.raises(DataError, match="kind"):
        preview("rlhf", "bundled:sft", str(tok_dir))
