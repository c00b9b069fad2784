"""The embedded default, end to end: real SmolLM2-135M-Instruct (from a PyPI package) on the 696 Korean pairs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tinyrecipe import REPO

pytestmark = pytest.mark.slow


def test_demo_recipe_trains_and_answers(tmp_path):
    out = tmp_path / "demo"
    # The shipped recipe, shortened to 6 optimizer steps (48 rows) to keep CI well inside its budget.
    run = subprocess.run([sys.executable, "-m", "launch.cli", "train", str(REPO / "recipes/demo-ko.yaml"),
                          f"training.output_dir={out}", "training.max_steps=6", "training.save_steps=3"],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    m = json.loads((out / "train_metrics.json").read_text())
    losses = [x["loss"] for x in m["train_loss"]]
    assert m["global_step"] == 6 and m["data"]["rows"] == 696 and m["data"]["used"] == 696
    assert losses[-1] < losses[0], losses  # a real pretrained model adapting to the template
    assert [s["prompt"] for s in m["samples"]] == ["AI가 뭐지?", "너는 누구니?"]
    assert "before:" in run.stdout and "after:" in run.stdout
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-6").is_dir()

    gen = subprocess.run([sys.executable, "-m", "launch.cli", "generate", str(out), "AI가 뭐지?",
                          "--max-new-tokens", "48"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert m["samples"][0]["after"] in gen.stdout  # greedy: the same answer as right after training
