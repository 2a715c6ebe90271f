"""Reaching the Hugging Face Hub. One quick connection check per process: when the Hub cannot be reached,
hub ids load from the local cache only (`local_files_only=True`) instead of each download retrying for
tens of seconds (the menu's default tokenizer took ~50 s to give up offline), and the error says why.

    AutoTokenizer.from_pretrained(name, **hub_kwargs(name))
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

HUB_TIMEOUT_S = 3.0


@functools.cache
def hub_reachable() -> bool:
    """False when HF_HUB_OFFLINE is set or the Hub's endpoint (HF_ENDPOINT, default huggingface.co) does not
    accept a TCP connection within HUB_TIMEOUT_S; checked once per process."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=HUB_TIMEOUT_S):
            return True
    except OSError:
        return False


def is_local(name_or_path: str) -> bool:
    """A path on this machine (what exists, or what is written as a path) rather than a hub id."""
    return os.path.exists(os.path.expanduser(name_or_path)) or name_or_path.startswith((".", "/", "~"))


def hub_kwargs(name_or_path: str) -> dict[str, bool]:
    """`from_pretrained` options for `name_or_path`: the local cache only when it is a hub id and the Hub is
    unreachable, else none."""
    return {} if is_local(name_or_path) or hub_reachable() else {"local_files_only": True}


def offline_note(name_or_path: str) -> str | None:
    """Why a hub load failed when the Hub was not reachable (for the error, in place of transformers' own
    text); None otherwise."""
    if is_local(name_or_path) or hub_reachable():
        return None
    return "the Hugging Face Hub is unreachable (offline?) and it is not in the local cache"
