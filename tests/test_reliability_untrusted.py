"""Untrusted files never execute code: crafted pickles are refused wherever a user can point LLM-Lab.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_reliability_untrusted.py -q

Every test plants a pickle whose `__reduce__` would create a marker file when unpickled, hands it to one
loading path, and asserts both a one-line LLM-Lab error and that the marker does not exist. Reward
functions are imported only from the module a config names.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tests.conftest import tiny_config

from llmlab.checkpoint import load_model, save_checkpoint
from llmlab.config import RLHFConfig, SFTConfig
from llmlab.errors import CheckpointError, ConfigError, LLMLabError
from llmlab.model import build_model


class Payload:
    """Unpickling this calls open(marker, "w"): the marker file appears iff code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": torch.zeros(2), "state": Payload(marker)}, path)
    return path


def one_line(error: BaseException) -> str:
    message = str(error)
    assert isinstance(error, LLMLabError) and message and "\n" not in message
    return message


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PWNED"


@pytest.fixture
def lora_checkpoint(tmp_path) -> Path:
    from llmlab.lora import apply_lora, save_lora_checkpoint

    model = apply_lora(build_model(tiny_config()), SFTConfig(use_lora=True, lora_preset="all"), verbose=False)
    return save_lora_checkpoint(tmp_path / "lora" / "best", model, kind="sft", trainer_state={"step": 1})


def test_the_payload_really_runs_when_unpickled_unsafely(tmp_path, marker):
    # the control: without weights_only the planted file executes; every other test must not get here
    torch.load(plant(tmp_path / "x.pt", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["best_model.pt", "model.bin", "weights.pt"])
def test_a_pickle_path_given_to_load_model_is_refused(tmp_path, marker, name):
    with pytest.raises(CheckpointError) as info:
        load_model(plant(tmp_path / name, marker))
    assert "pickle" in one_line(info.value)
    assert not marker.exists()


def test_a_pickle_as_trainer_state_is_refused_on_resume(tmp_path, marker):
    from llmlab.train.loop import resume_state

    save_checkpoint(tmp_path / "latest", build_model(tiny_config()), trainer_state={"step": 3})
    plant(tmp_path / "latest" / "trainer_state.pt", marker)
    with pytest.raises(CheckpointError) as info:
        resume_state(tmp_path)  # what every stage's resume=... calls
    assert "cannot be read safely" in one_line(info.value)
    assert not marker.exists()


def test_a_pickle_renamed_model_safetensors_is_refused(tmp_path, marker):
    save_checkpoint(tmp_path / "best", build_model(tiny_config()))
    plant(tmp_path / "best" / "model.safetensors", marker)
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path)
    assert "corrupt or truncated" in one_line(info.value)
    assert not marker.exists()


def _only_bin(adapter: Path, marker: Path) -> None:
    (adapter / "adapter_model.safetensors").unlink()
    plant(adapter / "adapter_model.bin", marker)


def test_peft_itself_reads_a_bin_adapter_with_weights_only(lora_checkpoint, marker):
    """What PeftModel.from_pretrained does with only adapter_model.bin: torch.load(weights_only=True),
    which refuses the payload (so no code runs) but raises a raw UnpicklingError: LLM-Lab must check
    for the safetensors file itself."""
    import pickle

    from peft import PeftModel

    _only_bin(lora_checkpoint / "adapter", marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        PeftModel.from_pretrained(build_model(tiny_config()), str(lora_checkpoint / "adapter"))
    assert not marker.exists()


@pytest.mark.parametrize("loader", ["load_model", "load_lora_checkpoint", "merge_full", "merge_adapter"])
def test_an_adapter_with_only_a_pickle_is_refused(tmp_path, lora_checkpoint, marker, loader):
    from llmlab import lora

    _only_bin(lora_checkpoint / "adapter", marker)
    with pytest.raises(CheckpointError) as info:
        if loader == "load_model":
            load_model(lora_checkpoint)
        elif loader == "load_lora_checkpoint":
            lora.load_lora_checkpoint(lora_checkpoint)
        elif loader == "merge_full":
            lora.merge_full_checkpoint(lora_checkpoint, tmp_path / "merged")
        else:
            base = save_checkpoint(tmp_path / "base", build_model(tiny_config()))
            lora.merge_adapter_folder(lora_checkpoint / "adapter", base, tmp_path / "merged")
    assert "adapter_model.safetensors" in one_line(info.value)
    assert not marker.exists()


def test_a_pickle_beside_a_safetensors_adapter_is_never_read(lora_checkpoint, marker):
    plant(lora_checkpoint / "adapter" / "adapter_model.bin", marker)
    model = load_model(lora_checkpoint)
    assert "lora_" not in " ".join(model.state_dict())  # merged from the safetensors file
    assert not marker.exists()


def test_chat_adapter_flag_with_only_a_pickle_is_refused(lora_checkpoint, marker):
    from llmlab.cli.chat import load_for_inference

    save_checkpoint(lora_checkpoint.parent / "base", build_model(tiny_config()))
    _only_bin(lora_checkpoint / "adapter", marker)
    try:
        with pytest.raises(CheckpointError):
            load_for_inference(str(lora_checkpoint.parent / "base"), adapter=str(lora_checkpoint / "adapter"))
    finally:
        assert not marker.exists()


def test_import_hf_of_a_pickle_pytorch_model_bin_is_refused(tmp_path, marker):
    from transformers import LlamaConfig

    from llmlab.interop.hf_io import import_hf

    folder = tmp_path / "hf"
    LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64).save_pretrained(folder)
    plant(folder / "pytorch_model.bin", marker)
    with pytest.raises(CheckpointError) as info:
        import_hf(str(folder), tmp_path / "out")
    one_line(info.value)
    assert not marker.exists() and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# Reward functions: only the module a config names is imported
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def reward_module(tmp_path, monkeypatch) -> tuple[str, Path]:
    """A module on sys.path that leaves a marker when imported (a stand-in for any importable code)."""
    marker = tmp_path / "IMPORTED"
    name = f"llmlab_test_reward_{abs(hash(str(tmp_path)))}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(f"""
        open({str(marker)!r}, "w").close()
        def score(prompts, completions, **_):
            return [1.0 for _ in completions]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield name, marker
    sys.modules.pop(name, None)


def _rlhf(**kw) -> RLHFConfig:
    return RLHFConfig(algorithm="grpo", reward_model_name=None, datasets=["bundled:prompts"], batch_size=4,
                      mini_batch_size=4, **kw)


def test_rewards_import_nothing_the_config_does_not_name(reward_module):
    from llmlab.rlhf.rewards import build_reward_fn

    name, marker = reward_module
    reward = build_reward_fn(_rlhf(reward_functions=["format_final_line", {"name": "length_penalty",
                                                                           "weight": 0.5}]))
    assert reward(["p"], ["Answer: 4"]) == [1.0 - 0.5 * len("Answer: 4") / 1000]
    assert not marker.exists() and name not in sys.modules
    # naming it explicitly is the only way in (the control that the module would run)
    reward = build_reward_fn(_rlhf(reward_functions=[f"{name}:score"]))
    assert marker.exists() and reward(["p"], ["x"]) == [1.0]


@pytest.mark.parametrize("spec", ["__import__('os').system('touch IMPORTED')", "eval:print",
                                  "{name}", "{name}.score", "{name}:", ":score", "{name}:missing"])
def test_reward_specs_are_names_never_code(reward_module, spec):
    from llmlab.rlhf.rewards import build_reward_fn

    name, marker = reward_module
    spec = spec.format(name=name)
    with pytest.raises(ConfigError) as info:
        build_reward_fn(_rlhf(reward_functions=[spec]))
    assert "reward_functions" in one_line(info.value)
    if ":" not in spec or spec.startswith(":") or spec.startswith("__import__"):
        assert not marker.exists()  # nothing was imported for a spec that is not module:function


def test_rlhf_config_json_keeps_reward_specs_as_plain_strings(tmp_path):
    path = tmp_path / "rlhf.json"
    path.write_text(json.dumps({"reward_functions": ["os:system"], "reward_model_name": None}))
    cfg = RLHFConfig.load(path)  # loading a config imports nothing; only build_reward_fn resolves names
    assert cfg.reward_functions == ["os:system"]
