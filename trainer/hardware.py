"""What the machine offers, read once, and the pure choices that follow from it.

`detect()` is the only function here that looks at the machine; everything else takes a Hardware value,
so precision and attention choices are unit-testable for any machine.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from .config import RecipeError


@dataclass(frozen=True, kw_only=True, slots=True)
class Hardware:
    cuda: bool
    bf16: bool = False
    """The GPU computes in bfloat16 natively (Ampere or newer)."""
    device_name: str = "cpu"
    flash_attn: bool = False
    liger: bool = False
    bitsandbytes: bool = False
    gpu_memory_gib: float | None = None
    """Memory of this process's GPU (what micro_batch_size auto plans for); None on CPU."""


def detect() -> Hardware:
    import torch

    cuda = torch.cuda.is_available()
    return Hardware(
        cuda=cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(including_emulation=False),
        device_name=torch.cuda.get_device_name(0) if cuda else "cpu",
        flash_attn=importlib.util.find_spec("flash_attn") is not None,
        liger=importlib.util.find_spec("liger_kernel") is not None,
        bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None,
        gpu_memory_gib=torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
        if cuda else None,
    )


def precision(requested: str, hw: Hardware) -> str:
    """'bf16' | 'fp16' | 'fp32' from the recipe's training.precision and the hardware."""
    if requested == "auto":
        if not hw.cuda:
            return "fp32"
        return "bf16" if hw.bf16 else "fp16"
    if requested == "bf16" and not hw.bf16:
        where = hw.device_name if hw.cuda else "this CPU-only machine"
        raise RecipeError(f"training.precision=bf16 but {where} has no native bfloat16: "
                          "set training.precision=auto (fp16 on older GPUs, fp32 on CPU)")
    if requested == "fp16" and not hw.cuda:
        raise RecipeError("training.precision=fp16 needs a CUDA GPU: set training.precision=auto (fp32 on CPU)")
    return requested


def torch_dtype_name(prec: str) -> str:
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[prec]


def attention(requested: str, hw: Hardware) -> str:
    if requested == "auto":
        return "flash_attention_2" if hw.cuda and hw.flash_attn else "sdpa"
    if requested.startswith("flash_attention") and not (hw.cuda and hw.flash_attn):
        raise RecipeError(f"model.attn_implementation={requested} needs a CUDA GPU with flash-attn installed: "
                          "set model.attn_implementation=auto")
    return requested


def use_liger(requested: bool | str, hw: Hardware) -> bool:
    if requested == "auto":
        return hw.cuda and hw.liger
    if requested and not hw.liger:
        raise RecipeError("model.liger_kernel=true but liger-kernel is not installed: "
                          "pip install 'scalesft[gpu]' or set model.liger_kernel=auto")
    return bool(requested)


def check_quantization(bits: int | None, hw: Hardware) -> None:
    if bits and not hw.bitsandbytes:
        raise RecipeError(f"quantization.bits={bits} needs bitsandbytes, which is not importable: "
                          "pip install 'scalesft[quant]' or set quantization.bits=null (LoRA on 16-bit weights)")
