"""Helpers the tests import (conftest.py holds only fixtures: pytest imports it under a shared module name)."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


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
