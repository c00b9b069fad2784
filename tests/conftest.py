"""Shared fixtures: a tiny random Llama + tokenizer + Korean Q/A rows (trainer/tiny.py), built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the user's caches or the network.
os.environ.setdefault("SCALESFT_CACHE", str(Path(os.environ.get("PYTEST_CACHE_ROOT", "/tmp")) / f"scalesft-test-cache-{os.getuid()}"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from scalesft.trainer.tiny import build

    root = tmp_path_factory.mktemp("tiny")
    model_dir, data_file = build(root, rows=64, seed=0)
    return {"root": root, "model": model_dir, "data": data_file}
