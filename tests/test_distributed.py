"""trainer/distributed.py without processes: what accelerate's launch variables mean, refusals before any
model loads, and the adapter digest the multi-process tests compare ranks with."""

from __future__ import annotations

import pytest
import torch

from scalesft.launch.render import DS_CONFIG_DIR
from scalesft.core.recipe import RecipeError
from scalesft.trainer.distributed import _canonical, adapter_digest, launched

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
    from scalesft.core.recipe import recipe_from_dict
    from scalesft.trainer.distributed import resolve
    from scalesft.core.hardware import Hardware

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


class _Captured(Exception):
    """Raised by the stand-in for the process-group constructor, carrying the arguments it was given."""


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_the_process_group_is_created_with_the_recipes_ddp_timeout(env, strategy):
    """resolve() creates the process group (the Trainer comes later and cannot change it): torch's
    init_process_group (DDP, FSDP2) or deepspeed.comm.init_distributed (ZeRO) must get training.ddp_timeout.
    The constructor is replaced by one that records its arguments and stops: no group, no processes.
    (tests/test_distributed_launch.py::test_hung_rank_fails_after_ddp_timeout shows the real effect.)"""
    from datetime import timedelta

    from accelerate import PartialState

    from scalesft.core.recipe import recipe_from_dict
    from scalesft.trainer.distributed import resolve
    from scalesft.core.hardware import Hardware

    def capture(*args, **kwargs):
        raise _Captured(kwargs)

    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999",
                 "OMP_NUM_THREADS": str(torch.get_num_threads())}.items():  # else accelerate sets 1 thread here
        env.setenv(k, v)
    if strategy == "zero2":
        import deepspeed.comm

        env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        env.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(DS_CONFIG_DIR / "zero2.json"))
        env.setattr(deepspeed.comm, "init_distributed", capture)
    else:
        env.setattr(torch.distributed, "init_process_group", capture)
    recipe = recipe_from_dict({"model": {"name_or_path": "x"}, "data": {"path": "x.json"},
                               "training": {"output_dir": "o", "ddp_timeout": 7}})
    PartialState._reset_state()
    try:
        with pytest.raises(_Captured) as got:
            resolve(Hardware(cuda=False), recipe, "fp32")
    finally:
        PartialState._reset_state()
    kwargs = got.value.args[0]
    assert kwargs["timeout"] == timedelta(seconds=7)
    if strategy == "zero2":
        assert kwargs["dist_backend"] == "gloo"


def test_a_collective_timeout_becomes_one_line(env):
    from scalesft.trainer.distributed import collective_timeout_line

    gloo = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 20000ms for recv operation")
    assert collective_timeout_line(gloo, 20) is None  # one process: no other rank to blame
    env.setenv("WORLD_SIZE", "3")
    env.setenv("RANK", "2")
    assert collective_timeout_line(gloo, 20) == (
        "rank 2 of 3: a collective waited longer than training.ddp_timeout=20 s for the other rank(s) (0, 1): "
        "one of them hung or died; its own log shows where it stopped")
    assert collective_timeout_line(RuntimeError("CUDA out of memory"), 20) is None
    assert collective_timeout_line(ValueError("timed out"), 20) is None
