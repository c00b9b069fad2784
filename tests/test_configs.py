"""Every shipped accelerate and DeepSpeed config loads with the library that reads it, names the strategy it
claims, bakes in no process counts, and leaves batch/precision to the training arguments ("auto")."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import yaml

from scalesft.launch.render import ACCELERATE_CONFIG_DIR, DS_CONFIG_DIR, ROOT
from scalesft.core.strategy import STRATEGIES

ACCELERATE_FILES = sorted(ACCELERATE_CONFIG_DIR.glob("*.yaml"))
DS_FILES = sorted(DS_CONFIG_DIR.glob("*.json"))
EXPECTED_TYPE = {"ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "zero3_offload": "DEEPSPEED",
                 "fsdp2": "FSDP"}


def test_every_strategy_has_its_files_and_nothing_is_orphaned():
    assert {p.name for p in ACCELERATE_FILES} == {s.accelerate_config for s in STRATEGIES.values()}
    assert {p.name for p in DS_FILES} == {s.ds_config for s in STRATEGIES.values() if s.ds_config}
    assert {"ddp.yaml", "zero2.yaml", "zero3.yaml", "fsdp2.yaml"} <= {p.name for p in ACCELERATE_FILES}
    assert {"zero2.json", "zero3.json", "zero3_offload.json"} <= {p.name for p in DS_FILES}


@pytest.mark.parametrize("path", ACCELERATE_FILES, ids=lambda p: p.name)
def test_accelerate_config_loads(path):
    from accelerate.commands.config import load_config_from_file

    raw = yaml.safe_load(path.read_text())
    for key in ("num_processes", "num_machines", "machine_rank", "main_process_ip", "main_process_port", "gpu_ids"):
        assert key not in raw, f"{path.name} bakes in {key}: the launcher passes it"
    cfg = load_config_from_file(str(path))
    assert cfg.num_processes in (None, -1, 1), cfg.num_processes
    users = [name for name, s in STRATEGIES.items() if s.accelerate_config == path.name]
    for name in users:
        assert cfg.distributed_type.value == EXPECTED_TYPE[name]
    if cfg.distributed_type.value == "DEEPSPEED":
        ds_file = ROOT / cfg.deepspeed_config["deepspeed_config_file"]
        assert ds_file.is_file(), f"{path.name} points to a missing {ds_file}"
    if cfg.distributed_type.value == "FSDP":
        assert cfg.fsdp_config["fsdp_version"] == 2
        assert cfg.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # the adapter is saved whole


@pytest.mark.parametrize("path", DS_FILES, ids=lambda p: p.name)
def test_deepspeed_config_loads_and_takes_the_training_arguments(path):
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    raw = json.loads(path.read_text())
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert raw[key] == "auto", f"{path.name}: {key} must be 'auto' (the training arguments are the one source)"
    assert raw["bf16"]["enabled"] == "auto" and raw["fp16"]["enabled"] == "auto"
    stage = raw["zero_optimization"]["stage"]
    assert stage == int(path.stem[4])  # zero2.json -> 2, zero3*.json -> 3
    if stage == 3:  # without it the saved adapter is the near-empty ZeRO-3 placeholder
        assert raw["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True

    plugin = DeepSpeedPlugin(hf_ds_config=str(path))
    assert plugin.zero_stage == stage
    # Fill the "auto" values as the Trainer does, for 3 processes x micro 2 x accumulation 4.
    ds = HfTrainerDeepSpeedConfig(str(path))
    args = SimpleNamespace(world_size=3, per_device_train_batch_size=2, gradient_accumulation_steps=4,
                           max_grad_norm=1.0, learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.999,
                           adam_epsilon=1e-8, weight_decay=0.0, save_on_each_node=False, fp16=False,
                           fp16_full_eval=False, bf16=True, bf16_full_eval=False)
    ds.trainer_config_process(args)
    assert not ds.mismatches
    assert ds.config["train_batch_size"] == 24
    assert ds.config["gradient_accumulation_steps"] == 4
    assert ds.config["bf16"]["enabled"] is True and ds.config["fp16"]["enabled"] is False
