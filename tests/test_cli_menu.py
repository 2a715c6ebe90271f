"""The interactive menu: which questions are asked, on-the-spot validation, and an end-to-end pexpect
session (configure a tiny model, train it a few steps on bundled data, chat with it)."""

import io
import json
import os
import sys

import pexpect
import pytest

from llmlab.cli import menu
from llmlab.config import ModelConfig, RLHFConfig, SFTConfig, TrainConfig


class Scripted(menu.PlainPrompter):
    """Plain prompts answered from a list; records every question and every error shown."""

    def __init__(self, answers):
        self.answers, self.asked, self.lines = list(answers), [], []
        super().__init__(read=self._read, out=self)

    def _read(self, prompt):
        self.asked.append(prompt)
        if not self.answers:
            raise AssertionError(f"no scripted answer for {prompt!r}")
        return self.answers.pop(0)

    def write(self, text):
        self.lines.append(text)

    def names(self):
        return [q.split(" ", 1)[0] for q in self.asked]


def test_only_the_chosen_optimizer_and_schedule_parameters_are_asked():
    # max_steps, optimizer=lion (3rd choice) -> lion_beta1/2, lr, weight_decay, scheduler=none (1st)
    p = Scripted(["5000", "3", "", "", "", "", "1"] + [""] * 30)
    cfg = menu.ask_config(p, TrainConfig)
    asked = p.names()
    assert cfg.optimizer == "lion" and cfg.scheduler == "none" and cfg.max_steps == 5000
    assert "lion_beta1" in asked and "lion_beta2" in asked
    assert not {"adamw_beta1", "sophia_rho", "muon_momentum", "poly_power", "min_lr_ratio"} & set(asked)
    assert "seed" not in asked  # advanced section declined


class ByName(Scripted):
    """Answers by the question's field name (Enter for the rest)."""

    def __init__(self, by_name):
        super().__init__([])
        self.by_name = by_name

    def _read(self, prompt):
        self.asked.append(prompt)
        return self.by_name.get(prompt.split(" ", 1)[0], "")


@pytest.mark.parametrize("cls", [TrainConfig, SFTConfig])  # (RLHF has no warmup by default)
def test_a_short_run_gets_a_warmup_default_that_fits_it(cls):
    """max_steps=40 with the default warmup (longer than that) used to refuse Enter at warmup_steps
    forever; the default now follows max_steps, and what the user types for warmup_steps is kept."""
    assert cls().warmup_steps > 40
    p = ByName({"max_steps": "40", "Edit": "y"})
    cfg = menu.ask_config(p, cls)
    assert "warmup_steps" in p.names()
    assert cfg.max_steps == 40 and cfg.warmup_steps == 4
    assert not [line for line in p.lines if "error" in line]
    typed = menu.ask_config(ByName({"max_steps": "40", "warmup_steps": "7", "Edit": "y"}), cls)
    assert typed.warmup_steps == 7


def test_lora_fields_only_with_lora_and_algorithm_fields_only_for_their_algorithm():
    sft = Scripted([""] * 60)
    menu.ask_config(sft, SFTConfig)
    assert "use_lora" in " ".join(sft.asked) and "lora_r" not in sft.names()
    dpo = Scripted(["2"] + [""] * 60)  # algorithm: ppo, dpo, grpo -> dpo
    cfg = menu.ask_config(dpo, RLHFConfig)
    assert cfg.algorithm == "dpo" and "beta" in dpo.names()
    assert not {"group_size", "vf_coef", "gae_lambda", "reward_model_name"} & set(dpo.names())


def test_grpo_is_asked_its_sampling_options_and_not_ppo_ones():
    grpo = Scripted(["3"] + [""] * 80)  # algorithm: ppo, dpo, grpo -> grpo
    cfg = menu.ask_config(grpo, RLHFConfig)
    asked = set(grpo.names())
    assert cfg.algorithm == "grpo"
    assert {"top_k", "top_p", "grpo_temperature", "group_size", "kl_coef"} <= asked  # the rollouts sample with them
    assert not {"temperature", "vf_coef", "adaptive_kl", "target_kl"} & asked
    ppo = Scripted([""] * 80)
    menu.ask_config(ppo, RLHFConfig)
    assert {"top_k", "top_p", "temperature"} <= set(ppo.names()) and "grpo_temperature" not in ppo.names()


def test_a_wrong_answer_is_asked_again_with_the_reason():
    # d_model "abc" is refused at once; n_kv_heads=3 with n_heads=4 is refused at once (n_heads known)
    p = Scripted(["", "", "", "", "", "abc", "64", "4", "3", "2", "128", "2", "500", "64", ""] + [""] * 5)
    cfg = menu.ask_config(p, ModelConfig)
    errors = "".join(p.lines)
    assert "error: d_model: expected an integer, got 'abc'" in errors
    assert "error: n_kv_heads: n_heads=4 is not divisible by n_kv_heads=3" in errors
    assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (64, 4, 2, 500)
    assert p.names().count("d_model") == 2 and p.names().count("n_kv_heads") == 2


def test_a_check_that_needs_a_later_field_waits_then_asks_the_named_field_again():
    # d_model=30 with the default n_heads=14 is not refused yet; with n_heads=4 it is, at the end
    p = Scripted(["", "", "1", "", "", "30", "4", "64", "2", "100", "64", "", "", "32"])
    cfg = menu.ask_config(p, ModelConfig)  # attention_type=mha: n_kv_heads not asked
    assert "error: d_model: 30 is not divisible by n_heads=4" in "".join(p.lines)
    assert cfg.d_model == 32 and cfg.attention_type == "mha" and "n_kv_heads" not in p.names()


def test_yarn_fields_are_asked_with_yarn_and_factor_one_is_refused_there():
    # tokenizer, positional_encoding=yarn (4th), defaults, sizes, dropout, then the YaRN fields at once
    p = Scripted(["", "4", "", "", "", "64", "4", "2", "128", "2", "500", "64", "", "", "4", "", "", "", ""])
    cfg = menu.ask_config(p, ModelConfig)
    assert cfg.positional_encoding == "yarn" and cfg.rope_scaling_factor == 4.0
    assert ("error: rope_scaling_factor: positional_encoding=yarn with rope_scaling_factor=1.0 is plain RoPE; "
            "set rope_scaling_factor > 1") in "".join(p.lines)
    names = p.names()
    assert names.count("rope_scaling_factor") == 2
    assert {"original_max_seq_len", "yarn_beta_fast", "yarn_beta_slow"} <= set(names)
    assert "sliding_window" not in names  # the advanced section was declined
    rope = Scripted([""] * 14)
    menu.ask_config(rope, ModelConfig)
    assert not {"rope_scaling_factor", "original_max_seq_len", "yarn_beta_fast"} & set(rope.names())


class FakeTokenizer:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def test_vocab_size_default_comes_from_a_hub_tokenizer_and_stays_when_it_cannot_load(monkeypatch, tmp_path):
    import llmlab.data.tokenizer as tokenizer
    from llmlab.errors import DataError

    loaded = []

    def fake_load(name):
        loaded.append(name)
        if name == "offline/tok":
            raise DataError(f"tokenizer_name: cannot load {name!r} from the Hugging Face Hub (offline)")
        return FakeTokenizer({"org/tok": 1000, "Qwen/Qwen2.5-0.5B": 151665}[name])

    monkeypatch.setattr(tokenizer, "load_tokenizer", fake_load)
    p = Scripted([])
    values = {"tokenizer_name": "org/tok", "vocab_size": 151936}
    menu.vocab_from_tokenizer(p, values)
    assert values["vocab_size"] == 1000 and "vocab_size default set from the tokenizer: 1000\n" in p.lines
    values = {"tokenizer_name": "Qwen/Qwen2.5-0.5B", "vocab_size": 151936}  # the spec's padded size fits
    menu.vocab_from_tokenizer(p, values)
    assert values["vocab_size"] == 151936
    values = {"tokenizer_name": "offline/tok", "vocab_size": 777}
    menu.vocab_from_tokenizer(p, values)
    assert values["vocab_size"] == 777
    assert p.lines[-1] == ("note: vocab_size stays 777: the tokenizer could not be loaded to size it "
                           "(tokenizer_name: cannot load 'offline/tok' from the Hugging Face Hub (offline))\n")
    assert loaded == ["org/tok", "Qwen/Qwen2.5-0.5B", "offline/tok"]

    # wired into "Configure new model": a hub name typed there sizes vocab_size's default
    monkeypatch.chdir(tmp_path)
    answers = ["1", "org/tok"] + [""] * 4 + ["64", "4", "2", "128", "2", "", "64", "", "", "m.json"]
    menu.action_configure(Scripted(answers))
    assert ModelConfig.load("m.json").vocab_size == 1000


def test_vocab_size_from_a_local_tokenizer_folder_and_a_real_offline_hub_miss(tok_dir):
    from llmlab.data.tokenizer import load_tokenizer

    p = Scripted([])
    values = {"tokenizer_name": str(tok_dir), "vocab_size": 151936}
    menu.vocab_from_tokenizer(p, values)
    assert values["vocab_size"] == len(load_tokenizer(str(tok_dir)))
    values = {"tokenizer_name": "llmlab-test/no-such-tokenizer", "vocab_size": 151936}  # HF_HUB_OFFLINE=1
    menu.vocab_from_tokenizer(p, values)
    assert values["vocab_size"] == 151936 and p.lines[-1].startswith("note: vocab_size stays 151936: ")
    assert p.lines[-1].count("\n") == 1


# --------------------------------------------------------------------------------------------------
# End to end through a terminal
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from llmlab.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer(["bundled:shakespeare | macbeth"], 300, out, max_docs=40)
    return out


class Terminal:
    def __init__(self, cwd):
        env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm", OMP_NUM_THREADS="1", COLUMNS="120",
                   HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        env.pop("LLMLAB_PLAIN_PROMPTS", None)
        self.child = pexpect.spawn(sys.executable, ["-m", "llmlab.cli.main"], cwd=str(cwd), env=env,
                                   encoding="utf-8", timeout=60, dimensions=(50, 160))
        self.log = []
        self.child.logfile_read = self

    def write(self, text):
        self.log.append(text)

    def flush(self):
        pass

    def answer(self, question, text=None, key="\r", timeout=60):
        """Wait for the question, replace the default with `text` (or keep it) and submit."""
        self.child.expect(question, timeout=timeout)
        if text is not None:
            self.child.send("\x15" + text)  # Ctrl-U clears the pre-filled default
        self.child.send(key)


def test_menu_end_to_end_configure_train_and_chat(tok_dir, tmp_path):
    t = Terminal(tmp_path)
    t.answer("Main menu", "1")
    t.answer("Model config:")  # configure new
    t.answer(r"tokenizer_name \(", str(tok_dir))
    for q in ("positional_encoding", "attention_type", "norm_type", "activation"):
        t.answer(q)  # the defaults: rope, gqa, rmsnorm, swiglu
    t.answer(r"d_model \(", "abc")
    t.child.expect("d_model: expected an integer, got 'abc'")  # asked again, with the reason
    t.child.send("\x1532\r")
    t.answer(r"n_heads \(", "4")
    t.answer(r"n_kv_heads \(", "3")
    t.child.expect("n_kv_heads: n_heads=4 is not divisible by n_kv_heads=3")
    t.child.send("\x152\r")
    t.answer(r"d_ff \(", "64")
    t.answer(r"n_layers \(", "2")
    t.answer(r"vocab_size \(")  # default taken from the tokenizer
    t.answer(r"max_seq_len \(", "64")
    t.answer(r"dropout \(")
    t.answer("Edit advanced parameters", key="n")
    t.answer("Save config as")
    t.child.expect("saved model_config.json")

    t.answer("Main menu", "2")
    t.answer("Resume from a checkpoint", key="n")
    t.answer("Training config:")  # configure new
    t.answer(r"max_steps \(", "3")
    t.child.expect("warmup_steps default lowered to 0")  # the default 1000 would be refused
    t.answer(r"optimizer \(")
    for q in ("adamw_beta1", "adamw_beta2", "adamw_eps", r"lr \(", "weight_decay", r"scheduler \(", "min_lr_ratio"):
        t.answer(q)
    t.answer(r"warmup_steps \(", "4")  # more than max_steps: refused with the reason
    t.child.expect("warmup_steps: 4 is more than max_steps=3")
    t.child.send("\x151\r")
    t.answer(r"batch_size \(", "2")
    t.answer("gradient_accumulation_steps", "1")
    t.answer(r"grad_clip \(")
    t.answer(r"eval_every \(", "3")
    t.answer(r"eval_steps \(", "1")
    t.answer("save_best_only", key="y")
    t.answer(r"datasets \(", "bundled:shakespeare")
    t.answer(r"output_dir \(", "ck")
    t.answer("Edit advanced parameters", key="n")
    t.answer("Model config file")
    t.child.expect("Model size and training memory")  # the estimate, before training
    t.child.expect("parameters")
    t.answer("Save config as")
    t.answer("Start training", key="y")
    t.answer("Main menu", "5", timeout=180)  # back after training

    t.answer("Checkpoint folder", "ck")
    t.answer("LoRA adapter folder")
    t.child.expect("raw completion")  # a base model completes text
    t.answer("you> ", "To be", key="\r")
    t.child.expect("model> ")
    t.answer("you> ", "/exit")
    t.answer("Main menu", "0")
    t.child.expect(pexpect.EOF)
    t.child.close()
    assert t.child.exitstatus == 0, "".join(t.log)[-2000:]

    model = ModelConfig.load(tmp_path / "model_config.json")
    from llmlab.data.tokenizer import load_tokenizer

    assert (model.d_model, model.n_kv_heads, model.vocab_size) == (32, 2, len(load_tokenizer(str(tok_dir))))
    train = TrainConfig.load(tmp_path / "train_config.json")
    assert (train.max_steps, train.warmup_steps, train.batch_size, train.output_dir) == (3, 1, 2, "ck")
    assert (tmp_path / "ck" / "best" / "model.safetensors").is_file()
    steps = [json.loads(line) for line in (tmp_path / "ck" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in steps) == 3 and any("val_loss" in r for r in steps)


def test_plain_prompts_without_a_terminal(tmp_path, monkeypatch):
    """No terminal: numbered menus, `error: <reason>` lines, the same questions, a clean exit."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO())
    assert type(menu.default_prompter()) is menu.PlainPrompter
    p = Scripted(["7", "1", "", "", "", "", "", "", "abc", "64", "4", "2", "128", "2", "500", "64", "", "", "", "0"])
    assert menu.run_menu(p) == 0
    text = "".join(p.lines)
    assert "  1. Configure new model" in text and "  0. Exit" in text
    assert "error: '7' is not a menu option" in text
    assert "error: d_model: expected an integer, got 'abc'" in text
    cfg = ModelConfig.load(tmp_path / "model_config.json")
    assert (cfg.d_model, cfg.n_heads, cfg.vocab_size, cfg.max_seq_len) == (64, 4, 500, 64)


def test_menu_options_3_4_and_6_hand_the_chosen_configs_to_their_stages(tmp_path, monkeypatch):
    """Menu 3 (SFT) and 4 (RLHF) with an existing config file, 6 (merge, option 1): each stage function is
    mocked and receives exactly the config / paths chosen; 5 is Test model (the README says so)."""
    import torch
    from tests.conftest import tiny_config

    from llmlab.checkpoint import save_checkpoint
    from llmlab.cli import commands
    from llmlab.model import build_model

    assert [(k, label.split(" ")[0]) for k, label, _ in menu.MENU] == [
        ("1", "Configure"), ("2", "Base"), ("3", "SFT"), ("4", "RLHF"), ("5", "Test"), ("6", "Merge"), ("0", "Exit")]
    monkeypatch.chdir(tmp_path)
    SFTConfig(max_steps=7, warmup_steps=1, output_dir="sft_out").save("sft_config.json")
    RLHFConfig(algorithm="dpo", max_steps=5, warmup_steps=1, policy_checkpoint="no/such/policy").save("rlhf_config.json")
    torch.manual_seed(0)
    base = save_checkpoint(tmp_path / "base", build_model(tiny_config()))
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    calls = []

    def fake_stage(module, name, what):
        return lambda *args, **kw: calls.append((name, args, kw)) or tmp_path / "out"

    monkeypatch.setattr(commands, "_stage_function", fake_stage)
    answers = ["3", "", "1", "", "", "", "base",  # SFT: no resume, use existing, sft_config.json, save as, start,
               # and policy_checkpoint (the spec's default path: no checkpoint yet) asked again at the start
               "4", "", "1", "", "", "", "base",  # RLHF: the same with rlhf_config.json (no/such/policy)
               "6", "1", "adapter", "base", "merged_out",  # merge option 1: adapter + base, output
               "0"]
    p = Scripted(answers)
    assert menu.run_menu(p) == 0 and p.answers == []
    said = "".join(p.lines)
    assert "policy_checkpoint: checkpoints/best_model.pt: the spec's file name" in said
    assert "policy_checkpoint: no/such/policy: checkpoint not found" in said
    assert "error:" not in said
    (sft_name, (sft_cfg,), _), (rlhf_name, (rlhf_cfg,), _), (merge_name, merge_args, merge_kw) = calls
    assert sft_name == "run_sft" and sft_cfg == SFTConfig.load("sft_config.json")  # saved again, fixed
    assert (sft_cfg.max_steps, sft_cfg.output_dir, sft_cfg.policy_checkpoint) == (7, "sft_out", "base")
    assert rlhf_name == "run_rlhf" and (rlhf_cfg.algorithm, rlhf_cfg.max_steps) == ("dpo", 5)
    assert rlhf_cfg == RLHFConfig.load("rlhf_config.json") and rlhf_cfg.policy_checkpoint == "base"
    assert merge_name == "merge_adapter_folder" and merge_args == ("adapter", "base", "merged_out") and base.is_dir()
    assert merge_kw == {"force": False}


def test_chat_help_lists_every_repl_command_the_session_accepts(capsys):
    """`llm-lab chat --help` ends with the REPL commands; each one listed is one ChatSession.command runs."""
    from llmlab.cli import chat
    from llmlab.cli.main import main

    assert main(["chat", "--help"]) == 0
    text = capsys.readouterr().out
    listed = [w.rstrip(",") for line in text.split("commands typed at the you> prompt")[1].splitlines()
              for w in line.split()[:2] if w.startswith("/")] + ["/temperature"]
    assert set(listed) == {"/reset", "/temp", "/temperature", "/top_p", "/top_k", "/max_tokens", "/help", "/exit",
                           "/quit"}
    session = chat.ChatSession(model=None, tokenizer=None, chat=True)
    for name in listed:
        out = io.StringIO()
        keep_going = session.command(f"{name} 1", out)
        assert "unknown command" not in out.getvalue() and keep_going == (name not in ("/exit", "/quit"))
    assert "/system" not in text  # not a command: the session's answer to it is "unknown command"
    out = io.StringIO()
    session.command("/system x", out)
    assert "unknown command" in out.getvalue()


@pytest.mark.parametrize("command", [["chat"], ["generate", "--prompt", "hi"]])
def test_system_message_with_raw_mode_is_refused_before_loading(command, monkeypatch, capsys):
    """--system has no effect in raw completion (no template): a one-line error, exit 2, nothing loaded."""
    from llmlab.cli import chat
    from llmlab.cli.main import main

    monkeypatch.setattr(chat.ChatSession, "open", classmethod(lambda *a, **kw: pytest.fail("loaded a model")))
    assert main(command + ["--checkpoint", "ck", "--raw", "--system", "be brief"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --system") and err.count("\n") == 1 and "--chat" in err


def test_end_of_input_cancels_an_action_and_leaves_the_main_menu_cleanly():
    """Ctrl-D (or piped input running out) inside an action cancels it like Ctrl-C; at the main menu it
    exits with 0 and "bye", as choosing 0 does (it was "interrupted", exit 130)."""
    answers = iter(["1"])

    def read(prompt):
        try:
            return next(answers)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    assert menu.run_menu(menu.PlainPrompter(read=read, out=out)) == 0
    text = out.getvalue()
    assert "cancelled" in text and text.rstrip().endswith("bye")


def test_text_column_is_asked_for_pretraining_only():
    """SFT and RLHF read records by their format and refuse text_column: the menu does not offer it there."""
    def names(cls):
        return [q.name for section in menu.QUESTIONS[cls] for q in section.questions]

    assert "text_column" in names(TrainConfig)
    assert "text_column" not in names(SFTConfig) and "text_column" not in names(RLHFConfig)


def test_merge_declining_to_overwrite_asks_for_another_output_folder(tmp_path, monkeypatch):
    """Menu 6 with an output folder that exists: "no" to overwriting asks the folder again (it ended the
    action with the CLI's "pass --force" error); "yes" merges with force."""
    import torch
    from tests.conftest import tiny_config

    from llmlab.checkpoint import save_checkpoint
    from llmlab.cli import commands
    from llmlab.model import build_model

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ck", build_model(tiny_config()))
    (tmp_path / "ck_merged").mkdir()
    (tmp_path / "taken").mkdir()
    calls = []
    monkeypatch.setattr(commands, "_stage_function",
                        lambda module, name, what: lambda *a, **kw: calls.append((a, kw)) or tmp_path / "out")
    p = Scripted(["6", "2", "ck", "", "n", "taken", "n", "fresh",      # declined twice, then a new folder
                  "6", "2", "ck", "", "y", "0"])                       # overwrite confirmed
    assert menu.run_menu(p) == 0 and p.answers == []
    assert "error:" not in "".join(p.lines)
    assert calls == [(("ck", "fresh"), {"force": False}), (("ck", "ck_merged"), {"force": True})]


@pytest.mark.parametrize("cls, kind, stage", [(SFTConfig, "sft", "run_sft"), (RLHFConfig, "rlhf", "run_rlhf")])
def test_sft_and_rlhf_runs_started_from_the_menu_can_be_resumed_there(cls, kind, stage, tmp_path, monkeypatch):
    """Menu 3 and 4 offer the spec's resume steps as menu 2 does (an interrupted SFT or RLHF run could be
    resumed only with the CLI): the checkpoint (the stage's output_dir/latest by default), max_steps to
    extend, the optimizer state; the stage gets the checkpoint's config with the new max_steps."""
    import torch
    from tests.conftest import tiny_config

    from llmlab.checkpoint import save_checkpoint
    from llmlab.cli import commands
    from llmlab.model import build_model

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    trained = cls(max_steps=4, warmup_steps=1, output_dir=cls().output_dir)
    save_checkpoint(tmp_path / trained.output_dir / "latest", build_model(tiny_config()), kind=kind,
                    train_config=trained)
    calls = []
    monkeypatch.setattr(commands, "_stage_function",
                        lambda module, name, what: lambda *a, **kw: calls.append((name, a, kw)) or tmp_path)
    action = "3" if cls is SFTConfig else "4"
    p = Scripted([action, "y", "", "9", "n", "", "", "0"])  # resume, default folder, max_steps 9, fresh optimizer
    assert menu.run_menu(p) == 0 and p.answers == []
    assert "error:" not in "".join(p.lines)
    assert f"Checkpoint folder [{cls().output_dir}/latest]: " in p.asked
    [(name, (cfg,), kw)] = calls
    assert name == stage and cfg == trained.with_overrides({"max_steps": 9})
    assert kw["resume"] == f"{cls().output_dir}/latest" and kw["load_optimizer_state"] is False
