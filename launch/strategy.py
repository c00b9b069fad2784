"""Distributed strategies and what each one needs from the model load. Pure: no torch, no environment.

A strategy names one accelerate config (accelerate_configs/) and, for DeepSpeed, one ds json (ds_configs/).
`resolve_qlora` answers, for a recipe's quantization and a strategy, how the base model must be loaded;
the trainer (trainer/distributed.py) and `scalesft plan` both call it, so the plan shows what a run does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE_CONFIG_DIR = ROOT / "accelerate_configs"
DS_CONFIG_DIR = ROOT / "ds_configs"

Strategy = Literal["ddp", "zero2", "zero3", "zero3_offload", "fsdp2"]


@dataclass(frozen=True, kw_only=True, slots=True)
class StrategySpec:
    name: str
    accelerate_config: str
    """File name in accelerate_configs/."""
    ds_config: str | None
    """File name in ds_configs/ (DeepSpeed strategies only)."""
    zero_stage: int | None
    shards_weights: bool
    """Weights are sharded across ranks (ZeRO-3, FSDP): quantized weights must be stored in the compute dtype
    and the model must not be placed with a device_map."""
    summary: str


STRATEGIES: dict[str, StrategySpec] = {s.name: s for s in (
    StrategySpec(name="ddp", accelerate_config="ddp.yaml", ds_config=None, zero_stage=None, shards_weights=False,
                 summary="DDP: full replica per process, gradients all-reduced"),
    StrategySpec(name="zero2", accelerate_config="zero2.yaml", ds_config="zero2.json", zero_stage=2,
                 shards_weights=False, summary="DeepSpeed ZeRO-2: optimizer state + gradients sharded"),
    StrategySpec(name="zero3", accelerate_config="zero3.yaml", ds_config="zero3.json", zero_stage=3,
                 shards_weights=True, summary="DeepSpeed ZeRO-3: weights + gradients + optimizer state sharded"),
    StrategySpec(name="zero3_offload", accelerate_config="zero3.yaml", ds_config="zero3_offload.json",
                 zero_stage=3, shards_weights=True,
                 summary="DeepSpeed ZeRO-3 with weights and optimizer state offloaded to CPU memory"),
    StrategySpec(name="fsdp2", accelerate_config="fsdp2.yaml", ds_config=None, zero_stage=None,
                 shards_weights=True, summary="FSDP2 (fully_shard per decoder layer)"),
)}


class StrategyError(ValueError):
    """A strategy that does not exist or cannot run this recipe: one line with the fix."""


def get_strategy(name: str) -> StrategySpec:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise StrategyError(f"unknown strategy '{name}': choose one of {', '.join(STRATEGIES)}") from None


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True, kw_only=True, slots=True)
class QLoraResolution:
    bits: int | None
    compute_dtype: str | None
    quant_storage: str | None
    """bnb_4bit_quant_storage: the compute dtype when weights are sharded, else uint8 (bnb's default)."""
    device_map: str | None
    """'local_rank' (one device per process: {"": local_rank}) or None (let the strategy place weights)."""
    gradient_checkpointing_reentrant: bool | None
    """None when checkpointing is off."""


def resolve_qlora(*, strategy: str, bits: int | None, compute_dtype: str, precision: str,
                  gradient_checkpointing: bool) -> QLoraResolution:
    """How to load the base model for this strategy. precision: the resolved one (bf16, fp16 or fp32);
    compute_dtype: the recipe's quantization.compute_dtype ('auto' follows precision).

    Raises StrategyError for combinations known not to work."""
    spec = get_strategy(strategy)
    if bits == 8 and spec.shards_weights:
        raise StrategyError(
            f"quantization.bits=8 cannot run under {strategy}: LLM.int8 weights cannot be sharded "
            f"(only 4-bit weights can be stored in the compute dtype); use quantization.bits=4, or "
            f"--strategy ddp / zero2")
    dtype = DTYPES[precision] if compute_dtype == "auto" else compute_dtype
    quantized = bits is not None
    # TRL's SFTTrainer (1.16) forces use_reentrant=True for PEFT under ZeRO-3; everything else runs
    # non-reentrant, which DDP needs to avoid marking parameters ready twice.
    reentrant = None if not gradient_checkpointing else spec.zero_stage == 3
    return QLoraResolution(
        bits=bits,
        compute_dtype=dtype if quantized else None,
        quant_storage=(dtype if spec.shards_weights else "uint8") if bits == 4 else None,
        device_map=None if (spec.shards_weights or not quantized) else "local_rank",
        gradient_checkpointing_reentrant=reentrant,
    )


def checkpointing_label(reentrant: bool | None) -> str:
    return "off" if reentrant is None else ("reentrant" if reentrant else "non-reentrant")


def planned_precision(requested: str, cpu: bool) -> str:
    """The precision a run will use on CPU processes, or on GPUs assumed bf16-capable (Ampere or newer).
    The trainer decides from the real hardware (trainer/hardware.py); this is the same rule for planning."""
    from trainer.hardware import Hardware, precision

    return precision(requested, Hardware(cuda=not cpu, bf16=not cpu, device_name="a planned GPU"))
