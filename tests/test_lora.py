"""LoRA through PEFT: preset targets, frozen base, PEFT-format adapters, full LoRA checkpoints, merging."""

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

import llmlab
from conftest import tiny_config
from llmlab.checkpoint import load_state_into, read_checkpoint, save_checkpoint
from llmlab.config import SFTConfig
from llmlab.errors import CheckpointError, LLMLabError
from llmlab.lora import (
    LORA_PRESETS,
    apply_lora,
    base_state_dict,
    load_lora_checkpoint,
    merge_adapter_folder,
    merge_full_checkpoint,
    save_adapter,
    save_lora_checkpoint,
)
from llmlab.model import build_model
from llmlab.model.estimate import count_lora_parameters


def sft_cfg(**kw) -> SFTConfig:
    base = dict(use_lora=True, lora_preset="minimal", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                datasets=["bundled:sft"], max_steps=10, warmup_steps=0)
    base.update(kw)
    return SFTConfig(**base)


def lora_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def randomize_lora(model, seed: int = 1) -> None:
    """PEFT starts lora_B at zero (a no-op adapter); give A and B values so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


class FakeTokenizer:
    def save_pretrained(self, folder: str) -> None:
        import os

        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "tokenizer.json"), "w") as f:
            f.write('{"fake": true}')


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("preset", ["minimal", "attention_only", "ffn_only", "all"])
def test_presets_target_the_right_modules(preset, activation):
    cfg = tiny_config(activation=activation)
    model = apply_lora(build_model(cfg), sft_cfg(lora_preset=preset), verbose=False)
    names = lora_names(model)
    expected = [t for t in LORA_PRESETS[preset] if activation == "swiglu" or t != "gate_proj"]
    assert sorted({n.rsplit(".", 1)[-1] for n in names}) == sorted(expected)
    assert len(names) == cfg.n_layers * len(expected)
    if preset == "ffn_only" and activation == "gelu":
        assert sorted({n.rsplit(".", 1)[-1] for n in names}) == ["down_proj", "up_proj"]
    # only adapter parameters train, and their count is the estimator's
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count_lora_parameters(cfg, expected, 4)


def test_custom_targets_and_bad_name_lists_existing_modules(capsys):
    cfg = tiny_config()
    model = apply_lora(build_model(cfg), sft_cfg(lora_preset="custom", lora_target_modules=["o_proj", "up_proj"]))
    assert sorted({n.rsplit(".", 1)[-1] for n in lora_names(model)}) == ["o_proj", "up_proj"]
    out = capsys.readouterr().out
    assert "trainable" in out and f"{sum(p.numel() for p in model.parameters()):,}" in out
    with pytest.raises(LLMLabError) as e:
        apply_lora(build_model(cfg), sft_cfg(lora_preset="custom", lora_target_modules=["q_proj", "qkv"]))
    msg = str(e.value)
    assert "'qkv'" in msg and "\n" not in msg
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert name in msg


def _trained_lora(tmp_path, tie=False):
    """A base checkpoint, and a LoRA model on it whose adapter is not a no-op, saved as a full checkpoint
    with its best adapter folder."""
    cfg = tiny_config(tie_embeddings=tie)
    base = build_model(cfg)
    save_checkpoint(tmp_path / "base", base, kind="pretrain", tokenizer=FakeTokenizer())
    train_cfg = sft_cfg(lora_preset="all")
    model = apply_lora(copy.deepcopy(base), train_cfg, verbose=False)
    randomize_lora(model)
    save_lora_checkpoint(tmp_path / "sft" / "best", model, kind="sft", train_config=train_cfg,
                         trainer_state={"step": 7}, metrics={"val_loss": 1.5}, tokenizer=FakeTokenizer(),
                         best_adapter_dir=tmp_path / "sft" / "best_lora_adapters")
    return cfg, base, model.eval()


@pytest.mark.parametrize("tie", [False, True])
def test_lora_checkpoint_layout_and_resume(tmp_path, tie):
    cfg, base, model = _trained_lora(tmp_path, tie)
    ckpt = read_checkpoint(tmp_path / "sft" / "best")
    assert ckpt.has_adapter and ckpt.meta["has_adapter"] and ckpt.meta["step"] == 7
    state = ckpt.state_dict()
    assert not any("lora_" in k or "base_layer" in k for k in state)
    for k, v in base.state_dict().items():  # the base weights, bit-identical, under their plain names
        if not (tie and k == "lm_head.weight"):
            assert torch.equal(state[k], v), k
    resumed = load_lora_checkpoint(tmp_path / "sft" / "best").eval()
    assert [n for n, p in resumed.named_parameters() if p.requires_grad] == \
           [n for n, p in model.named_parameters() if p.requires_grad]
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(resumed(x), model(x))
        assert (model(x) - base.eval()(x)).abs().max() > 1e-2
        with model.disable_adapter():  # DPO's reference: the frozen base
            assert torch.equal(model(x), base(x))
    assert base_state_dict(resumed).keys() == state.keys()


def test_best_adapters_load_with_peft_from_pretrained(tmp_path):
    cfg, _, model = _trained_lora(tmp_path)
    folder = tmp_path / "sft" / "best_lora_adapters"
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
    plain = build_model(cfg)
    load_state_into(plain, read_checkpoint(tmp_path / "base").state_dict())
    loaded = PeftModel.from_pretrained(plain, str(folder)).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("option", [1, 2])
def test_merged_logits_equal_base_plus_adapter(tmp_path, option):
    cfg, base, model = _trained_lora(tmp_path)
    out = tmp_path / "merged"
    if option == 1:
        merge_adapter_folder(tmp_path / "sft" / "best_lora_adapters", tmp_path / "base", out)
    else:
        merge_full_checkpoint(tmp_path / "sft" / "best", out)
    merged_ckpt = read_checkpoint(out)
    assert not merged_ckpt.has_adapter and not (out / "adapter").exists()
    assert not any("lora_" in k for k in merged_ckpt.state_dict())
    assert merged_ckpt.meta["kind"] == "merged" and merged_ckpt.meta["step"] == 7
    assert merged_ckpt.meta["metrics"] == {"val_loss": 1.5}
    assert merged_ckpt.trainer_state() is None  # a starting point, not a run to resume
    tc = merged_ckpt.training_config()
    assert tc["stage"] == "SFTConfig" and tc["use_lora"] is False and "lora_r" not in tc
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    merged = llmlab.load_model(out)
    assert type(merged).__name__ == "Transformer"
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        want, got, plain = model(x), merged(x), base.eval()(x)
    assert (got - want).abs().max() < 1e-5
    assert (plain - want).abs().max() > 1e-2  # the adapter mattered


def test_merge_errors(tmp_path):
    _trained_lora(tmp_path)
    with pytest.raises(LLMLabError, match="Checkpoint doesn't have LoRA parameters.*merged already"):
        merge_full_checkpoint(tmp_path / "base", tmp_path / "m1")
    with pytest.raises(LLMLabError, match="Adapter folder not found.*nowhere"):
        merge_adapter_folder(tmp_path / "nowhere", tmp_path / "base", tmp_path / "m2")
    with pytest.raises(LLMLabError, match="Adapter folder not found"):
        merge_adapter_folder(tmp_path / "sft" / "best", tmp_path / "base", tmp_path / "m2")  # no adapter files
    merge_full_checkpoint(tmp_path / "sft" / "best", tmp_path / "m3")
    with pytest.raises(LLMLabError, match="already exists.*--force"):
        merge_full_checkpoint(tmp_path / "sft" / "best", tmp_path / "m3")
    with pytest.raises(LLMLabError, match="already exists.*--force"):
        merge_adapter_folder(tmp_path / "sft" / "best_lora_adapters", tmp_path / "base", tmp_path / "m3")
    assert merge_full_checkpoint(tmp_path / "sft" / "best", tmp_path / "m3", force=True) == tmp_path / "m3"
    # neither a LoRA training config nor adapter_config.json: the config cannot be known
    ck = tmp_path / "sft" / "best"
    (ck / "training_config.json").unlink()
    (ck / "adapter" / "adapter_config.json").unlink()
    with pytest.raises(LLMLabError, match="Could not load LoRA config.*--adapter DIR --base CHECKPOINT"):
        merge_full_checkpoint(ck, tmp_path / "m4")
    save_checkpoint(tmp_path / "other", build_model(tiny_config(d_ff=96)))  # not the adapter's base
    with pytest.raises(LLMLabError, match="does not fit.*base checkpoint the adapter was trained on") as e:
        merge_adapter_folder(tmp_path / "sft" / "best_lora_adapters", tmp_path / "other", tmp_path / "m5")
    assert "\n" not in str(e.value)
    for f in ("m1", "m2", "m4", "m5"):
        assert not (tmp_path / f).exists()


def test_an_adapter_onto_a_base_trained_further_since_is_refused(tmp_path):
    """The base folder was trained further after the adapter was made: merging onto it would give a model
    nobody trained (it printed "merged"). The adapter's run saved the weights it was trained on."""
    cfg, base, _ = _trained_lora(tmp_path)
    merge_adapter_folder(tmp_path / "sft" / "best_lora_adapters", tmp_path / "base", tmp_path / "ok")
    with torch.no_grad():
        base.lm_head.weight.add_(1e-3)  # "continued pretraining" into the same folder
    save_checkpoint(tmp_path / "base", base, kind="pretrain", tokenizer=FakeTokenizer())
    with pytest.raises(CheckpointError, match=r"trained on other weights than .*base holds.*merge-lora "
                                              r"--checkpoint .*sft.best --out DIR") as e:
        merge_adapter_folder(tmp_path / "sft" / "best_lora_adapters", tmp_path / "base", tmp_path / "m")
    assert "\n" not in str(e.value) and not (tmp_path / "m").exists()
    merge_full_checkpoint(tmp_path / "sft" / "best", tmp_path / "m")  # what the message offers works


def test_adapter_config_fallback_and_save_adapter_needs_lora(tmp_path):
    cfg, _, model = _trained_lora(tmp_path)
    (tmp_path / "sft" / "best" / "training_config.json").unlink()  # falls back to adapter_config.json
    merge_full_checkpoint(tmp_path / "sft" / "best", tmp_path / "merged")
    x = torch.randint(0, cfg.vocab_size, (1, 8))
    with torch.no_grad():
        assert (llmlab.load_model(tmp_path / "merged")(x) - model(x)).abs().max() < 1e-5
    with pytest.raises(LLMLabError, match="no LoRA adapters"):
        save_adapter(build_model(cfg), tmp_path / "x")


def test_lora_on_a_tied_lm_head_is_refused():
    from tests.conftest import tiny_config

    from llmlab.config import SFTConfig
    from llmlab.errors import ConfigError
    from llmlab.lora import target_modules
    from llmlab.model import build_model

    cfg = SFTConfig(use_lora=True, lora_preset="custom", lora_target_modules=["q_proj", "lm_head"])
    assert target_modules(cfg, build_model(tiny_config())) == ["q_proj", "lm_head"]
    with pytest.raises(ConfigError, match="lm_head shares its weight with embed_tokens"):
        target_modules(cfg, build_model(tiny_config(tie_embeddings=True)))


# --------------------------------------------------------------------------------------------------
# The LoRA options reach PEFT; resume and merge keep the settings the adapter was trained with
# --------------------------------------------------------------------------------------------------


def test_lora_alpha_sets_the_scaling_and_the_merged_weight():
    model = apply_lora(build_model(tiny_config()), sft_cfg(lora_r=4, lora_alpha=16), verbose=False)
    randomize_lora(model)
    layer = model.get_base_model().layers[0].self_attn.q_proj
    assert layer.scaling["default"] == 4.0  # alpha / r = 16 / 4 (PEFT's default alpha 8 would give 2)
    w = layer.base_layer.weight.detach().clone()
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged.layers[0].self_attn.q_proj.weight, w + delta * 4.0, rtol=0, atol=1e-6)


def test_lora_dropout_is_a_dropout_on_the_lora_path():
    model = apply_lora(build_model(tiny_config(dropout=0.0)), sft_cfg(lora_dropout=0.5), verbose=False)
    randomize_lora(model)
    drop = model.get_base_model().layers[0].self_attn.q_proj.lora_dropout["default"]
    assert isinstance(drop, torch.nn.Dropout) and drop.p == 0.5
    x = torch.randint(0, 128, (2, 12))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))  # the model has no dropout of its own: only LoRA's differs
        model.eval()
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("field,value", [("lora_alpha", 16), ("lora_r", 8), ("lora_dropout", 0.2),
                                         ("lora_preset", "minimal"), ("lora_target_modules", ["q_proj"])])
def test_resume_check_refuses_changed_lora_settings(tmp_path, field, value):
    from llmlab.errors import ConfigError
    from llmlab.lora import check_lora_resume

    _trained_lora(tmp_path)  # trained with sft_cfg(lora_preset="all"): r=4, alpha=8, dropout 0.0
    ckpt = read_checkpoint(tmp_path / "sft" / "best")
    check_lora_resume(sft_cfg(lora_preset="all"), ckpt)  # the same settings resume
    check_lora_resume(sft_cfg(lora_preset="all", lora_target_modules=["q_proj"]), ckpt)  # unused by "all"
    check_lora_resume(sft_cfg(lora_preset="all", lora_dropout=0.3), ckpt, skip=("lora_dropout",))  # RLHF's
    changed = {"lora_preset": "all", field: value}
    if field == "lora_target_modules":
        changed["lora_preset"] = "custom"
    with pytest.raises(ConfigError) as e:
        check_lora_resume(sft_cfg(**changed), ckpt)
    msg = str(e.value)
    name = "lora_preset" if field == "lora_target_modules" else field
    assert msg.startswith(f"{name}: ") and "\n" not in msg and "resume with" in msg
    saved = {"lora_alpha": "lora_alpha=8", "lora_r": "lora_r=4", "lora_dropout": "lora_dropout=0.0",
             "lora_preset": "lora_preset=all", "lora_target_modules": "lora_preset=all"}[field]
    assert saved in msg  # the checkpoint's value, to resume with


def test_merge_option2_uses_the_adapters_own_config_over_a_stale_training_config(tmp_path, capsys):
    cfg, _, model = _trained_lora(tmp_path)  # r=4, alpha=8
    tc_file = tmp_path / "sft" / "best" / "training_config.json"
    tc = json.loads(tc_file.read_text())
    tc_file.write_text(json.dumps({**tc, "lora_alpha": 32}))  # what a resume with changed alpha used to write
    merge_full_checkpoint(tmp_path / "sft" / "best", tmp_path / "merged")
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        assert (llmlab.load_model(tmp_path / "merged")(x) - model(x)).abs().max() < 1e-5  # alpha 8, as trained
    assert "training_config.json says r=4, alpha=32" in capsys.readouterr().out  # and the disagreement is told


def test_merge_option1_keeps_the_base_checkpoints_own_adapter(tmp_path):
    """An adapter trained on a LoRA checkpoint (RLHF starts from the SFT checkpoint with its adapter merged)
    merges onto that checkpoint with its adapter: the result is the stacked model."""
    cfg, _, _ = _trained_lora(tmp_path)  # sft/best: base weights + adapter 1 (preset all)
    start = llmlab.load_model(tmp_path / "sft" / "best")  # base + adapter 1, merged
    second = apply_lora(copy.deepcopy(start), sft_cfg(lora_preset="minimal", lora_r=2), verbose=False)
    randomize_lora(second, seed=2)
    save_adapter(second, tmp_path / "rlhf_adapters")
    merge_adapter_folder(tmp_path / "rlhf_adapters", tmp_path / "sft" / "best", tmp_path / "merged")
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        want = second.eval()(x)
        assert (llmlab.load_model(tmp_path / "merged")(x) - want).abs().max() < 1e-5
        assert (start(x) - want).abs().max() > 1e-2  # adapter 2 mattered
        plain = llmlab.load_model(tmp_path / "sft" / "best", with_adapter=False)
        assert (plain(x) - start(x)).abs().max() > 1e-2  # and so did adapter 1
    # the checkpoint's own adapter (best_lora_adapters/ beside best/) goes onto the plain base weights, not
    # on top of itself: the result is best/ itself
    merge_adapter_folder(tmp_path / "sft" / "best_lora_adapters", tmp_path / "sft" / "best", tmp_path / "m2")
    with torch.no_grad():
        assert (llmlab.load_model(tmp_path / "m2")(x) - start(x)).abs().max() < 1e-5


def test_merge_option1_stacks_a_later_runs_best_adapters_on_a_lora_checkpoint(tmp_path):
    """RLHF with LoRA on an SFT-LoRA checkpoint, saved as the trainers do (a full checkpoint whose frozen
    weights are SFT merged, best_lora_adapters/ beside it): its adapters go on top of the SFT checkpoint
    with its own adapter merged, since their checkpoint's frozen weights are not the SFT base's."""
    cfg, _, _ = _trained_lora(tmp_path)
    start = llmlab.load_model(tmp_path / "sft" / "best")  # what RLHF starts from: base + SFT adapter
    rl = apply_lora(copy.deepcopy(start), sft_cfg(lora_preset="minimal", lora_r=2), verbose=False)
    randomize_lora(rl, seed=5)
    save_lora_checkpoint(tmp_path / "rlhf" / "best", rl, kind="rlhf", train_config=sft_cfg(lora_preset="minimal"),
                         trainer_state={"step": 3}, tokenizer=FakeTokenizer(),
                         best_adapter_dir=tmp_path / "rlhf" / "best_lora_adapters")
    merge_adapter_folder(tmp_path / "rlhf" / "best_lora_adapters", tmp_path / "sft" / "best", tmp_path / "merged")
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        want = rl.eval()(x)
        assert (llmlab.load_model(tmp_path / "merged")(x) - want).abs().max() < 1e-5
        assert (start(x) - want).abs().max() > 1e-2


def test_a_stacked_adapter_onto_a_lora_checkpoint_trained_again_since_is_refused(tmp_path):
    """RLHF's adapter was trained on SFT's best/ with its adapter merged; SFT ran again into the same folder
    (another adapter there now): stacking onto it would give a model nobody trained (it printed 'merged')."""
    cfg, base, _ = _trained_lora(tmp_path)
    start = llmlab.load_model(tmp_path / "sft" / "best")
    rl = apply_lora(copy.deepcopy(start), sft_cfg(lora_preset="minimal", lora_r=2), verbose=False)
    randomize_lora(rl, seed=5)
    save_lora_checkpoint(tmp_path / "rlhf" / "best", rl, kind="rlhf", train_config=sft_cfg(lora_preset="minimal"),
                         trainer_state={"step": 3}, tokenizer=FakeTokenizer(),
                         best_adapter_dir=tmp_path / "rlhf" / "best_lora_adapters")
    again = apply_lora(copy.deepcopy(base), sft_cfg(lora_preset="all"), verbose=False)
    randomize_lora(again, seed=9)  # the SFT run again, into the same folder
    save_lora_checkpoint(tmp_path / "sft" / "best", again, kind="sft", train_config=sft_cfg(lora_preset="all"),
                         trainer_state={"step": 2}, tokenizer=FakeTokenizer())
    with pytest.raises(CheckpointError, match=r"trained on other weights than .*best gives with its own adapter "
                                              r"merged.*merge-lora --checkpoint .*rlhf.best --out DIR"):
        merge_adapter_folder(tmp_path / "rlhf" / "best_lora_adapters", tmp_path / "sft" / "best", tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("evidence", ["weights", "training_config"])
def test_merge_option1_with_a_later_checkpoint_of_the_same_run_is_not_stacked(tmp_path, evidence, monkeypatch):
    """best_lora_adapters/ with latest/ of the same run (a later step, another adapter on the same frozen
    base): the adapter goes onto the plain base weights, so the result is the best model, not
    base + latest's adapter + best's adapter. Known from the frozen weights of the checkpoint the adapter
    was saved with, or (that checkpoint gone) from best_lora_adapters/ sitting in the base's run folder
    with the same stage recorded."""
    cfg, _, best_model = _trained_lora(tmp_path)
    later = copy.deepcopy(best_model)
    randomize_lora(later, seed=3)  # the run went on training its adapter
    train_cfg = sft_cfg(lora_preset="all")
    save_lora_checkpoint(tmp_path / "sft" / "latest", later, kind="sft", train_config=train_cfg,
                         trainer_state={"step": 9}, tokenizer=FakeTokenizer())
    adapters = tmp_path / "sft" / "best_lora_adapters"
    if evidence == "training_config":
        import shutil

        shutil.rmtree(tmp_path / "sft" / "best")
        (adapters / "training_metadata.json").unlink()
    merge_adapter_folder(adapters, tmp_path / "sft" / "latest", tmp_path / "merged")
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        want = best_model(x)
        assert (llmlab.load_model(tmp_path / "merged")(x) - want).abs().max() < 1e-5
        assert (later.eval()(x) - want).abs().max() > 1e-2  # latest's adapter differs from best's
    # chat --adapter takes the same base (llmlab.lora.base_model_for_adapter): the best model again
    from llmlab.cli.chat import load_for_inference

    monkeypatch.setattr("llmlab.data.tokenizer.load_tokenizer", lambda source: None)  # FakeTokenizer's folder
    loaded, _, kind = load_for_inference(str(tmp_path / "sft" / "latest"), adapter=str(adapters), device="cpu")
    with torch.no_grad():
        assert kind == "adapter" and (loaded(x) - want).abs().max() < 1e-5


def test_adapter_metadata_names_its_checkpoint_absolutely_and_relative_names_are_not_trusted(tmp_path, monkeypatch):
    """training_metadata.json's checkpoint is saved resolved; a relative one (older saves) was relative to
    where that run started, so it is not used to find the adapter's frozen weights."""
    from llmlab.lora import _adapter_training_checkpoints

    monkeypatch.chdir(tmp_path)
    cfg = tiny_config()
    model = apply_lora(build_model(cfg), sft_cfg(lora_preset="all"), verbose=False)
    save_lora_checkpoint(Path("run") / "best", model, kind="sft", train_config=sft_cfg(lora_preset="all"),
                         trainer_state={"step": 1}, tokenizer=FakeTokenizer(), best_adapter_dir=Path("run") / "kept")
    meta_file = tmp_path / "run" / "kept" / "training_metadata.json"
    meta = json.loads(meta_file.read_text())
    assert meta["checkpoint"] == str(tmp_path / "run" / "best")
    assert _adapter_training_checkpoints(tmp_path / "run" / "kept") == [tmp_path / "run" / "best"]
    meta_file.write_text(json.dumps({**meta, "checkpoint": "run/best"}))
    assert _adapter_training_checkpoints(tmp_path / "run" / "kept") == []


def test_unreadable_weights_while_matching_an_adapter_to_its_base_are_one_line(tmp_path):
    """merge option 1 reads the frozen weights of the checkpoint the adapter was saved with (best/ beside
    best_lora_adapters/) to compare them with the base's: a corrupt file there is one line, not a traceback."""
    _, _, model = _trained_lora(tmp_path)
    later = copy.deepcopy(model)
    randomize_lora(later, seed=3)
    save_lora_checkpoint(tmp_path / "sft" / "latest", later, kind="sft", train_config=sft_cfg(lora_preset="all"),
                         trainer_state={"step": 9}, tokenizer=FakeTokenizer())
    (tmp_path / "sft" / "best" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(LLMLabError, match="unreadable safetensors") as e:
        merge_adapter_folder(tmp_path / "sft" / "best_lora_adapters", tmp_path / "sft" / "latest", tmp_path / "m")
    assert "\n" not in str(e.value) and not (tmp_path / "m").exists()


def test_estimate_counts_a_lora_on_lm_head():
    """A custom preset with lm_head: the estimator counts its A and B (d_model -> vocab) as apply_lora
    trains them (`llm-lab estimate` under-reported SFT's tiny config by exactly that adapter)."""
    cfg = tiny_config()
    targets = ["q_proj", "v_proj", "lm_head"]
    model = apply_lora(build_model(cfg), sft_cfg(lora_preset="custom", lora_target_modules=targets), verbose=False)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trained == count_lora_parameters(cfg, targets, 4) > count_lora_parameters(cfg, targets[:2], 4)
