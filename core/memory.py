"""Predicted peak GPU memory per rank for a recipe, strategy and world size. Pure arithmetic: no torch import.

    estimate(shape, bits=4, lora_r=64, micro_batch=16, seq_len=1024, checkpointing=True) -> MemoryEstimate

Terms (bytes, per rank; what torch.cuda.max_memory_allocated sees, not the CUDA context):
- weights: 4-bit linears at 0.5 B/param + absmax (fp32 per 64 weights, or 8-bit + a second level with double
  quant); embeddings, LM head and norms in the compute dtype (fp32 where prepare_model_for_kbit_training upcasts,
  as the seeds do). 16-bit LoRA: every weight in bf16. ZeRO-3 / FSDP2 shard it over the ranks.
- adapter, gradients, optimizer: the LoRA parameters in their dtype (TRL keeps QLoRA adapters in bf16, peft
  upcasts them to fp32 on 16-bit weights), one gradient each, AdamW's two moments in the parameter dtype (8-bit
  optimizers: 2 B/param). ZeRO-2 shards gradients and moments, ZeRO-3 / FSDP2 everything.
- activations, per token of the micro batch (micro_batch x seq_len: the longest a padded or packed batch gets):
  with checkpointing each decoder layer keeps its input (hidden x stream bytes) and one layer at a time holds
  its full activations; without, every layer holds them. A layer's full activations are c_h x hidden +
  c_f x intermediate values, calibrated on the H100 runs in bench/runs (Liger, bf16 stream, no dropout:
  c_h 8.4, c_f 3; without Liger's SwiGLU/RMSNorm +2 h +1 f; LoRA dropout keeps a copy of each projection's
  input: +6 h +1 f).
- logits: on transformers' Trainer loss path without Liger's fused linear cross-entropy (the seeds' code) the
  [tokens x vocab] logits live in bf16 plus an fp32 copy and its fp32 gradient (10 B per vocab entry per token);
  with Liger, and on TRL's SFTTrainer (scalesft) either way, a chunk (negligible; measured).
- transient: dequantized weights, allocator slack: 2.5 hidden vectors per token (calibrated).

Fitted (C_H, C_F, TRANSIENT_H) on the 14 peaks measured on an H100 in bench/runs/h100_run{1,3}.json, and
validated on 7 peaks measured later on an H200 (bench/runs/h200_run4.json: micro batch 4-16, sequence 1024 and
2048, LoRA rank 16 and 64, 16-bit LoRA, Liger on and off, checkpointing off) that the fit never saw:
tests/test_bench_memory.py holds both sets to VALIDATED_WITHIN. Multi-GPU terms (DDP buckets, ZeRO/FSDP
sharding, ZeRO-3 offload) follow the strategies' definitions (core/strategy.py) and are not measured on GPUs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .batch import (BatchError, Batching, check_token_budget, max_token_accumulation, plan_auto_rows,
                    plan_batch)
from .flops import PROJECTIONS, Shape
from .strategy import get_strategy

GiB = 2**30
VALIDATED_WITHIN = 0.10
"""The estimate's measured error bound, on the fitted peaks and on the held-out ones (tests/test_bench_memory.py):
the one place the tolerance is stated."""
C_H, C_F = 8.4, 3.0  # full activations of one decoder layer per token, in hidden / intermediate vectors
TRANSIENT_H = 2.5  # per token, in hidden vectors (bf16)


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryEstimate:
    weights: float
    adapter: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    transient: float

    @property
    def total(self) -> float:
        return (self.weights + self.adapter + self.gradients + self.optimizer + self.activations + self.logits
                + self.transient)

    def gib(self) -> dict[str, float]:
        return {k: round(v / GiB, 2) for k, v in {**asdict(self), "total": self.total}.items()}


def _targets(t) -> tuple[str, ...]:
    return PROJECTIONS if t in (None, "all-linear") else tuple(t)


def estimate(shape: Shape, *, bits: int | None, lora_r: int, micro_batch: int, seq_len: int,
             checkpointing: bool = True, lora_targets="all-linear", double_quant: bool = True,
             liger: bool = True, lora_dropout: float = 0.0, optim: str = "adamw_torch",
             adapter_bytes: int | None = None, upcast_fp32: bool = False, strategy: str = "single",
             world_size: int = 1, full_logits: bool = False) -> MemoryEstimate:
    """Peak memory of one rank. adapter_bytes None: 2 (bf16) for quantized weights as TRL keeps them, else 4.
    full_logits: the loss holds the whole [tokens x vocab] logits (transformers' Trainer without Liger, the seeds'
    code path); TRL's SFTTrainer, which scalesft runs, does not (measured on the H200, bench/runs/h200_run4.json:
    Liger off costs +0.4 GiB at 8k tokens where whole logits would be +9.8)."""
    h, f, L, V = shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers, shape.vocab_size
    head = h * V
    embed = h * V
    linear = shape.linear_params() - head  # decoder projections
    other = embed + head + 2 * h * L + h  # embeddings, LM head, norms
    dense_b = 4 if upcast_fp32 else 2
    if bits == 4:
        absmax = linear / 64 * (1 + 4 / 256) if double_quant else linear / 64 * 4
        weights = linear * 0.5 + absmax + other * dense_b
    elif bits == 8:
        weights = linear * 1.0 + linear / 4096 * 4 + other * dense_b  # int8 + per-row scales
    else:
        weights = (linear + other) * 2
    p_lora = shape.lora_params(lora_r, _targets(lora_targets))
    a_b = adapter_bytes or (2 if bits else 4)
    adapter, grads = p_lora * a_b, p_lora * a_b
    optimizer = p_lora * (2 if "8bit" in optim else 0.1 * a_b if optim == "adafactor" else 2 * a_b)

    spec = get_strategy("ddp" if strategy == "single" else strategy)  # the sharding is the strategy's (core/strategy.py)
    if spec.shards_weights:
        # parameters sharded (or offloaded); two decoder layers gathered at a time (current + prefetch)
        per_layer = weights * (linear / L) / max(linear + other, 1)
        weights = (0.0 if spec.offloads_to_cpu else weights / world_size) + 2 * per_layer
        adapter /= world_size
    if spec.shards_optimizer:
        grads /= world_size
        optimizer = 0.0 if spec.offloads_to_cpu else optimizer / world_size
    elif world_size > 1:
        grads *= 2  # DDP: gradient buckets beside the .grad tensors

    tokens = micro_batch * seq_len
    stream_b = 4 if upcast_fp32 else 2
    c_h, c_f = C_H, C_F
    if not liger:
        c_h, c_f = c_h + 2, c_f + 1
    if lora_dropout > 0:
        c_h, c_f = c_h + 6, c_f + 1
    layer_full = (c_h * h + c_f * f) * stream_b
    per_token = (L * h * stream_b + layer_full) if checkpointing else L * layer_full
    activations = tokens * per_token
    logits = tokens * V * 10 if full_logits and not liger else 0.0
    transient = tokens * TRANSIENT_H * h * 2 * (2 if upcast_fp32 else 1)
    return MemoryEstimate(weights=weights, adapter=adapter, gradients=grads, optimizer=optimizer,
                          activations=activations, logits=logits, transient=transient)


def choose_checkpointing(budget_gib: float, shape: Shape, **kw: Any) -> bool:
    """True when the run needs activation checkpointing to stay under budget_gib (False: it fits without, and
    skipping the recomputation is ~25% faster: bench/RESULTS.md)."""
    return estimate(shape, checkpointing=False, **kw).total / GiB > budget_gib


def plan_memory(recipe, shape: Shape | None, *, strategy: str, world_size: int, precision: str,
                tokens: int | None = None) -> dict[str, Any] | None:
    """For `scalesft plan`: predicted peak GiB per GPU with and without checkpointing, or None (shape unknown).
    tokens: the most one micro-step holds (default micro_batch_size x max_seq_length)."""
    if shape is None or precision == "fp32":
        return None
    q, lo, t, d = recipe.quantization, recipe.lora, recipe.training, recipe.data
    if tokens is None:
        tokens = t.micro_batch_size * d.max_seq_length
    kw = dict(bits=q.bits, lora_r=lo.r, lora_targets=lo.target_modules, micro_batch=1,
              seq_len=tokens, double_quant=q.double_quant, liger=recipe.model.liger_kernel is not False,
              lora_dropout=lo.dropout, optim=t.optim, strategy=strategy, world_size=world_size)
    on = estimate(shape, checkpointing=True, **kw)
    off = estimate(shape, checkpointing=False, **kw)
    return {"peak_gib_checkpointing": round(on.total / GiB, 1), "peak_gib_no_checkpointing": round(off.total / GiB, 1),
            "recipe_checkpointing": t.gradient_checkpointing, "tokens_per_micro_step": tokens,
            "breakdown_gib": (on if t.gradient_checkpointing else off).gib()}


# ---------------------------------------------------------------- micro_batch_size: auto

HEADROOM = 0.85
"""Fraction of the GPU's memory the plan fills: the CUDA context, NCCL buffers and allocator fragmentation
(what max_memory_allocated does not see) take the rest."""
TOKEN_CAP = 16384
"""The most tokens auto puts in one micro-step (16 rows of 1024, the bench's fastest micro batch): beyond it a
GPU gains little and memory goes to activations that nothing needs."""
CPU_TOKENS = 4096
"""Tokens per micro-step on CPU (and where the model's shape is unknown): plenty of memory, slow compute."""
DEFAULT_GPU_GIB = 80.0
"""The GPU memory `scalesft plan` assumes where it cannot see the GPU (an H100 / A100 80 GB)."""


def tokens_that_fit(shape: Shape, gpu_gib: float, **kw: Any) -> int:
    """The most tokens one micro-step may hold so that the predicted peak stays under HEADROOM x gpu_gib."""
    fixed = estimate(shape, micro_batch=0, seq_len=1, **kw).total
    per_token = estimate(shape, micro_batch=1, seq_len=1, **kw).total - fixed
    return max(0, int((gpu_gib * HEADROOM * GiB - fixed) // per_token))


def choose_batching(recipe, shape: Shape | None, *, strategy: str, world_size: int, precision: str,
                    gpu_gib: float | None = None) -> Batching:
    """The micro-batch of one world size: the recipe's integer micro_batch_size as it is, or (auto) a row count
    (padded/packed data) or a token budget (padding-free data) sized by the memory model for the model's shape
    (None: not known here). Raises BatchError."""
    t, d = recipe.training, recipe.data
    G, L = t.global_batch_size, d.max_seq_length
    if t.micro_batch_size != "auto":
        return Batching(global_batch_size=G, world_size=world_size,
                        rows=plan_batch(G, t.micro_batch_size, world_size))
    if t.micro_batch_tokens != "auto":
        budget, source = t.micro_batch_tokens, "training.micro_batch_tokens"
        check_token_budget(budget, L)
    elif precision == "fp32":  # CPU (or an fp32 GPU run): memory is not the limit
        budget, source = max(CPU_TOKENS, 2 * L), f"the CPU default (max({CPU_TOKENS}, 2 x max_seq_length))"
    else:
        if shape is None:
            budget = max(CPU_TOKENS, 2 * L)
            source = (f"a default: the model's config.json is not local, so the memory model cannot size it "
                      f"(max({CPU_TOKENS}, 2 x max_seq_length); set training.micro_batch_tokens)")
        else:
            source = f"the memory model (core/memory.py) on {gpu_gib or DEFAULT_GPU_GIB:g} GiB per GPU"
            q, lo = recipe.quantization, recipe.lora
            fit = tokens_that_fit(shape, gpu_gib or DEFAULT_GPU_GIB, bits=q.bits, lora_r=lo.r,
                                  lora_targets=lo.target_modules, double_quant=q.double_quant,
                                  liger=recipe.model.liger_kernel is not False, lora_dropout=lo.dropout,
                                  optim=t.optim, strategy=strategy, world_size=world_size,
                                  checkpointing=t.gradient_checkpointing)
            if fit < L:
                raise BatchError(f"one row of data.max_seq_length={L} tokens does not fit: the memory model "
                                 f"(core/memory.py) leaves room for {fit} tokens per micro-step on "
                                 f"{gpu_gib or DEFAULT_GPU_GIB:g} GiB; lower data.max_seq_length, turn on "
                                 "training.gradient_checkpointing, or shard the weights (--strategy zero3)")
            budget = min(fit, max(TOKEN_CAP, 2 * L))
            if budget > 2 * L:
                budget = max(2 * L, budget // 256 * 256)
    if d.padding_free and not d.packing:
        return Batching(global_batch_size=G, world_size=world_size, micro_batch_tokens=budget, auto=True,
                        max_accumulation=max_token_accumulation(G, world_size, budget, L), budget_source=source)
    return Batching(global_batch_size=G, world_size=world_size, micro_batch_tokens=budget, auto=True,
                    rows=plan_auto_rows(G, world_size, budget // L), budget_source=source)
