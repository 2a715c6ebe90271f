"""`llm-lab pipeline --preset micro`: every stage runs on bundled data and reports its measured effect."""

import json

import pytest

from llmlab.cli import main
from llmlab.pipeline import SUMMARY_ROWS


@pytest.mark.slow
def test_micro_pipeline_runs_every_stage_and_writes_the_summary(tmp_path, capsys):
    out = tmp_path / "run"
    assert main.main(["pipeline", "--preset", "micro", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    stages = ("tokenizer", "pretrain", "sft", "merge", "dpo", "grpo", "chat")
    assert {s: summary[s]["status"] for s in stages} == {s: "done" for s in stages}
    for stage, _, before, after in SUMMARY_ROWS:
        assert isinstance(summary[stage][before], float) and isinstance(summary[stage][after], float)
    assert summary["pretrain"]["val_loss_after"] < summary["pretrain"]["val_loss_before"]
    assert summary["merge"]["accuracy_merged"] == summary["merge"]["accuracy_unmerged"]
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


def test_pipeline_stops_after_an_interrupted_stage(tmp_path):
    from llmlab.pipeline import _stop_if_interrupted
    from llmlab.train.loop import write_run_status

    _stop_if_interrupted(tmp_path)  # no run there: nothing to say
    write_run_status(tmp_path, "finished", step=4, max_steps=4, kind="sft")
    _stop_if_interrupted(tmp_path)
    write_run_status(tmp_path, "interrupted", step=2, max_steps=4, kind="sft")
    with pytest.raises(KeyboardInterrupt, match="stopped at step 2 of 4"):
        _stop_if_interrupted(tmp_path)
