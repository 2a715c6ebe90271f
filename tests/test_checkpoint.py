"""Checkpoint folders: exact round trip, atomic writes, clear errors, no unpickling."""

import json
import os

import pytest
import torch
from tests.conftest import tiny_config

from llmlab import load_model
from llmlab.checkpoint import read_checkpoint, resolve_checkpoint, save_checkpoint
from llmlab.errors import CheckpointError
from llmlab.model import build_model


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_exact(tmp_path, tied):
    m = build_model(tiny_config(tie_embeddings=tied, positional_encoding="alibi"))
    save_checkpoint(tmp_path / "ck", m, trainer_state={"step": 7})
    loaded = load_model(tmp_path / "ck")
    assert not loaded.training and loaded.config == m.config
    for (k, a), (_, b) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    if tied:
        assert loaded.lm_head.weight.data_ptr() == loaded.embed_tokens.weight.data_ptr()
    meta = json.loads((tmp_path / "ck" / "llmlab.json").read_text())
    assert meta["format_version"] == 1 and meta["step"] == 7


def test_truncated_safetensors_gives_clear_error(tmp_path):
    save_checkpoint(tmp_path / "ck", build_model(tiny_config()))
    f = tmp_path / "ck" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(tmp_path / "ck")


def test_shape_mismatch_names_the_tensor(tmp_path):
    save_checkpoint(tmp_path / "ck", build_model(tiny_config()))
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["d_ff"] = 96
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.\w+_proj\.weight has shape"):
        load_model(tmp_path / "ck")


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path):
    m = build_model(tiny_config())
    save_checkpoint(tmp_path / "ck", m, trainer_state={"step": 1})

    def boom(_tmp):
        raise OSError("No space left on device")

    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "ck", m, trainer_state={"step": 2}, write_extra=boom)
    assert read_checkpoint(tmp_path / "ck").trainer_state()["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary folder left behind


def test_spec_best_model_pt_maps_to_best_folder_and_pickles_are_refused(tmp_path):
    save_checkpoint(tmp_path / "checkpoints" / "best", build_model(tiny_config()))
    assert resolve_checkpoint(tmp_path / "checkpoints" / "best_model.pt") == tmp_path / "checkpoints" / "best"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, bad)
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(bad)
    # a crafted trainer_state.pt inside a checkpoint folder is refused too
    torch.save({"x": Evil()}, tmp_path / "checkpoints" / "best" / "trainer_state.pt")
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        read_checkpoint(tmp_path / "checkpoints" / "best").trainer_tensors()
    assert not marker.exists()


def test_a_gguf_file_as_a_checkpoint_is_told_to_import_it_first(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(CheckpointError, match=r"a GGUF file, not a checkpoint folder; convert it with `llm-lab "
                                              r"import-hf .*model.gguf --out DIR`"):
        resolve_checkpoint(gguf)


def test_only_the_specs_file_names_map_to_folders_and_others_list_what_exists(tmp_path):
    ck = tmp_path / "sft_checkpoints"
    for name in ("best", "latest"):
        save_checkpoint(ck / name, build_model(tiny_config()))
    assert resolve_checkpoint(ck / "latest_model.pt") == ck / "latest"
    # the merge's output for best/ (best_merged/) does not exist yet: an error, not best/ itself
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(ck / "best_model_merged.pt")
    msg = str(e.value)
    assert "best_merged/" in msg and "checkpoint folders in" in msg and "best, latest" in msg and "\n" not in msg
    save_checkpoint(ck / "best_merged", build_model(tiny_config()))
    assert resolve_checkpoint(ck / "best_model_merged.pt") == ck / "best_merged"
    save_checkpoint(ck / "merged", build_model(tiny_config()))
    assert resolve_checkpoint(ck / "model_merged.pt") == ck / "merged"
    for typo in ("bset_model.pt", "weights.pt", "bets"):  # a mistyped path never loads best/
        with pytest.raises(CheckpointError, match="best, best_merged, latest, merged; pass one of them"):
            resolve_checkpoint(ck / typo)
    with pytest.raises(CheckpointError, match="does not exist; pass a checkpoint folder"):
        resolve_checkpoint(tmp_path / "nowhere" / "best_model.pt")


def test_checkpoint_saved_with_yarn_at_factor_one_loads_as_rope(tmp_path, capsys):
    """Before yarn needed rope_scaling_factor > 1, yarn at 1.0 (the default) was saved in config.json; such a
    checkpoint loads as rope (the same frequencies, attention factor 1) with a note. A user's config still
    refuses it."""
    from llmlab.config import ModelConfig
    from llmlab.errors import ConfigError

    torch.manual_seed(0)
    rope = build_model(tiny_config(positional_encoding="rope", init_std=0.3)).eval()
    save_checkpoint(tmp_path / "ck", rope)
    cfg_file = tmp_path / "ck" / "config.json"
    data = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**data, "positional_encoding": "yarn", "rope_scaling_factor": 1.0}))
    capsys.readouterr()
    loaded = load_model(tmp_path / "ck")
    assert loaded.config.positional_encoding == "rope"
    assert "yarn with rope_scaling_factor=1.0 is plain RoPE; loading it as positional_encoding=rope" in \
        capsys.readouterr().err  # on stderr, apart from generated text
    load_model(tmp_path / "ck")
    assert "plain RoPE" not in capsys.readouterr().err  # said once per checkpoint
    x = torch.randint(0, rope.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(x), rope(x))
    with pytest.raises(ConfigError, match="set rope_scaling_factor > 1"):
        ModelConfig.load(cfg_file)  # a config the user passes keeps the refusal
    cfg_file.write_text(json.dumps({**data, "positional_encoding": "yarn", "rope_scaling_factor": 0.5}))
    with pytest.raises(CheckpointError, match="rope_scaling_factor: must be >= 1"):
        read_checkpoint(tmp_path / "ck")  # not RoPE: still refused


def test_an_imported_models_generation_config_is_carried_into_later_checkpoints(tmp_path, macbeth_tok_dir):
    """import_hf saves a model's generation_config.json beside tokenizer/; a checkpoint saved later with that
    tokenizer (SFT, RLHF, a merge) copies it, so its extra eos ids still stop replies and go out with
    export-hf. A tokenizer with no such file writes none."""
    from llmlab.data.tokenizer import load_tokenizer, stop_token_ids

    model = build_model(tiny_config(vocab_size=300))
    tok = load_tokenizer(str(macbeth_tok_dir))
    save_checkpoint(tmp_path / "imported", model, tokenizer=tok)
    assert not (tmp_path / "imported" / "generation_config.json").exists()
    gen = {"eos_token_id": [tok.eos_token_id, 7], "temperature": 0.6}
    (tmp_path / "imported" / "generation_config.json").write_text(json.dumps(gen))
    imported_tok = load_tokenizer(str(tmp_path / "imported" / "tokenizer"))
    assert 7 in stop_token_ids(imported_tok)
    save_checkpoint(tmp_path / "sft", model, tokenizer=imported_tok)
    assert json.loads((tmp_path / "sft" / "generation_config.json").read_text()) == gen
    assert 7 in stop_token_ids(load_tokenizer(str(tmp_path / "sft" / "tokenizer")))
