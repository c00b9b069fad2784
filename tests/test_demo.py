"""The embedded default, end to end, exactly as `./dev demo` runs it: real SmolLM2-135M-Instruct (from a PyPI
package) learns 20 Korean pairs; it must visibly answer questions from its training data with their answers,
report the held-out loss before and after, and say so in a few quiet lines."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from tinyrecipe import REPO

pytestmark = pytest.mark.slow


def opening(text: str, words: int = 2) -> str:
    return " ".join(text.split()[:words])


def test_demo_learns_its_training_answers_quietly(tmp_path):
    from scalesft.trainer.assets import builtin_dataset

    out = tmp_path / "demo"
    recipe = yaml.safe_load((REPO / "recipes/demo-ko.yaml").read_text())
    run = subprocess.run([sys.executable, "-m", "scalesft.launch.cli", "train", str(REPO / "recipes/demo-ko.yaml"),
                          f"training.output_dir={out}"], cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stderr[-3000:]
    m = json.loads((out / "train_metrics.json").read_text())
    assert m["global_step"] == recipe["training"]["max_steps"]

    # Learning, shown: the sample questions come from the training rows, and at least 3 of the 5 answers
    # after training open with their dataset answer's first words (before training: none does).
    rows = builtin_dataset(recipe["data"]["path"].removeprefix("builtin:"))
    answer_of = {r["question"]: r["answer"] for r in rows[:recipe["data"]["limit"]]}
    samples = m["samples"]
    assert [s["prompt"] for s in samples] == recipe["training"]["sample_prompts"] and len(samples) == 5
    hits = [s["prompt"] for s in samples if opening(s["after"]) == opening(answer_of[s["prompt"]])]
    assert len(hits) >= 3, samples
    assert not [s for s in samples if opening(s["before"]) == opening(answer_of[s["prompt"]])]
    # the held-out loss is measured before and after training
    evals = m["eval_loss"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == m["global_step"], evals

    # Quiet: no third-party warnings, one line per logged step, at most ~30 lines besides progress bars (one
    # terminal line redrawn with \r, which text mode reads as many), and the summary.
    bar = re.compile(r"\d+/\d+ \[\d\d:\d\d")
    lines = [ln for ln in (run.stdout + "\n" + run.stderr).splitlines() if ln.strip() and not bar.search(ln)]
    assert not [ln for ln in lines if re.search(r"warn|deprecat|Traceback", ln, re.I)], lines
    assert len(lines) <= 32, "\n".join(lines)
    assert sum(ln.startswith("  Q ") for ln in lines) == 5
    steps = [ln for ln in lines if re.match(r"\[scalesft\] step +\d+/\d+ · loss ", ln)]
    assert len(steps) == len(m["train_loss"])
    assert any(ln.startswith("[scalesft] done in ") and "eval loss" in ln for ln in lines)
    assert any(ln == f"[scalesft] adapter: {out}" for ln in lines)
    assert "\ufffd" not in run.stdout

    gen = subprocess.run([sys.executable, "-m", "scalesft.launch.cli", "generate", str(out), samples[0]["prompt"],
                          "--max-new-tokens", "48"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert samples[0]["after"] in gen.stdout  # greedy: the same answer as right after training
    assert "\ufffd" not in gen.stdout and not re.search(r"warn", gen.stdout + gen.stderr, re.I), gen.stderr
