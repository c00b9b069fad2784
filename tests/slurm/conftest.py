"""A real two-node Slurm cluster (tests/slurm/cluster.sh) for the tests in this folder, started once per session.

Nothing is mocked: slurmctld, two slurmd (n1, n2) and munged run on this host; the fixture installs Debian's
packages when they are missing (as root) and stops the daemons at the end. Deselect with `-m "not slurm"`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_helpers import CLUSTER_SH, REPO, Cluster, _free_port_base


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Cluster:
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SCALESFT_SLURM_PORT": str(_free_port_base())}
    t0 = time.monotonic()
    p = subprocess.run(["bash", str(CLUSTER_SH), "start", str(state)], env=env, capture_output=True, text=True)
    bringup = time.monotonic() - t0
    if p.returncode:
        subprocess.run(["bash", str(CLUSTER_SH), "stop", str(state)], env=env, capture_output=True)
        pytest.fail(f"the test Slurm cluster did not start (rc {p.returncode}):\n{p.stdout}\n{p.stderr}")
    print(f"\nslurm test cluster up in {bringup:.1f} s at {state}", file=sys.stderr)
    env["SLURM_CONF"] = str(state / "slurm.conf")
    # Jobs inherit this environment (sbatch --export=ALL): the venv's python first, the repo importable.
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cluster = Cluster(dir=state, env=env, bringup_s=bringup)
    (state / "bringup_s").write_text(f"{bringup:.2f}\n")
    try:
        yield cluster
    finally:
        subprocess.run(["bash", str(CLUSTER_SH), "stop", str(state)], env=env, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def slurm_tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny random Llama + tokenizer + Korean Q/A rows of varying length (trainer/tiny.py)."""
    from scalesft.trainer.tiny import build

    root = tmp_path_factory.mktemp("slurm-tiny")
    model_dir, data_file = build(root, rows=64, seed=0)
    return {"root": root, "model": model_dir, "data": data_file}
