"""The Hugging Face hub, seen from this process: is it reachable (one short TCP connect, once per process), is
offline mode on, and switching offline mode on so that cache lookups fail or succeed at once instead of retrying."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(timeout: float = 3.0) -> bool:
    url = urlparse(hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def offline_env() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


def go_offline() -> None:
    """Offline mode for this process, also for libraries that read HF_HUB_OFFLINE at import time: loads from the
    local cache then fail or succeed at once instead of retrying the network."""
    import sys

    os.environ["HF_HUB_OFFLINE"] = "1"
    for module, attrs in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                          ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        mod = sys.modules.get(module)
        for attr in attrs:
            if mod is not None and hasattr(mod, attr):
                setattr(mod, attr, True)


_HUB_STATE: dict[str, bool] = {}


def hub_unreachable() -> bool:
    """Offline mode is on, or the hub does not answer a TCP connect (checked once per process)."""
    if offline_env():
        return True
    if "reachable" not in _HUB_STATE:
        _HUB_STATE["reachable"] = hub_reachable()
    return not _HUB_STATE["reachable"]
