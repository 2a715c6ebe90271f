"""Bad input at the edges gives a one-line error naming the field or flag and the fix, never a torch traceback,
and never loses work: empty prompts, --device, over-long prompts, LLMLAB_THREADS, corrupt checkpoint JSON,
existing --out folders, Hugging Face folders passed as checkpoints, pickle-only transformers folders."""

import copy
import io
import json

import pytest
import torch
from tests.conftest import tiny_config

from llmlab.checkpoint import load_model, read_checkpoint, save_checkpoint
from llmlab.cli import chat
from llmlab.cli.main import main
from llmlab.config import TrainConfig
from llmlab.errors import CheckpointError, ConfigError
from llmlab.model import build_model


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def ckpts(macbeth_tok_dir, tmp_path_factory):
    """A raw (pretrain) and a chat (sft) checkpoint with a 64-token context."""
    from llmlab.data.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("ck")
    tok = load_tokenizer(str(macbeth_tok_dir))
    torch.manual_seed(0)
    model = build_model(tiny_config(vocab_size=len(tok), max_seq_len=64))
    save_checkpoint(root / "pretrain", model, kind="pretrain", tokenizer=tok)
    save_checkpoint(root / "sft", model, kind="sft", tokenizer=tok)
    return root


# ---- 1. empty prompt ------------------------------------------------------------------------------


def test_empty_prompt_row_is_a_config_error_not_an_index_error():
    from llmlab.generate import generate_tokens

    m = build_model(tiny_config())
    with pytest.raises(ConfigError, match=r"^prompt: empty;"):
        generate_tokens(m, [[]], max_new_tokens=2)
    with pytest.raises(ConfigError, match=r"prompt: empty \(row 1\)"):
        generate_tokens(m, [[1, 2], []], max_new_tokens=2)


def test_cli_generate_with_an_empty_raw_prompt_is_one_line(ckpts, capsys):
    code, _, err = run(["generate", "--checkpoint", str(ckpts / "pretrain"), "--prompt", "", "--raw"], capsys)
    assert code == 2 and "prompt: empty" in one_line_error(err)


def test_a_token_id_outside_the_vocabulary_is_a_config_error_not_an_index_error(macbeth_tok_dir, tmp_path, capsys):
    # a tokenizer from a larger model: its ids past vocab_size failed deep inside the embedding
    from llmlab.data.tokenizer import load_tokenizer
    from llmlab.generate import generate_tokens

    m = build_model(tiny_config(vocab_size=64))
    with pytest.raises(ConfigError, match=r"^prompt: token id 64 \(row 1\) is outside the model's vocabulary"):
        generate_tokens(m, [[1, 2], [3, 64]], max_new_tokens=2)
    save_checkpoint(tmp_path / "small", m, kind="pretrain", tokenizer=load_tokenizer(str(macbeth_tok_dir)))
    code, _, err = run(["generate", "--checkpoint", str(tmp_path / "small"), "--prompt", "To be, or not to be",
                        "--raw", "--max-new-tokens", "5"], capsys)
    assert code == 2 and "vocab_size 64" in one_line_error(err)


# ---- 2. --device -----------------------------------------------------------------------------------


def test_pick_device_accepts_known_names_and_refuses_others(monkeypatch):
    from llmlab.device import pick_device

    assert pick_device("cpu") == torch.device("cpu") and pick_device(" CPU ").type == "cpu"
    assert pick_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ConfigError, match=r"^device: 'gpu' is not a device; use auto, cpu, cuda"):
        pick_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^device: 'cuda' but .* sees no CUDA GPU; use auto or cpu"):
        pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"device: 'cuda:3' but there are 1 CUDA device"):
        pick_device("cuda:3")


@pytest.mark.parametrize("device", ["gpu", "cuda:x"])
def test_cli_bad_device_is_one_line_before_loading(device, capsys, tmp_path):
    # the flag is checked before the checkpoint is read: a missing checkpoint does not hide it
    code, _, err = run(["generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "hi",
                        "--device", device], capsys)
    assert code == 2 and "device:" in one_line_error(err)


# ---- 3. over-long prompts --------------------------------------------------------------------------


def test_raw_prompt_longer_than_the_context_still_generates_with_a_notice(ckpts):
    session = chat.ChatSession.open(str(ckpts / "pretrain"), settings=chat.Settings(temperature=0, max_new_tokens=8))
    notices = io.StringIO()
    session.reply("the king " * 60, stream=io.StringIO(), notices=notices)  # far over 64 tokens
    text = notices.getvalue()
    assert text.count("\n") == 1 and "notice: the prompt" in text and "cut to its last 63 tokens" in text
    assert "reply is limited to 1 tokens (max_new_tokens 8)" in text
    quiet = io.StringIO()
    session.reply("the king", stream=io.StringIO(), notices=quiet)
    assert quiet.getvalue() == ""


def test_capped_reply_is_said_in_the_library_output_too():
    from llmlab.generate import generate_tokens

    out = generate_tokens(build_model(tiny_config()), [list(range(1, 71))], max_new_tokens=9, temperature=0)
    assert out.prompt_tokens_cut == 70 - 63 and out.new_tokens_allowed == 1


def test_chat_message_longer_than_the_context_is_refused_and_the_history_kept(ckpts):
    session = chat.ChatSession.open(str(ckpts / "sft"), settings=chat.Settings(temperature=0, max_new_tokens=4))
    session.history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(ConfigError, match=r"^message: \d+ tokens with the chat template, .*max_seq_len\) is 64"):
        session.reply("the king " * 60)
    assert len(session.history) == 2  # nothing dropped by the refused message
    lines = iter(["the king " * 60, "/exit"])
    out = io.StringIO()
    session.repl(input_fn=lambda _p: next(lines), out=out)  # the REPL says so and goes on
    assert "error: message:" in out.getvalue() and out.getvalue().rstrip().endswith("bye")


# ---- 4. threads ------------------------------------------------------------------------------------


def test_llmlab_threads_sets_torch_threads_and_a_bad_value_is_one_line(monkeypatch, capsys):
    from llmlab.device import available_cores, set_threads

    assert available_cores() >= 1
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("LLMLAB_THREADS", "1")
        assert set_threads() == 1 and torch.get_num_threads() == 1
        assert set_threads() == 1 and torch.get_num_threads() == 1  # idempotent
        monkeypatch.setenv("LLMLAB_THREADS", "two")
        with pytest.raises(ConfigError, match=r"^LLMLAB_THREADS: 'two' is not a positive integer"):
            set_threads()
        code, _, err = run(["estimate"], capsys)  # the CLI applies it before any command
        assert code == 2 and "LLMLAB_THREADS" in one_line_error(err)
    finally:
        torch.set_num_threads(before)


# ---- 5. corrupt checkpoint JSON --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llmlab.json", "training_config.json", "trainer_state.json"])
def test_truncated_checkpoint_json_is_a_one_line_checkpoint_error(tmp_path, name):
    folder = tmp_path / "ck"
    save_checkpoint(folder, build_model(tiny_config()), trainer_state={"step": 3}, train_config=TrainConfig())
    f = folder / name
    f.write_text(f.read_text()[:12])
    with pytest.raises(CheckpointError, match=rf"{name}: not valid JSON .*use another checkpoint") as e:
        ckpt = read_checkpoint(folder)
        load_model(folder)
        ckpt.training_config()
        ckpt.trainer_state()
    assert "\n" not in str(e.value)


def test_merge_of_a_checkpoint_with_broken_training_config_is_one_line(tmp_path):
    from llmlab.config import SFTConfig
    from llmlab.lora import apply_lora, merge_full_checkpoint, save_lora_checkpoint

    cfg = SFTConfig(use_lora=True, lora_preset="minimal", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                    datasets=["bundled:sft"], max_steps=1, warmup_steps=0)
    model = apply_lora(copy.deepcopy(build_model(tiny_config())), cfg, verbose=False)
    save_lora_checkpoint(tmp_path / "sft", model, kind="sft", train_config=cfg, trainer_state={"step": 1})
    (tmp_path / "sft" / "training_config.json").write_text('{"use_lora": tr')
    with pytest.raises(CheckpointError, match=r"training_config.json: not valid JSON"):
        merge_full_checkpoint(tmp_path / "sft", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


# ---- 6. existing --out folders ---------------------------------------------------------------------


def test_tokenizer_train_and_data_prepare_refuse_an_existing_out_without_force(macbeth_tok_dir, tmp_path,
                                                                               capsys):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "model.safetensors").write_text("precious")
    for argv in (["tokenizer", "train", "--datasets", "bundled:shakespeare", "--out", str(out)],
                 ["data", "prepare", "--datasets", "bundled:shakespeare", "--tokenizer", str(macbeth_tok_dir),
                  "--out", str(out)]):
        code, _, err = run(argv, capsys)
        assert code == 2 and "--out:" in one_line_error(err) and "--force" in err
    assert (out / "model.safetensors").read_text() == "precious"


def test_tokenizer_train_with_force_replaces_the_folder(tmp_path, capsys):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code, _, _ = run(["tokenizer", "train", "--datasets", "bundled:shakespeare | macbeth", "--vocab-size", "300",
                      "--max-docs", "20", "--out", str(out), "--force"], capsys)
    assert code == 0 and (out / "tokenizer.json").is_file() and not (out / "old.txt").exists()


def test_configure_refuses_an_existing_out_without_force_and_overwrites_with_it(tmp_path, capsys):
    """Like tokenizer train, data prepare and the exports: an existing --out is one line naming --force and is
    left as it was (checked before the tokenizer loads or anything prints); --force overwrites it."""
    out = tmp_path / "model_config.json"
    out.write_text("precious")
    code, printed, err = run(["configure", "--vocab-from-tokenizer", "--out", str(out), "d_model=64", "n_heads=4",
                              "n_kv_heads=2", "tokenizer_name=./no/such/tokenizer"], capsys)
    assert code == 2 and printed == "" and out.read_text() == "precious"
    assert one_line_error(err) == (f"error: --out: {out} already exists; pass --force (force=True) to overwrite it "
                                   f"or choose another --out\n")
    code, printed, _ = run(["configure", "--out", str(out), "d_model=64", "n_heads=4", "n_kv_heads=2", "--force"],
                           capsys)
    assert code == 0 and json.loads(out.read_text())["d_model"] == 64 and "saved model config to" in printed


# ---- 7. a Hugging Face folder passed as a checkpoint -----------------------------------------------


def test_hugging_face_folder_as_checkpoint_says_import_hf(tmp_path, capsys):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                    "hidden_size": 64, "num_hidden_layers": 2}))
    with pytest.raises(CheckpointError, match=r"a Hugging Face model folder \(llama\).*llm-lab import-hf"):
        read_checkpoint(folder)
    code, _, err = run(["generate", "--checkpoint", str(folder), "--prompt", "hi"], capsys)
    assert code == 2 and "import-hf" in one_line_error(err) and "unknown key" not in err


# ---- 8. transformers folders with only pickle weights ----------------------------------------------


@pytest.fixture
def pickle_only(tmp_path):
    """A local transformers Llama folder whose weights are only pytorch_model.bin (never to be unpickled)."""
    from transformers import LlamaConfig

    folder = tmp_path / "bin-only"
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=64).save_pretrained(folder)
    torch.save({"model.embed_tokens.weight": torch.zeros(64, 16)}, folder / "pytorch_model.bin")
    return folder


def _no_unpickling(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("torch.load was called on a pickle file")

    monkeypatch.setattr(torch, "load", refuse)


def test_pickle_only_folder_is_refused_by_import_and_reward_model(pickle_only, monkeypatch):
    from llmlab.interop.hf_io import load_hf
    from llmlab.rlhf.rewards import RewardModel

    _no_unpickling(monkeypatch)
    with pytest.raises(CheckpointError, match=r"only pickle files \(pytorch_model.bin\).*safetensors"):
        load_hf(str(pickle_only))
    with pytest.raises(ConfigError, match=r"^reward_model_name: .*only pickle files"):
        RewardModel(str(pickle_only))


def test_from_pretrained_is_asked_for_safetensors_only(pickle_only, monkeypatch):
    """Past the folder check (as for a hub model), transformers itself is told use_safetensors=True."""
    import llmlab.interop.hf_io as hf_io

    _no_unpickling(monkeypatch)
    monkeypatch.setattr(hf_io, "pickle_only_folder", lambda _s: False)
    with pytest.raises(CheckpointError, match=r"cannot load the weights .*model.safetensors"):
        hf_io.load_hf(str(pickle_only), with_tokenizer=False)


def test_chat_turns_reuse_the_prompt_ids_and_the_sessions_stop_ids(ckpts, monkeypatch):
    import llmlab.data.tokenizer as tokenizer_module

    found = []
    real_stops = tokenizer_module.stop_token_ids
    monkeypatch.setattr(tokenizer_module, "stop_token_ids", lambda tok: found.append(1) or real_stops(tok))
    session = chat.ChatSession.open(str(ckpts / "sft"), settings=chat.Settings(temperature=0, max_new_tokens=2))
    encoded, real_prompt = [], session.prompt_ids
    session.prompt_ids = lambda text: encoded.append(text) or real_prompt(text)
    lines = iter(["the king", "the queen", "the thane", "/exit"])
    session.repl(input_fn=lambda _p: next(lines), out=io.StringIO())
    assert encoded == ["the king", "the queen", "the thane"]  # once per turn, not a check and again in reply
    assert len(found) == 1  # stop ids (disk read + probe render) once per session, not per turn


@pytest.mark.parametrize("command", [["generate", "--prompt", "the king"], ["chat"]])
def test_system_message_on_a_raw_completion_default_is_refused_not_dropped(ckpts, command, capsys):
    code, out, err = run([command[0], "--checkpoint", str(ckpts / "pretrain"), *command[1:], "--system", "Be brief",
                          "--max-new-tokens", "2"], capsys)
    assert code == 2 and "--system" in one_line_error(err) and "--chat" in err and out == ""


def test_stage_main_applies_the_thread_setting_like_the_cli(monkeypatch, capsys):
    import llmlab.device
    from llmlab.config import TrainConfig
    from llmlab.train.stage import stage_main

    calls = []
    monkeypatch.setattr(llmlab.device, "set_threads", lambda n=None: calls.append(n) or 1)
    assert stage_main([], TrainConfig, lambda *a, **k: None, prog="p", description="d") == 2  # no --config
    assert calls == [None]  # LLMLAB_THREADS / OMP_NUM_THREADS apply under torchrun too
    assert "--config" in capsys.readouterr().err


def test_export_gguf_goes_through_commands_interop_with_its_dtype_and_device_help_names_all(monkeypatch, capsys):
    from llmlab.cli import commands

    seen = []
    monkeypatch.setattr(commands, "interop", lambda *a, **k: seen.append((a, k)))
    code, _, _ = run(["export-gguf", "ck", "--out", "m.gguf", "--dtype", "f32"], capsys)
    assert code == 0 and seen == [(("export_gguf", "ck", "m.gguf"), {"force": False, "dtype": "f32"})]
    code, out, _ = run(["generate", "--help"], capsys)
    assert code == 0 and "cuda:N" in out and "mps" in out


def test_configure_says_when_d_ff_was_left_far_from_d_model(tmp_path, capsys):
    """`configure d_model=256` keeps the spec's d_ff=4864 (19x): the estimate says so and names the usual
    value; a usual shape gets no notice. The config is saved as asked either way."""
    from llmlab.config import ModelConfig
    from llmlab.model.estimate import shape_notice

    code, printed, _ = run(["configure", "--out", str(tmp_path / "a.json"), "d_model=256", "n_heads=8",
                            "n_kv_heads=2"], capsys)
    assert code == 0 and json.loads((tmp_path / "a.json").read_text())["d_ff"] == 4864
    assert "notice: d_ff 4864 is 19.0x d_model 256" in " ".join(printed.split()) and "d_ff=704" in printed
    code, printed, _ = run(["configure", "--out", str(tmp_path / "b.json"), "d_model=256", "n_heads=8",
                            "n_kv_heads=2", "d_ff=704"], capsys)
    assert code == 0 and "notice: d_ff" not in printed
    plain = ModelConfig(d_model=256, n_heads=8, n_kv_heads=2, d_ff=64, activation="gelu")
    assert shape_notice(plain).endswith("d_ff=1024 (set it with d_ff=...)")


@pytest.mark.parametrize("flag,value,fragment", [("--batch-size", "-5", "-5 is not a positive integer"),
                                                 ("--batch-size", "0", "0 is not a positive integer"),
                                                 ("--seq-len", "x", "'x' is not an integer")])
def test_estimate_refuses_sizes_below_one(tmp_path, capsys, flag, value, fragment):
    """`estimate --batch-size -5` printed negative gigabytes; sizes below 1 are refused in one line."""
    tiny_config().save(tmp_path / "model.json")
    code, _, err = run(["estimate", "--model-config", str(tmp_path / "model.json"), flag, value], capsys)
    assert code == 2 and f"argument {flag}: {fragment}" in err and "Traceback" not in err
