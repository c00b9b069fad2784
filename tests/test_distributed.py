"""trainer/distributed.py without processes: what accelerate's launch variables mean, refusals before any
model loads, and the adapter digest the multi-process tests compare ranks with."""

from __future__ import annotations

import pytest
import torch

from launch.strategy import DS_CONFIG_DIR
from trainer.config import RecipeError
from trainer.distributed import _canonical, adapter_digest, launched

LAUNCH_VARS = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_USE_FSDP", "FSDP_VERSION",
               "ACCELERATE_DEEPSPEED_ZERO_STAGE")


@pytest.fixture
def env(monkeypatch):
    for k in LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_launch_is_read_through_accelerates_plugin(env, stage):
    env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    env.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(DS_CONFIG_DIR / f"zero{stage}.json"))
    assert launched() == (f"zero{stage}", stage, None)


def test_fsdp_launch(env):
    env.setenv("ACCELERATE_USE_FSDP", "true")
    env.setenv("FSDP_VERSION", "2")
    assert launched() == ("fsdp2", None, 2)
    env.setenv("FSDP_VERSION", "1")
    with pytest.raises(RecipeError, match="FSDP version 1 is not supported"):
        launched()


def test_plain_launch_is_ddp(env):
    assert launched() == ("ddp", None, None)


def test_eight_bit_under_zero3_is_refused_before_any_process_group(env):
    from trainer.config import recipe_from_dict
    from trainer.distributed import resolve
    from trainer.hardware import Hardware

    env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    env.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(DS_CONFIG_DIR / "zero3.json"))
    recipe = recipe_from_dict({"model": {"name_or_path": "x"}, "data": {"path": "x.json"},
                               "training": {"output_dir": "o"}, "quantization": {"bits": 8}})
    with pytest.raises(RecipeError, match="quantization.bits=8 cannot run under zero3"):
        resolve(Hardware(cuda=False, bitsandbytes=True), recipe, "fp32")


def test_adapter_digest_matches_in_memory_and_saved_names():
    a = {"base_model.model.layers.0.q_proj.lora_A.default.weight": torch.ones(2, 3),
         "base_model.model.layers.0.q_proj.lora_B.default.weight": torch.zeros(3, 2)}
    saved = {_canonical(k): v.clone() for k, v in a.items()}
    assert set(saved) == {"base_model.model.layers.0.q_proj.lora_A.weight", "base_model.model.layers.0.q_proj.lora_B.weight"}
    assert adapter_digest(a) == adapter_digest(saved)
    saved["base_model.model.layers.0.q_proj.lora_B.weight"][0, 0] = 1e-7
    assert adapter_digest(a) != adapter_digest(saved)
    assert _canonical("module.base_model.x.lora_A.default.weight") == "base_model.x.lora_A.weight"
