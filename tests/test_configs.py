"""Every shipped config in configs/ loads and validates; the tiny ones are the pipeline's tiny preset."""

import json
from pathlib import Path

import pytest

from llmlab.cli import main
from llmlab.cli.commands import load_stage_config
from llmlab.config import ModelConfig, RLHFConfig, SFTConfig, TrainConfig
from llmlab.errors import ConfigError
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


# The values the spec ("Model Configuration", "Base Training") states, written out literally, so a changed
# dataclass default fails here even when the shipped default configs are regenerated from it.
SPEC_MODEL_DEFAULTS = dict(
    tokenizer_name="Qwen/Qwen2.5-0.5B", positional_encoding="rope", attention_type="gqa", norm_type="rmsnorm",
    activation="swiglu", d_model=896, n_heads=14, n_kv_heads=2, d_ff=4864, n_layers=24, vocab_size=151936,
    max_seq_len=1024, dropout=0.0, sliding_window=None, attention_bias=False, norm_eps=1e-6,
)
SPEC_PRETRAIN_DEFAULTS = dict(
    max_steps=10000, optimizer="adamw", adamw_beta1=0.9, adamw_beta2=0.999, adamw_eps=1e-8, lion_beta1=0.9,
    lion_beta2=0.99, sophia_beta1=0.965, sophia_beta2=0.99, sophia_rho=0.04, muon_momentum=0.95,
    muon_nesterov=True, lr=3e-4, weight_decay=0.1, scheduler="cosine", warmup_steps=1000, batch_size=1,
    gradient_accumulation_steps=64, grad_clip=1.0, eval_every=500, eval_steps=100, save_best_only=True,
    datasets=["HuggingFaceFW/fineweb-edu"],
)


@pytest.mark.parametrize("cls,spec", [(ModelConfig, SPEC_MODEL_DEFAULTS), (TrainConfig, SPEC_PRETRAIN_DEFAULTS)],
                         ids=["model", "pretrain"])
def test_dataclass_defaults_are_the_values_the_spec_states(cls, spec):
    cfg = cls()
    actual = {name: getattr(cfg, name) for name in spec}
    assert actual == spec
    assert all(type(actual[n]) is type(spec[n]) for n in spec)  # 0.0 not 0, True not 1


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


def test_shipped_configs_and_presets_set_nothing_their_stage_never_reads():
    """The notices for set-but-unused settings stay meaningful: no shipped config or pipeline preset
    triggers one (a PPO config with a GRPO group_size, a DPO preset with max_new_tokens did)."""
    from llmlab.rlhf.run import unread_by_algorithm
    from llmlab.train.stage import unused_settings

    cfgs = [stage_configs(name, "runs/x")[k] for name in PRESETS for k in ("pretrain", "sft", "dpo", "grpo")]
    for path in CONFIGS.glob("*.json"):
        if not path.name.startswith("model_"):
            cls = TrainConfig if "pretrain" in path.name else SFTConfig if "sft" in path.name else RLHFConfig
            cfgs.append(cls.load(path))
    for cfg in cfgs:
        assert unused_settings(cfg) is None, cfg
        assert not isinstance(cfg, RLHFConfig) or unread_by_algorithm(cfg) is None, cfg


# --------------------------------------------------------------------------------------------------
# RLHF checks: one-line ConfigErrors that name the field and the fix
# --------------------------------------------------------------------------------------------------


def _rlhf(**kw):
    return RLHFConfig(reward_model_name=None, **kw)


@pytest.mark.parametrize("kw, message", [
    (dict(adaptive_kl=True, target_kl=0.0), "target_kl: must be > 0 with adaptive_kl=true"),
    (dict(adaptive_kl=True, target_kl=-1.0), "target_kl: must be > 0 with adaptive_kl=true"),
    (dict(adaptive_kl=True, target_kl=float("nan")), "target_kl: must be a finite number"),
    (dict(adaptive_kl=True, kl_coef=0.0), "kl_coef: adaptive_kl=true scales kl_coef, so 0 stays 0"),
    (dict(batch_size=10, mini_batch_size=4), "mini_batch_size: batch_size=10 is not divisible by mini_batch_size=4"),
    (dict(algorithm="grpo", group_size=1), "group_size: GRPO needs at least 2 responses per prompt, got 1"),
])
def test_rlhf_bad_combinations_are_one_line_config_errors(kw, message):
    from llmlab.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        _rlhf(**kw)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_rlhf_checks_apply_only_where_they_matter():
    _rlhf(adaptive_kl=False, target_kl=0.0)  # the target is read only by the adaptive controller
    _rlhf(adaptive_kl=False, kl_coef=0.0)
    _rlhf(adaptive_kl=True, target_kl=0.5, kl_coef=0.01)
    _rlhf(algorithm="ppo", group_size=1)  # group_size is GRPO's
    _rlhf(batch_size=12, mini_batch_size=4)


def test_rlhf_help_says_what_dropout_and_save_every_really_do():
    help_ = RLHFConfig.field_help()
    assert "turns every dropout off" in help_["lora_dropout"]
    assert "does nothing while save_best_only is true" in help_["save_every"]
    assert "GRPO" in help_["top_k"] and "GRPO" in help_["top_p"]
    assert SFTConfig.field_help()["lora_dropout"] == "Dropout on the LoRA path"  # other stages keep theirs


@pytest.mark.parametrize("cls,key,hint", [(TrainConfig, "learning_rate", "lr"), (SFTConfig, "lr", "learning_rate"),
                                          (SFTConfig, "grad_clip", "max_grad_norm"),
                                          (TrainConfig, "max_step", "max_steps")])
def test_an_unknown_key_suggests_the_stages_own_name(cls, key, hint):
    """pretrain says lr and grad_clip where sft and rlhf say learning_rate and max_grad_norm (the spec's
    names): the error names the one this stage uses, and a near miss its closest key."""
    with pytest.raises(ConfigError, match=rf"override '{key}': unknown key for {cls.__name__} \(did you mean {hint}\?\)"):
        cls().with_overrides([f"{key}=1"])
    with pytest.raises(ConfigError, match=rf"unknown key\(s\) {key} for {cls.__name__} \(did you mean {hint}\?\)"):
        cls.from_dict({key: 1})
    with pytest.raises(ConfigError) as plain:
        cls().with_overrides(["zzz=1"])
    assert "did you mean" not in str(plain.value)


def test_an_override_can_fix_what_the_file_alone_gets_wrong(tmp_path, monkeypatch):
    """default, then the file, then the overrides, validated once: a file with max_steps 6 and the default
    warmup (100) is invalid alone, and warmup_steps=1 on the command line must fix it (it was refused
    before the override applied), for `llm-lab` and for `python -m llmlab.train.<stage>` alike."""
    from llmlab.cli.main import build_config
    from llmlab.train import sft
    from llmlab.train.stage import stage_main

    path = tmp_path / "sft.json"
    path.write_text(json.dumps({"max_steps": 6, "datasets": ["bundled:sft"]}))
    with pytest.raises(ConfigError, match="warmup_steps: 100 is more than max_steps=6"):
        SFTConfig.load(path)
    cfg = build_config(SFTConfig, str(path), ["warmup_steps=1"])
    assert (cfg.max_steps, cfg.warmup_steps) == (6, 1)
    with pytest.raises(ConfigError, match="override 'lr': unknown key for SFTConfig"):
        build_config(SFTConfig, str(path), ["lr=1"])
    seen = []
    monkeypatch.setattr(sft, "run_sft", lambda cfg, **kw: seen.append(cfg))
    assert stage_main(["--config", str(path), "warmup_steps=2"], SFTConfig, sft.run_sft, prog="x",
                      description="x") == 0
    assert seen and seen[0].warmup_steps == 2


@pytest.mark.parametrize("cls", [TrainConfig, SFTConfig, RLHFConfig])
@pytest.mark.parametrize("value", ["0", "1", "-5"])
def test_max_seq_len_below_two_names_the_field(cls, value):
    """0 used to mean the model's length without a word, and 1 or -5 failed later as 'seq_len must be >= 2'."""
    with pytest.raises(ConfigError, match=rf"^max_seq_len: must be >= 2, or null .*got {value}$"):
        cls().with_overrides([f"max_seq_len={value}"])
    assert cls().with_overrides(["max_seq_len=null"]).max_seq_len is None


@pytest.mark.parametrize("cls", [SFTConfig, RLHFConfig])
def test_text_column_is_refused_where_records_are_read_by_format(cls):
    """SFT and RLHF never read text_column: a set one would be silently ignored."""
    with pytest.raises(ConfigError, match=r"^text_column: only pretraining reads one text column; .*'body'"):
        cls().with_overrides(["text_column=body"])
    assert TrainConfig().with_overrides(["text_column=body"]).text_column == "body"


def test_a_value_of_the_wrong_type_is_named_in_plain_words():
    """'expected float or NoneType' was Python's vocabulary; a menu or JSON user reads numbers and null."""
    with pytest.raises(ConfigError, match=r"beta: expected a number \(float\) or null \(none\), got 'abc'"):
        RLHFConfig(algorithm="dpo").with_overrides(["beta=abc"])


def test_a_stage_called_with_a_dict_says_which_config_it_needs():
    """From Python, run_pretrain({...}) was an AttributeError deep in the run; SFT given an RLHF config too."""
    from llmlab.rlhf.run import run_rlhf
    from llmlab.train.pretrain import run_pretrain
    from llmlab.train.sft import run_sft

    with pytest.raises(ConfigError, match=r"cfg: expected a TrainConfig, got a dict; .*TrainConfig.from_dict\(d\)"):
        run_pretrain({"max_steps": 3})
    with pytest.raises(ConfigError, match="cfg: expected a SFTConfig, got a RLHFConfig"):
        run_sft(RLHFConfig())
    with pytest.raises(ConfigError, match="cfg: expected a RLHFConfig, got a dict"):
        run_rlhf({})
