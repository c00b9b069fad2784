"""Real multi-process training on CPU/gloo through `scalesft train --gpus N --strategy S` (which renders and runs
`accelerate launch`), on the tiny model with varying sequence lengths and completion-only loss.

Each launch is made once per module and checked for several things:
- the strategy really ran: every rank writes ranks/rank-N.json from accelerate's state and the live model
  (DeepSpeed engine's ZeRO stage, ZeRO-3 partitioned weights, FSDP2 sharded DTensors, gloo group size);
- every rank holds the same full adapter (digest of the gathered LoRA weights, SCALESFT_RANK_REPORT=1), and it
  is the saved one;
- the saved adapter is complete and reloads onto the base model;
- equivalence: at the same global batch the adapter equals the 1-process run's (max abs diff <= 1e-5);
- a rank that hangs fails the job after training.ddp_timeout, with one line naming the waiting rank.

Imports cost ~7 s per process and DeepSpeed JIT-compiles a shared-memory op on its first run (+25-40 s, up to
minutes on a busy 2-core box): TORCH_EXTENSIONS_DIR is kept in a stable folder so later runs reuse it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from scalesft.launch.render import ACCELERATE_CONFIG_DIR
from scalesft.core.strategy import layout_text
from tinyrecipe import REPO, write_recipe

pytestmark = pytest.mark.slow

TOLERANCE = 1e-5
STEPS = 6
os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                      str(Path(tempfile.gettempdir()) / f"scalesft-torch-extensions-{os.getuid()}"))


class Run:
    def __init__(self, name: str, out: Path, stdout: str, seconds: float, recipe: Path, strategy: str, world: int):
        self.name, self.out, self.stdout, self.seconds = name, out, stdout, seconds
        self.recipe, self.strategy, self.world = recipe, strategy, world
        self.metrics = json.loads((out / "train_metrics.json").read_text())
        self.ranks = [json.loads(p.read_text()) for p in sorted((out / "ranks").glob("rank-*.json"))]

    def adapter(self) -> dict:
        from safetensors.torch import load_file

        return load_file(str(self.out / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def launch(tiny, tmp_path_factory):
    """launch(name, gpus=None|N, strategy=..., **sections) -> Run, each distinct name launched once."""
    root = tmp_path_factory.mktemp("dist")
    done: dict[str, Run] = {}

    def run(name: str, *, gpus: int | None = None, strategy: str = "ddp", by_hand: bool = False, **sections) -> Run:
        if name in done:
            return done[name]
        out = root / name
        training = {"max_steps": STEPS, **sections.pop("training", {})}
        data = {"max_seq_length": 128, **sections.pop("data", {})}  # nothing truncated: lengths vary 30-120
        recipe = write_recipe(root / f"{name}.yaml", tiny, out, training=training, data=data, **sections)
        # the venv's bin first, as when it is activated: torch JIT-builds DeepSpeed's op with the first `ninja` on
        # PATH, and a different ninja (system vs venv) invalidates the cached build (+25-170 s)
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        env["SCALESFT_RANK_REPORT"] = "1"  # every rank adds the digest of the full adapter it holds
        if gpus is None:  # one plain process, as `python -m trainer.train` runs it; one thread like each rank
            argv = [sys.executable, "-m", "trainer.train", str(recipe)]
            env["OMP_NUM_THREADS"] = "1"
        elif by_hand:  # the documented plain `accelerate launch`, none of the variables scalesft train adds
            argv = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
                    str(ACCELERATE_CONFIG_DIR / f"{strategy}.yaml"), "--num_processes", str(gpus),
                    "--main_process_port", "0", "-m", "trainer.train", str(recipe)]
            for var in ("ACCELERATE_USE_CPU", "OMP_NUM_THREADS", "DS_ACCELERATOR"):
                env.pop(var, None)
        else:
            argv = [sys.executable, "-m", "scalesft.launch.cli", "train", str(recipe), "--gpus", str(gpus), "--strategy",
                    strategy, "--device", "cpu", "--port", "0"]
        t = time.perf_counter()
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - t
        assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        print(f"\n[launch] {name}: {seconds:.1f} s", flush=True)
        done[name] = Run(name, out, proc.stdout + proc.stderr, seconds, recipe, strategy, gpus or 1)
        return done[name]

    return run


@pytest.fixture(scope="module")
def single(launch):
    """The reference: one process, micro batch 2 x accumulation 4 = global batch 8."""
    r = launch("single", training={"global_batch_size": 8, "micro_batch_size": 2})
    assert (r.metrics["world_size"], r.metrics["gradient_accumulation_steps"]) == (1, 4)
    return r


START = re.compile(r"\[scalesft\] rank (\d+) \(local (\d+)\) of (\d+) on (\S+): (.*?) · (.*)")


def start_lines(r: Run) -> dict[int, tuple[dict[str, str], str]]:
    """Each rank's start line: {rank: (its layout key=values, the batch part)}."""
    found = {}
    for m in START.finditer(r.stdout):
        found[int(m.group(1))] = (dict(kv.split("=", 1) for kv in m.group(5).split()), m.group(6))
    return found


def planned_layout(r: Run) -> dict[str, str]:
    """`scalesft plan RECIPE --cpu --gpus-per-node W --strategy S --json`'s layout for this run, as the start
    line writes values."""
    import contextlib
    import io

    from scalesft.launch.cli import main as cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli(["plan", str(r.recipe), "--cpu", "--gpus-per-node", str(r.world), "--strategy", r.strategy,
                    "--json"]) == 0
    (entry,) = json.loads(buf.getvalue())
    return layout_text(entry["layout"])


def check_layout(r: Run) -> dict[str, str]:
    """The plan and every rank's own start line (and rank report, from the live Layout) agree on sharding,
    device_map, quant storage, reentrancy, attention and LoRA fusing."""
    planned = planned_layout(r)
    lines = start_lines(r)
    assert sorted(lines) == list(range(r.world)), r.stdout[-3000:]
    for rank, (fields, _) in lines.items():
        assert fields == planned, (rank, fields, planned)
    for x in r.ranks:
        assert layout_text(x["layout"]) == planned
    return planned


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def check_run(r: Run, single: Run, *, world: int, accumulation: int, strategy: str, steps: int = STEPS) -> float:
    """What every multi-process run must show; returns the max abs difference to the 1-process adapter."""
    from scalesft.trainer.distributed import adapter_digest

    assert r.metrics["world_size"] == world and r.metrics["gradient_accumulation_steps"] == accumulation
    assert r.metrics["global_step"] == single.metrics["global_step"] == steps
    # one start line per rank: the layout `scalesft plan --json` printed for this strategy, and the batch plan
    layout = check_layout(r)
    assert layout["strategy"] == strategy and layout["attention"] == "sdpa" and layout["quant_storage"] == "none"
    sharded = strategy in ("zero3", "zero3_offload", "fsdp2")
    assert layout["sharded"] == str(sharded).lower() and layout["lora"] == ("peft" if sharded else "fused")
    # the checkpoint reentrancy each backend needs: reentrant only under ZeRO-3
    assert layout["checkpointing"] == ("reentrant" if strategy.startswith("zero3") else "non-reentrant")
    for rank, (_, batch) in start_lines(r).items():
        assert batch.startswith(f"micro_batch=2 grad_accum={accumulation} global_batch={2 * accumulation * world} "
                                "precision=fp32"), batch
    # every rank reported, from a real process group of that size
    assert [x["rank"] for x in r.ranks] == list(range(world))
    assert all(x["process_group_size"] == world and x["strategy"] == strategy for x in r.ranks)
    # identical full adapters on every rank, equal to the saved file (so the file is the whole adapter)
    saved = r.adapter()
    assert {x["adapter_digest"] for x in r.ranks} == {adapter_digest(saved)}
    # complete: the same tensors with the same shapes as the 1-process adapter, none empty
    ref = single.adapter()
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert all(v.numel() > 0 for v in saved.values())
    # training moved the weights far beyond the tolerance, so equality below is not trivially true
    assert max(v.abs().max().item() for k, v in saved.items() if "lora_B" in k) > 1000 * TOLERANCE
    return max_abs_diff(saved, ref)


def reload(r: Run, tiny) -> None:
    """The saved adapter loads onto the base model and reproduces its weights exactly."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny["model"]), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(r.out))
    loaded = {k.replace(".default.", "."): v for k, v in model.named_parameters() if "lora_" in k}
    saved = r.adapter()
    assert loaded.keys() == saved.keys()
    assert max_abs_diff({k: v.detach() for k, v in loaded.items()}, saved) == 0.0


def test_ddp_two_processes(launch, single, tiny):
    r = launch("ddp", gpus=2, strategy="ddp")
    assert all(x["distributed_type"] == "MULTI_CPU" for x in r.ranks)  # gloo DDP, not 2 lone processes
    diff = check_run(r, single, world=2, accumulation=2, strategy="ddp")
    print(f"[equivalence] ddp x2 vs 1 process: {diff:.3g}")
    assert diff <= TOLERANCE
    reload(r, tiny)


def test_zero2_two_processes(launch, single, tiny):
    r = launch("zero2", gpus=2, strategy="zero2")
    assert all(x["distributed_type"] == "DEEPSPEED" and x["zero_stage"] == 2 for x in r.ranks)
    diff = check_run(r, single, world=2, accumulation=2, strategy="zero2")
    print(f"[equivalence] zero2 x2 vs 1 process: {diff:.3g}")
    assert diff <= TOLERANCE
    reload(r, tiny)


def test_zero3_two_processes(launch, single, tiny):
    r = launch("zero3", gpus=2, strategy="zero3")
    for x in r.ranks:
        assert x["distributed_type"] == "DEEPSPEED" and x["zero_stage"] == 3
        assert x["zero3_partitioned_params"] > 0  # the base weights really are partitioned across ranks
    diff = check_run(r, single, world=2, accumulation=2, strategy="zero3")
    print(f"[equivalence] zero3 x2 vs 1 process: {diff:.3g}")
    assert diff <= TOLERANCE
    reload(r, tiny)  # gathered whole: not the near-empty ZeRO-3 placeholder


def test_zero3_offload_two_processes(launch, single, tiny):
    """ZeRO-3 with weights and optimizer state offloaded to CPU memory (ds_configs/zero3_offload.json): its own
    strategy name on the start line and in the plan, weights partitioned, the same adapter."""
    r = launch("zero3_offload", gpus=2, strategy="zero3_offload")
    for x in r.ranks:
        assert x["distributed_type"] == "DEEPSPEED" and x["zero_stage"] == 3 and x["zero3_partitioned_params"] > 0
    diff = check_run(r, single, world=2, accumulation=2, strategy="zero3_offload")
    print(f"[equivalence] zero3_offload x2 vs 1 process: {diff:.3g}")
    assert diff <= TOLERANCE


def test_fsdp2_two_processes(launch, single, tiny):
    r = launch("fsdp2", gpus=2, strategy="fsdp2")
    for x in r.ranks:
        assert x["distributed_type"] == "FSDP" and x["fsdp_version"] == 2
        # every parameter is a DTensor whose local shard is smaller than the whole: really sharded
        assert x["dtensor_params"] > 0 and x["sharded_params"] == x["dtensor_params"]
    diff = check_run(r, single, world=2, accumulation=2, strategy="fsdp2")
    print(f"[equivalence] fsdp2 x2 vs 1 process: {diff:.3g}")
    assert diff <= TOLERANCE
    reload(r, tiny)


def test_uneven_world_size_three(launch):
    """Global batch 12: 1 process x micro 2 x accumulation 6 == 3 processes x micro 2 x accumulation 2, the 3
    processes started by a plain hand-typed `accelerate launch --config_file accelerate_configs/ddp.yaml`.

    5 steps x 12 = 60 of the 64 rows: within one epoch. At the end of an epoch whose rows do not divide by the
    world size (64 over 3 ranks) the distributed sampler repeats rows to even the ranks out, so a 6th step
    differs from the 1-process run by design (measured 1.8e-3), not by a normalisation bug."""
    steps = 5
    one = launch("single12", training={"global_batch_size": 12, "micro_batch_size": 2, "max_steps": steps})
    three = launch("ddp3", gpus=3, strategy="ddp", by_hand=True,
                   training={"global_batch_size": 12, "micro_batch_size": 2, "max_steps": steps})
    # typed by hand without ACCELERATE_USE_CPU, the trainer still builds a real 3-rank gloo group (a plain launch
    # used to start 3 processes that each saw a world of 1 and trained 3 unsynchronised copies)
    assert all(x["distributed_type"] == "MULTI_CPU" for x in three.ranks)
    assert one.metrics["gradient_accumulation_steps"] == 6
    diff = check_run(three, one, world=3, accumulation=2, strategy="ddp", steps=steps)
    print(f"[equivalence] ddp x3 vs 1 process (global 12): {diff:.3g}")
    assert diff <= TOLERANCE


def test_qlora_4bit_ddp_two_processes(launch, tiny):
    r = launch("qlora_ddp", gpus=2, strategy="ddp", quantization={"bits": 4})
    for x in r.ranks:
        assert x["distributed_type"] == "MULTI_CPU" and x["process_group_size"] == 2
        assert x["params4bit"] > 0  # 4-bit weights, whole on each rank
    assert len({x["adapter_digest"] for x in r.ranks}) == 1
    layout = check_layout(r)  # the plan and both ranks: uint8 storage, the model on each rank's device
    assert (layout["quant_storage"], layout["device_map"], layout["lora"]) == ("uint8", "local_rank", "fused")
    assert r.metrics["global_step"] == STEPS and r.metrics["world_size"] == 2
    from scalesft.trainer.distributed import adapter_digest

    assert {x["adapter_digest"] for x in r.ranks} == {adapter_digest(r.adapter())}
    reload(r, tiny)


def test_hung_rank_fails_after_ddp_timeout(tiny, tmp_path):
    """Rank 1 stops answering after step 2 (tests/hang_rank.py, a test-only callback around the real
    entry point); rank 0 waits in the next collective. With training.ddp_timeout=10 the group created by
    trainer/distributed.py gives up after 10 s (torch's default would be 30 min on gloo): rank 0 prints one
    line naming itself and the timeout, and the launcher ends the job. The hung rank ignores SIGTERM (the
    trainer's handler only asks for a checkpoint), so torchrun kills it after its 30 s grace."""
    from scalesft.launch.render import render_launch
    from scalesft.launch.run import accelerate_executable

    timeout = 10
    recipe = write_recipe(tmp_path / "hang.yaml", tiny, tmp_path / "out",
                          training={"max_steps": 50, "ddp_timeout": timeout}, data={"max_seq_length": 128})
    cmd = render_launch(recipe=recipe, strategy="ddp", num_processes=2, main_process_port=0, cpu=True,
                        threads_per_process=1, accelerate=accelerate_executable(), module="hang_rank")
    env = {**os.environ, **cmd.env, "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd.argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: list[tuple[float, str]] = []  # (arrival time, line)
    watchdog = threading.Timer(400, proc.kill)  # startup + the timeout + grace; without the fix: 30 min
    watchdog.start()
    try:
        for line in proc.stdout:
            lines.append((time.time(), line.rstrip("\n")))
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    ended = time.time()
    text = "\n".join(line for _, line in lines)
    # (a progress bar may precede it on the same line: tqdm ends its updates with \r, not \n)
    found = [re.search(r"\[hang\] rank 1 hangs .* at ([0-9.]+)", line) for _, line in lines]
    hang = [float(m.group(1)) for m in found if m]
    assert hang, f"rank 1 never reached the hang:\n{text[-6000:]}"
    assert proc.returncode != 0
    error = [(t, line) for t, line in lines if "scalesft: error: rank 0 of 2" in line]
    assert error, f"no timeout line from rank 0:\n{text[-6000:]}"
    t_error, line = error[0]
    assert line.endswith(f"scalesft: error: rank 0 of 2: a collective waited longer than training.ddp_timeout="
                         f"{timeout} s for the other rank(s) (1): one of them hung or died; its own log shows "
                         "where it stopped"), line
    waited, total = t_error - hang[0], ended - hang[0]
    print(f"\n[hung rank] timeout {timeout} s: rank 0's error after {waited:.1f} s, job ended after {total:.1f} s")
    assert timeout - 1 < waited < timeout + 15, text[-4000:]  # the recipe's timeout, not torch's 30 min
    assert total < timeout + 30 + 20  # + torchrun's 30 s SIGTERM grace for the hung rank + a margin


def bimodal_rows(n: int = 64) -> list[dict[str, str]]:
    """Q/A rows that are either very short (a one-clause answer, ~25 tokens) or long (twelve clauses, ~120)."""
    import random

    from scalesft.trainer.tiny import _SUBJECTS, _VERBS

    rng = random.Random(3)
    rows = []
    for _ in range(n):
        q = f"{rng.choice(_SUBJECTS)}에 대해 {rng.choice(_SUBJECTS)}은 어떻습니까?"
        a = " ".join(f"{rng.choice(_SUBJECTS)}는 {rng.choice(_VERBS)}." for _ in range(1 if rng.random() < 0.6 else 12))
        rows.append({"question": q, "answer": a})
    return rows


@pytest.fixture(scope="module")
def bimodal(tmp_path_factory):
    data = tmp_path_factory.mktemp("bimodal") / "rows.json"
    data.write_text(json.dumps(bimodal_rows(), ensure_ascii=False), encoding="utf-8")
    return str(data)


def test_auto_token_micro_batches_ddp_two_processes(launch, bimodal):
    """micro_batch_size auto on padding-free rows of very different lengths: each step's 8 rows dealt to 2 gloo
    DDP ranks and split into micro-batches of at most 128 tokens, so within a step the ranks' micro-batches
    differ in row count and tokens; yet both ranks run the same number of micro-steps (no hang) and the adapter
    equals the 1-process micro 2 x accumulation 4 run's on the same rows."""
    from scalesft.core.batch import epoch_layouts
    from scalesft.trainer.batching import plan_run, row_lengths, row_order
    from scalesft.core.recipe import load_recipe
    from scalesft.trainer.data import read_rows, tokenize
    from scalesft.trainer.distributed import adapter_digest
    from scalesft.trainer.model import load_tokenizer

    one = launch("single_bimodal", data={"path": bimodal}, training={"global_batch_size": 8, "micro_batch_size": 2})
    r = launch("auto_ddp", gpus=2, strategy="ddp", data={"path": bimodal},
               training={"micro_batch_size": "auto", "micro_batch_tokens": 128})
    recipe = load_recipe(r.out / "recipe.yaml")
    dataset, _ = tokenize(read_rows(recipe.data), load_tokenizer(recipe.model), recipe.data)
    lengths = row_lengths(dataset)
    plan = plan_run(lengths, global_batch_size=8, world_size=2, budget=128, seed=0, max_steps=STEPS,
                    num_train_epochs=1)
    k = plan.gradient_accumulation_steps
    assert k >= 2 and r.metrics["gradient_accumulation_steps"] == k and r.metrics["micro_batch_tokens"] == 128
    assert one.metrics["gradient_accumulation_steps"] == 4
    check_layout(r)
    for rank, (_, batch) in start_lines(r).items():
        assert batch.startswith(f"micro_batch_tokens=128 grad_accum={k} global_batch=8 precision=fp32"), batch
    layouts = list(epoch_layouts(row_order(len(lengths), 0, 0), lengths, plan))[:STEPS]
    uneven = [(s, j) for s, lay in enumerate(layouts) for j in range(k) if len(lay[0][j]) != len(lay[1][j])]
    assert uneven  # micro-steps where the ranks hold different numbers of rows
    assert max(lengths) > 3 * min(lengths)  # rows of very different lengths
    assert all(sum(lengths[i] for i in mb) <= 128 for lay in layouts for rk in lay for mb in rk)
    assert r.metrics["world_size"] == 2 and r.metrics["global_step"] == STEPS
    assert [x["process_group_size"] for x in r.ranks] == [2, 2]
    saved = r.adapter()
    assert {x["adapter_digest"] for x in r.ranks} == {adapter_digest(saved)}
    assert r.metrics["tokens_trained"] == one.metrics["tokens_trained"]  # the same rows, all of them
    assert max(v.abs().max().item() for k_, v in saved.items() if "lora_B" in k_) > 1000 * TOLERANCE
    diff = max_abs_diff(saved, one.adapter())
    print(f"[equivalence] auto (tokens <= 128) ddp x2 vs 1 process micro 2: {diff:.3g}")
    assert diff <= TOLERANCE


def test_auto_token_micro_batches_zero3_two_processes(launch, bimodal):
    """The same under ZeRO-3, where every micro-step's forward and backward gather the sharded weights across
    the ranks: a rank running one micro-step more than the other would hang. It finishes, and equals."""
    one = launch("single_bimodal", data={"path": bimodal}, training={"global_batch_size": 8, "micro_batch_size": 2})
    r = launch("auto_zero3", gpus=2, strategy="zero3", data={"path": bimodal},
               training={"micro_batch_size": "auto", "micro_batch_tokens": 128})
    assert all(x["zero_stage"] == 3 and x["zero3_partitioned_params"] > 0 for x in r.ranks)
    assert check_layout(r)["checkpointing"] == "reentrant"
    assert r.metrics["global_step"] == STEPS and r.metrics["gradient_accumulation_steps"] >= 2
    diff = max_abs_diff(r.adapter(), one.adapter())
    print(f"[equivalence] auto (tokens <= 128) zero3 x2 vs 1 process micro 2: {diff:.3g}")
    assert diff <= TOLERANCE
