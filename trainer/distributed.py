"""Which distributed strategy this process runs under, read from accelerate, and the runtime work that follows
from it. What each strategy implies (device_map, quant storage, reentrancy, LoRA fusing) is core/strategy.py's
Layout, the same one `scalesft plan` prints; this module only reads what was launched and acts on it.

    resolve(hw, recipe, precision)   before the model loads: what `accelerate launch` asked for (accelerate's
                                     own plugins read its launch variables), its Layout (core.strategy), and
                                     the process group (created here, with training.ddp_timeout)
    prepare_trainer(trainer, s)      after the Trainer is built: accelerate's state must match (FSDP2 on CPU
                                     is forced here: accelerate 1.15 only enables FSDP on GPUs)
    rank_report(trainer, s, out)     after training: what each rank really ran (ZeRO stage of the engine,
                                     sharded DTensor parameters), and, only with SCALESFT_RANK_REPORT=1 (the
                                     multi-process tests set it), a hash of the full adapter it holds

CPU paths (the ones that really start N synchronised processes with accelerate 1.15 / DeepSpeed 0.19, as
tests/test_distributed_launch.py checks): DDP and FSDP2 use a gloo process group from use_cpu; DeepSpeed needs
ddp_backend="gloo" and neither use_cpu nor deepspeed= in the training arguments (with cpu=True accelerate's
PartialState never takes its DeepSpeed branch; the plugin comes from the launcher's variables instead).

The process group is created once, here, before the training arguments exist: the Trainer's own
`ddp_timeout` would come too late (accelerate keeps the first group), so resolve() passes the recipe's
training.ddp_timeout to accelerate's PartialState, which hands it to torch's init_process_group (DDP, FSDP2)
or to deepspeed.comm.init_distributed (ZeRO-2/3). A collective that waits longer fails on that rank;
collective_timeout_line() turns that error into one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalesft.core.hardware import Hardware
from scalesft.core.recipe import RecipeError
from scalesft.core.strategy import Layout, StrategyError, recipe_layout, strategy_of


@dataclass(kw_only=True)
class Strategy:
    """The strategy this process runs under: core.strategy's Layout (what `scalesft plan` shows) plus the process's
    place in the group."""

    layout: Layout
    world_size: int
    rank: int
    local_rank: int
    device: str
    zero_stage: int | None = None
    fsdp_version: int | None = None
    args: dict[str, Any] = field(default_factory=dict)
    """Extra SFTConfig arguments this strategy needs."""

    @property
    def name(self) -> str:
        return self.layout.strategy

    @property
    def device_map(self) -> dict[str, str] | None:
        """For from_pretrained: {"": this process's device}, or None where the strategy places the weights."""
        return {"": self.device} if self.layout.device_map == "local_rank" else None

    @property
    def quant_storage(self) -> str | None:
        return self.layout.quant_storage

    @property
    def reentrant(self) -> bool:
        return bool(self.layout.reentrant)

    def log_line(self) -> str:
        return f"rank {self.rank} (local {self.local_rank}) of {self.world_size} on {self.device}: {self.layout.line()}"


def launched() -> tuple[str, int | None, int | None]:
    """(strategy, zero stage, fsdp version) that `accelerate launch` asked for, read by accelerate's own
    plugins from the variables its launcher sets (ACCELERATE_USE_DEEPSPEED + the ds config, ACCELERATE_USE_FSDP
    + FSDP_VERSION), exactly as Accelerator() will read them; named by core.strategy.strategy_of."""
    from accelerate.utils import parse_flag_from_env

    stage = version = None
    offload = False
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin()
        stage = int(plugin.zero_stage)
        zero = plugin.deepspeed_config.get("zero_optimization", {})
        offload = any(str((zero.get(k) or {}).get("device", "none")).lower() == "cpu"
                      for k in ("offload_param", "offload_optimizer"))
    elif parse_flag_from_env("ACCELERATE_USE_FSDP"):
        from accelerate.utils import FullyShardedDataParallelPlugin

        version = int(FullyShardedDataParallelPlugin().fsdp_version)
    try:
        return strategy_of(zero_stage=stage, offload=offload, fsdp_version=version), stage, version
    except StrategyError as e:
        raise RecipeError(str(e)) from None


def process_group_timeout(seconds: int):
    """training.ddp_timeout as the timedelta init_process_group / deepspeed.comm.init_distributed take."""
    from datetime import timedelta

    if seconds < 1:
        raise RecipeError(f"training.ddp_timeout must be >= 1 second, got {seconds}")
    return timedelta(seconds=seconds)


_TIMEOUT_TEXT = re.compile(r"timed out|timeout|watchdog", re.IGNORECASE)


def collective_timeout_line(error: BaseException, ddp_timeout: int) -> str | None:
    """One line for an error raised by a collective that waited past training.ddp_timeout (gloo raises a
    RuntimeError "Timed out waiting Nms for recv operation"; NCCL a DistBackendError from its watchdog), naming
    this rank and the timeout; None for any other error. Only meaningful in a multi-process run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2 or not isinstance(error, RuntimeError) or not _TIMEOUT_TEXT.search(str(error)):
        return None
    rank = int(os.environ.get("RANK", "0"))
    others = ", ".join(str(r) for r in range(world) if r != rank)
    return (f"rank {rank} of {world}: a collective waited longer than training.ddp_timeout={ddp_timeout} s for the "
            f"other rank(s) ({others}): one of them hung or died; its own log shows where it stopped")


def resolve(hw: Hardware, recipe, precision: str) -> Strategy:
    """Initialise the process group the way this strategy needs it and decide the load settings.
    Raises RecipeError for combinations known not to work, before any model loads."""
    from accelerate import PartialState

    name, stage, fsdp_version = launched()
    t = recipe.training
    launched_world = int(os.environ.get("WORLD_SIZE", "1"))
    try:  # before the process group: a combination known not to work stops here, on every rank
        planned = recipe_layout(recipe, strategy=name, world_size=launched_world, hw=hw, precision=precision)
    except StrategyError as e:
        raise RecipeError(str(e)) from None

    args: dict[str, Any] = {}
    timeout = process_group_timeout(t.ddp_timeout)
    if stage is not None:
        # DeepSpeed: its own engine and process group (deepspeed.comm.init_distributed gets the timeout); on CPU
        # it needs gloo named and use_cpu off (use_cpu would make accelerate skip the DeepSpeed engine).
        state = PartialState(cpu=False, backend=None if hw.cuda else "gloo", timeout=timeout)
        if not hw.cuda:
            args["ddp_backend"] = "gloo"
        args["use_cpu"] = False
    else:
        state = PartialState(cpu=not hw.cuda, timeout=timeout)
        args["use_cpu"] = not hw.cuda
    world, rank, local = state.num_processes, state.process_index, state.local_process_index
    # Processes that did not join one group each see a world of 1: they would train N unsynchronised copies.
    if world != launched_world:
        raise RecipeError(f"{launched_world} processes were launched but accelerate set up a world of {world} "
                          f"({state.distributed_type}): launch with `scalesft train --gpus N --strategy S`, "
                          "which sets the variables this machine needs")
    if world > 1:
        args["ddp_find_unused_parameters"] = False
    device = f"cuda:{local}" if hw.cuda else "cpu"
    return Strategy(layout=planned, world_size=world, rank=rank, local_rank=local, device=device,
                    zero_stage=stage, fsdp_version=fsdp_version, args=args)


def prepare_trainer(trainer, s: Strategy) -> None:
    """Make accelerate's state match the strategy, or refuse. Call after the Trainer is built, before train()."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    state = trainer.accelerator.state
    if s.fsdp_version and state.distributed_type == DistributedType.MULTI_CPU:
        # accelerate 1.15 turns FSDP on for GPU process groups only; on CPU it would silently run plain DDP.
        # Force the state the GPU path would have built: the FSDP plugin from the launcher's FSDP_* variables.
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.fsdp_plugin = plugin
        state.distributed_type = DistributedType.FSDP
        # as AcceleratorState does on GPUs: every later AcceleratorState() re-reads PartialState's type
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        trainer.is_fsdp_enabled = True
        # On a CPU mesh torch's full-state-dict gather hands back the sharded DTensors themselves (their
        # storage is freed after resharding), so the saved adapter would be unreadable. Gather explicitly.
        trainer.accelerator.get_state_dict = _gathered_state_dict
    expected = (DistributedType.DEEPSPEED if s.zero_stage is not None else
                DistributedType.FSDP if s.fsdp_version else None)  # from the strategy spec (launched())
    if expected is not None and state.distributed_type != expected:
        raise RecipeError(f"strategy {s.name} was launched but accelerate runs {state.distributed_type}: "
                          "launch with `scalesft train --strategy ...`")
    if s.zero_stage is not None and state.deepspeed_plugin.zero_stage != s.zero_stage:
        raise RecipeError(f"ZeRO-{s.zero_stage} was launched but accelerate's plugin has stage "
                          f"{state.deepspeed_plugin.zero_stage}")


def _gathered_state_dict(model, unwrap: bool = True) -> dict[str, Any]:
    """Every tensor of the model whole, on every rank (a collective: all ranks call it, as save_model does)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
            for k, v in model.state_dict().items()}


def _canonical(name: str) -> str:
    """Adapter parameter name as peft saves it (no adapter name, no wrapper prefixes)."""
    for prefix in ("_forward_module.", "module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(prefix, "")
    return name.replace(".default.", ".")


def adapter_digest(tensors: dict[str, Any]) -> str:
    """A hash of an adapter's tensors (names canonicalised, values as float32): equal digests mean equal weights."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors, key=_canonical):
        t = tensors[name].detach().to(torch.float32).contiguous().cpu()
        h.update(_canonical(name).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def full_adapter(trainer) -> dict[str, Any]:
    """The trainable (LoRA) parameters gathered whole on this rank: a collective call, every rank must make it.
    ZeRO-3 parameters are gathered with deepspeed; FSDP2 DTensors with full_tensor()."""
    from torch.distributed.tensor import DTensor

    named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().clone().cpu() for n, p in named}
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone().cpu() for n, p in named}


RANK_REPORT_ENV = "SCALESFT_RANK_REPORT"
"""Set to 1 (the multi-process tests do) to add the digest of the full adapter to every rank's report: a
collective that gathers the whole adapter in fp32 on every rank and hashes it (~670 MB per rank for r64 on an
8B model), so it is off in normal runs. Every rank must see the same value (the launcher passes it to all)."""


def rank_report(trainer, s: Strategy, out: Path) -> dict[str, Any]:
    """What this rank really ran, written to out/ranks/rank-{rank}.json: accelerate's distributed type, the
    DeepSpeed engine's ZeRO stage, how many parameters are FSDP DTensors and how many are actually sharded
    (local shard smaller than the whole). With SCALESFT_RANK_REPORT=1 also `adapter_digest`, the digest of the
    full adapter this rank holds (gathered: a collective on every rank); otherwise that key is absent."""
    from torch.distributed.tensor import DTensor

    state = trainer.accelerator.state
    params = list(trainer.model.named_parameters())
    dtensors = [p for _, p in params if isinstance(p, DTensor)]
    engine = trainer.model_wrapped if trainer.is_deepspeed_enabled else None
    report = {
        "rank": s.rank, "local_rank": s.local_rank, "world_size": s.world_size, "strategy": s.name,
        "device": s.device,
        "distributed_type": str(state.distributed_type.value),
        "process_group_size": _process_group_size(),
        "zero_stage": engine.zero_optimization_stage() if engine is not None else None,
        "fsdp_version": state.fsdp_plugin.fsdp_version if getattr(state, "fsdp_plugin", None) else None,
        "dtensor_params": len(dtensors),
        "sharded_params": sum(1 for p in dtensors if p.to_local().numel() < p.numel()),
        "zero3_partitioned_params": sum(1 for _, p in params if hasattr(p, "ds_numel") and p.numel() < p.ds_numel),
        "params4bit": sum(1 for _, p in params if type(p).__name__ == "Params4bit"),
        "layout": s.layout.fields(),
    }
    if os.environ.get(RANK_REPORT_ENV) == "1":
        report["adapter_digest"] = adapter_digest(full_adapter(trainer))
    path = out / "ranks" / f"rank-{s.rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return report


def _process_group_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

