"""The one specification of each distributed strategy, and the layout a run gets from it. Pure: no torch, no
environment.

Everything that differs between DDP, ZeRO-2, ZeRO-3 (with or without CPU offload) and FSDP2 is a field of its
StrategySpec below: the accelerate/DeepSpeed config files, the variables its processes need on CPU, whether it
shards the weights (and so where the model is placed and how 4-bit weights are stored), checkpoint reentrancy,
whether the LoRA forward may be fused, and what the memory model shards. `layout()` turns a spec, the recipe and
the hardware into the Layout that `scalesft plan --json` prints and that the trainer runs and prints on its start
line (trainer/distributed.py): one function, so the two cannot disagree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .hardware import Hardware, attention, quant_compute_dtype, untested


@dataclass(frozen=True, kw_only=True, slots=True)
class StrategySpec:
    name: str
    summary: str
    accelerate_config: str
    """File name in accelerate_configs/."""
    ds_config: str | None = None
    """File name in ds_configs/ (DeepSpeed strategies only)."""
    zero_stage: int | None = None
    fsdp_version: int | None = None
    shards_weights: bool = False
    """Weights are sharded across ranks (ZeRO-3, FSDP2): 4-bit weights are stored in the compute dtype (so they
    can be flattened and split) and the model is not placed with a device_map (the engine places the shards)."""
    shards_optimizer: bool = False
    """Gradients and optimizer state are sharded (ZeRO-2 and everything that shards weights)."""
    offloads_to_cpu: bool = False
    """Weights and optimizer state live in CPU memory between uses (ZeRO-3 offload)."""
    reentrant_checkpointing: bool = False
    """Activation checkpointing runs reentrant: TRL's SFTTrainer forces it for PEFT models under ZeRO-3. Everywhere
    else non-reentrant, which DDP needs (a reentrant backward marks parameters ready twice)."""
    fuses_lora: bool = False
    """The fused LoRA forward may replace peft's: not where hooks gather lora_B's weight only when lora_B itself
    is called (ZeRO-3, FSDP2)."""
    cpu_env: dict[str, str] = field(default_factory=dict)
    """Variables the processes need to run on CPU (gloo). DDP and FSDP2 take the torchrun path with accelerate's
    ACCELERATE_USE_CPU in the processes (`accelerate launch --cpu` starts one process; `use_cpu: true` in a config
    file never reaches them); DeepSpeed its own CPU accelerator."""


_TORCHRUN_CPU = {"ACCELERATE_USE_CPU": "true"}
_DEEPSPEED_CPU = {"DS_ACCELERATOR": "cpu"}

STRATEGIES: dict[str, StrategySpec] = {s.name: s for s in (
    StrategySpec(name="ddp", summary="DDP: full replica per process, gradients all-reduced",
                 accelerate_config="ddp.yaml", fuses_lora=True, cpu_env=_TORCHRUN_CPU),
    StrategySpec(name="zero2", summary="DeepSpeed ZeRO-2: optimizer state + gradients sharded",
                 accelerate_config="zero2.yaml", ds_config="zero2.json", zero_stage=2, shards_optimizer=True,
                 fuses_lora=True, cpu_env=_DEEPSPEED_CPU),
    StrategySpec(name="zero3", summary="DeepSpeed ZeRO-3: weights + gradients + optimizer state sharded",
                 accelerate_config="zero3.yaml", ds_config="zero3.json", zero_stage=3, shards_weights=True,
                 shards_optimizer=True, reentrant_checkpointing=True, cpu_env=_DEEPSPEED_CPU),
    StrategySpec(name="zero3_offload",
                 summary="DeepSpeed ZeRO-3 with weights and optimizer state offloaded to CPU memory",
                 accelerate_config="zero3.yaml", ds_config="zero3_offload.json", zero_stage=3, shards_weights=True,
                 shards_optimizer=True, offloads_to_cpu=True, reentrant_checkpointing=True, cpu_env=_DEEPSPEED_CPU),
    StrategySpec(name="fsdp2", summary="FSDP2 (fully_shard per decoder layer)", accelerate_config="fsdp2.yaml",
                 fsdp_version=2, shards_weights=True, shards_optimizer=True, cpu_env=_TORCHRUN_CPU),
)}


class StrategyError(ValueError):
    """A strategy that does not exist or cannot run this recipe: one line with the fix."""


def get_strategy(name: str) -> StrategySpec:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise StrategyError(f"unknown strategy '{name}': choose one of {', '.join(STRATEGIES)}") from None


def strategy_of(*, zero_stage: int | None, offload: bool = False, fsdp_version: int | None = None) -> str:
    """The strategy name of what accelerate was launched with (its DeepSpeed / FSDP plugin's settings)."""
    if zero_stage is not None:
        found = [s.name for s in STRATEGIES.values() if s.zero_stage == zero_stage and s.offloads_to_cpu == offload]
    elif fsdp_version is not None:
        found = [s.name for s in STRATEGIES.values() if s.fsdp_version == fsdp_version]
    else:
        return "ddp"
    if not found:
        what = f"DeepSpeed ZeRO stage {zero_stage}" if zero_stage is not None else f"FSDP version {fsdp_version}"
        raise StrategyError(f"{what} is not supported: launch one of {', '.join(STRATEGIES)} "
                            "(scalesft train --strategy S uses the shipped config)")
    return found[0]


@dataclass(frozen=True, kw_only=True, slots=True)
class Layout:
    """How one run is laid out on its processes: what `scalesft plan --json` shows under "layout" and what the
    trainer's start line prints (the same keys, the same values)."""

    strategy: str
    """The strategy's name; "single" for ddp on one process."""
    sharded: bool
    """Weights sharded over the ranks."""
    device_map: str | None
    """"local_rank" (the whole model on this process's device: {"": device}) or None (from_pretrained loads on
    the CPU and the strategy places, or shards, the weights)."""
    quant_storage: str | None
    """bnb_4bit_quant_storage: the compute dtype when weights are sharded, else uint8 (bnb's default); None
    without 4-bit weights."""
    checkpointing: str
    """off | reentrant | non-reentrant."""
    attention: str
    """The attn_implementation the model is loaded with (sdpa_varlen: trainer/model.py)."""
    lora: str
    """fused (scalesft's one-GEMM LoRA forward) or peft (peft's own forward)."""
    notes: tuple[str, ...] = ()
    """Why a fast path is off, when the reason is not the strategy (versions, dropout, DoRA): printed once."""

    @property
    def reentrant(self) -> bool | None:
        return None if self.checkpointing == "off" else self.checkpointing == "reentrant"

    def fields(self) -> dict[str, object]:
        """The compared keys (plan --json "layout", the start line), notes left out."""
        d = asdict(self)
        d.pop("notes")
        return d

    def line(self) -> str:
        """key=value pairs, as the start line prints them (parsed back by tests: values have no spaces)."""
        return " ".join(f"{k}={v}" for k, v in layout_text(self.fields()).items())


def layout_text(fields: dict[str, object]) -> dict[str, str]:
    """Layout fields (as `fields()` or plan --json's "layout" give them) as the start line writes them."""
    return {k: "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()}


def layout(*, strategy: str, world_size: int, hw: Hardware, precision: str, bits: int | None,
           compute_dtype: str = "auto", gradient_checkpointing: bool, attn_implementation: str = "auto",
           lora_dropout: float = 0.0, use_dora: bool = False) -> Layout:
    """The layout of a run of this strategy at this world size on this hardware. precision: the resolved one
    (bf16, fp16 or fp32); compute_dtype: quantization.compute_dtype ('auto' follows precision).
    Raises StrategyError (and RecipeError from the attention choice) for combinations known not to work."""
    spec = get_strategy(strategy)
    if bits == 8 and spec.shards_weights:
        raise StrategyError(
            f"quantization.bits=8 cannot run under {strategy}: LLM.int8 weights cannot be sharded "
            f"(only 4-bit weights can be stored in the compute dtype); use quantization.bits=4, or "
            f"--strategy ddp / zero2")
    notes = []
    if not spec.fuses_lora:
        lora = "peft"
    elif lora_dropout > 0 or use_dora:
        lora = "peft"
        notes.append("lora=peft: the fused LoRA forward has no dropout or DoRA (lora.dropout=0, lora.use_dora=false "
                     "enable it)")
    elif (why := untested("fused_lora", hw.versions)) is not None:
        lora = "peft"
        notes.append(f"lora=peft: the fused LoRA forward is off because {why}")
    else:
        lora = "fused"
    attn = attention(attn_implementation, hw)
    if attn == "sdpa" and hw.cuda and hw.varlen_kernel and (why := untested("sdpa_varlen", hw.versions)):
        notes.append(f"attention=sdpa: torch's varlen attention is off because {why}")
    checkpointing = "off" if not gradient_checkpointing else (
        "reentrant" if spec.reentrant_checkpointing else "non-reentrant")
    storage = quant_compute_dtype(compute_dtype, precision) if spec.shards_weights else "uint8"  # bnb's default
    return Layout(
        strategy="single" if strategy == "ddp" and world_size == 1 else strategy,
        sharded=spec.shards_weights,
        device_map=None if spec.shards_weights or not (bits or hw.cuda) else "local_rank",
        quant_storage=storage if bits == 4 else None,
        checkpointing=checkpointing,
        attention=attn,
        lora=lora,
        notes=tuple(notes),
    )


def recipe_layout(recipe, *, strategy: str, world_size: int, hw: Hardware, precision: str) -> Layout:
    """layout() for a recipe (core.recipe.Recipe): the one call both `scalesft plan` and the trainer make."""
    q, lo = recipe.quantization, recipe.lora
    return layout(strategy=strategy, world_size=world_size, hw=hw, precision=precision, bits=q.bits,
                  compute_dtype=q.compute_dtype, gradient_checkpointing=recipe.training.gradient_checkpointing,
                  attn_implementation=recipe.model.attn_implementation, lora_dropout=lo.dropout,
                  use_dora=lo.use_dora)


def planned_hardware(*, cpu: bool, flash_attn: bool = False, liger: bool = False, varlen_kernel: bool = False,
                     versions: dict[str, str | None] | None = None, gpu_memory_gib: float | None = None,
                     bitsandbytes: bool = True) -> Hardware:
    """The machine a plan is for: CPU processes, or GPUs assumed bf16-capable (Ampere or newer) with this
    machine's packages. The trainer reads the real one (trainer/hardware.py detect)."""
    if cpu:
        return Hardware(cuda=False, device_name="cpu", bitsandbytes=bitsandbytes, versions=dict(versions or {}))
    return Hardware(cuda=True, bf16=True, device_name="a planned GPU", flash_attn=flash_attn, liger=liger,
                    bitsandbytes=bitsandbytes, gpu_memory_gib=gpu_memory_gib, varlen_kernel=varlen_kernel,
                    versions=dict(versions or {}))
