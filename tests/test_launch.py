"""The launcher without launching: rendered commands (checked by accelerate's own parser), `scalesft plan`,
`scalesft train --dry-run`, and every bad input refused with one line before any process starts."""

from __future__ import annotations

import json
import socket
import time

import pytest
import yaml

from scalesft.core.batch import nearest_global_batches
from scalesft.core.strategy import STRATEGIES, StrategyError, layout, planned_hardware
from scalesft.launch import plan as plan_mod
from scalesft.launch import run as run_mod
from scalesft.launch.render import ACCELERATE_CONFIG_DIR, DS_CONFIG_DIR, LaunchError, render_launch
from scalesft.trainer.tiny import korean_qa_rows

ALL = ["ddp", "zero2", "zero3", "zero3_offload", "fsdp2"]


@pytest.fixture
def recipe(tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(korean_qa_rows(64), ensure_ascii=False), encoding="utf-8")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tmp_path / "no-model-is-loaded")},
        "data": {"path": str(data), "max_seq_length": 256},
        "training": {"output_dir": str(tmp_path / "out"), "global_batch_size": 16, "micro_batch_size": 2},
        "quantization": {"bits": 4},
    }))
    return path


def accelerate_view(argv):
    """What `accelerate launch` makes of a rendered argv: its own parser and config validation."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    assert argv[1] == "launch"
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv[2:]))
    return args


@pytest.mark.parametrize("strategy", ALL)
def test_render_each_strategy_as_accelerate_reads_it(strategy):
    cmd = render_launch(recipe="r.yaml", overrides=["training.max_steps=5"], strategy=strategy, num_processes=4)
    assert all(isinstance(a, str) for a in cmd.argv) and cmd.env == {}  # on GPUs nothing extra is set
    assert "--cpu" not in cmd.argv  # `accelerate launch --cpu` silently starts ONE process, whatever --num_processes
    a = accelerate_view(cmd.argv)
    assert a.num_processes == 4 and a.num_machines == 1
    assert a.module and a.training_script == "scalesft.trainer.train" and a.training_script_args == ["r.yaml",
                                                                                            "training.max_steps=5"]
    spec = STRATEGIES[strategy]
    assert a.config_file == str(ACCELERATE_CONFIG_DIR / spec.accelerate_config)
    assert (a.use_deepspeed, a.use_fsdp, a.multi_gpu) == (spec.zero_stage is not None, strategy == "fsdp2",
                                                          strategy == "ddp")
    if spec.ds_config:  # absolute, so the launch works from any directory
        assert a.deepspeed_config_file == str(DS_CONFIG_DIR / spec.ds_config)
        assert a.zero3_init_flag == (spec.zero_stage == 3)
    if strategy == "fsdp2":
        assert int(a.fsdp_version) == 2


@pytest.mark.parametrize("strategy", ALL)
def test_render_cpu_takes_the_paths_that_work(strategy):
    """DDP/FSDP on CPU need ACCELERATE_USE_CPU in the processes (the torchrun path; `use_cpu: true` in a config
    file never reaches them); DeepSpeed must NOT get use_cpu (the trainer passes ddp_backend=gloo instead).
    tests/test_distributed_launch.py runs each of these paths with 2 real processes."""
    cmd = render_launch(recipe="r.yaml", strategy=strategy, num_processes=2, cpu=True, threads_per_process=1)
    if STRATEGIES[strategy].zero_stage is None:
        assert cmd.env == {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
        assert accelerate_view(cmd.argv).multi_gpu or strategy == "fsdp2"  # torchrun, not the simple launcher
    else:
        assert cmd.env == {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    assert cmd.shell().startswith(" ".join(f"{k}={v}" for k, v in sorted(cmd.env.items())) + " accelerate launch ")


def test_render_multi_node():
    cmd = render_launch(recipe="r.yaml", strategy="zero3", num_processes=16, num_machines=2,
                        machine_rank=1, main_process_ip="10.0.0.1", main_process_port=29600)
    a = accelerate_view(cmd.argv)
    assert (a.num_processes, a.num_machines, a.machine_rank, a.main_process_ip, a.main_process_port) == \
        (16, 2, 1, "10.0.0.1", 29600)
    # what slurm/train.sh always ran over several nodes: static rendezvous, no restarts
    assert (a.rdzv_backend, a.max_restarts, a.monitor_interval) == ("static", 0, 1)
    assert "--rdzv_backend" not in render_launch(recipe="r.yaml", num_processes=2).argv
    with pytest.raises(LaunchError, match="machine rank 2 is not one of the 2 machines"):
        render_launch(recipe="r.yaml", num_processes=16, num_machines=2, machine_rank=2, main_process_ip="h")
    with pytest.raises(LaunchError, match="main process address"):
        render_launch(recipe="r.yaml", num_processes=16, num_machines=2)
    with pytest.raises(LaunchError, match="do not split evenly"):
        render_launch(recipe="r.yaml", num_processes=15, num_machines=2, main_process_ip="h")


TESTED_VERSIONS = {"torch": "2.13.0", "transformers": "5.23.0", "peft": "0.21.2"}


def test_layout_per_strategy():
    gpu = planned_hardware(cpu=False, varlen_kernel=True, versions=TESTED_VERSIONS)
    kw = dict(world_size=8, hw=gpu, precision="bf16", bits=4, gradient_checkpointing=True)
    expect = {  # sharded, device_map, quant_storage, checkpointing, lora
        "ddp": (False, "local_rank", "uint8", "non-reentrant", "fused"),
        "zero2": (False, "local_rank", "uint8", "non-reentrant", "fused"),
        "zero3": (True, None, "bfloat16", "reentrant", "peft"),
        "zero3_offload": (True, None, "bfloat16", "reentrant", "peft"),
        "fsdp2": (True, None, "bfloat16", "non-reentrant", "peft"),
    }
    for name, want in expect.items():
        lay = layout(strategy=name, **kw)
        assert (lay.sharded, lay.device_map, lay.quant_storage, lay.checkpointing, lay.lora) == want, name
        assert lay.attention == "sdpa_varlen" and lay.strategy == name
    assert layout(strategy="ddp", **{**kw, "world_size": 1}).strategy == "single"
    cpu = layout(strategy="ddp", world_size=1, hw=planned_hardware(cpu=True, versions=TESTED_VERSIONS),
                 precision="fp32", bits=None, gradient_checkpointing=False)
    assert (cpu.device_map, cpu.quant_storage, cpu.checkpointing, cpu.attention) == (None, None, "off", "sdpa")
    # unquantized LoRA on a GPU: the whole model on this process's GPU, as the trainer loads it
    assert layout(strategy="ddp", **{**kw, "bits": None}).device_map == "local_rank"
    with pytest.raises(StrategyError, match="bits=8 cannot run under zero3"):
        layout(strategy="zero3", **{**kw, "bits": 8})


def test_layout_falls_back_to_the_stock_paths_outside_the_tested_versions():
    old = planned_hardware(cpu=False, varlen_kernel=True, versions={**TESTED_VERSIONS, "peft": "0.30.0",
                                                                    "transformers": "5.40.1"})
    lay = layout(strategy="ddp", world_size=1, hw=old, precision="bf16", bits=4, gradient_checkpointing=True)
    assert (lay.lora, lay.attention) == ("peft", "sdpa")
    assert any("peft 0.30.0 is outside the tested range >=0.21,<0.22" in n for n in lay.notes)
    assert any("transformers 5.40.1 is outside the tested range" in n for n in lay.notes)
    dropout = layout(strategy="ddp", world_size=1, hw=old, precision="bf16", bits=4, gradient_checkpointing=True,
                     lora_dropout=0.05)
    assert dropout.lora == "peft" and "lora.dropout=0" in dropout.notes[0]


def test_plan_json(recipe, capsys):
    rc = plan_mod.main([str(recipe), "--nodes", "1,2", "--gpus-per-node", "2", "--gpus-per-node", "4", "--strategy", "zero3",
                        "--json", "training.max_steps=7"])
    assert rc == 0
    entries = json.loads(capsys.readouterr().out)
    assert [(e["world_size"], e["gradient_accumulation_steps"]) for e in entries] == [(2, 4), (4, 2), (4, 2), (8, 1)]
    for e in entries:
        assert {"world_size", "micro_batch_size", "gradient_accumulation_steps", "global_batch_size", "strategy",
                "command"} <= set(e)
        assert e["micro_batch_size"] * e["gradient_accumulation_steps"] * e["world_size"] == e["global_batch_size"] == 16
        assert e["strategy"] == "zero3" and e["steps_per_epoch"] == 4 and e["optimizer_steps"] == 7
        assert e["repeated_rows_per_epoch"] == 0  # 64 rows over micro 2 x 2, 4 or 8 ranks
        assert e["max_tokens_per_step"] == 16 * 256
        assert e["precision"] == "bf16" and e["layout"]["checkpointing"] == "reentrant"
        assert e["layout"]["quant_storage"] == "bfloat16" and e["layout"]["device_map"] is None
        assert e["layout"]["sharded"] is True and e["layout"]["lora"] == "peft"
        a = accelerate_view([c for c in e["argv"]])
        assert a.num_processes == e["world_size"] and a.num_machines == e["nodes"]
        assert a.training_script_args == [str(recipe), "training.max_steps=7"]


def test_plan_text(recipe, capsys):
    assert plan_mod.main([str(recipe), "--gpus-per-node", "2", "--cpu"]) == 0
    out = capsys.readouterr().out
    assert "precision fp32" in out and "non-reentrant" in out and 'device_map {"": local_rank}' in out
    assert "ACCELERATE_USE_CPU=true accelerate launch --config_file" in out
    row = next(line.split() for line in out.splitlines() if line.split()[:1] == ["2"])
    assert row[:6] == ["2", "1", "2", "2", "4", "16"]  # world nodes gpus/node micro accum global


def test_train_dry_run_prints_the_command(recipe, capsys):
    assert run_mod.main([str(recipe), "--gpus", "2", "--strategy", "zero2", "--device", "cpu", "--dry-run",
                         "training.max_steps=3"]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    assert line.startswith("DS_ACCELERATOR=cpu OMP_NUM_THREADS=")
    assert "--num_processes 2" in line and line.endswith(f"-m scalesft.trainer.train {recipe} training.max_steps=3")


# ---- bad input: one line on stderr, exit status 2, nothing started -------------------------------------------

def refused(capsys, argv):
    t = time.perf_counter()
    rc = run_mod.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and err.startswith("scalesft train: error: ")
    assert time.perf_counter() - t < 5  # refused up front: no processes, no model
    return err


def test_refuses_a_global_batch_that_does_not_divide(recipe, capsys):
    err = refused(capsys, [str(recipe), "--gpus", "3", "--device", "cpu"])
    assert "global_batch_size=16 is not divisible by micro_batch_size (2) x world_size (3)" in err
    assert "global_batch_size in [12, 18]" in err


def test_refuses_a_strategy_that_conflicts_with_quantization(recipe, capsys):
    for strategy in ("zero3", "fsdp2"):
        err = refused(capsys, [str(recipe), "--gpus", "2", "--strategy", strategy, "--device", "cpu",
                               "quantization.bits=8"])
        assert f"quantization.bits=8 cannot run under {strategy}" in err
    with pytest.raises(StrategyError, match="unknown strategy 'zero4'"):
        layout(strategy="zero4", world_size=1, hw=planned_hardware(cpu=True), bits=None, precision="fp32",
               gradient_checkpointing=True)


def test_refuses_more_processes_than_rows(recipe, capsys):
    err = refused(capsys, [str(recipe), "--gpus", "128", "--device", "cpu", "training.global_batch_size=128",
                           "training.micro_batch_size=1"])
    assert "has 64 rows but the launch starts 128 processes" in err
    err = refused(capsys, [str(recipe), "--gpus", "2", "--device", "cpu", "data.limit=1"])
    assert "has 1 rows but the launch starts 2 processes" in err


def test_refuses_a_busy_main_process_port(recipe, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        err = refused(capsys, [str(recipe), "--gpus", "2", "--device", "cpu", "--port", str(port)])
    assert f"main process port {port} is already in use" in err and "--port 0" in err


def test_refuses_a_missing_accelerate_config(recipe, capsys, tmp_path):
    err = refused(capsys, [str(recipe), "--gpus", "2", "--device", "cpu", "--dry-run",
                           "--accelerate-config", str(tmp_path / "nope.yaml")])
    assert f"accelerate config file '{tmp_path / 'nope.yaml'}' does not exist" in err


def test_plan_warns_when_an_epoch_repeats_rows(recipe, capsys):
    assert plan_mod.main([str(recipe), "--gpus-per-node", "3", "training.global_batch_size=12"]) == 0
    assert "world size 3: 64 rows do not fill whole micro batches on every rank; each epoch repeats 2 rows" in \
        capsys.readouterr().out


def test_plan_refuses_with_one_line(recipe, capsys):
    assert plan_mod.main([str(recipe), "--gpus-per-node", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is not divisible" in err


def test_scalesft_cli_wires_plan_and_train(recipe):
    """The console script's plan and train subcommands, as a user runs them (overrides after options)."""
    import subprocess
    import sys

    from scalesft.launch.render import ROOT

    def cli(*argv):
        return subprocess.run([sys.executable, "-m", "scalesft.launch.cli", *argv], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    out = cli("plan", str(recipe), "--gpus-per-node", "4", "--strategy", "fsdp2", "--json", "training.max_steps=2")
    assert out.returncode == 0, out.stderr
    (entry,) = json.loads(out.stdout)
    assert (entry["world_size"], entry["gradient_accumulation_steps"], entry["strategy"]) == (4, 2, "fsdp2")
    assert entry["command"].endswith(f"-m scalesft.trainer.train {recipe} training.max_steps=2")
    out = cli("train", str(recipe), "--gpus", "2", "--strategy", "ddp", "--device", "cpu", "--dry-run",
              "training.max_steps=2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ACCELERATE_USE_CPU=true ") and "--num_processes 2" in out.stdout
    out = cli("train", str(recipe), "--gpus", "3", "--device", "cpu", "--dry-run")
    assert out.returncode == 2 and out.stderr.strip().startswith("scalesft train: error: training.global_batch_size")


def test_every_train_option_acts(recipe, tmp_path, monkeypatch):
    """`scalesft train` with any launcher option goes through accelerate launch (1 process unless --gpus), so
    --device, --port and --accelerate-config act on their own; with none it runs the trainer in this process.
    Nothing is started: execute() and the trainer's main are replaced by recorders."""
    from scalesft.launch import cli
    from scalesft.trainer import train as train_mod

    launched, trained = [], []
    monkeypatch.setattr(run_mod, "execute", lambda cmd, **kw: launched.append(cmd) or 0)
    monkeypatch.setattr(train_mod, "main", lambda argv: trained.append(argv) or 0)

    def train(*options):
        launched.clear()
        trained.clear()
        assert cli.main(["train", str(recipe), *options, "training.max_steps=2"]) == 0
        if not launched:
            return None
        (cmd,) = launched
        return cmd, accelerate_view(cmd.argv)

    assert train() is None and trained == [[str(recipe), "training.max_steps=2"]]
    with socket.socket() as s:  # a port that is free now (check_port really runs)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd, a = train("--port", str(port))
    assert a.main_process_port == port and a.num_processes == 1 and not trained
    monkeypatch.setattr(run_mod, "check_port", lambda port: None)  # the default 29500 may be taken here
    cmd, a = train("--device", "cpu")
    assert cmd.env.get("ACCELERATE_USE_CPU") == "true" and a.num_processes == 1
    assert a.training_script_args == [str(recipe), "training.max_steps=2"]
    cmd, a = train("--device", "cuda")
    assert "ACCELERATE_USE_CPU" not in cmd.env and "DS_ACCELERATOR" not in cmd.env
    custom = tmp_path / "my-ddp.yaml"
    custom.write_text((ACCELERATE_CONFIG_DIR / "ddp.yaml").read_text())
    cmd, a = train("--accelerate-config", str(custom))
    assert a.config_file == str(custom)
    assert not trained


# ---- micro_batch_size: auto in the plan ---------------------------------------------------------------------

def _entries(recipe_path, *overrides, worlds=range(1, 65), strategy="ddp", **kw):
    from scalesft.core.recipe import load_recipe

    r = load_recipe(recipe_path, list(overrides))
    return plan_mod.plan_entries(r, recipe_path=str(recipe_path), overrides=list(overrides), nodes=[1],
                                 gpus_per_node=list(worlds), strategy=strategy, **kw)


def test_plan_every_world_size_1_to_64_never_aborts(recipe):
    """Token micro-batches: every world size with one row per process plans; the others are marked with the
    reason and the nearest valid global batch; the table and JSON hold all 64."""
    entries = _entries(recipe, "training.micro_batch_size=auto", "training.global_batch_size=48")
    assert [e["world_size"] for e in entries] == list(range(1, 65))
    for e in entries:
        w = e["world_size"]
        if w <= 48:  # 64 rows: also one row per process
            assert "error" not in e, e
            assert e["batching"] == "tokens" and e["micro_batch_size"] is None
            assert e["micro_batch_tokens"] == 4096 and e["global_batch_size"] == 48  # no shape: the default
            assert e["max_gradient_accumulation_steps"] == -(-(-(-48 // w)) // (4096 // 256))
            assert e["repeated_rows_per_epoch"] == (w - 16 if 16 < w else 0)  # 64 = 48 + 16 rows in the tail
        else:
            assert "smaller than the world size" in e["error"] and e["nearest_global_batch_size"] == [w]
    text = plan_mod.format_plan(entries, str(recipe))
    assert "world size 49 cannot run: training.global_batch_size=48 is smaller than the world size (49)" in text
    assert "nearest valid global batch at this world size: 49" in text
    assert text.count("cannot run: see below") == 16
    json.dumps(entries)  # --json prints them as they are


def test_plan_every_world_size_with_a_fixed_or_padded_micro_batch(recipe):
    """An integer micro batch keeps today's meaning (refused exactly where global % (micro x world) != 0);
    auto on padded rows takes the largest divisor of global / world that fits."""
    fixed = _entries(recipe)  # micro 2, global 16
    padded = _entries(recipe, "training.micro_batch_size=auto", "data.padding_free=false")
    for e, p in zip(fixed, padded):
        w = e["world_size"]
        if 16 % (2 * w) == 0:
            assert (e["micro_batch_size"], e["gradient_accumulation_steps"]) == (2, 16 // (2 * w))
        else:
            assert "is not divisible" in e["error"]
            assert e["nearest_global_batch_size"] == [g for g in (16 // (2 * w) * 2 * w, 16 // (2 * w) * 2 * w + 2 * w) if g]
        if 16 % w == 0:  # budget 4096 / max_seq_length 256: up to 16 rows per micro-step
            assert (p["micro_batch_size"], p["gradient_accumulation_steps"], p["batching"]) == (16 // w, 1, "rows")
        else:
            assert ("not divisible by the world size" if w < 16 else "smaller than the world size") in p["error"]
            assert p["nearest_global_batch_size"] == nearest_global_batches(max(16, w), w)


@pytest.mark.parametrize("name", ["seed-000-kanana-qlora", "seed-001-llama31-instruct-lora",
                                  "seed-003-llama2-guanaco-qlora", "seed-004-llama31-ko-alpaca-qlora"])
@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_shipped_seed_recipes_plan_cleanly(name, strategy, tmp_path):
    """At 1, 2, 4, 8, 16 and 32 GPUs wherever the global batch >= world size, with the memory model sizing
    the token budget from an 8B Llama shape on 80 GiB."""
    from scalesft.launch.render import ROOT

    model = tmp_path / "llama8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}))
    worlds = [1, 2, 4, 8, 16, 32]
    entries = _entries(ROOT / "recipes" / f"{name}.yaml", f"model.name_or_path={model}", worlds=worlds,
                       strategy=strategy, gpu_memory_gib=80)
    for e in entries:
        g = 1 if name.startswith("seed-003") else (8 if name.startswith("seed-004") else 32)
        if e["world_size"] <= g:
            assert "error" not in e, e
            assert e["batching"] == "tokens" and 2048 <= e["micro_batch_tokens"] <= 16384
            assert e["memory"]["peak_gib_checkpointing"] <= 0.85 * 80
        else:
            assert e["nearest_global_batch_size"] == [e["world_size"]]


def test_readme_plan_example_runs(capsys):
    """`scalesft plan recipes/seed-000-kanana-qlora.yaml --nodes 2 --gpus-per-node 8 --strategy zero3`: the
    README's own example, which a fixed micro batch of 4 refused (32 is not divisible by 4 x 16)."""
    from scalesft.launch.render import ROOT

    assert plan_mod.main([str(ROOT / "recipes/seed-000-kanana-qlora.yaml"), "--nodes", "2", "--gpus-per-node", "8",
                          "--strategy", "zero3"]) == 0
    out = capsys.readouterr().out
    row = next(line.split() for line in out.splitlines() if line.split()[:1] == ["16"])
    assert row[:5] == ["16", "2", "8", "4096", "tok"] and row[5] == "<=1"


def test_plan_json_marks_the_world_sizes_that_cannot_run(recipe, capsys):
    assert plan_mod.main([str(recipe), "--gpus-per-node", "2,3,4", "--json"]) == 0  # micro 2, global 16
    entries = json.loads(capsys.readouterr().out)
    assert [("error" in e, e["world_size"]) for e in entries] == [(False, 2), (True, 3), (False, 4)]
    assert entries[1]["nearest_global_batch_size"] == [12, 18] and "is not divisible" in entries[1]["error"]
