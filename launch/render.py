"""Render the `accelerate launch` command for a strategy and world size. Pure: builds an argv list and the
environment variables to set; nothing is executed here (launch/run.py is the one call site).

    >>> cmd = render_launch(recipe="recipes/tiny.yaml", strategy="zero2", num_processes=2, cpu=True)
    >>> cmd.shell()   # DS_ACCELERATOR=cpu accelerate launch --config_file .../zero2.yaml ...

Every variable the launch depends on is in `env` (declared, not hidden); the caller's environment is
inherited underneath it. The CPU paths are the ones that really start N synchronised processes
(tests/test_distributed_launch.py runs each with 2 real processes):
- DDP / FSDP2: the torchrun path (a MULTI_GPU / FSDP config) with ACCELERATE_USE_CPU=true in the processes.
  (`accelerate launch --cpu` starts ONE process; `use_cpu: true` in a config file never reaches them.)
  FSDP2 on CPU also needs the trainer to force accelerate's state to FSDP: trainer/distributed.py does.
- DeepSpeed: accelerate's DeepSpeed plugin; the trainer passes ddp_backend="gloo" and neither use_cpu
  nor deepspeed= to the training arguments.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from scalesft.core.strategy import get_strategy

ROOT = Path(__file__).resolve().parent.parent
"""The scalesft checkout: the shipped configs live beside the code."""
ACCELERATE_CONFIG_DIR = ROOT / "accelerate_configs"
DS_CONFIG_DIR = ROOT / "ds_configs"


class LaunchError(ValueError):
    """A launch that cannot start: one line with the fix."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LaunchCommand:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    """Variables set on top of the caller's environment."""

    def shell(self) -> str:
        """The command as one copy-pasteable shell line (for printing only; never executed as a string), with
        secrets (secret environment values, Hugging Face tokens: core/secrets.py redact_text) as ***."""
        import os

        from scalesft.core.secrets import redact_text

        prefix = [f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items())]
        return redact_text(" ".join(prefix + [shlex.quote(a) for a in self.argv]), os.environ)


def accelerate_config_path(strategy: str, override: str | Path | None = None) -> Path:
    """The accelerate config file for a strategy (shipped in accelerate_configs/), or the user's file."""
    path = Path(override) if override is not None else ACCELERATE_CONFIG_DIR / get_strategy(strategy).accelerate_config
    if not path.is_file():
        raise LaunchError(f"accelerate config file '{path}' does not exist: pass an existing file to "
                          f"--accelerate-config, or leave it out to use the shipped one for --strategy")
    return path


def render_launch(*, recipe: str | Path, overrides: list[str] | tuple[str, ...] = (), strategy: str = "ddp",
                  num_processes: int, num_machines: int = 1, machine_rank: int = 0,
                  main_process_ip: str | None = None, main_process_port: int = 29500, cpu: bool = False,
                  threads_per_process: int | None = None, accelerate_config: str | Path | None = None,
                  ds_config: str | Path | None = None, accelerate: str = "accelerate",
                  launcher: Sequence[str] | None = None,
                  module: str = "scalesft.trainer.train") -> LaunchCommand:
    """The command that starts `num_processes` processes in all (over `num_machines` machines) running
    `python -m {module} RECIPE OVERRIDES...` under `strategy`.

    launcher: the words before accelerate's options (default `[accelerate, "launch"]`; Slurm nodes run
    `[python, "-m", "accelerate.commands.launch"]`, launch/slurm.py node_command). Over several machines the
    command is machine `machine_rank`'s and uses torchrun's static rendezvous with no restarts
    (`--rdzv_backend static --max_restarts 0 --monitor_interval 1`): a failed rank ends the run."""
    spec = get_strategy(strategy)
    if num_processes < 1 or num_machines < 1:
        raise LaunchError(f"need at least one process and one machine, got {num_processes} on {num_machines}")
    if num_processes % num_machines:
        raise LaunchError(f"{num_processes} processes do not split evenly over {num_machines} machines")
    if not 0 <= machine_rank < num_machines:
        raise LaunchError(f"machine rank {machine_rank} is not one of the {num_machines} machines (0..{num_machines - 1})")
    if num_machines > 1 and not main_process_ip:
        raise LaunchError("a launch over several machines needs the main process address: pass --main-process-ip")
    if not 0 <= main_process_port <= 65535:
        raise LaunchError(f"main process port {main_process_port} is not a port number (0 picks a free one)")
    config = accelerate_config_path(strategy, accelerate_config)
    argv = [*(launcher if launcher is not None else (accelerate, "launch")), "--config_file", str(config),
            "--num_processes", str(num_processes), "--num_machines", str(num_machines)]
    if num_machines > 1:
        argv += ["--machine_rank", str(machine_rank), "--main_process_ip", str(main_process_ip)]
    argv += ["--main_process_port", str(main_process_port)]
    if num_machines > 1:
        argv += ["--rdzv_backend", "static", "--max_restarts", "0", "--monitor_interval", "1"]
    if spec.ds_config is not None:
        ds = Path(ds_config) if ds_config is not None else DS_CONFIG_DIR / spec.ds_config
        if not ds.is_file():
            raise LaunchError(f"DeepSpeed config file '{ds}' does not exist: pass an existing json")
        # Absolute path on the command line: the relative path in the yaml only works from the repo root.
        argv += ["--deepspeed_config_file", str(ds)]
    elif ds_config is not None:
        raise LaunchError(f"a DeepSpeed config was given but strategy '{strategy}' is not a DeepSpeed one")
    argv += ["-m", module, str(recipe), *overrides]

    env: dict[str, str] = {}
    if cpu:
        env.update(spec.cpu_env)  # core/strategy.py: what this strategy's processes need on CPU (gloo)
        if threads_per_process is not None:
            env["OMP_NUM_THREADS"] = str(max(1, threads_per_process))
    return LaunchCommand(argv=argv, env=env)
