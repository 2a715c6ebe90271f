"""The README's Python example runs as written (on a tiny checkpoint in place of the tour's)."""

import re
from pathlib import Path

import torch

from conftest import tiny_config
from llmlab.checkpoint import save_checkpoint
from llmlab.model import build_model

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_python_example_runs(macbeth_tok_dir, tmp_path, capsys):
    from llmlab.data.tokenizer import load_tokenizer

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    code = next(b for b in blocks if "from llmlab import" in b)
    tok = load_tokenizer(str(macbeth_tok_dir))
    torch.manual_seed(0)
    model = build_model(tiny_config(vocab_size=len(tok), tokenizer_name=str(macbeth_tok_dir), max_seq_len=128))
    save_checkpoint(tmp_path / "best", model, kind="pretrain", tokenizer=tok)
    assert "runs/tiny/pretrain/best" in code  # the tour's checkpoint, swapped for the tiny one here
    exec(compile(code.replace("runs/tiny/pretrain/best", str(tmp_path / "best")), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("To be, or not") and len(printed) > len("To be, or not") + 10
    assert 0 < float(printed.strip().splitlines()[-1]) < 20  # the loss example: a mean token cross entropy
