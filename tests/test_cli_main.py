"""The `llm-lab` command table: --help everywhere, one-line errors with exit 2, configure/estimate, and
inference (generate, chat REPL commands, streaming decode) on a tiny checkpoint, all in-process."""

import copy
import io
import json
import shutil

import pytest
import torch
from tests.conftest import tiny_config

from llmlab.checkpoint import save_checkpoint
from llmlab.cli import chat, main
from llmlab.config import ModelConfig, TrainConfig
from llmlab.errors import ConfigError
from llmlab.model import build_model
from llmlab.model.estimate import count_parameters


def run(argv, capsys):
    code = main.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def all_commands():
    return [name.split(" ") for name in main.COMMANDS]


@pytest.mark.parametrize("words", all_commands(), ids=lambda w: "-".join(w))
def test_every_subcommand_help_works_and_lists_config_fields(words, capsys):
    code, out, _ = run([*words, "--help"], capsys)
    assert code == 0 and "usage: llm-lab " + " ".join(words) in out
    cmd = main.COMMANDS[" ".join(words)]
    if cmd.config is not None:  # generated from the fields' help metadata
        for name, text in cmd.config.field_help().items():
            assert f"  {name}=" in out
            assert text.split()[0] in out


def test_top_level_help_lists_every_command(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for name in {n.split(" ")[0] for n in main.COMMANDS}:
        assert name in out


@pytest.mark.parametrize("argv", [
    ["pretrain", "bogus_key=1"],
    ["sft", "max_step=3"],
    ["rlhf", "algorithm=dpo", "beta_typo=0.1"],
    ["configure", "d_modle=64"],
    ["estimate", "--model-config", "nope.json"],
    ["pretrain", "--config", "does/not/exist.json"],
    ["configure", "n_heads=5"],
    ["pretrain", "--no-such-flag"],
    ["generate", "--checkpoint", "nowhere", "--prompt", "hi"],
    ["merge-lora", "--adapter", "a", "--out", "o"],
    ["chat", "--checkpoint", "x", "--temperature", "-1"],
])
def test_user_errors_are_one_line_and_exit_2(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err + out


def test_unknown_override_names_the_key_and_the_allowed_ones(capsys):
    code, _, err = run(["pretrain", "bogus_key=1"], capsys)
    assert code == 2 and "'bogus_key'" in err and "max_steps" in err


def test_debug_env_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("LLMLAB_DEBUG", "1")
    with pytest.raises(Exception, match="bogus_key"):
        main.main(["pretrain", "bogus_key=1"])


def test_keyboard_interrupt_exits_130_with_a_message(monkeypatch, capsys):
    def boom(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(main.COMMANDS, "configure", main.COMMANDS["configure"].__class__(
        "x", boom, ModelConfig, main._args_configure))
    code, _, err = run(["configure"], capsys)
    assert code == 130 and "interrupted" in err


def test_config_file_then_overrides_then_saved(tmp_path, capsys):
    src = tmp_path / "in.json"
    tiny_config().save(src)
    out = tmp_path / "model_config.json"
    code, printed, _ = run(["configure", "--config", str(src), "--out", str(out), "n_layers=3", "d_ff=96"], capsys)
    assert code == 0
    cfg = ModelConfig.load(out)
    assert (cfg.n_layers, cfg.d_ff, cfg.d_model) == (3, 96, 32)
    assert f"{count_parameters(cfg):,}" in printed  # the estimate is printed


def test_estimate_reads_model_and_training_overrides(tmp_path, capsys):
    tiny_config().save(tmp_path / "m.json")
    TrainConfig(batch_size=2, datasets=["x"]).save(tmp_path / "t.json")
    code, out, _ = run(["estimate", "--model-config", str(tmp_path / "m.json"), "--config", str(tmp_path / "t.json"),
                        "n_layers=4", "batch_size=8", "optimizer=lion"], capsys)
    assert code == 0
    assert f"{count_parameters(tiny_config(n_layers=4)):,}" in out
    assert "batch 8 x 64 tokens, lion" in out


def test_estimate_for_rlhf_uses_each_algorithm_s_sequence_length():
    """DPO scores whole pairs up to max_seq_len (it generates nothing); PPO/GRPO a prompt plus its reply."""
    from llmlab.cli.commands import stage_estimate_args
    from llmlab.config import RLHFConfig

    model = tiny_config(max_seq_len=512)
    for algo, want in (("dpo", 96), ("grpo", 40 + 24)):
        stage = RLHFConfig(algorithm=algo, max_seq_len=96, max_prompt_len=40, max_new_tokens=24, mini_batch_size=2)
        got = stage_estimate_args(stage, model)
        assert got["seq_len"] == want and got["batch_size"] == (4 if algo == "dpo" else 2), algo
    assert stage_estimate_args(RLHFConfig(algorithm="dpo", max_seq_len=None), model)["seq_len"] == 512


# --------------------------------------------------------------------------------------------------
# Inference on a tiny checkpoint with a trained tokenizer
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(macbeth_tok_dir, tmp_path_factory):
    from llmlab.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(macbeth_tok_dir))
    root = tmp_path_factory.mktemp("ck")
    torch.manual_seed(0)
    model = build_model(tiny_config(vocab_size=len(tok), tokenizer_name=str(macbeth_tok_dir),
                                    max_seq_len=128))
    for kind in ("pretrain", "sft"):
        save_checkpoint(root / kind, model, kind=kind, tokenizer=tok)
    return root, model, tok


def test_generate_greedy_matches_the_engine_and_uses_raw_text_for_base_models(checkpoints, capsys):
    from llmlab.generate import generate

    root, model, tok = checkpoints
    code, out, _ = run(["generate", "--checkpoint", str(root / "pretrain"), "--prompt", "To be, or not",
                        "--temperature", "0", "--max-new-tokens", "12"], capsys)
    assert code == 0
    ids = tok("To be, or not", add_special_tokens=False)["input_ids"]
    seq = generate(model, torch.tensor([ids]), max_new_tokens=12, temperature=0, eos_token_id=tok.eos_token_id)
    new = [t for t in seq[0, len(ids):].tolist() if t != tok.eos_token_id]
    assert out == tok.decode(new, skip_special_tokens=True) + "\n"


@pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="needs a C++ compiler")
def test_generate_compile_flag_compiles_and_gives_the_same_greedy_text(checkpoints, capsys, monkeypatch):
    root, _, _ = checkpoints
    args = ["generate", "--checkpoint", str(root / "pretrain"), "--prompt", "To be, or not", "--temperature", "0",
            "--max-new-tokens", "12"]
    code, eager, _ = run(args, capsys)
    compiled_models = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled_models.append(model) or real_compile(model, **kw))
    code_c, compiled, _ = run(args + ["--compile"], capsys)
    assert code == code_c == 0
    assert len(compiled_models) == 1
    assert compiled == eager and eager.strip()


def test_sft_checkpoints_chat_through_the_template_and_keep_history(checkpoints):
    root, _, tok = checkpoints
    session = chat.ChatSession.open(str(root / "sft"), settings=chat.Settings(temperature=0, max_new_tokens=5))
    assert session.chat
    ids = session.prompt_ids("hello")
    assert tok.decode(ids).startswith("<|im_start|>user\nhello<|im_end|>") and tok.decode(ids).endswith(
        "<|im_start|>assistant\n")
    answer = session.reply("hello", stream=io.StringIO())
    assert session.history == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": answer}]
    second = tok.decode(session.prompt_ids("again"))
    assert second.count("<|im_start|>user") == 2  # multi-turn: the first exchange is in the context
    raw = chat.ChatSession.open(str(root / "pretrain"))
    assert not raw.chat and raw.prompt_ids("hello") == tok("hello", add_special_tokens=False)["input_ids"]


def test_raw_prompts_keep_the_tokenizers_own_bos_and_drop_an_appended_eos():
    # an imported Llama-style tokenizer puts BOS before the text (transformers' tokenizer(text) and llama.cpp
    # do): raw completion starts from it too; an EOS the tokenizer appends would end the text to continue
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "hello": 2, "world": 3}, unk_token="</s>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                           special_tokens=[("<s>", 0), ("</s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    assert tok("hello world")["input_ids"] == [0, 2, 3, 1]
    assert chat.ChatSession(None, tok, chat=False).prompt_ids("hello world") == [0, 2, 3]
    assert chat.raw_prompt_ids(tok, "") == []  # still refused as an empty prompt by reply()


def test_system_message_a_template_refuses_is_one_line_naming_system(checkpoints, tmp_path, capsys):
    # Gemma/Mistral-style templates raise on a system role: the REPL left with exit 2 at the first message
    from llmlab.data.tokenizer import CHATML_TEMPLATE

    root, model, tok = checkpoints
    no_system = copy.copy(tok)
    no_system.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                               "supported') }}{% endif %}{% if messages[-1]['content'] == 'boom' %}"
                               "{{ raise_exception('boom refused') }}{% endif %}" + CHATML_TEMPLATE)
    save_checkpoint(tmp_path / "sft", model, kind="sft", tokenizer=no_system)
    with pytest.raises(ConfigError, match=r"^--system: .*System role not supported.*drop --system"):
        chat.ChatSession.open(str(tmp_path / "sft"), system="be brief")
    code, _, err = run(["generate", "--checkpoint", str(tmp_path / "sft"), "--prompt", "hi", "--system", "x"], capsys)
    assert code == 2 and err.startswith("error: --system:") and err.count("\n") == 1
    session = chat.ChatSession.open(str(tmp_path / "sft"), settings=chat.Settings(max_new_tokens=2))
    assert session.prompt_ids("hi")  # without --system it chats
    lines, out = iter(["boom", "hi", "/exit"]), io.StringIO()
    session.repl(input_fn=lambda _prompt: next(lines), out=out)  # a message the template refuses: the REPL goes on
    assert "error: chat template: cannot render the conversation (boom refused)" in out.getvalue()
    assert out.getvalue().count("model> ") == 1 and out.getvalue().endswith("bye\n")


def test_history_is_trimmed_to_fit_the_context(checkpoints):
    root, _, _ = checkpoints
    session = chat.ChatSession.open(str(root / "sft"), settings=chat.Settings(max_new_tokens=32))
    session.history = [{"role": "user", "content": "word " * 20}, {"role": "assistant", "content": "ok"}] * 5
    ids = session.prompt_ids("last question")
    assert len(ids) <= 128 - 32 and len(session.history) < 10


def test_repl_commands_change_settings_and_reject_bad_values(checkpoints):
    root, _, _ = checkpoints
    session = chat.ChatSession.open(str(root / "sft"), settings=chat.Settings(temperature=0, max_new_tokens=3))
    lines = iter(["/temp 0.3", "/top_p 2", "/top_p 0.5", "/max_tokens 4", "/max_tokens x", "/bogus", "hi",
                  "/reset", "/exit"])
    out = io.StringIO()
    session.repl(input_fn=lambda _prompt: next(lines), out=out)
    text = out.getvalue()
    assert session.settings == chat.Settings(temperature=0.3, top_p=0.5, top_k=0, max_new_tokens=4)
    assert "error: top_p: must be in (0, 1]" in text and "error: max_new_tokens: expected int" in text
    assert "error: unknown command /bogus" in text and "model> " in text
    assert session.history == [] and text.rstrip().endswith("bye")


CAP = "notice: the reply is limited to"


def test_capped_reply_is_said_once_a_session_then_only_when_the_cap_drops_a_lot(checkpoints):
    """max_new_tokens at the model's context (the README's tiny model: 256 and 256) caps every reply by a
    little: said the first time, not on every turn; again when /max_tokens changes or the cap falls to 3/4."""
    root, _, _ = checkpoints
    session = chat.ChatSession.open(str(root / "sft"), settings=chat.Settings(temperature=0, max_new_tokens=128))
    lines = iter(["hi", "hi", "hi", "/exit"])
    out = io.StringIO()
    session.repl(input_fn=lambda _prompt: next(lines), out=out)
    text = out.getvalue()
    assert text.count(CAP) == 1 and text.count("model> ") == 3
    assert "model> notice" not in text  # the notice on its own line, before the reply's "model> "
    session.history = [{"role": "user", "content": "the king " * 3}, {"role": "assistant", "content": "ok"}]
    first = int(text.split(CAP)[1].split()[0])
    assert 128 - len(session.prompt_ids("hi")) <= 0.75 * first and len(session.history) == 2  # history kept
    grown = io.StringIO()
    session.reply("hi", stream=io.StringIO(), notices=grown)  # the history grew: a much smaller cap is news
    assert grown.getvalue().count(CAP) == 1
    session.reply("hi", stream=io.StringIO(), notices=(again := io.StringIO()))
    assert again.getvalue() == ""
    session.settings = chat.Settings(temperature=0, max_new_tokens=127)  # /max_tokens: a new length asked
    session.reply("hi", stream=io.StringIO(), notices=(asked := io.StringIO()))
    assert asked.getvalue().count(CAP) == 1


def test_dropping_the_oldest_exchanges_is_said_once_a_session(checkpoints):
    """A conversation that outgrows the context loses its oldest exchanges on every later turn: said the
    first time (it was silent), not on every turn."""
    root, _, _ = checkpoints
    session = chat.ChatSession.open(str(root / "sft"), settings=chat.Settings(temperature=0, max_new_tokens=8))
    long = [{"role": "user", "content": "the king " * 6}, {"role": "assistant", "content": "ok ok"}]
    session.history = long * 8  # more than the 64-token context holds
    session.reply("hi", stream=io.StringIO(), notices=(first := io.StringIO()))
    assert "notice: the oldest " in first.getvalue() and "exchange(s) of the conversation are left out" in \
        first.getvalue()
    assert 0 < len(session.history) < 2 * 8 + 2
    session.history += long * 8
    session.reply("hi", stream=io.StringIO(), notices=(second := io.StringIO()))
    assert "the oldest" not in second.getvalue()


def test_generate_still_says_the_capped_reply(checkpoints, capsys):
    root, _, _ = checkpoints
    code, _, err = run(["generate", "--checkpoint", str(root / "pretrain"), "--prompt", "To be", "--temperature",
                        "0", "--max-new-tokens", "128"], capsys)
    assert code == 0 and err.count(CAP) == 1


def test_help_in_the_repl_lists_every_command_as_chat_help_does(checkpoints, capsys):
    root, _, _ = checkpoints
    session = chat.ChatSession.open(str(root / "sft"))
    lines = iter(["/help", "/bogus", "/exit"])
    out = io.StringIO()
    session.repl(input_fn=lambda _prompt: next(lines), out=out)
    text = out.getvalue()
    assert main.CHAT_COMMANDS_HELP in text  # the one list: what chat --help ends with
    for name in ("/reset", "/temp", "/temperature", "/top_p", "/top_k", "/max_tokens", "/help", "/exit", "/quit"):
        assert name in text.split(main.CHAT_COMMANDS_HELP.splitlines()[0])[1]
    assert "error: unknown command /bogus; /help lists the commands" in text
    assert main.main(["chat", "--help"]) == 0
    assert main.CHAT_COMMANDS_HELP in capsys.readouterr().out


@pytest.mark.parametrize("compile_on", [True, False])
def test_compile_says_once_that_it_compiles_before_the_first_reply(compile_on, checkpoints, monkeypatch):
    import llmlab.generate as gen

    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)  # the compiled path, run eagerly
    monkeypatch.setattr(gen, "check_compiler", lambda device: None)
    root, _, _ = checkpoints
    session = chat.ChatSession.open(str(root / "sft"), settings=chat.Settings(temperature=0, max_new_tokens=3,
                                                                               compile=compile_on))
    lines = iter(["hi", "hello", "/exit"])
    out = io.StringIO()
    session.repl(input_fn=lambda _prompt: next(lines), out=out)
    text = out.getvalue()
    assert text.count(chat.COMPILE_NOTICE) == (1 if compile_on else 0)
    if compile_on:
        assert text.index(chat.COMPILE_NOTICE) < text.index("model> ")


def test_generate_compile_says_it_compiles_on_stderr(checkpoints, capsys, monkeypatch):
    import llmlab.generate as gen

    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    monkeypatch.setattr(gen, "check_compiler", lambda device: None)
    root, _, _ = checkpoints
    code, out, err = run(["generate", "--checkpoint", str(root / "pretrain"), "--prompt", "To be", "--temperature",
                          "0", "--max-new-tokens", "4", "--compile"], capsys)
    assert code == 0 and err.count(chat.COMPILE_NOTICE) == 1 and chat.COMPILE_NOTICE not in out


def test_ctrl_c_at_the_prompt_leaves(checkpoints):
    root, _, _ = checkpoints
    session = chat.ChatSession.open(str(root / "sft"))

    def interrupt(_prompt):
        raise KeyboardInterrupt

    out = io.StringIO()
    session.repl(input_fn=interrupt, out=out)
    assert out.getvalue().rstrip().endswith("bye")


def test_adapter_folder_is_applied_to_the_base(checkpoints, tmp_path):
    from peft import LoraConfig, get_peft_model

    root, model, _ = checkpoints
    peft_model = get_peft_model(build_model(model.config), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                                      init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    loaded, _, kind = chat.load_for_inference(str(root / "pretrain"), adapter=str(tmp_path / "adapter"))
    assert kind == "adapter"
    key = "layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[key], loaded.state_dict()[key])  # W + BA alpha/r, merged
    assert torch.equal(model.state_dict()["layers.0.self_attn.k_proj.weight"],
                       loaded.state_dict()["layers.0.self_attn.k_proj.weight"])  # untargeted layers unchanged
    assert chat.ChatSession.open(str(root / "pretrain"), adapter=str(tmp_path / "adapter")).chat


def test_stream_decoder_holds_partial_characters(checkpoints):
    _, _, tok = checkpoints
    text = "naïve café — ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    dec = chat.StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


def test_a_reply_ending_inside_a_character_prints_what_it_returns(checkpoints, monkeypatch):
    # a reply capped after the first byte of a character: the held byte is printed at the end (as decode
    # gives it), not dropped, so the printed reply is the returned one (and transformers' decode)
    import llmlab.generate

    root, _, tok = checkpoints
    first_byte = tok.convert_tokens_to_ids("Ã")  # byte 0xC3, the start of "é" in byte-level BPE
    monkeypatch.setattr(llmlab.generate, "generate_tokens", lambda *a, on_tokens, **kw: on_tokens(
        torch.tensor([first_byte])))
    session = chat.ChatSession.open(str(root / "pretrain"))
    out = io.StringIO()
    answer = session.reply("hi", stream=out)
    assert answer == tok.decode([first_byte]) == "\ufffd" and out.getvalue() == answer + "\n"


def test_configs_can_be_read_back_from_the_output(tmp_path, capsys):
    out = tmp_path / "m.json"
    assert run(["configure", "--out", str(out), "d_model=64", "n_heads=4", "n_kv_heads=2"], capsys)[0] == 0
    assert json.loads(out.read_text())["d_model"] == 64


def test_pretrain_then_resume_from_the_checkpoints_own_config(macbeth_tok_dir, tmp_path, capsys):
    from llmlab.data.tokenizer import load_tokenizer

    tok_dir = str(macbeth_tok_dir)
    tiny_config(vocab_size=len(load_tokenizer(tok_dir)), tokenizer_name=tok_dir).save(tmp_path / "m.json")
    out = tmp_path / "ck"
    code, printed, err = run(["pretrain", "--model-config", str(tmp_path / "m.json"), "max_steps=2", "warmup_steps=0",
                              "batch_size=2", "gradient_accumulation_steps=1", "eval_every=2", "eval_steps=1",
                              "save_every=2", "save_best_only=false", "val_fraction=0.2", 'datasets=["bundled:shakespeare | macbeth"]',
                              f"output_dir={out}"], capsys)
    assert code == 0, err
    assert "Model size and training memory" in printed  # the estimate comes first
    code, _, err = run(["pretrain", "--resume", str(out / "latest"), "max_steps=3"], capsys)
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 3
    saved = json.loads((out / "latest" / "training_config.json").read_text())
    assert saved["max_steps"] == 3 and saved["batch_size"] == 2  # the rest came from the checkpoint
    code, _, err = run(["sft", "--resume", str(out / "latest")], capsys)
    assert code == 2 and "not SFTConfig" in err


def test_configure_sizes_vocab_from_the_tokenizer_and_rounds_up(macbeth_tok_dir, tmp_path):
    from llmlab.config import ModelConfig
    from llmlab.data.tokenizer import load_tokenizer

    n = len(load_tokenizer(str(macbeth_tok_dir)))
    for extra, expected in (([], n), (["--vocab-multiple-of", "64"], -(-n // 64) * 64)):
        out = tmp_path / f"m{len(extra)}.json"
        assert main.main(["configure", "--out", str(out), "--vocab-from-tokenizer", *extra,
                          f"tokenizer_name={macbeth_tok_dir}", "d_model=32", "n_heads=4", "n_kv_heads=2",
                          "d_ff=64", "n_layers=2"]) == 0
        assert ModelConfig.load(out).vocab_size == expected
    assert expected % 64 == 0 and expected > n  # 300 tokens + specials: rounding adds rows


def test_inference_defaults_are_the_specs():
    assert (chat.Settings().temperature, chat.Settings().top_p, chat.Settings().max_new_tokens) == (0.7, 0.9, 256)
    for argv in (["generate", "--checkpoint", "x", "--prompt", "p"], ["chat", "--checkpoint", "x"]):
        settings = chat.settings_from_args(main.build_parser().parse_args(argv))
        assert settings == chat.Settings(temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=256), argv


def test_generate_passes_top_p_and_top_k_to_the_sampler(checkpoints, capsys, monkeypatch):
    import llmlab.generate

    root, _, _ = checkpoints
    seen = []
    real = llmlab.generate.generate_tokens

    def spy(model, prompts, **kw):
        seen.append({k: kw[k] for k in ("temperature", "top_p", "top_k", "max_new_tokens")})
        return real(model, prompts, **kw)

    monkeypatch.setattr(llmlab.generate, "generate_tokens", spy)
    code, _, err = run(["generate", "--checkpoint", str(root / "pretrain"), "--prompt", "To be", "--top-p", "0.5",
                        "--top-k", "3", "--max-new-tokens", "2", "--seed", "1"], capsys)
    assert code == 0, err
    assert seen == [{"temperature": 0.7, "top_p": 0.5, "top_k": 3, "max_new_tokens": 2}]


def test_adapter_goes_on_top_of_the_checkpoints_own_adapter(checkpoints, tmp_path):
    from peft import LoraConfig, get_peft_model

    from llmlab.checkpoint import load_model
    from llmlab.lora import save_adapter, save_lora_checkpoint

    root, model, tok = checkpoints
    first = get_peft_model(build_model(model.config), LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"],
                                                                 init_lora_weights=False))
    save_lora_checkpoint(tmp_path / "sft_lora", first, kind="sft", tokenizer=tok)
    start = load_model(tmp_path / "sft_lora")  # base + its adapter, merged: where a second LoRA run starts
    second = get_peft_model(start, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    save_adapter(second, tmp_path / "second")
    loaded, _, _ = chat.load_for_inference(str(tmp_path / "sft_lora"), adapter=str(tmp_path / "second"))
    x = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        want = second.eval()(x)
        assert (loaded(x) - want).abs().max() < 1e-5
        assert (load_model(tmp_path / "sft_lora", with_adapter=False)(x) - want).abs().max() > 1e-3
