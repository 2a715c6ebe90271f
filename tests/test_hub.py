"""Hub ids offline: one quick check, then the local cache only (no tens of seconds of retries)."""

import time

import pytest

import llmlab.hub as hub
from llmlab.errors import CheckpointError, DataError


@pytest.fixture
def fresh_check():
    hub.hub_reachable.cache_clear()
    yield
    hub.hub_reachable.cache_clear()


def test_reachability_follows_hf_hub_offline_and_the_connection(fresh_check, monkeypatch):
    from huggingface_hub import constants

    tried = []

    class Conn:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    def connect(address, timeout):
        tried.append((address, timeout))
        return Conn()

    monkeypatch.setattr(hub.socket, "create_connection", connect)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert hub.hub_reachable() is True and tried == [(("huggingface.co", 443), hub.HUB_TIMEOUT_S)]
    assert hub.hub_reachable() is True and len(tried) == 1  # once per process
    hub.hub_reachable.cache_clear()

    def refuse(address, timeout):
        raise OSError("Name or service not known")

    monkeypatch.setattr(hub.socket, "create_connection", refuse)
    assert hub.hub_reachable() is False
    assert hub.hub_kwargs("Qwen/Qwen2.5-0.5B") == {"local_files_only": True}
    assert hub.hub_kwargs("./runs/tok") == {} and hub.hub_kwargs(".") == {}  # paths never ask the Hub
    hub.hub_reachable.cache_clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub.socket, "create_connection", connect)
    assert hub.hub_reachable() is False and len(tried) == 1  # HF_HUB_OFFLINE: no connection tried


def test_offline_hub_ids_fail_at_once_from_the_cache_with_the_reason(monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    from llmlab.data.tokenizer import load_tokenizer
    from llmlab.interop.hf_io import load_hf

    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    asked = []
    for cls in (AutoTokenizer, AutoConfig):
        real = cls.from_pretrained
        monkeypatch.setattr(cls, "from_pretrained",
                            lambda name, *a, real=real, **kw: asked.append(kw.get("local_files_only")) or real(name, *a, **kw))
    start = time.perf_counter()
    with pytest.raises(DataError, match="the Hugging Face Hub is unreachable .offline.. and it is not in the local cache"):
        load_tokenizer("llmlab-tests/no-such-tokenizer")
    with pytest.raises(CheckpointError, match="the Hugging Face Hub is unreachable"):
        load_hf("llmlab-tests/no-such-model")
    assert len(asked) >= 2 and all(asked) and time.perf_counter() - start < 10  # every lookup: the cache only
