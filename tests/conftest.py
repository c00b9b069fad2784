"""Shared fixtures: a tiny random Llama + tokenizer + Korean Q/A rows (trainer/tiny.py), built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# Tests never touch the user's caches or the network.
os.environ.setdefault("SCALESFT_CACHE", str(Path(os.environ.get("PYTEST_CACHE_ROOT", "/tmp")) / f"scalesft-test-cache-{os.getuid()}"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from trainer.tiny import build

    root = tmp_path_factory.mktemp("tiny")
    model_dir, data_file = build(root, rows=64, seed=0)
    return {"root": root, "model": model_dir, "data": data_file}


def write_recipe(path: Path, tiny: dict[str, Path], output_dir: Path, **sections) -> Path:
    """A tiny recipe; keyword arguments update its sections, e.g. training={"max_steps": 3}."""
    recipe = {
        "model": {"name_or_path": str(tiny["model"])},
        "data": {"path": str(tiny["data"]), "format": "qa", "template": "ko-qa", "max_seq_length": 64},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"output_dir": str(output_dir), "global_batch_size": 8, "micro_batch_size": 2,
                     "max_steps": 4, "learning_rate": 1.0e-2, "logging_steps": 1, "save_steps": 100,
                     "gradient_checkpointing": True, "seed": 0},
    }
    for name, values in sections.items():
        recipe.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return path
