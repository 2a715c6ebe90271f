"""Bad config input gets a one-line ConfigError naming the field, never a traceback (hypothesis).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_fuzz_config.py -q

Covers config JSON (wrong types, unknown keys, out-of-range and huge numbers, inconsistent head counts,
files that are not JSON or not UTF-8), `key=value` overrides, the CLI (`main([...])` returns 2 and prints
one line) and the interactive menu's answer check.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from llmlab.config import STAGE_CONFIGS, ConfigBase, ModelConfig, RLHFConfig, SFTConfig, TrainConfig
from llmlab.errors import ConfigError, LLMLabError

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
CLASSES = list(STAGE_CONFIGS.values())

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["none", "null", "true", "1e999", "-0", "nan", "inf", "1_000", "0x10", " 7 ", "[1,", "a,b"]),
)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c,
                                                                                             max_size=3), max_leaves=6)


def check_error(error: BaseException, cls: type[ConfigBase], blamed: set[str] | None = None) -> str:
    """One line, an LLM-Lab error, naming a field (or one of `blamed`)."""
    message = str(error)
    assert isinstance(error, ConfigError), f"{type(error).__name__}: {message}"
    assert message and "\n" not in message and "Traceback" not in message
    names = blamed if blamed is not None else set(cls.field_names())
    # the name stands alone (not inside a longer word); lookarounds rather than \b, which fails next to
    # identifier characters that are not \w (hypothesis found 'A·')
    assert any(re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", message) or repr(n) in message
               for n in names), message
    return message


def build(cls: type[ConfigBase], data: dict) -> ConfigBase | None:
    try:
        return cls.from_dict(data)
    except LLMLabError as e:
        check_error(e, cls, set(data) | {"config", "unknown"})
        return None


@FUZZ
@given(cls=st.sampled_from(CLASSES), data=st.data())
def test_one_field_with_any_json_value(cls, data):
    name = data.draw(st.sampled_from(cls.field_names()))
    value = data.draw(json_values)
    try:
        cfg = cls.from_dict({name: value})
    except LLMLabError as e:
        message = check_error(e, cls)
        # the interactive menu asks again for the field an error starts with
        assert re.match(r"^[A-Za-z_]\w*", message).group(0) in cls.field_names(), message
        return
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()  # what loads also saves


@FUZZ
@given(cls=st.sampled_from(CLASSES), data=st.dictionaries(st.text(min_size=1, max_size=12), json_values, max_size=4))
def test_unknown_keys_are_named(cls, data):
    unknown = sorted(k for k in data if k not in cls.field_names() and not k.startswith("_"))
    assume(unknown)
    with pytest.raises(ConfigError) as info:
        cls.from_dict(data, source="cfg.json")
    message = check_error(info.value, cls, {unknown[0]})
    assert "cfg.json" in message and "allowed" in message


@FUZZ
@given(d_model=st.integers(-4, 130), n_heads=st.integers(-2, 20), n_kv_heads=st.integers(-2, 20),
       attention_type=st.sampled_from(["mha", "mqa", "gqa"]),
       positional_encoding=st.sampled_from(["rope", "yarn", "alibi", "sinusoidal"]))
def test_head_counts_are_consistent_or_refused(d_model, n_heads, n_kv_heads, attention_type, positional_encoding):
    data = dict(d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, attention_type=attention_type,
                positional_encoding=positional_encoding,
                rope_scaling_factor=2.0 if positional_encoding == "yarn" else 1.0)  # yarn needs a factor > 1
    try:
        cfg = ModelConfig.from_dict(data)
    except ConfigError as e:
        check_error(e, ModelConfig, {"d_model", "n_heads", "n_kv_heads"})
        return
    assert cfg.d_model % cfg.n_heads == 0 and cfg.n_heads % cfg.n_kv_heads == 0
    assert cfg.n_kv_heads == {"mha": cfg.n_heads, "mqa": 1}.get(attention_type, n_kv_heads)
    if positional_encoding in ("rope", "yarn"):
        assert cfg.head_dim % 2 == 0


@pytest.mark.parametrize("cls,field", [(ModelConfig, "rope_theta"), (TrainConfig, "lr"), (SFTConfig, "max_grad_norm"),
                                       (RLHFConfig, "top_p"), (TrainConfig, "weight_decay"), (ModelConfig, "norm_eps")])
def test_huge_integers_in_float_fields_are_one_line_errors(cls, field):
    # json.loads("1" + "0" * 400) is a Python int; float() of it overflows
    big = json.loads("1" + "0" * 400) if field != "lr" else 10**5000  # past str()'s 4300-digit limit
    with pytest.raises(ConfigError) as info:
        cls.from_dict({field: big})
    check_error(info.value, cls, {field})


@FUZZ
@given(raw=st.binary(max_size=40))
def test_config_files_that_are_not_json_or_not_utf8(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("cfg") / "train_config.json"
    path.write_bytes(raw)
    try:
        cfg = TrainConfig.load(path)
    except ConfigError as e:
        check_error(e, TrainConfig, {str(path)})
        return
    data = json.loads(raw.decode("utf-8"))  # accepted: a JSON object whose fields landed
    assert isinstance(data, dict)
    for key, value in data.items():
        if not key.startswith("_"):
            assert _same(getattr(cfg, key), value), (key, value)


override_keys = st.one_of(st.sampled_from(TrainConfig.field_names()), st.text(max_size=8))
override_values = st.one_of(st.text(max_size=12), json_values.map(json.dumps))


@FUZZ
@given(items=st.lists(st.one_of(st.tuples(override_keys, override_values).map(lambda kv: f"{kv[0]}={kv[1]}"),
                                st.text(max_size=10)), min_size=1, max_size=3))
def test_key_value_overrides(items):
    base = TrainConfig()
    try:
        cfg = base.with_overrides(items)
    except LLMLabError as e:
        keys = {i.split("=", 1)[0].strip() for i in items} | {"override"}
        check_error(e, TrainConfig, keys)
        return
    assert isinstance(cfg, TrainConfig)
    expected = {}
    for item in items:  # accepted: every override (the last one per key) landed in its field
        key, raw = item.split("=", 1)
        try:
            expected[key.strip()] = json.loads(raw.strip())
        except ValueError:
            expected[key.strip()] = raw.strip()
    for key, value in expected.items():
        assert _same(getattr(cfg, key), value), (key, value, getattr(cfg, key))


def _same(got, value) -> bool:
    """A field's value is the one given (numbers compare by value, numeric text as its number, a string
    for a list field as a one-item list; lists may be kept as tuples)."""
    if isinstance(value, str) and isinstance(got, (int, float)) and not isinstance(got, bool):
        try:
            return type(got)(value) == got
        except ValueError:
            return False
    if isinstance(value, str) and isinstance(got, (list, tuple)):
        return list(got) == [value]  # one dataset given as a string
    if isinstance(value, list):
        return isinstance(got, (list, tuple)) and len(got) == len(value) and all(map(_same, got, value))
    return got == value


# --------------------------------------------------------------------------------------------------
# The CLI and the menu
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def no_training(monkeypatch):
    """Stage functions replaced by recorders: main() parses and validates, nothing trains."""
    from llmlab.cli import commands

    called = []
    for name in ("pretrain", "sft", "rlhf"):
        monkeypatch.setattr(commands, name, lambda cfg, *a, _n=name, **k: called.append((_n, cfg)))
    return called


@FUZZ
@given(command=st.sampled_from(["pretrain", "sft", "rlhf"]),
       items=st.lists(st.tuples(st.sampled_from(["max_steps", "lr", "learning_rate", "optimizer", "batch_size",
                                                 "warmup_steps", "nan_policy", "grad_clip", "bogus", "datasets"]),
                                override_values).map(lambda kv: f"{kv[0]}={kv[1]}"), min_size=1, max_size=3))
def test_cli_overrides_exit_2_with_one_line(no_training, capsys, command, items):
    from llmlab.cli.main import main

    assume(not any(i.startswith("-") for i in items))
    no_training.clear()
    code = main([command, *items])
    out = capsys.readouterr()
    if code == 0:
        assert len(no_training) == 1 and no_training[0][0] == command
        return
    assert code == 2 and not no_training, out.err
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out.err, out.err


def test_cli_bad_config_file_exits_2_with_one_line(no_training, capsys, tmp_path):
    from llmlab.cli.main import main

    path = tmp_path / "c.json"
    for text in ['{"max_steps": "many"}', '{"nope": 1}', "{", '{"lr": -1}', '[1, 2]']:
        path.write_text(text)
        assert main(["pretrain", "--config", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
    assert not no_training


@FUZZ
@given(cls=st.sampled_from(CLASSES), data=st.data())
def test_menu_answer_check_never_raises(cls, data):
    """The menu checks each typed answer by building the config; any text gets None or a one-line reason."""
    from llmlab.cli.menu import ConfigAsker

    name = data.draw(st.sampled_from(cls.field_names()))
    answer = data.draw(st.one_of(st.text(max_size=15), st.sampled_from(["", "none", "-1", "1e999", "0", "1e-9"])))
    reason = ConfigAsker(prompter=None, cls=cls).check(name, answer)
    assert reason is None or (isinstance(reason, str) and "\n" not in reason and reason.startswith(name))


def test_every_field_default_round_trips_through_json(tmp_path):
    for cls in CLASSES:
        cfg = cls()
        cfg.save(tmp_path / "c.json")
        assert cls.load(tmp_path / "c.json") == cfg
        assert dataclasses.asdict(cls.from_dict(cfg.to_dict())) == cfg.to_dict()
