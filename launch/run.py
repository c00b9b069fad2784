"""`scalesft train`: check, render and run one `accelerate launch` on this node.

    scalesft train RECIPE [section.key=value ...] --gpus N --strategy ddp|zero2|zero3|zero3_offload|fsdp2 [--dry-run]

Everything that can be wrong is checked before a process starts (batch divisibility, strategy vs
quantization, rows vs processes, config files, the main process port). `run_command` (a child process) and
`exec_command` (this process replaced, as each Slurm node does) are the only places in scalesft that start a
command: an argv list and an env dict, never a shell string.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

from scalesft.core.hardware import precision as resolve_precision
from scalesft.core.memory import choose_batching
from scalesft.core.strategy import STRATEGIES
from scalesft.launch.preflight import check_port, check_rows, count_rows, planned_hardware_here, train_rows
from scalesft.launch.render import LaunchCommand, render_launch


DEFAULT_PORT = 29500


def accelerate_executable() -> str:
    """`accelerate` from PATH, else the one installed next to this Python (an unactivated venv)."""
    found = shutil.which("accelerate")
    if found:
        return "accelerate"
    sibling = Path(sys.executable).parent / "accelerate"
    return str(sibling) if sibling.exists() else "accelerate"


def run_command(argv: list[str], env: dict[str, str] | None = None, *, inherit_env: bool = True,
                cwd: str | Path | None = None, capture: bool = False,
                timeout: float | None = None) -> subprocess.CompletedProcess:
    """The one place scalesft starts a process: an argv list (never a shell string) and the variables to set,
    on top of this environment unless inherit_env is False (env is then the whole environment)."""
    full = {**os.environ, **(env or {})} if inherit_env else dict(env or {})
    return subprocess.run(argv, env=full, cwd=cwd, capture_output=capture, text=True, timeout=timeout,
                          check=False)


def exec_command(cmd: LaunchCommand) -> NoReturn:
    """Replace this process with the rendered command (os.execvpe: same pid, so signals sent to this process
    reach it), its variables on top of this environment. Signal dispositions set to SIG_IGN stay ignored
    across the exec; handlers return to their defaults."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd.argv[0], cmd.argv, {**os.environ, **cmd.env})


def execute(cmd: LaunchCommand, *, cwd: str | Path | None = None) -> int:
    """Run the rendered command with its variables on top of this environment; return its exit status."""
    return run_command(cmd.argv, cmd.env, cwd=cwd).returncode


def prepare_train(args: argparse.Namespace) -> LaunchCommand:
    """All pre-launch checks, then the command. Raises a ValueError subclass with one line on bad input."""
    from scalesft.core.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    world = 1 if args.gpus is None else args.gpus
    strategy = args.strategy or "ddp"
    if world < 1:
        raise ValueError(f"--gpus must be >= 1, got {world}")
    device = args.device or "auto"
    port = DEFAULT_PORT if args.port is None else args.port
    cpu = device == "cpu" or (device == "auto" and not _cuda_available())
    from scalesft.core.strategy import recipe_layout
    from scalesft.trainer.assets import model_shape

    hw = planned_hardware_here(cpu=cpu)
    prec = resolve_precision(recipe.training.precision, hw)
    recipe_layout(recipe, strategy=strategy, world_size=world, hw=hw, precision=prec)  # strategy vs quantization
    choose_batching(recipe, model_shape(recipe.model.name_or_path), strategy=strategy, world_size=world,
                    precision=prec)  # the batch math (micro_batch_size auto too)
    rows = count_rows(recipe.data.path)
    if rows is not None:
        check_rows(train_rows(rows, limit=recipe.data.limit, eval_fraction=recipe.data.eval_fraction), world,
                   where=f"the training set ({recipe.data.path})")
    cmd = render_launch(recipe=args.recipe, overrides=args.overrides, strategy=strategy, num_processes=world,
                        main_process_port=port, cpu=cpu,
                        threads_per_process=(os.cpu_count() or 1) // world if cpu else None,
                        accelerate_config=args.accelerate_config, accelerate=accelerate_executable())
    if not args.dry_run:
        check_port(port)
    return cmd


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def add_launch_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The launcher's options (the recipe and overrides positionals are the caller's)."""
    # Defaults are None, so that `scalesft train` can tell an option given from one left out: any of these given
    # routes the run through `accelerate launch` (launch/cli.py), where each one acts.
    p.add_argument("--gpus", type=int, default=None, help="processes on this node: GPUs, or CPU processes (default 1)")
    p.add_argument("--strategy", default=None, choices=list(STRATEGIES), help="default ddp")
    p.add_argument("--device", default=None, choices=["auto", "cuda", "cpu"],
                   help="default auto: cuda when a GPU is visible, else cpu (gloo)")
    p.add_argument("--port", type=int, default=None, help=f"main process port (default {DEFAULT_PORT}; 0: pick a free one)")
    p.add_argument("--accelerate-config", default=None, help="use this accelerate config instead of the shipped one")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    return p


LAUNCH_OPTIONS = ("gpus", "strategy", "device", "port", "accelerate_config")


def launcher_requested(args: argparse.Namespace) -> bool:
    """True when any launcher option (or --dry-run) was given: the run must go through `accelerate launch`."""
    return args.dry_run or any(getattr(args, name, None) is not None for name in LAUNCH_OPTIONS)


def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return add_launch_options(p)


def train_command(args: argparse.Namespace) -> int:
    cmd = prepare_train(args)
    if args.dry_run:
        print(cmd.shell())
        return 0
    print(f"scalesft train: {cmd.shell()}", file=sys.stderr, flush=True)
    return execute(cmd)


def one_line_errors(prog: str, command, args: argparse.Namespace) -> int:
    """Run a subcommand; every user error (a ValueError subclass: RecipeError, BatchError, StrategyError,
    LaunchError, ...) becomes one line on stderr and exit status 2."""
    try:
        return command(args)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def train_cli(args: argparse.Namespace) -> int:
    return one_line_errors("scalesft train", train_command, args)


def main(argv: list[str] | None = None) -> int:
    parser = add_train_arguments(argparse.ArgumentParser(prog="scalesft train", description=__doc__.split("\n")[0]))
    return train_cli(parser.parse_intermixed_args(argv))


if __name__ == "__main__":
    sys.exit(main())
