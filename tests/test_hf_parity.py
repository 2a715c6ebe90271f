"""Logits parity with transformers' Llama and Qwen2 on random weights (built from configs, no download)."""

import pytest
import torch
import transformers

from llmlab.hf import hf_state_to_llmlab, model_config_from_hf
from llmlab.model import build_model


def _parity(hf_model, rtol=1e-5):
    """Large random weights (std 0.2, not HF's 0.02 with its tiny logits) and random norm weights (not all
    1), so a mis-mapped matrix or norm shows; logits agree to `rtol` of their scale, and swapping one
    layer's two norm weights (a mis-mapping) breaks that by orders of magnitude."""
    hf_model.eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
            elif not name.endswith("bias"):  # biases: zero, or set by the test
                p.normal_(0.0, 0.2)
    cfg = model_config_from_hf(hf_model.config)
    ours = build_model(cfg).eval()
    ours.load_state_dict(hf_state_to_llmlab(hf_model.state_dict()), strict=not cfg.tie_embeddings)
    x = torch.randint(0, hf_model.config.vocab_size, (2, 24))
    with torch.no_grad():
        ref = hf_model(x).logits
        got = ours(x)
        scale = float(ref.abs().max())
        assert scale > 3 and float(ref.std()) > 1  # logits ~6-7 here, far from the 0.02 init's near-zero ones
        assert (ref - got).abs().max() < rtol * scale  # measured ~1e-6 of the scale
        layer = ours.layers[0]  # negative control: the two norms of layer 0 swapped
        a, b = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        a_old = a.clone()
        a.copy_(b)
        b.copy_(a_old)
        assert (ref - ours(x)).abs().max() > 1000 * rtol * scale
    return cfg


def test_llama_gqa_rope_rmsnorm_swiglu_parity():
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, attn_implementation="eager"))
    cfg = _parity(hf)
    assert cfg.attention_type == "gqa" and cfg.n_kv_heads == 2


def test_qwen2_bias_parity_with_tied_embeddings():
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        vocab_size=256, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True, attn_implementation="eager"))
    with torch.no_grad():  # random init leaves biases at zero: make them matter
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    cfg = _parity(hf)
    assert cfg.attention_bias and cfg.tie_embeddings and cfg.attention_type == "mqa"


def test_llama_yarn_parity():
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=256, max_position_embeddings=128, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                         "rope_theta": 10000.0},
        attn_implementation="eager"))
    cfg = _parity(hf)
    assert cfg.positional_encoding == "yarn"


@pytest.mark.parametrize("window", [5])
def test_mistral_sliding_window_parity(window):
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(transformers.MistralConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=128, rms_norm_eps=1e-6, sliding_window=window,
        attn_implementation="eager"))
    cfg = _parity(hf)
    assert cfg.sliding_window == window
