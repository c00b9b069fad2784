"""Helpers for the tests that run real Slurm jobs: the cluster handle, recipes, job submission, weight diffs."""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CLUSTER_SH = HERE / "cluster.sh"


def _free_port_base(n: int = 4) -> int:
    """A base port such that base .. base+n-1 are all free on 127.0.0.1."""
    for _ in range(100):
        base = random.randrange(30000, 40000)
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
        """Wait until the job is finished (a final state, or gone from the controller), or until `until(state)`
        is true. Returns the last scontrol state seen (or the jobcomp record once the job is gone)."""
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
            else:  # gone from the controller (MinJobAge): its last jobcomp record
                return self.final_record(job) or last
            time.sleep(0.25)
        raise TimeoutError(f"job {job} not done after {timeout} s; last state {last.get('JobState')}\n"
                           + self.logs())

    def logs(self, n: int = 30) -> str:
        out = []
        for f in sorted((self.dir / "log").glob("*.log")):
            out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(out)


# ---------------------------------------------------------------- training jobs on the cluster

@dataclass
class Run:
    job: str
    output_dir: Path
    log: Path
    record: dict[str, str]
    seconds: float

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def write_recipe(path: Path, tiny: dict[str, Path], output_dir: Path, **training) -> Path:
    """The tests' tiny recipe (tests/tinyrecipe.py), 30 steps with a checkpoint every 5."""
    from tinyrecipe import write_recipe as tiny_recipe

    return tiny_recipe(path, tiny, output_dir,
                       training={"max_steps": 30, "save_steps": 5, "save_total_limit": 3, **training})


def job_env(tmp: Path, procs_per_node: int | None = None, **extra: str) -> dict[str, str]:
    """What a training job needs on top of the cluster environment: offline everything, one thread per
    process (2 cores), caches in the test's folder."""
    env = {"SCALESFT_HOME": str(REPO), "SCALESFT_PYTHON": sys.executable, "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "offline", "WANDB_DIR": str(tmp), "WANDB_SILENT": "true",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "SCALESFT_SRUN_ARGS": "",  # the test cluster has no CPU binding (TaskPlugin=task/none)
           "SCALESFT_CACHE": os.environ.get("SCALESFT_CACHE", str(tmp / "cache")), **extra}
    if procs_per_node is not None:
        env["SCALESFT_PROCS_PER_NODE"] = str(procs_per_node)
    return env


def submit_train(cluster: Cluster, recipe: Path, nodes: int, env: dict[str, str], log: Path,
                 *overrides: str) -> str:
    return cluster.sbatch(f"--nodes={nodes}", f"--output={log}", "--time=10", str(REPO / "slurm" / "train.sh"),
                          str(recipe), *overrides, env=env, cwd=log.parent)


def run_train(cluster: Cluster, recipe: Path, nodes: int, env: dict[str, str], log: Path,
              timeout: float = 240) -> Run:
    import yaml

    t0 = time.monotonic()
    job = submit_train(cluster, recipe, nodes, env, log)
    rec = cluster.wait(job, timeout=timeout)
    out = Path(yaml.safe_load(recipe.read_text())["training"]["output_dir"])
    return Run(job=job, output_dir=out, log=log, record=rec, seconds=time.monotonic() - t0)


def adapter_max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and wa, (sorted(wa), sorted(wb))
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)
