"""Checks that run before any process starts or any model loads. Each failure is one LaunchError line.

    check_port(port)                    the main process port is free (0 = pick one: always passes)
    count_rows(path)                    training rows in a local data file, or None when not a local file
    check_rows(rows, world_size, ...)   every process gets at least one row
"""

from __future__ import annotations

import csv
import json
import math
import socket
from pathlib import Path

from scalesft.launch.render import LaunchError


def check_port(port: int, host: str = "") -> None:
    """Raise if the main process port is taken. accelerate itself would only warn and silently move a
    single-node run to another port (and fail outright on several nodes), so say it here, early."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            raise LaunchError(f"main process port {port} is already in use on this machine: pass --port with a free "
                              f"port, or --port 0 to pick one") from None


def count_rows(path: str | Path) -> int | None:
    """Rows in a local .json (a list of rows), .jsonl, .csv or .parquet file.
    None for anything else (hub names, builtin: data): the trainer checks those after loading."""
    p = Path(path)
    if not p.is_file():
        return None
    suffix = p.suffix.lower()
    try:  # a file that cannot be counted here (unreadable, malformed) is named by the trainer, in one line
        if suffix == ".json":
            data = json.loads(p.read_text(encoding="utf-8-sig"))
            return len(data) if isinstance(data, list) else None
        if suffix == ".jsonl":
            with p.open(encoding="utf-8-sig") as f:
                return sum(1 for line in f if line.strip())
        if suffix == ".csv":
            with p.open(encoding="utf-8-sig", newline="") as f:
                return max(0, sum(1 for _ in csv.reader(f)) - 1)
        if suffix == ".parquet":
            import pyarrow.parquet as pq
            return pq.ParquetFile(p).metadata.num_rows
    except (OSError, ValueError, csv.Error):
        return None
    except Exception as e:  # pyarrow's errors
        if type(e).__module__.startswith("pyarrow"):
            return None
        raise
    return None


def train_rows(rows: int, *, limit: int | None, eval_fraction: float) -> int:
    """Rows left for training after data.limit and the eval hold-out (datasets rounds the test size up)."""
    if limit is not None:
        rows = min(rows, limit)
    return rows - math.ceil(rows * eval_fraction) if eval_fraction > 0 else rows


def check_rows(rows: int, world_size: int, *, where: str = "the training set") -> None:
    if rows < world_size:
        raise LaunchError(f"{where} has {rows} rows but the launch starts {world_size} processes: every "
                          f"process needs at least one row; use at most {max(rows, 1)} processes or more data")


def planned_hardware_here(*, cpu: bool, gpu_memory_gib: float | None = None):
    """The machine a plan or launch is for (core.strategy.planned_hardware) with this machine's packages: which
    fast paths are installed and their versions, read from package metadata (torch is not imported)."""
    import importlib.util

    from scalesft.core.hardware import release
    from scalesft.core.strategy import planned_hardware
    from scalesft.trainer.hardware import installed_versions

    versions = installed_versions()
    return planned_hardware(cpu=cpu, flash_attn=importlib.util.find_spec("flash_attn") is not None,
                            liger=importlib.util.find_spec("liger_kernel") is not None,
                            varlen_kernel=release(versions["torch"] or "0") >= (2, 10),  # torch.nn.attention.varlen
                            bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None,
                            versions=versions, gpu_memory_gib=gpu_memory_gib)
