"""The machine this process runs on, read once (core/hardware.py holds the pure choices that follow from it)."""

from __future__ import annotations

import importlib.util

from scalesft.core.hardware import Hardware


def installed_versions() -> dict[str, str | None]:
    """torch, transformers and peft as installed (what core.hardware.TESTED pins the fast paths to)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


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
        varlen_kernel=importlib.util.find_spec("torch.nn.attention.varlen") is not None,
        versions=installed_versions(),
    )
