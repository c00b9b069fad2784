"""Which distributed strategy this process runs under, read from accelerate's state, and what it implies
for model loading and the training arguments.

First version: single process and DDP (GPU, or CPU/gloo). ZeRO and FSDP2 are resolved by the launcher work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .hardware import Hardware


@dataclass(kw_only=True)
class Strategy:
    name: str
    """single | ddp | zero2 | zero3 | fsdp2"""
    world_size: int
    rank: int
    local_rank: int
    device: str
    device_map: Any = None
    """For from_pretrained: quantized models under single/DDP/ZeRO-2 live whole on this rank's device."""
    quant_storage: str | None = None
    """bnb_4bit_quant_storage: the compute dtype under ZeRO-3/FSDP2 so the 4-bit weights can be sharded."""
    args: dict[str, Any] = field(default_factory=dict)
    """Extra SFTConfig arguments this strategy needs."""

    def log_line(self) -> str:
        return (f"rank {self.rank} (local {self.local_rank}) of {self.world_size}: strategy={self.name} "
                f"device={self.device}")


def resolve(hw: Hardware, quantized: bool) -> Strategy:
    from accelerate import PartialState

    state = PartialState(cpu=not hw.cuda)
    world, rank, local = state.num_processes, state.process_index, state.local_process_index
    device = f"cuda:{local}" if hw.cuda else "cpu"
    args: dict[str, Any] = {"use_cpu": not hw.cuda}
    if world > 1:
        args["ddp_find_unused_parameters"] = False
    return Strategy(name="ddp" if world > 1 else "single", world_size=world, rank=rank, local_rank=local,
                    device=device, device_map={"": device} if quantized or hw.cuda else None, args=args)
