"""The test cluster itself: two nodes that run one task each, resolve each other, and requeue fast."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_two_nodes_one_task_each(slurm_cluster, tmp_path):
    out = tmp_path / "out.txt"
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        "srun --ntasks-per-node=1 bash -c 'echo $SLURM_NODEID $SLURMD_NODENAME $(getent hosts n1 | cut -d\" \" -f1)'\n"
    )
    job = slurm_cluster.sbatch("-N2", "--ntasks-per-node=1", f"--output={out}", str(script))
    rec = slurm_cluster.wait(job, timeout=30)
    assert rec.get("JobState") == "COMPLETED", rec
    lines = sorted(out.read_text().split("\n")[:-1])
    assert lines == ["0 n1 127.0.0.1", "1 n2 127.0.0.1"]
    assert slurm_cluster.bringup_s < 60
