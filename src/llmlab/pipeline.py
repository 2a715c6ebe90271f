"""The whole pipeline on bundled data, offline: tokenizer, pretraining, LoRA SFT, merge, DPO, GRPO, chat.

    llm-lab pipeline --preset tiny --out runs/demo

What `make demo` runs. Each stage is the real one (the same functions the CLI calls) and each is
followed by a measurement of its effect, computed here on held-out data so that it does not depend on
what a stage chooses to log:

- pretraining: validation loss (on held-out Shakespeare) before and after;
- SFT: answer accuracy (greedy, exact match) on held-out `bundled:sft` records before and after (the
  tasks' question space is small, so a held-out record's question usually also occurs in training: this
  measures learnt skills and the chat format, not generalisation to unseen questions),
  and again after merging the adapter (it must not change);
- DPO: on held-out preference pairs, the share where the policy prefers the chosen answer (summed
  log-probs) before and after, and the implicit-reward accuracy (beta x log-ratio to the reference);
- GRPO: mean exact-match reward of sampled answers to held-out `bundled:prompts` before and after.

Each stage's resolved config is saved (`configs/` and the stage's folder) and named in one line rather
than printed in full as the standalone commands do. Plots land in each stage's folder (the stage's own) and `summary.png`; `summary.json` holds the numbers.
A stage that this install lacks is reported as missing and the stages that need it are skipped. Ctrl-C
in a stage saves its latest/ and stops the pipeline (summary.json names the stage interrupted); running
the pipeline again starts the whole run over.
Held-out data: every stage trains with the same `val_fraction`, and the measurements read the `val`
split (chosen by content hash, see `llmlab.data.sources`), so they never see a training record.

Presets: `micro` (seconds; the tests), `tiny` (minutes on 2 CPU cores; the demo), `small` and `base`
(bigger models and runs, for a GPU).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmlab.config import ConfigBase, ModelConfig, RLHFConfig, SFTConfig, TrainConfig
from llmlab.errors import ConfigError, LLMLabError

VAL_FRACTION = 0.05
TOKENIZER_DATA = ["bundled:shakespeare", "bundled:prompts | | 1.0 | column=prompt",
                  "bundled:prompts | | 0.3 | column=answer"]
CHAT_PROMPT = "What is the first letter of cat?"


@dataclass(frozen=True)
class Preset:
    """Sizes and step counts of one pipeline run; the dicts are config fields."""

    vocab_size: int
    model: dict[str, Any]
    pretrain: dict[str, Any]
    sft: dict[str, Any]
    dpo: dict[str, Any]
    grpo: dict[str, Any]
    eval_questions: int = 64  # held-out SFT questions for answer accuracy
    eval_pairs: int = 64  # held-out preference pairs
    eval_prompts: int = 16  # held-out prompts, each sampled group_size times, for GRPO's mean reward
    tokenizer_docs: int | None = None
    eval_batches: int = 8  # validation batches for the loss


def _preset(vocab: int, width: int, heads: int, layers: int, seq: int, steps: tuple[int, int, int, int], *,
            batch: int, lr: float, lora_r: int, evals: tuple[int, int, int], tokenizer_docs: int | None = None,
            eval_batches: int = 8, tune: dict[str, dict[str, Any]] | None = None) -> Preset:
    """One recipe scaled by size; `tune` overrides fields per stage ("model", "pretrain", "sft", "dpo", "grpo")."""
    from dataclasses import replace

    pre, sft, dpo, grpo = steps
    every = lambda n: max(1, n // 3)  # noqa: E731 - evaluate (and keep best/) a few times per stage
    common = dict(val_fraction=VAL_FRACTION, log_every=max(1, min(10, pre // 10)), save_best_only=False)
    preset = Preset(
        vocab_size=vocab,
        model=dict(d_model=width, n_heads=heads, n_kv_heads=max(1, heads // 2), d_ff=int(width * 8 / 3) // 8 * 8,
                   n_layers=layers, max_seq_len=seq, tie_embeddings=True),
        pretrain=dict(common, max_steps=pre, lr=lr, warmup_steps=max(1, pre // 10), batch_size=batch,
                      gradient_accumulation_steps=1, eval_every=every(pre), eval_steps=4, save_every=every(pre),
                      datasets=["bundled:shakespeare"], max_seq_len=min(seq, 128), weight_decay=0.1),
        sft=dict(common, max_steps=sft, learning_rate=lr, warmup_steps=max(1, sft // 10), batch_size=batch,
                 gradient_accumulation_steps=1, eval_every=every(sft), eval_steps=4, save_every=every(sft),
                 datasets=["bundled:sft"], use_lora=True, lora_preset="all", lora_r=lora_r, lora_alpha=2 * lora_r,
                 lora_dropout=0.0, max_seq_len=min(seq, 128)),
        dpo=dict(common, algorithm="dpo", max_steps=dpo, learning_rate=lr / 4, beta=0.1, batch_size=batch,
                 mini_batch_size=batch, eval_every=every(dpo), eval_steps=2, save_every=every(dpo),
                 datasets=["bundled:preference"], reward_model_name=None, max_prompt_len=64),
        grpo=dict(common, algorithm="grpo", max_steps=grpo, learning_rate=lr / 4, group_size=4, batch_size=batch // 2,
                  mini_batch_size=batch // 2, ppo_epochs=1, kl_coef=0.02, grpo_temperature=1.0,
                  eval_every=every(grpo), eval_steps=1, save_every=every(grpo), datasets=["bundled:prompts"],
                  reward_model_name=None, reward_functions=["exact_match"], max_prompt_len=64, max_new_tokens=8),
        eval_questions=evals[0], eval_pairs=evals[1], eval_prompts=evals[2], tokenizer_docs=tokenizer_docs,
        eval_batches=eval_batches,
    )
    return replace(preset, **{stage: {**getattr(preset, stage), **fields} for stage, fields in (tune or {}).items()})


PRESETS: dict[str, Preset] = {
    "micro": _preset(320, 32, 2, 2, 64, (4, 4, 2, 2), batch=4, lr=3e-3, lora_r=4, evals=(8, 8, 4),
                     tokenizer_docs=200, eval_batches=2),
    # tiny: about 5 minutes (~330 CPU s) on 2 idle cores, every stage with a clear effect. Pretraining mixes in
    # the tasks as plain text (so the base model knows them; SFT teaches the chat format and when to stop),
    # with small batches for more updates. The lm_head is untied so that LoRA can adapt it (the end-of-turn
    # token is never a target in pretraining) and merge it cleanly. DPO and GRPO need small steps: DPO at
    # larger learning rates stops the model ending its turn; GRPO samples 8 answers for each of 16 prompts.
    "tiny": _preset(2048, 96, 4, 4, 256, (1600, 300, 150, 40), batch=16, lr=4e-3, lora_r=16, evals=(64, 64, 32),
                    tune=dict(model=dict(tie_embeddings=False),
                              pretrain=dict(batch_size=8, datasets=["bundled:shakespeare", "bundled:tasks | | 30"]),
                              sft=dict(learning_rate=2e-3, lora_preset="custom",
                                       lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj", "lm_head"]),
                              dpo=dict(learning_rate=3e-4, beta=1.0),
                              grpo=dict(learning_rate=3e-4, group_size=8, batch_size=16, mini_batch_size=16))),
    "small": _preset(8192, 384, 6, 8, 512, (3000, 1500, 300, 200), batch=32, lr=1e-3, lora_r=32,
                     evals=(200, 200, 64)),
    "base": _preset(16384, 768, 12, 12, 1024, (10000, 3000, 600, 400), batch=32, lr=6e-4, lora_r=64,
                    evals=(400, 400, 128)),
}


def stage_configs(preset: str | Preset, out: str | Path, vocab_size: int | None = None) -> dict[str, ConfigBase]:
    """The model and stage configs of a run in `out` (the files it saves, and configs/*_tiny.json)."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    out = Path(out)
    vocab = vocab_size or -(-p.vocab_size // 64) * 64
    return {
        "model": ModelConfig(tokenizer_name=str(out / "tokenizer"), vocab_size=vocab, **p.model),
        "pretrain": TrainConfig(output_dir=str(out / "pretrain"), **p.pretrain),
        "sft": SFTConfig(policy_checkpoint=str(out / "pretrain"), output_dir=str(out / "sft"), **p.sft),
        "dpo": RLHFConfig(policy_checkpoint=str(out / "sft_merged"), output_dir=str(out / "dpo"), **p.dpo),
        "grpo": RLHFConfig(policy_checkpoint=str(out / "dpo"), output_dir=str(out / "grpo"), **p.grpo),
    }


# --------------------------------------------------------------------------------------------------
# Measurements (held-out data, no gradient)
# --------------------------------------------------------------------------------------------------


def validation_loss(model: Any, tokenizer: Any, datasets: list[str], seq_len: int, n_batches: int,
                    batch_size: int = 8) -> float:
    """Mean next-token cross entropy over `n_batches` packed validation blocks."""
    import torch
    import torch.nn.functional as F

    from llmlab.data.pretrain import PretrainBatches
    from llmlab.device import model_device

    batches = PretrainBatches(datasets, tokenizer, seq_len, batch_size, split="val", val_fraction=VAL_FRACTION)
    device, total = model_device(model), 0.0
    with torch.no_grad():
        for _ in range(n_batches):
            ids = next(batches)["input_ids"].to(device)
            logits = model(ids)
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).item()
    return total / n_batches


def heldout_questions(tokenizer: Any, n: int) -> list[tuple[list[int], str]]:
    """(prompt ids, reference answer) of the first question of `n` held-out `bundled:sft` conversations."""
    from llmlab.data.chat import render
    from llmlab.data.sources import RecordIterator

    records = RecordIterator(["bundled:sft"], split="val", val_fraction=VAL_FRACTION)
    out, seen = [], set()
    while len(out) < n:
        messages = next(records)["messages"]
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        key = json.dumps(messages[:first])
        if key in seen:
            if len(seen) >= n or records.stream.epoch > 0:
                break
            continue
        seen.add(key)
        text = render(tokenizer, messages[:first], add_generation_prompt=True)
        out.append((tokenizer(text, add_special_tokens=False)["input_ids"], messages[first]["content"]))
    return out


def _complete(model: Any, tokenizer: Any, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
              seed: int = 0) -> list[str]:
    import torch

    from llmlab.data.tokenizer import stop_token_ids
    from llmlab.device import model_device
    from llmlab.generate import generate_tokens

    stops = stop_token_ids(tokenizer)
    gen = torch.Generator(model_device(model)).manual_seed(seed)
    out = generate_tokens(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0,
                          eos_token_id=stops, pad_token_id=tokenizer.pad_token_id, generator=gen)
    return [tokenizer.decode([t for t in r if t not in stops], skip_special_tokens=True) for r in out.responses]


def answer_accuracy(model: Any, tokenizer: Any, questions: list[tuple[list[int], str]], batch: int = 32) -> float:
    """Share of greedy answers equal to the reference (whitespace-normalised exact match)."""
    from llmlab.rlhf.rewards import exact_match

    scores: list[float] = []
    for i in range(0, len(questions), batch):
        part = questions[i:i + batch]
        answers = _complete(model, tokenizer, [q for q, _ in part], max_new_tokens=12, temperature=0.0)
        scores += exact_match([""] * len(part), answers, answer=[a for _, a in part])
    return sum(scores) / max(1, len(scores))


def preference_scores(policy: Any, reference: Any, tokenizer: Any, n_pairs: int, beta: float,
                      seq_len: int = 128) -> dict[str, float]:
    """On held-out pairs: how often the policy gives the chosen answer more log-prob than the rejected
    one, and DPO's implicit-reward accuracy (beta x (policy - reference) log-ratio, chosen > rejected)."""
    import torch

    from llmlab.data.preference import PreferenceBatches
    from llmlab.device import model_device
    from llmlab.rlhf.dpo import preference_logps

    batches = PreferenceBatches(["bundled:preference"], tokenizer, seq_len, min(16, n_pairs), split="val",
                                val_fraction=VAL_FRACTION)
    prefers, reward_ok, margins, seen = 0, 0, 0.0, 0
    with torch.no_grad():
        while seen < n_pairs:
            batch = {k: v.to(model_device(policy)) for k, v in next(batches).items()}
            pc, pr = preference_logps(policy, batch)
            rc, rr = preference_logps(reference, batch)
            margin = beta * ((pc - rc) - (pr - rr))
            prefers += int((pc > pr).sum())
            reward_ok += int((margin > 0).sum())
            margins += float(margin.sum())
            seen += len(pc)
    return {"prefers_chosen": prefers / seen, "reward_accuracy": reward_ok / seen, "reward_margin": margins / seen}


def heldout_prompts(tokenizer: Any, n: int, max_prompt_len: int) -> list[dict[str, Any]]:
    from llmlab.data.prompts import PromptBatches

    return next(PromptBatches(["bundled:prompts"], tokenizer, n, max_prompt_len=max_prompt_len, split="val",
                              val_fraction=VAL_FRACTION))


def mean_reward(model: Any, tokenizer: Any, prompts: list[dict[str, Any]], cfg: RLHFConfig, seed: int = 0) -> float:
    """Mean reward (the run's reward functions) of group_size sampled answers per held-out prompt."""
    from llmlab.rlhf.rewards import build_reward_fn

    reward = build_reward_fn(cfg)
    rows = [p for p in prompts for _ in range(cfg.group_size)]
    answers = _complete(model, tokenizer, [r["prompt_ids"] for r in rows], max_new_tokens=cfg.max_new_tokens,
                        temperature=cfg.grpo_temperature, seed=seed)
    scores = reward([r["prompt"] for r in rows], answers, answer=[r["answer"] for r in rows])
    return float(sum(scores) / len(scores))


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


@dataclass
class PipelineRun:
    """Bookkeeping of one run: per-stage results and timings, printed as they come."""

    out: Path
    console: Any
    summary: dict[str, dict[str, Any]] = field(default_factory=dict)

    def begin(self, name: str, what: str) -> float:
        self.console.rule(f"[bold]{name}[/bold]: {what}")
        return time.perf_counter()

    def done(self, name: str, t0: float, **results: Any) -> None:
        results["seconds"] = round(time.perf_counter() - t0, 1)
        self.summary[name] = {"status": "done", **results}
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in results.items() if k != "reply")
        self.console.print(f"[green]{name}[/green]: {shown}")
        self.save()

    def missing(self, name: str, error: LLMLabError) -> None:
        self.summary[name] = {"status": "missing", "reason": str(error)}
        self.console.print(f"[yellow]{name}: skipped[/yellow] ({error})")
        self.save()

    def skipped(self, name: str, needs: str) -> None:
        self.summary[name] = {"status": "skipped", "reason": f"needs {needs}"}
        self.console.print(f"[yellow]{name}: skipped[/yellow] (needs {needs})")

    def stop_if_interrupted(self, folder: Path) -> None:
        """Stop the pipeline when the stage in `folder` was interrupted (Ctrl-C/SIGTERM: it saved latest/ and
        returned early), saying so in summary.json and in a line: the stage's own resume command finishes
        that stage alone, and running the pipeline again starts the whole run over."""
        from llmlab.train.loop import last_run_status

        status = last_run_status(folder)
        if status is None or status.stopped != "interrupted":
            return
        self.summary[folder.name] = {"status": "interrupted", "step": status.step, "max_steps": status.max_steps}
        self.save()
        message = f"{folder.name} stopped at step {status.step} of {status.max_steps}"
        self.console.print(f"[yellow]pipeline stopped[/yellow]: {message}; the resume command above finishes "
                           f"{folder.name} alone, and the later stages do not run. `llm-lab pipeline` again with "
                           f"this --out starts the whole run over (it replaces {self.out}).", soft_wrap=True)
        raise KeyboardInterrupt(message)

    def ok(self, *names: str) -> bool:
        return all(self.summary.get(n, {}).get("status") == "done" for n in names)

    def save(self) -> None:
        from llmlab.atomic import atomic_write_text

        atomic_write_text(self.out / "summary.json", json.dumps(self.summary, indent=2) + "\n")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


SUMMARY_ROWS = [
    ("pretrain", "validation loss", "val_loss_before", "val_loss_after"),
    ("sft", "answer accuracy (held-out SFT records)", "accuracy_before", "accuracy_after"),
    ("merge", "answer accuracy after merging", "accuracy_unmerged", "accuracy_merged"),
    ("dpo", "policy prefers the chosen answer", "prefers_chosen_before", "prefers_chosen_after"),
    ("dpo", "DPO implicit-reward accuracy", "reward_accuracy_before", "reward_accuracy_after"),
    ("grpo", "GRPO mean reward (exact match)", "mean_reward_before", "mean_reward_after"),
]


def summary_table(summary: dict[str, dict[str, Any]]):
    from rich.table import Table

    table = Table(title="LLM-Lab pipeline: measured effect of each stage")
    for col in ("stage", "measure", "before", "after", "seconds"):
        table.add_column(col, justify="left" if col in ("stage", "measure") else "right")
    for stage, what, before, after in SUMMARY_ROWS:
        s = summary.get(stage, {})
        if s.get("status") != "done":
            table.add_row(stage, what, "-", s.get("status", "not run"), "")
            continue
        table.add_row(stage, what, _fmt(s.get(before)), _fmt(s.get(after)), _fmt(s.get("seconds")))
    for stage in ("tokenizer", "chat"):
        s = summary.get(stage, {})
        detail = {"tokenizer": f"{s.get('vocab_size')} tokens", "chat": repr(s.get("reply", ""))[:60]}[stage]
        table.add_row(stage, detail if s.get("status") == "done" else s.get("status", "not run"), "", "",
                      _fmt(s.get("seconds", "")))
    return table


def plot_summary(summary: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Bars of each measure before and after its stage."""
    rows = [(what, summary[st][b], summary[st][a]) for st, what, b, a in SUMMARY_ROWS
            if summary.get(st, {}).get("status") == "done" and b in summary[st]]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.2), squeeze=False)
    for ax, (what, before, after) in zip(axes[0], rows):
        ax.bar(["before", "after"], [before, after], color=["#999999", "#2a7ab0"])
        ax.set_title(what, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_pipeline(preset: str = "tiny", out: str | Path = "runs/demo", *, force: bool = False,
                 progress: bool = True) -> dict[str, dict[str, Any]]:
    """Run every stage on bundled data into `out`; returns the summary (also in out/summary.json)."""
    import shutil

    import torch
    from rich.console import Console

    from llmlab.cli import commands
    from llmlab.device import set_threads

    if preset not in PRESETS:
        raise ConfigError(f"preset: {preset!r} is not one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        # an earlier pipeline run is replaced (so `make demo` can be run again); anything else needs --force
        if not (force or (out / "summary.json").is_file()):
            raise ConfigError(f"--out: {out} already holds files that are not a pipeline run; pass --force to "
                              f"replace them or choose another folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    set_threads()
    torch.manual_seed(0)
    run = PipelineRun(out, Console(highlight=False))
    started = time.perf_counter()

    # 1. tokenizer ---------------------------------------------------------------------------------
    from llmlab.data.tokenizer import model_vocab_size, train_tokenizer

    t0 = run.begin("tokenizer", f"byte-level BPE of {p.vocab_size} tokens on Shakespeare and the chat tasks")
    tok = train_tokenizer(TOKENIZER_DATA, p.vocab_size, out / "tokenizer", max_docs=p.tokenizer_docs,
                          val_fraction=VAL_FRACTION)
    run.done("tokenizer", t0, vocab_size=len(tok))
    cfgs = stage_configs(p, out, vocab_size=model_vocab_size(tok, 64))
    for name, cfg in cfgs.items():
        cfg.save(out / "configs" / f"{name}.json")

    # 2. pretraining -------------------------------------------------------------------------------
    from llmlab.model import build_model

    pre = cfgs["pretrain"]
    seq = pre.max_seq_len or cfgs["model"].max_seq_len
    t0 = run.begin("pretrain", f"{pre.max_steps} steps on {' + '.join(str(d) for d in pre.datasets)}")
    torch.manual_seed(pre.seed)
    before = validation_loss(build_model(cfgs["model"]).eval(), tok, pre.datasets, seq, p.eval_batches)
    try:
        commands.pretrain(pre, cfgs["model"], progress=progress, show_config=False)
        run.stop_if_interrupted(out / "pretrain")
    except commands.StageMissing as e:
        run.missing("pretrain", e)
    else:
        base = _load(out / "pretrain")
        after = validation_loss(base, tok, pre.datasets, seq, p.eval_batches)
        run.done("pretrain", t0, val_loss_before=before, val_loss_after=after, steps=pre.max_steps)

    # 3. SFT with LoRA, then merge -----------------------------------------------------------------
    questions = heldout_questions(tok, p.eval_questions)
    if run.ok("pretrain"):
        sft = cfgs["sft"]
        t0 = run.begin("sft", f"LoRA ({sft.lora_preset}, r={sft.lora_r}) for {sft.max_steps} steps on bundled:sft")
        acc_before = answer_accuracy(base, tok, questions)
        try:
            commands.sft(sft, progress=progress, show_config=False)
            run.stop_if_interrupted(out / "sft")
        except commands.StageMissing as e:
            run.missing("sft", e)
        else:
            acc_after = answer_accuracy(_load(out / "sft"), tok, questions)
            run.done("sft", t0, accuracy_before=acc_before, accuracy_after=acc_after, questions=len(questions))
    else:
        run.skipped("sft", "pretrain")
    if run.ok("sft"):
        t0 = run.begin("merge", "adapter folder + base checkpoint -> one plain checkpoint")
        try:
            commands.merge_lora(adapter=str(out / "sft" / "best_lora_adapters"), base=str(out / "pretrain"),
                                out=str(out / "sft_merged"))
        except commands.StageMissing as e:
            run.missing("merge", e)
        else:
            merged = _load(out / "sft_merged")
            run.done("merge", t0, accuracy_unmerged=run.summary["sft"]["accuracy_after"],
                     accuracy_merged=answer_accuracy(merged, tok, questions))
    else:
        run.skipped("merge", "sft")

    # 4. DPO ---------------------------------------------------------------------------------------
    if run.ok("merge"):
        dpo = cfgs["dpo"]
        t0 = run.begin("dpo", f"{dpo.max_steps} steps on bundled:preference, beta {dpo.dpo_beta}")
        run.console.print(f"resolved config: {out / 'configs' / 'dpo.json'}", soft_wrap=True)
        try:
            commands.rlhf(dpo, progress=progress)
            run.stop_if_interrupted(out / "dpo")
        except commands.StageMissing as e:
            run.missing("dpo", e)
        else:
            before = preference_scores(merged, merged, tok, p.eval_pairs, dpo.dpo_beta)
            after = preference_scores(_load(out / "dpo"), merged, tok, p.eval_pairs, dpo.dpo_beta)
            run.done("dpo", t0, **{f"{k}_before": v for k, v in before.items()},
                     **{f"{k}_after": v for k, v in after.items()}, pairs=p.eval_pairs)
    else:
        run.skipped("dpo", "merge")

    # 5. GRPO --------------------------------------------------------------------------------------
    if run.ok("dpo"):
        grpo = cfgs["grpo"]
        t0 = run.begin("grpo", f"{grpo.max_steps} steps on bundled:prompts, {grpo.group_size} answers per prompt, "
                               f"exact-match reward")
        prompts = heldout_prompts(tok, p.eval_prompts, grpo.max_prompt_len)
        reward_before = mean_reward(_load(out / "dpo"), tok, prompts, grpo)
        run.console.print(f"resolved config: {out / 'configs' / 'grpo.json'}", soft_wrap=True)
        try:
            commands.rlhf(grpo, progress=progress)
            run.stop_if_interrupted(out / "grpo")
        except commands.StageMissing as e:
            run.missing("grpo", e)
        else:
            reward_after = mean_reward(_load(out / "grpo"), tok, prompts, grpo)
            run.done("grpo", t0, mean_reward_before=reward_before, mean_reward_after=reward_after,
                     prompts=len(prompts))
    else:
        run.skipped("grpo", "dpo")

    # 6. one-shot chat with the last model ---------------------------------------------------------
    from llmlab.cli.chat import ChatSession, Settings

    last = next((c for c, st in ((out / "grpo", "grpo"), (out / "dpo", "dpo"), (out / "sft_merged", "merge"),
                                 (out / "pretrain", "pretrain"))
                 if run.ok(st)), None)
    if last is not None:
        t0 = run.begin("chat", f"{last}: {CHAT_PROMPT!r}")
        session = ChatSession.open(str(last), settings=Settings(temperature=0.0, max_new_tokens=16))
        run.console.print(f"user: {CHAT_PROMPT}\nmodel: ", end="")
        reply = session.reply(CHAT_PROMPT, stream=run.console.file)
        run.done("chat", t0, checkpoint=str(last), prompt=CHAT_PROMPT, reply=reply)
    else:
        run.skipped("chat", "a trained checkpoint")

    import resource

    cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    run.summary["total"] = {"status": "done", "seconds": round(time.perf_counter() - started, 1), "preset": preset,
                            "cpu_seconds": round(cpu, 1)}
    run.save()
    plot = plot_summary(run.summary, out / "summary.png")
    run.console.print(summary_table(run.summary))
    run.console.print(f"summary: {out / 'summary.json'}" + (f", plot: {plot}" if plot else "")
                      + f"; total {run.summary['total']['seconds']} s wall, {run.summary['total']['cpu_seconds']} s CPU")
    return run.summary




def _load(path: Path):
    from llmlab.checkpoint import load_model

    return load_model(path)
