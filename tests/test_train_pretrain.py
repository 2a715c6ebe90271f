"""Base training's setup around the loop: the training sequence length the model config implies, and
vocab_size checked against the tokenizer (too small: an error; far too large: a notice)."""

import pytest
from tests.conftest import tiny_config

from llmlab.config import TrainConfig, vocab_slack
from llmlab.data.tokenizer import load_tokenizer
from llmlab.errors import ConfigError
from llmlab.train import pretrain
from llmlab.train.stage import check_vocab_size, stage_seq_len


def test_training_length_defaults_to_the_models_max_seq_len_and_may_not_exceed_it():
    model = tiny_config(max_seq_len=48)
    assert TrainConfig().max_seq_len is None
    assert stage_seq_len(TrainConfig(), model) == 48
    assert stage_seq_len(TrainConfig(max_seq_len=32), model) == 32
    assert stage_seq_len(TrainConfig(max_seq_len=48), model) == 48
    with pytest.raises(ConfigError) as e:
        stage_seq_len(TrainConfig(max_seq_len=49), model)
    assert str(e.value) == "max_seq_len: 49 is longer than the model's max_seq_len 48; lower it or leave it None"


def test_vocab_size_below_the_tokenizer_is_an_error_and_far_above_it_a_notice():
    assert vocab_slack(151665) >= 151936 - 151665  # the spec's default fits the Qwen2.5 tokenizer it is for
    assert vocab_slack(300) == 67
    with pytest.raises(ConfigError) as e:
        check_vocab_size(tiny_config(vocab_size=299, tokenizer_name="tok"), 300)
    assert str(e.value) == ("vocab_size: 299 is smaller than the tokenizer's 300 tokens (tok); "
                            "set vocab_size to at least 300")
    assert check_vocab_size(tiny_config(vocab_size=300), 300) is None
    assert check_vocab_size(tiny_config(vocab_size=367), 300) is None  # rounding room
    notice = check_vocab_size(tiny_config(vocab_size=368, tokenizer_name="tok"), 300)
    assert notice == ("note: vocab_size: 368 is 68 more than the tokenizer's 300 tokens (tok); those embedding "
                      "and lm_head rows are never used; set vocab_size=300 (or up to 367) to drop them")


@pytest.mark.parametrize("vocab,train_len,notice", [(512, None, True), (320, 16, False)])
def test_run_pretrain_prints_the_vocab_notice_and_trains_at_the_resolved_length(macbeth_tok_dir, tmp_path,
                                                                                monkeypatch, capsys, vocab,
                                                                                train_len, notice):
    """run_pretrain with a local tokenizer folder, stopped where the loop would start."""
    seen = {}
    monkeypatch.setattr(pretrain, "train_loop", lambda model, cfg, train, val, **kw: seen.update(train=train))
    model_cfg = tiny_config(vocab_size=vocab, tokenizer_name=str(macbeth_tok_dir), max_seq_len=48)
    cfg = TrainConfig(max_steps=1, warmup_steps=0, datasets=["bundled:shakespeare"], output_dir=str(tmp_path / "o"),
                      max_seq_len=train_len)
    pretrain.run_pretrain(cfg, model_cfg, progress=False, show_config=False)
    out = capsys.readouterr().out
    n = len(load_tokenizer(str(macbeth_tok_dir)))
    assert ("note: vocab_size" in out) is notice
    if notice:
        assert (f"note: vocab_size: 512 is {512 - n} more than the tokenizer's {n} tokens ({macbeth_tok_dir})"
                in out)
    assert seen["train"].seq_len == (train_len or 48)
    with pytest.raises(ConfigError, match=r"^vocab_size: 299 is smaller"):
        pretrain.run_pretrain(cfg, model_cfg.with_overrides({"vocab_size": 299}), progress=False)


def test_init_checkpoint_continues_pretraining_from_a_models_weights(macbeth_tok_dir, tmp_path, monkeypatch,
                                                                      capsys):
    """init_checkpoint: a new run (step 0) from the weights, model config and tokenizer of a checkpoint
    without trainer state (what merge-lora and import-hf write), which --resume refuses."""
    import torch

    from llmlab.checkpoint import save_checkpoint
    from llmlab.errors import CheckpointError
    from llmlab.model import build_model

    tok = load_tokenizer(str(macbeth_tok_dir))
    model_cfg = tiny_config(vocab_size=320, tokenizer_name=str(macbeth_tok_dir), max_seq_len=48)
    torch.manual_seed(5)
    source = build_model(model_cfg)
    save_checkpoint(tmp_path / "merged", source, kind="pretrain", tokenizer=tok)
    cfg = TrainConfig(max_steps=1, warmup_steps=0, datasets=["bundled:shakespeare"], output_dir=str(tmp_path / "o"),
                      init_checkpoint=str(tmp_path / "merged"), batch_size=2, gradient_accumulation_steps=1,
                      scheduler="none")
    with pytest.raises(CheckpointError, match="no trainer_state.json.*init_checkpoint for pretrain"):
        pretrain.run_pretrain(cfg, resume=str(tmp_path / "merged"), progress=False)
    seen = {}
    monkeypatch.setattr(pretrain, "train_loop",
                        lambda model, cfg, train, val, **kw: seen.update(model=model, start=kw["start_state"]))
    pretrain.run_pretrain(cfg, None, progress=False, show_config=False)  # the model config comes with it
    assert "starting from the weights of" in capsys.readouterr().out and seen["start"] is None
    assert all(torch.equal(a, b) for a, b in zip(seen["model"].state_dict().values(), source.state_dict().values()))
    with pytest.raises(ConfigError, match="n_layers: .* leave out --model-config when starting from init_checkpoint"):
        pretrain.run_pretrain(cfg, model_cfg.with_overrides({"n_layers": 3}), progress=False)
    monkeypatch.undo()
    pretrain.run_pretrain(cfg, None, progress=False, show_config=False)  # and it trains, from step 0
    from llmlab.checkpoint import load_model, read_checkpoint

    saved = tmp_path / "o" / "best"
    assert read_checkpoint(saved).trainer_state()["step"] == 1
    moved = load_model(saved).state_dict()["lm_head.weight"] - source.state_dict()["lm_head.weight"]
    assert 0 < moved.abs().max() < 0.1  # one small step away from the starting weights
