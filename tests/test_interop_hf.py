"""Import from and export to transformers folders: logits parity (1e-4) and identical greedy continuations,
on tiny random models and a tiny trained byte-level BPE tokenizer (no download)."""

import copy
import json

import pytest
import torch
import transformers
from tests.conftest import tiny_config

from llmlab.checkpoint import load_model, read_checkpoint, save_checkpoint
from llmlab.data.tokenizer import chat_template_of, load_tokenizer, stop_token_ids, train_tokenizer
from llmlab.errors import CheckpointError, ConfigError
from llmlab.generate import generate_tokens
from llmlab.interop import export_hf, import_hf
from llmlab.model import build_model

TEXT = ("To be, or not to be, that is the question. Whether tis nobler in the mind to suffer the slings "
        "and arrows of outrageous fortune, or to take arms against a sea of troubles. ") * 8


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    (root / "corpus.txt").write_text(TEXT)
    train_tokenizer(str(root / "corpus.txt"), vocab_size=300, out_dir=root / "tok")
    return root / "tok"


def _hf_folder(tmp_path, model_cls, config_cls, tok_dir, bias=False, **kw):
    torch.manual_seed(0)
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=320, max_position_embeddings=64, rms_norm_eps=1e-6,
                initializer_range=0.2)
    base.update(kw)
    hf = model_cls(config_cls(**base)).eval()
    if bias:
        with torch.no_grad():
            for layer in hf.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    load_tokenizer(str(tok_dir)).save_pretrained(folder)
    return hf, folder


def _logits(model, x):
    out = model(x)
    return getattr(out, "logits", out)


def _logits_diff(a, b, vocab):
    x = torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float((_logits(a, x) - _logits(b, x)).abs().max())


def test_import_llama_folder_parity_and_tokenizer(tmp_path, tok_dir):
    hf, folder = _hf_folder(tmp_path, transformers.LlamaForCausalLM, transformers.LlamaConfig, tok_dir,
                            rope_theta=5000.0, tie_word_embeddings=False)
    out = import_hf(str(folder), tmp_path / "ck")
    ckpt = read_checkpoint(out)
    assert ckpt.meta["kind"] == "imported" and ckpt.model_config.rope_theta == 5000.0
    assert ckpt.model_config.attention_type == "gqa" and not ckpt.model_config.tie_embeddings
    tok = transformers.AutoTokenizer.from_pretrained(ckpt.tokenizer_path)
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert _logits_diff(load_model(out), hf, 320) < 1e-4
    with pytest.raises(CheckpointError, match="already exists"):
        import_hf(str(folder), out)


def test_import_qwen2_bias_tied_sliding_window(tmp_path, tok_dir):
    hf, folder = _hf_folder(tmp_path, transformers.Qwen2ForCausalLM, transformers.Qwen2Config, tok_dir, bias=True,
                            num_key_value_heads=1, tie_word_embeddings=True, use_sliding_window=True,
                            sliding_window=6, max_window_layers=0, attn_implementation="eager")
    out = import_hf(str(folder), tmp_path / "ck")
    cfg = read_checkpoint(out).model_config
    assert cfg.attention_bias and cfg.tie_embeddings and cfg.sliding_window == 6 and cfg.attention_type == "mqa"
    assert _logits_diff(load_model(out), hf, 320) < 1e-4


def test_import_refuses_partial_sliding_window(tmp_path, tok_dir):
    _, folder = _hf_folder(tmp_path, transformers.Qwen2ForCausalLM, transformers.Qwen2Config, tok_dir,
                           use_sliding_window=True, sliding_window=6, max_window_layers=1)
    with pytest.raises(ConfigError, match="max_window_layers"):
        import_hf(str(folder), tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_import_qwen2_window_flag_with_all_full_layers_is_unwindowed(tmp_path, tok_dir):
    """use_sliding_window=True but max_window_layers >= num_hidden_layers: transformers windows no layer
    (layer_types all full_attention), so the import must not window either (20-token probe > window 6)."""
    hf, folder = _hf_folder(tmp_path, transformers.Qwen2ForCausalLM, transformers.Qwen2Config, tok_dir, bias=True,
                            use_sliding_window=True, sliding_window=6, max_window_layers=2,
                            attn_implementation="eager")
    assert set(hf.config.layer_types) == {"full_attention"}
    out = import_hf(str(folder), tmp_path / "ck")
    assert read_checkpoint(out).model_config.sliding_window is None
    assert _logits_diff(load_model(out), hf, 320) < 1e-4


def test_import_parity_probe_is_longer_than_the_sliding_window(tmp_path, tok_dir, monkeypatch):
    """A window of 24 that transformers does not have changes logits only past 24 tokens: the import's
    logit check must see it (a 16-token probe did not) and write nothing."""
    from llmlab.interop import hf_io

    _, folder = _hf_folder(tmp_path, transformers.LlamaForCausalLM, transformers.LlamaConfig, tok_dir)
    translate = hf_io.model_config_from_hf
    monkeypatch.setattr(hf_io, "model_config_from_hf",
                        lambda hf, **kw: translate(hf, **kw).with_overrides(["sliding_window=24"]))
    with pytest.raises(CheckpointError, match="imported logits differ"):
        import_hf(str(folder), tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("config,field", [
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16}), "'llama3'"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(mlp_bias=True), "mlp_bias=True"),
])
def test_hf_config_translation_refuses_what_llmlab_cannot_represent(config, field):
    from llmlab.hf import model_config_from_hf

    hf = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=320, max_position_embeddings=64, **config)
    with pytest.raises(ConfigError, match=field) as e:
        model_config_from_hf(hf)
    assert "\n" not in str(e.value)


def _llmlab_checkpoint(tmp_path, tok_dir, **overrides):
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=320, init_std=0.2, d_model=64, **overrides)
    model = build_model(cfg)
    if cfg.attention_bias:
        with torch.no_grad():
            for layer in model.layers:
                layer.self_attn.q_proj.bias.normal_(0, 0.5)
                layer.self_attn.k_proj.bias.normal_(0, 0.5)
    return model, save_checkpoint(tmp_path / "ck", model, tokenizer=load_tokenizer(str(tok_dir)))


def _assert_same_in_transformers(ours, folder, arch):
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(hf).__name__ == arch
    assert _logits_diff(ours, hf, ours.config.vocab_size) < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    prompt = tok.apply_chat_template([{"role": "user", "content": "to be or not"}], add_generation_prompt=True,
                                     return_dict=True, return_tensors="pt")["input_ids"]
    stops = stop_token_ids(tok)
    mine = generate_tokens(ours, prompt, max_new_tokens=12, temperature=0, eos_token_id=stops).responses[0]
    theirs = hf.generate(prompt, do_sample=False, max_new_tokens=12)[0, prompt.shape[1]:].tolist()
    cut = next((i + 1 for i, t in enumerate(theirs) if t in stops), len(theirs))
    assert mine == theirs[:cut] and len(mine) > 1


@pytest.mark.parametrize("overrides,arch", [
    (dict(attention_type="gqa", n_kv_heads=2, rope_theta=20000.0), "LlamaForCausalLM"),
    (dict(attention_type="mqa", attention_bias=True, tie_embeddings=True, sliding_window=5), "Qwen2ForCausalLM"),
    (dict(attention_type="mha", sliding_window=4), "MistralForCausalLM"),
    (dict(positional_encoding="yarn", rope_scaling_factor=4.0, original_max_seq_len=16), "LlamaForCausalLM"),
])
def test_export_hf_same_logits_and_greedy_tokens(tmp_path, tok_dir, overrides, arch):
    model, ck = _llmlab_checkpoint(tmp_path, tok_dir, **overrides)
    out = export_hf(ck, tmp_path / "hf")
    assert (out / "model.safetensors").is_file() and (out / "generation_config.json").is_file()
    assert json.loads((out / "config.json").read_text())["architectures"] == [arch]
    _assert_same_in_transformers(model.eval(), out, arch)
    # the saved template is the one SFT and chat render with (data.tokenizer.chat_template_of)
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == chat_template_of(load_tokenizer(str(tok_dir)))


def test_export_hf_merges_lora_adapter(tmp_path, tok_dir):
    from peft import LoraConfig, get_peft_model

    from llmlab.checkpoint import model_state_for_saving

    model, _ = _llmlab_checkpoint(tmp_path / "base", tok_dir)
    base_state = model_state_for_saving(model)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    ck = save_checkpoint(tmp_path / "lora", peft, state_dict=base_state, kind="sft",
                         tokenizer=load_tokenizer(str(tok_dir)),
                         write_extra=lambda tmp: peft.save_pretrained(str(tmp / "adapter")))
    merged = load_model(ck)
    assert _logits_diff(merged, load_model(ck, with_adapter=False), 320) > 1e-2  # the adapter matters
    out = export_hf(ck, tmp_path / "hf")
    _assert_same_in_transformers(merged, out, "LlamaForCausalLM")


def test_cli_export_hf_says_what_its_check_compared_and_found(tmp_path, tok_dir, capsys, monkeypatch):
    """`llm-lab export-hf` ends with a `checked:` line carrying the numbers check_hf_export computed (the max
    logit difference, the probe's tokens, the allowance), so the user sees that the reload check ran."""
    from llmlab.cli.main import main
    from llmlab.interop import hf_io

    _, ck = _llmlab_checkpoint(tmp_path, tok_dir)
    found = []
    real = hf_io.check_hf_export
    monkeypatch.setattr(hf_io, "check_hf_export", lambda *a: found.append(real(*a)) or found[-1])
    assert main(["export-hf", str(ck), "--out", str(tmp_path / "hf")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2] == f"Hugging Face export: {ck} -> {tmp_path / 'hf'}"
    (c,) = found
    assert c.tokens == hf_io.probe_length(load_model(ck), transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf")) and c.max_abs_diff <= c.allowed
    assert lines[-1] == (f"checked: reloaded with transformers, logits match LLM-Lab's (max abs diff "
                         f"{c.max_abs_diff:.1e} on {c.tokens} tokens, allowed {c.allowed:.1e} = 0.0001 x logit "
                         f"scale {max(c.scale, 1.0):.3g})")
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0  # import's check too
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"checked: logits match transformers' load of {tmp_path / 'hf'} (max abs diff ")
    assert last.endswith(" on 16 tokens, allowed 1.0e-03)")


def _double_final_norm(state):
    return {k: v * 2 if k == "model.norm.weight" else v for k, v in state.items()}


def _tenfold_rope_theta(translate):
    def wrong(cfg, **kw):
        hf = translate(cfg, **kw)
        hf.rope_parameters = {**hf.rope_parameters, "rope_theta": cfg.rope_theta * 10}
        return hf
    return wrong


@pytest.mark.parametrize("target,corrupt", [
    ("llmlab_state_to_hf", lambda translate: lambda state: _double_final_norm(translate(state))),
    ("hf_config_from_llmlab", _tenfold_rope_theta),
])
def test_export_hf_checks_its_own_output_and_writes_nothing_on_mismatch(tmp_path, tok_dir, monkeypatch, target,
                                                                          corrupt):
    """export_hf reloads what it wrote with transformers and compares logits: a weight or a config field
    written wrong (here injected) is a one-line CheckpointError and no folder, even with force."""
    from llmlab.interop import hf_io

    _, ck = _llmlab_checkpoint(tmp_path, tok_dir)
    monkeypatch.setattr(hf_io, target, corrupt(getattr(hf_io, target)))
    with pytest.raises(CheckpointError, match="logits for the exported folder differ") as e:
        export_hf(ck, tmp_path / "hf", force=True)
    assert "\n" not in str(e.value) and not (tmp_path / "hf").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf")] == []


@pytest.mark.parametrize("overrides,option", [
    (dict(positional_encoding="alibi"), "positional_encoding='alibi'"),
    (dict(norm_type="layernorm"), "norm_type='layernorm'"),
    (dict(activation="gelu"), "activation='gelu'"),
])
def test_export_hf_refuses_options_without_equivalent(tmp_path, tok_dir, overrides, option):
    _, ck = _llmlab_checkpoint(tmp_path, tok_dir, **overrides)
    with pytest.raises(ConfigError, match=option) as e:
        export_hf(ck, tmp_path / "hf")
    assert "\n" not in str(e.value) and not (tmp_path / "hf").exists()


def test_import_refuses_a_tokenizer_larger_than_the_vocabulary(tmp_path, tok_dir):
    # 300 tokens, 200 embedding rows: generating from text with a token id >= 200 failed deep in the model
    _, folder = _hf_folder(tmp_path, transformers.LlamaForCausalLM, transformers.LlamaConfig, tok_dir, vocab_size=200)
    with pytest.raises(ConfigError, match="the tokenizer has 300 tokens but vocab_size is 200") as e:
        import_hf(str(folder), tmp_path / "ck")
    assert "\n" not in str(e.value) and not (tmp_path / "ck").exists()


def test_import_of_an_llmlab_checkpoint_says_what_it_is(tmp_path, tok_dir):
    # it said "cannot read a transformers config (Unrecognized model ...); check the hub id / path and the network"
    _, ck = _llmlab_checkpoint(tmp_path, tok_dir)
    with pytest.raises(CheckpointError, match="is an LLM-Lab checkpoint already .* export-hf") as e:
        import_hf(str(ck), tmp_path / "again")
    assert "\n" not in str(e.value) and not (tmp_path / "again").exists()


def test_import_unknown_hub_id_is_one_line_error(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read a transformers config") as e:
        import_hf("llmlab-test/not-a-model", tmp_path / "ck")  # offline in tests: the hub path fails cleanly
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------
# export-hf --adapter: the base and a PEFT adapter under transformers' module names
# --------------------------------------------------------------------------------------------------

LORA_TARGETS = ("q_proj", "v_proj", "up_proj", "lm_head")  # attention, MLP and the head (named apart in HF)


def _lora_run(tmp_path, tok_dir):
    """A base checkpoint and an SFT-LoRA run on it saved as the trainers save it (sft/best/ with adapter/,
    sft/best_lora_adapters/ beside it), with an adapter that is not a no-op: (base, base checkpoint, LoRA)."""
    from llmlab.config import SFTConfig
    from llmlab.lora import apply_lora, save_lora_checkpoint

    base, base_ck = _llmlab_checkpoint(tmp_path / "base", tok_dir)
    cfg = SFTConfig(use_lora=True, lora_preset="custom", lora_target_modules=list(LORA_TARGETS), lora_r=4,
                    lora_alpha=8, lora_dropout=0.0, datasets=["bundled:sft"])
    lora = apply_lora(copy.deepcopy(base), cfg, verbose=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    save_lora_checkpoint(tmp_path / "sft" / "best", lora, kind="sft", train_config=cfg,
                         tokenizer=load_tokenizer(str(tok_dir)), best_adapter_dir=tmp_path / "sft" / "best_lora_adapters")
    return base.eval(), base_ck, lora.eval()


def _lora_modules(peft_model):
    from peft.tuners.lora import LoraLayer

    return {n for n, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("how", ["own adapter", "adapter folder"])
def test_export_hf_adapter_loads_with_peft_and_gives_llmlab_logits(tmp_path, tok_dir, how):
    """export_hf(..., adapter=...) writes the plain base and adapter/: PeftModel.from_pretrained over the
    exported model finds every LoRA module under transformers' names and gives LLM-Lab's logits with the
    adapter, which differ from the base's; the LLM-Lab adapter folder as saved does not (the gap closed)."""
    from peft import PeftModel
    from safetensors import safe_open

    base, base_ck, lora = _lora_run(tmp_path, tok_dir)
    if how == "own adapter":  # a LoRA run's checkpoint: its own adapter/ on its own frozen weights
        out = export_hf(tmp_path / "sft" / "best", tmp_path / "hf", adapter=True)
    else:  # best_lora_adapters/ on the base checkpoint it was trained on
        out = export_hf(base_ck, tmp_path / "hf", adapter=tmp_path / "sft" / "best_lora_adapters")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert _logits_diff(base, hf, 320) < 1e-4  # the folder holds the base, not the merged model
    peft = PeftModel.from_pretrained(hf, out / "adapter").eval()
    layers = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")]
    assert _lora_modules(peft) == {*layers, "lm_head"}
    assert _logits_diff(lora, peft, 320) < 1e-4
    assert _logits_diff(lora, base, 320) > 1e-2  # the adapter matters, so the match above is not the base's
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert len(keys) == 2 * 7 and all(k.startswith(("base_model.model.model.layers.", "base_model.model.lm_head."))
                                      for k in keys)
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == sorted(LORA_TARGETS) and saved["task_type"] == "CAUSAL_LM"
    assert saved["base_model_name_or_path"] == str(out.resolve()) and saved["auto_mapping"] is None
    # transformers' own PEFT integration loads the base from base_model_name_or_path
    auto = transformers.AutoModelForCausalLM.from_pretrained(out / "adapter").eval()
    assert _logits_diff(lora, auto, 320) < 1e-4
    # the adapter as LLM-Lab saved it: PEFT finds q/v/up by their leaf names but loads none of their tensors
    with pytest.warns(UserWarning, match="missing adapter keys"):
        raw = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(out),
                                        str(tmp_path / "sft" / "best_lora_adapters")).eval()
    assert _logits_diff(lora, raw, 320) > 1e-2


def _unconverted(convert):
    return lambda state: dict(state)


def _doubled_lora_b(convert):
    return lambda state: {k: v * 2 if "lora_B" in k else v for k, v in convert(state).items()}


@pytest.mark.parametrize("corrupt,message", [
    (_unconverted, "has no place in the transformers model"),
    (_doubled_lora_b, "PEFT's logits for the exported adapter over the exported folder differ"),
])
def test_export_hf_adapter_checks_its_own_output_and_writes_nothing_on_mismatch(tmp_path, tok_dir, monkeypatch,
                                                                                  corrupt, message):
    """Adapter keys left under LLM-Lab's names, or adapter weights written wrong (both injected): a one-line
    CheckpointError and no folder."""
    from llmlab.interop import hf_io

    _lora_run(tmp_path, tok_dir)
    monkeypatch.setattr(hf_io, "llmlab_adapter_state_to_hf", corrupt(hf_io.llmlab_adapter_state_to_hf))
    with pytest.raises(CheckpointError, match=message) as e:
        export_hf(tmp_path / "sft" / "best", tmp_path / "hf", adapter=True)
    assert "\n" not in str(e.value) and not (tmp_path / "hf").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf")] == []


def test_export_hf_adapter_errors_are_one_line_and_write_nothing(tmp_path, tok_dir):
    _, base_ck, _ = _lora_run(tmp_path, tok_dir)
    adapters = tmp_path / "sft" / "best_lora_adapters"
    torch.manual_seed(5)  # the same shapes, other weights
    other = save_checkpoint(tmp_path / "other", build_model(read_checkpoint(base_ck).model_config),
                            tokenizer=load_tokenizer(str(tok_dir)))
    cases = [
        (base_ck, True, "holds no LoRA adapter .* drop --adapter, or pass --adapter DIR"),
        (base_ck, tmp_path / "missing", "Adapter folder not found"),
        (adapters, None, "is a LoRA adapter folder, not a checkpoint; .* --adapter"),
        (other, adapters, "was trained on other weights than"),
    ]
    for source, adapter, message in cases:
        with pytest.raises(CheckpointError, match=message) as e:
            export_hf(source, tmp_path / "hf", adapter=adapter)
        assert "\n" not in str(e.value) and not (tmp_path / "hf").exists()


def test_cli_export_hf_adapter_checks_base_and_adapter(tmp_path, tok_dir, capsys):
    """`llm-lab export-hf CHECKPOINT --adapter [DIR]`: two `checked:` lines, the base and the adapter; a plain
    checkpoint with a bare --adapter is `error:` and exit 2."""
    from llmlab.cli.main import main

    _, base_ck, _ = _lora_run(tmp_path, tok_dir)
    assert main(["export-hf", str(tmp_path / "sft" / "best"), "--adapter", "--out", str(tmp_path / "hf")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("checked: reloaded with transformers, logits match LLM-Lab's (max abs diff ")
    assert lines[-1].startswith(f"checked: reloaded {tmp_path / 'hf' / 'adapter'} with PEFT over it, logits match "
                                f"LLM-Lab's with the adapter (max abs diff ")
    assert (tmp_path / "hf" / "adapter" / "adapter_model.safetensors").is_file()
    assert main(["export-hf", str(base_ck), "--adapter", str(tmp_path / "sft" / "best_lora_adapters"),
                 "--out", str(tmp_path / "hf2")]) == 0
    assert (tmp_path / "hf2" / "adapter" / "adapter_config.json").is_file()
    assert main(["export-hf", str(base_ck), "--adapter", "--out", str(tmp_path / "hf3")]) == 2
    assert "error: " in capsys.readouterr().err and not (tmp_path / "hf3").exists()
