"""What a machine offers, as a value, and the pure choices that follow from it (precision, attention, Liger, the
version-pinned fast paths). trainer/hardware.py `detect()` reads the real machine; `scalesft plan` builds the
Hardware it plans for. Nothing here looks at the machine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import RecipeError

TESTED: dict[str, dict[str, tuple[str, str]]] = {
    # scalesft's own forward for peft's LoRA linear (trainer/model.py fuse_lora) reads peft's LoraLayer internals
    "fused_lora": {"peft": ("0.21", "0.22")},
    # the sdpa_varlen attention function (trainer/model.py) uses transformers' attention interface kwargs
    # (cu_seq_lens_q, max_length_q) and torch.nn.attention.varlen
    "sdpa_varlen": {"torch": ("2.11", "2.14"), "transformers": ("5.23", "5.24")},
}
"""The versions each fast path was tested with (tests/test_gpu.py on CUDA, tests/test_bench.py on CPU):
[lowest, first untested) per package. Outside them the stock path runs, and the start line says why."""


def release(version: str) -> tuple[int, ...]:
    """The leading release numbers of a version string: "2.11.0+cu130" -> (2, 11, 0), "5.23.0.dev0" -> (5, 23, 0)."""
    found = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(n) for n in found.group().split(".")) if found else ()


def untested(feature: str, versions: dict[str, str | None]) -> str | None:
    """Why `feature` must take the stock path with these installed versions (None: inside the tested range)."""
    for pkg, (low, high) in TESTED[feature].items():
        v = versions.get(pkg)
        if v is None:
            return f"{pkg} is not installed"
        if not release(low) <= release(v) < release(high):
            return f"{pkg} {v} is outside the tested range >={low},<{high}"
    return None


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
    varlen_kernel: bool = False
    """torch has torch.nn.attention.varlen (the variable-length flash attention kernel)."""
    versions: dict[str, str | None] = field(default_factory=dict)
    """Installed versions of torch, transformers and peft (what the pinned fast paths check)."""


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


def quant_compute_dtype(requested: str, precision: str) -> str:
    """quantization.compute_dtype as a torch dtype name: 'auto' follows the training precision."""
    return torch_dtype_name(precision) if requested == "auto" else requested


VARLEN_ATTN = "sdpa_varlen"
"""sdpa, except that padding-free batches run torch's variable-length flash attention per sequence (trainer/model.py)
instead of one masked attention over the whole flattened row."""


def attention(requested: str, hw: Hardware) -> str:
    """The attention implementation the model is loaded with: auto -> flash_attention_2 when installed on a GPU,
    else sdpa; sdpa -> sdpa_varlen on a GPU whose torch has the varlen kernel (tested versions only)."""
    if requested == "auto":
        requested = "flash_attention_2" if hw.cuda and hw.flash_attn else "sdpa"
    elif requested.startswith("flash_attention") and not (hw.cuda and hw.flash_attn):
        raise RecipeError(f"model.attn_implementation={requested} needs a CUDA GPU with flash-attn installed: "
                          "set model.attn_implementation=auto")
    if requested == "sdpa" and hw.cuda and hw.varlen_kernel and untested("sdpa_varlen", hw.versions) is None:
        return VARLEN_ATTN
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
