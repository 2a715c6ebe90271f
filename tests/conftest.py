"""Shared fixtures: tiny deterministic models on CPU, one torch thread per pytest worker."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# before torch is imported; and main()/stage_main() call set_threads(), which reads it: without it they would
# reset torch to every core inside each pytest worker (oversubscription under pytest -n)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

try:  # every run (CI or not) draws the same hypothesis examples: a red run is a real regression, not luck
    from hypothesis import settings

    settings.register_profile("deterministic", derandomize=True, print_blob=True)
    settings.register_profile("ci", derandomize=True, print_blob=True)  # the former CI-only name
    settings.load_profile("deterministic")
except ImportError:  # pragma: no cover - hypothesis is a dev dependency
    pass

from llmlab.config import ModelConfig  # noqa: E402


def tiny_config(**overrides) -> ModelConfig:
    base = dict(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2, vocab_size=128, max_seq_len=64)
    base.update(overrides)
    return ModelConfig(**base)


def model_grads(model, ids):
    """(loss, every parameter's gradient) of a scalar over the model's logits on `ids`: for comparing two
    paths of the same model."""
    model.zero_grad()
    loss = model(ids).logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_config()


@pytest.fixture(scope="session")
def macbeth_tok_dir(tmp_path_factory):
    """A small trained tokenizer folder (300 tokens, 40 Macbeth documents), built once per session; tests
    only read it."""
    from llmlab.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer(["bundled:shakespeare | macbeth"], 300, out, max_docs=40)
    return out


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """A small tokenizer trained on the bundled SFT records (300 tokens, 100 records), loaded once per
    session; tests only read it."""
    import os

    from llmlab.data.tokenizer import load_tokenizer, train_tokenizer

    os.environ.setdefault("LLMLAB_CACHE", str(tmp_path_factory.getbasetemp() / "llmlab-cache"))
    out = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer(["bundled:sft"], 300, out, max_docs=100)
    return load_tokenizer(str(out))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
