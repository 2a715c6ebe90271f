"""SFT through the shared loop: a tiny model learns fixed Q/A chats and to stop at <|im_end|>; LoRA trains
only the adapters (base bit-identical), writes PEFT-loadable best adapters and resumes exactly."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from llmlab.checkpoint import load_model, load_state_into, read_checkpoint, save_checkpoint
from llmlab.config import ModelConfig, SFTConfig
from llmlab.data.chat import IGNORE_INDEX, render
from llmlab.data.sources import canonical_json, in_split
from llmlab.data.tokenizer import stop_token_ids, train_tokenizer
from llmlab.errors import LLMLabError
from llmlab.generate import generate_tokens
from llmlab.lora import load_lora_checkpoint
from llmlab.model import build_model
from llmlab.train.loop import LMLoss
from llmlab.train.metrics import read_metrics
from llmlab.train.sft import run_sft, sft_batches

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Egypt", "Cairo"),
            ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Chile", "Santiago"), ("Norway", "Oslo"), ("Cuba", "Havana"),
            ("Ireland", "Dublin"), ("Greece", "Athens"), ("Poland", "Warsaw"), ("Austria", "Vienna"),
            ("Canada", "Ottawa"), ("Russia", "Moscow")]
VAL_FRACTION = 0.3  # by content hash: Spain and Chile are validation, the other 14 are trained on
RECORDS = [{"messages": [{"role": "user", "content": f"What is the capital of {c}?"},
                         {"role": "assistant", "content": a}]} for c, a in CAPITALS]
TRAIN = [r for r in RECORDS if in_split(canonical_json(r), "train", VAL_FRACTION)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tokenizer with chat tokens, a random-init base checkpoint (spec naming: pre/best_model.pt ->
    pre/best) holding it, and the Q/A data as jsonl."""
    root = tmp_path_factory.mktemp("sft")
    assert 0 < len(TRAIN) < len(RECORDS)
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    chats = [f"<|im_start|>user\nWhat is the capital of {c}?<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>"
             for c, a in CAPITALS]
    (root / "corpus.txt").write_text("\n".join(chats * 3))
    tok = train_tokenizer(str(root / "corpus.txt"), vocab_size=300, out_dir=root / "tok")
    cfg = ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, n_layers=2, vocab_size=len(tok),
                      max_seq_len=64)
    torch.manual_seed(0)
    save_checkpoint(root / "pre" / "best", build_model(cfg), tokenizer=tok)
    return root, tok, cfg


def sft_config(root, name, **kw) -> SFTConfig:
    base = dict(policy_checkpoint=str(root / "pre" / "best_model.pt"), datasets=[str(root / "qa.jsonl")],
                batch_size=8, gradient_accumulation_steps=1, max_steps=70, learning_rate=3e-3, warmup_steps=10,
                eval_every=35, eval_steps=1, log_every=5, save_every=1000, val_fraction=VAL_FRACTION,
                save_best_only=False, output_dir=str(root / name))
    base.update(kw)
    return SFTConfig(**base)


def answer_accuracy(model, tok) -> float:
    """Share of trained questions answered exactly, ending with <|im_end|>, under greedy decoding."""
    model.eval()
    right = 0
    for r in TRAIN:
        prompt = tok(render(tok, r["messages"][:1], add_generation_prompt=True), add_special_tokens=False)
        out = generate_tokens(model, [prompt["input_ids"]], max_new_tokens=8, temperature=0,
                              eos_token_id=stop_token_ids(tok), pad_token_id=tok.pad_token_id)
        right += tok.decode(out.responses[0]) == r["messages"][1]["content"] + "<|im_end|>"
    return right / len(TRAIN)


def test_full_sft_teaches_answers_and_stopping(world, capsys):
    root, tok, _ = world
    before = answer_accuracy(load_model(root / "pre" / "best"), tok)
    out = run_sft(sft_config(root, "full"), progress=False)
    assert "best_model.pt -> " in capsys.readouterr().out  # the spec's file name mapped to the folder
    after = answer_accuracy(load_model(out / "latest"), tok)
    assert before == 0.0 and after >= 0.9, (before, after)
    ckpt = read_checkpoint(out / "latest")
    assert ckpt.meta["kind"] == "sft" and ckpt.meta["step"] == 70 and not ckpt.has_adapter
    assert ckpt.tokenizer_path is not None and (out / "best").is_dir() and (out / "loss.png").is_file()
    losses = [r["loss"] for r in read_metrics(out) if r.get("loss") is not None]
    assert losses[-1] < 0.5 * losses[0]


def test_loss_only_on_assistant_tokens(world):
    root, tok, cfg = world
    batch = next(sft_batches(sft_config(root, "unused"), tok, 64, "train"))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    answers = {a for _, a in CAPITALS}
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        kept = labels != IGNORE_INDEX
        assert torch.equal(labels[kept], ids[kept])
        learned = labels[kept].tolist()
        assert learned[-1] == im_end and tok.decode(learned[:-1]) in answers  # the answer and its end only
    model = build_model(cfg).eval()
    with torch.no_grad():
        loss_sum = LMLoss(model)(batch["input_ids"], batch["labels"])
        logits = model(batch["input_ids"])[:, :-1]
        targets = batch["labels"][:, 1:]
        manual = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                   ignore_index=IGNORE_INDEX, reduction="sum")
        everything = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                       batch["input_ids"][:, 1:].reshape(-1), reduction="sum")
    assert torch.allclose(loss_sum, manual, rtol=1e-5) and not torch.allclose(loss_sum, everything, rtol=0.1)


def test_lora_sft_trains_only_adapters(world):
    root, tok, cfg = world
    # a random-init base has tiny logits: only an adapted lm_head lets LoRA move them far
    targets = ["q_proj", "v_proj", "up_proj", "down_proj", "lm_head"]
    out = run_sft(sft_config(root, "lora", use_lora=True, lora_preset="custom", lora_target_modules=targets,
                             lora_alpha=64, learning_rate=1e-2, max_steps=120, eval_every=40), progress=False)
    base = load_file(str(root / "pre" / "best" / "model.safetensors"))
    for which in ("latest", "best"):
        saved = load_file(str(out / which / "model.safetensors"))
        assert saved.keys() == base.keys()
        assert all(torch.equal(saved[k], base[k]) for k in base)  # the base is bit-identical
    adapter = load_file(str(out / "latest" / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert len(lora_b) == cfg.n_layers * 4 + 1 and all(v.abs().max() > 0 for v in lora_b)  # all moved from zero
    losses = [r["loss"] for r in read_metrics(out) if r.get("loss") is not None]
    assert losses[-1] < 0.1 * losses[0]
    accuracy = answer_accuracy(load_lora_checkpoint(out / "latest"), tok)  # the base alone answers none
    assert accuracy >= 0.9, accuracy
    # the lightweight best adapters load with PEFT onto a plain LLM-Lab model and match best/
    plain = build_model(cfg)
    load_state_into(plain, base)
    peft_model = PeftModel.from_pretrained(plain, str(out / "best_lora_adapters")).eval()
    trained = load_lora_checkpoint(out / "best").eval()
    x = torch.tensor([tok("<|im_start|>user\nWhat is the capital of Peru?<|im_end|>")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(peft_model(x), trained(x))
        assert (trained(x) - load_model(root / "pre" / "best")(x)).abs().max() > 1e-3
    meta = json.loads((out / "best_lora_adapters" / "training_metadata.json").read_text())
    assert meta["step"] == read_checkpoint(out / "best").meta["step"]


def test_lora_resume_is_exact(world):
    root, _, _ = world
    kw = dict(use_lora=True, lora_dropout=0.1, learning_rate=1e-2, scheduler="none", warmup_steps=0,
              eval_every=4, save_every=4)
    whole = run_sft(sft_config(root, "whole", max_steps=8, **kw), progress=False)
    part = run_sft(sft_config(root, "part", max_steps=4, **kw), progress=False)
    with pytest.raises(LLMLabError, match="use_lora"):
        run_sft(sft_config(root, "part", max_steps=8, **{**kw, "use_lora": False}), resume=str(part / "latest"),
                progress=False)
    run_sft(sft_config(root, "part", max_steps=8, **kw), resume=str(part / "latest"), progress=False)
    a = load_file(str(whole / "latest" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(part / "latest" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last = [[(r.get("loss"), r.get("val_loss")) for r in read_metrics(d) if r["step"] == 8] for d in (whole, part)]
    assert last[0] == last[1] and last[0][0][1] is not None


def test_lora_resume_with_changed_lora_settings_is_refused(world):
    from llmlab.errors import ConfigError

    root, _, _ = world
    kw = dict(use_lora=True, lora_alpha=8, max_steps=1, warmup_steps=0, eval_every=100, save_every=1)
    part = run_sft(sft_config(root, "changed", **kw), progress=False)
    with pytest.raises(ConfigError) as e:
        run_sft(sft_config(root, "changed", **{**kw, "lora_alpha": 32, "max_steps": 2}),
                resume=str(part / "latest"), progress=False)
    msg = str(e.value)
    assert msg.startswith("lora_alpha: ") and "lora_alpha=8" in msg and "resume with lora_alpha=8" in msg
    assert "\n" not in msg
    assert json.loads((part / "latest" / "training_config.json").read_text())["lora_alpha"] == 8  # untouched


def test_batch_size_and_max_grad_norm_reach_the_training_step(world, monkeypatch):
    import llmlab.train.loop as loop

    root, _, _ = world
    rows, clips = [], []
    real_fb, real_clip = loop.forward_backward, loop.grad_norm_and_clip

    def spy_fb(wrapped, micro, *a, **kw):
        rows.extend(int(mb["input_ids"].shape[0]) for mb in micro)
        return real_fb(wrapped, micro, *a, **kw)

    def spy_clip(params, max_norm):
        clips.append(max_norm)
        return real_clip(params, max_norm)

    monkeypatch.setattr(loop, "forward_backward", spy_fb)
    monkeypatch.setattr(loop, "grad_norm_and_clip", spy_clip)
    run_sft(sft_config(root, "spied", batch_size=3, max_grad_norm=0.37, max_steps=2, warmup_steps=0, eval_every=100),
            progress=False)
    assert rows == [3, 3] and clips == [0.37, 0.37]


def test_lora_target_modules_beside_a_preset_are_said_to_be_unused(world, capsys):
    """A PEFT user's target list with the default preset (minimal) trained q_proj/v_proj without a word."""
    from llmlab.train.stage import unused_lora_targets

    root, _, _ = world
    run_sft(sft_config(root, "lora_unused", use_lora=True, lora_target_modules=["o_proj"], max_steps=1,
                       warmup_steps=0, eval_every=1), progress=False)
    assert ('notice: lora_target_modules ["o_proj"] is unused: lora_preset=minimal adapts q_proj, v_proj; set '
            'lora_preset=custom to adapt the listed modules') in capsys.readouterr().out
    for kw in (dict(lora_preset="custom"), dict(use_lora=False), dict(lora_target_modules=None)):
        assert unused_lora_targets(sft_config(root, "x", **{"use_lora": True, "lora_target_modules": ["o_proj"],
                                                             **kw})) is None


def test_settings_the_configuration_never_reads_are_named_once(world, capsys):
    """Another optimizer's parameters, poly_power without the polynomial schedule, min_lr_ratio with none,
    max_nan_skips without skip, LoRA settings without use_lora: set to non-defaults they changed nothing
    without a word; each stage now names them in one notice (defaults, as the shipped configs list, are
    not named)."""
    from llmlab.config import RLHFConfig, TrainConfig
    from llmlab.train.stage import unused_settings

    root, _, _ = world
    run_sft(sft_config(root, "unused_opts", optimizer="adamw", lion_beta1=0.8, lora_r=4, max_steps=1, warmup_steps=0,
                       eval_every=1), progress=False)
    assert "notice: set but unused: lion_beta1=0.8 (optimizer=adamw); lora_r=4 (use_lora=false)" in capsys.readouterr().out
    got = unused_settings(TrainConfig(optimizer="lion", adamw_eps=1e-6, sophia_rho=0.1, scheduler="none",
                                      min_lr_ratio=0.1, poly_power=3.0, nan_policy="stop", max_nan_skips=5))
    assert got == ("notice: set but unused: adamw_eps=1e-06 (optimizer=lion); sophia_rho=0.1 (optimizer=lion); "
                   "poly_power=3.0 (scheduler=none); min_lr_ratio=0.1 (scheduler=none keeps the lr flat); "
                   "max_nan_skips=5 (nan_policy=stop)")
    assert unused_settings(TrainConfig(optimizer="lion", lion_beta1=0.8, scheduler="polynomial", poly_power=3.0)) is None
    assert unused_settings(RLHFConfig(algorithm="dpo", use_lora=True, lora_r=4)) is None
