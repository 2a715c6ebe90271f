"""Every shipped config in configs/ loads and validates; the tiny ones are the pipeline's tiny preset."""

import json
from pathlib import Path

import pytest

from llmlab.cli import main
from llmlab.cli.commands import load_stage_config
from llmlab.config import ModelConfig, RLHFConfig, SFTConfig, TrainConfig
from llmlab.pipeline import PRESETS, stage_configs

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CLASS_BY_PREFIX = {"model": ModelConfig, "pretrain": TrainConfig, "sft": SFTConfig, "rlhf": RLHFConfig}


def shipped():
    return sorted(CONFIGS.glob("*.json"))


def test_configs_exist_for_every_stage_and_size():
    names = {p.stem for p in shipped()}
    for stage in ("model", "pretrain", "sft", "rlhf_ppo", "rlhf_dpo", "rlhf_grpo"):
        assert {f"{stage}_tiny", f"{stage}_default"} <= names


@pytest.mark.parametrize("path", shipped(), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cls = CLASS_BY_PREFIX[path.stem.split("_")[0]]
    cfg = cls.load(path)  # unknown keys, wrong types and invalid combinations raise
    data = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    assert set(data) == set(cls.field_names())  # complete: every field written out
    if cls is not ModelConfig:  # the stage is told from the keys
        assert type(load_stage_config(path)) is cls
    if path.stem.startswith("rlhf_"):
        assert cfg.algorithm == path.stem.split("_")[1]


def test_default_configs_are_the_spec_defaults():
    assert ModelConfig.load(CONFIGS / "model_default.json") == ModelConfig()
    assert TrainConfig.load(CONFIGS / "pretrain_default.json") == TrainConfig()
    assert SFTConfig.load(CONFIGS / "sft_default.json") == SFTConfig()
    for algo in ("ppo", "dpo", "grpo"):
        assert RLHFConfig.load(CONFIGS / f"rlhf_{algo}_default.json") == RLHFConfig(algorithm=algo)


def test_tiny_configs_are_the_pipeline_tiny_preset():
    expected = stage_configs("tiny", "runs/tiny")
    files = {"model": "model_tiny", "pretrain": "pretrain_tiny", "sft": "sft_tiny", "dpo": "rlhf_dpo_tiny",
             "grpo": "rlhf_grpo_tiny"}
    for key, stem in files.items():
        cls = type(expected[key])
        assert cls.load(CONFIGS / f"{stem}.json") == expected[key], stem


def test_pipeline_presets_build_valid_configs_and_match_the_cli_choices():
    assert set(PRESETS) == set(main.PIPELINE_PRESETS)
    for name in PRESETS:
        cfgs = stage_configs(name, "runs/x")
        assert cfgs["sft"].use_lora and cfgs["dpo"].algorithm == "dpo" and cfgs["grpo"].algorithm == "grpo"
        assert cfgs["model"].vocab_size % 64 == 0
