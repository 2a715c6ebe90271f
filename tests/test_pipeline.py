"""`llm-lab pipeline --preset micro`: every stage runs on bundled data and reports its measured effect."""

import json

import pytest

from llmlab.cli import main
from llmlab.pipeline import SUMMARY_ROWS


@pytest.mark.slow
def test_micro_pipeline_runs_every_stage_and_writes_the_summary(tmp_path, capsys, monkeypatch):
    import dataclasses

    import torch

    from llmlab import pipeline
    from llmlab.checkpoint import load_model
    from llmlab.lora import load_lora_checkpoint

    # micro pretrains for 4 steps (val loss 5.78 -> 5.66); 60 steps at 1e-2 (~2 s more) move it by a margin
    micro = pipeline.PRESETS["micro"]
    pre = dict(micro.pretrain, max_steps=60, lr=1e-2, warmup_steps=6, eval_every=30, save_every=30, log_every=10)
    monkeypatch.setitem(pipeline.PRESETS, "micro", dataclasses.replace(micro, pretrain=pre))
    out = tmp_path / "run"
    assert main.main(["pipeline", "--preset", "micro", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    stages = ("tokenizer", "pretrain", "sft", "merge", "dpo", "grpo", "chat")
    assert {s: summary[s]["status"] for s in stages} == {s: "done" for s in stages}
    for stage, _, before, after in SUMMARY_ROWS:
        assert isinstance(summary[stage][before], float) and isinstance(summary[stage][after], float)
    assert summary["pretrain"]["steps"] == 60
    assert summary["pretrain"]["val_loss_after"] < 0.8 * summary["pretrain"]["val_loss_before"]  # 5.78 -> 4.47
    # micro's SFT answers no held-out question (0.0 even after 200 steps), so equal accuracies prove little:
    # the merged checkpoint must compute what the LoRA model it came from (sft/best) computes
    assert summary["merge"]["accuracy_merged"] == summary["merge"]["accuracy_unmerged"]
    lora, merged = load_lora_checkpoint(out / "sft" / "best").eval(), load_model(out / "sft_merged").eval()
    base = load_model(out / "pretrain").eval()
    x = torch.randint(0, summary["tokenizer"]["vocab_size"], (2, 16))
    with torch.no_grad():
        want, got = lora(x), merged(x)
        scale = want.abs().max()
        assert (got - want).abs().max() < 1e-4 * scale
        assert (base(x) - want).abs().max() > 1e-3 * scale  # the adapter moved the model: the merge carried it
    assert summary["dpo"]["reward_accuracy_before"] == 0.0  # policy == reference: no margin yet
    assert summary["tokenizer"]["vocab_size"] == 320 and summary["total"]["preset"] == "micro"
    assert isinstance(summary["chat"]["reply"], str)
    for f in ("summary.png", "configs/model.json", "configs/grpo.json", "pretrain/loss.png", "sft/best_lora_adapters",
              "sft_merged/model.safetensors", "dpo/metrics.jsonl", "grpo/metrics.jsonl"):
        assert (out / f).exists(), f
    assert "measured effect of each stage" in printed and "GRPO mean reward" in printed
    # one line per stage config instead of the resolved JSON
    assert f"resolved training config: {out / 'pretrain' / 'train_config.json'}" in printed
    assert f"resolved config: {out / 'configs' / 'grpo.json'}" in printed and '"gradient_accumulation_steps":' not in printed


def test_pipeline_refuses_to_replace_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main.main(["pipeline", "--preset", "micro", "--out", str(tmp_path)]) == 2
    assert "pass --force" in capsys.readouterr().err and (tmp_path / "notes.txt").is_file()
    assert main.main(["pipeline", "--preset", "nope", "--out", str(tmp_path)]) == 2


def test_pipeline_stops_after_an_interrupted_stage_and_says_what_running_it_again_does(tmp_path):
    """An interrupted stage stops the pipeline; the stage's own hint is `llm-lab sft --resume ...`, which
    finishes that stage alone, and main prints only "interrupted": a line says so and that the pipeline
    starts over when run again, and summary.json records the stage as interrupted (it was left out)."""
    import io

    from rich.console import Console

    from llmlab.pipeline import PipelineRun
    from llmlab.train.loop import write_run_status

    out = io.StringIO()
    run = PipelineRun(tmp_path, Console(file=out, width=200))
    sft = tmp_path / "sft"
    run.stop_if_interrupted(sft)  # no run there: nothing to say
    write_run_status(sft, "finished", step=4, max_steps=4, kind="sft")
    run.stop_if_interrupted(sft)
    assert out.getvalue() == "" and not (tmp_path / "summary.json").exists()
    write_run_status(sft, "interrupted", step=2, max_steps=4, kind="sft")
    with pytest.raises(KeyboardInterrupt, match="stopped at step 2 of 4"):
        run.stop_if_interrupted(sft)
    assert "pipeline stopped: sft stopped at step 2 of 4" in out.getvalue() and "starts the whole run over" in out.getvalue()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["sft"] == {"status": "interrupted", "step": 2, "max_steps": 4}
