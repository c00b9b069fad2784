"""A real two-node Slurm cluster (tests/slurm/cluster.sh) for the tests in this folder, started once per session.

Nothing is mocked: slurmctld, two slurmd (n1, n2) and munged run on this host; the fixture installs Debian's
packages when they are missing (as root) and stops the daemons at the end. Deselect with `-m "not slurm"`.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CLUSTER_SH = HERE / "cluster.sh"


def _free_port_base(n: int = 4) -> int:
    """A base port such that base .. base+n-1 are all free on 127.0.0.1."""
    for _ in range(100):
        base = random.randrange(20000, 30000)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no four consecutive free ports found")


@dataclass
class Cluster:
    dir: Path
    env: dict[str, str]
    bringup_s: float
    jobs: list[str] = field(default_factory=list)

    def run(self, *argv: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True,
                              check=check, timeout=timeout, **kw)

    def sbatch(self, *argv: str, env: dict[str, str] | None = None, cwd: Path | str = REPO) -> str:
        """Submit; return the job id."""
        out = self.run("sbatch", "--parsable", *argv, env=env or {}, cwd=cwd).stdout.strip()
        job = out.split(";")[0]
        self.jobs.append(job)
        return job

    def state(self, job: str) -> dict[str, str]:
        """`scontrol show job` as a dict; {} once the job has left the controller."""
        p = self.run("scontrol", "-o", "show", "job", job, check=False)
        if p.returncode:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", p.stdout))

    def final_record(self, job: str) -> dict[str, str]:
        """The last jobcomp record of a finished job (JobState, ExitCode, ...)."""
        rec: dict[str, str] = {}
        comp = self.dir / "log" / "jobcomp.txt"
        if comp.exists():
            for line in comp.read_text().splitlines():
                fields = dict(re.findall(r"(\w+)=(\S*)", line))
                if fields.get("JobId") == job:
                    rec = fields
        return rec

    def wait(self, job: str, timeout: float, until=None) -> dict[str, str]:
        """Wait until the job is finished (its jobcomp record exists and it is no longer queued or running),
        or until `until(state)` is true. Returns the last scontrol state seen (or the jobcomp record)."""
        end = time.monotonic() + timeout
        last: dict[str, str] = {}
        while time.monotonic() < end:
            st = self.state(job)
            if st:
                last = st
                if until is not None and until(st):
                    return st
                if until is None and st.get("JobState") in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                             "NODE_FAIL", "OUT_OF_MEMORY"}:
                    return st
            elif until is None:
                return self.final_record(job) or last
            time.sleep(0.25)
        raise TimeoutError(f"job {job} not done after {timeout} s; last state {last.get('JobState')}\n"
                           + self.logs())

    def logs(self, n: int = 30) -> str:
        out = []
        for f in sorted((self.dir / "log").glob("*.log")):
            out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(out)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Cluster:
    if shutil.which("bash") is None:  # pragma: no cover
        pytest.fail("bash is needed to start the test cluster")
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
