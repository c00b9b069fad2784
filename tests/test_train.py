"""Single-process training on the tiny model: what users rely on after `scalesft train`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import TrainerCallback

from tinyrecipe import write_recipe
from scalesft.core.recipe import load_recipe
from scalesft.trainer.train import train

PROBE = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 64]])


class CaptureLogits(TrainerCallback):
    """The trained model's logits on a fixed input, and the model itself, at the end of training."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model.eval()
        with torch.no_grad():
            self.logits = model(input_ids=PROBE).logits.clone()
        self.model = model


@pytest.fixture(scope="module")
def basic(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("basic")
    import os
    os.environ["WANDB_DIR"] = str(root)
    # 8 steps x global batch 8 = the 64 rows exactly once, so token counts are exact.
    recipe = load_recipe(write_recipe(root / "r.yaml", tiny, root / "out", training={
        "max_steps": 8, "save_steps": 4, "report_to": "wandb", "learning_rate": 5.0e-2,
        "lr_scheduler_type": "constant"}))
    cap = CaptureLogits()
    metrics = train(recipe, callbacks=[cap])
    return {"root": root, "out": root / "out", "metrics": metrics, "cap": cap, "recipe": root / "r.yaml"}


def test_loss_falls_and_metrics_are_exact(basic):
    m = basic["metrics"]
    losses = [x["loss"] for x in m["train_loss"]]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < losses[0] - 0.15, losses
    assert (m["world_size"], m["gradient_accumulation_steps"], m["global_batch_size"], m["global_step"]) == (1, 4, 8, 8)
    # One epoch: every loss-bearing token of the tokenized set was trained on exactly once.
    assert m["tokens_trained"] == m["data"]["loss_tokens"] > 0
    assert m["tokens_per_second"] > 0 and m["peak_memory_gib"] > 0 and m["wall_seconds"] > 0
    on_disk = json.loads((basic["out"] / "train_metrics.json").read_text())
    assert on_disk["tokens_trained"] == m["tokens_trained"]
    assert load_recipe(basic["out"] / "recipe.yaml").training.output_dir == str(basic["out"])


def _base_plus_adapter(out, dtype=torch.float32):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = load_recipe(out / "recipe.yaml")
    base = AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path, dtype=dtype)
    return PeftModel.from_pretrained(base, str(out)).eval()


def test_saved_adapter_reloads_with_identical_logits(basic):
    model = _base_plus_adapter(basic["out"])
    with torch.no_grad():
        logits = model(input_ids=PROBE).logits
    assert torch.equal(logits, basic["cap"].logits)
    # The adapter really changed the model.
    with torch.no_grad(), model.disable_adapter():
        assert (model(input_ids=PROBE).logits - logits).abs().max() > 1e-3


def test_merged_model_equals_base_plus_adapter(basic, tmp_path):
    from transformers import AutoModelForCausalLM

    from scalesft.launch.cli import main as cli

    assert cli(["merge", str(basic["out"]), str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        diff = (merged(input_ids=PROBE).logits - basic["cap"].logits).abs().max().item()
    assert diff < 1e-5, diff


def test_wandb_offline_run_has_train_loss(basic):
    runs = list((basic["root"] / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = (basic["out"] / "wandb_run_id").read_text().strip()
    assert runs[0].name.endswith(run_id)
    # wandb 0.31 writes offline runs as one binary record log (read by wandb-core, no Python reader): every
    # logged step's history record names train/loss (plus the summary's copies).
    log = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert log.count(b"train/loss") >= 8 and b"tokens_per_second" in log


def test_resume_continues_from_the_latest_checkpoint(basic, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(basic["out"], out)
    recipe = load_recipe(basic["recipe"], [f"training.output_dir={out}", "training.max_steps=10",
                                           "training.report_to=none"])
    m = train(recipe)
    assert m["resumed_from"].endswith("checkpoint-8") and m["global_step"] == 10
    assert [x["step"] for x in m["train_loss"]][-2:] == [9, 10]


def test_padding_free_equals_padded(tiny, tmp_path):
    """Padding-free batches (the default) train exactly like padded ones on the same data."""
    results = {}
    for pf in (True, False):
        recipe = load_recipe(write_recipe(tmp_path / f"{pf}.yaml", tiny, tmp_path / f"out-{pf}",
                                          data={"padding_free": pf}, training={"max_steps": 3}))
        results[pf] = [x["loss"] for x in train(recipe)["train_loss"]]
    assert len(results[True]) == 3
    assert max(abs(a - b) for a, b in zip(results[True], results[False])) < 1e-5, results
    from safetensors.torch import load_file
    a = load_file(tmp_path / "out-True" / "adapter_model.safetensors")
    b = load_file(tmp_path / "out-False" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.parametrize("bits, layer", [(4, "Linear4bit"), (8, "Linear8bitLt")])
def test_quantized_lora_trains_on_cpu(tiny, tmp_path, bits, layer):
    import bitsandbytes as bnb

    cap = CaptureLogits()
    recipe = load_recipe(write_recipe(tmp_path / "q.yaml", tiny, tmp_path / "out",
                                      quantization={"bits": bits}, training={"max_steps": 2}))
    m = train(recipe, callbacks=[cap])
    quantized = sum(isinstance(mod, getattr(bnb.nn, layer)) for mod in cap.model.modules())
    assert quantized == 14  # 2 layers x 7 projections stored in 4 or 8 bits
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in m["train_loss"])
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_4bit_answers_before_training_change_nothing(tiny, tmp_path):
    """On every CPU kind: sample answers before training (an eval-mode, no-grad 4-bit forward) leave the run
    bit-identical to one without them. On CPUs with avx512_bf16, bitsandbytes would otherwise switch those
    layers to an inference-only layout with no backward (trainer/model.py keep_trainable_4bit_layout)."""
    from safetensors.torch import load_file

    adapters = {}
    for name, prompts in (("plain", []), ("sampled", ["테스트 질문입니다?"])):
        recipe = load_recipe(write_recipe(tmp_path / f"{name}.yaml", tiny, tmp_path / name,
                                          quantization={"bits": 4},
                                          training={"max_steps": 2, "sample_prompts": prompts}))
        m = train(recipe)
        if prompts:
            assert m["samples"][0]["prompt"] == prompts[0]
        adapters[name] = load_file(tmp_path / name / "adapter_model.safetensors")
    a, b = adapters["plain"], adapters["sampled"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)



# The bad-input table (one `scalesft: error:` line, nothing written, no model loaded) is tests/test_bad_inputs.py.


def test_pure_hardware_checks():
    from scalesft.core.recipe import RecipeError
    from scalesft.core.hardware import Hardware, check_quantization, precision

    with pytest.raises(RecipeError, match="quantization.bits=4 needs bitsandbytes, which is not importable"):
        check_quantization(4, Hardware(cuda=True, bf16=True, bitsandbytes=False))
    check_quantization(None, Hardware(cuda=False))
    assert precision("auto", Hardware(cuda=False)) == "fp32"
    assert precision("auto", Hardware(cuda=True, bf16=True)) == "bf16"
    assert precision("auto", Hardware(cuda=True, bf16=False, device_name="Tesla T4")) == "fp16"
    with pytest.raises(RecipeError, match="training.precision=bf16 but Tesla T4 has no native bfloat16"):
        precision("bf16", Hardware(cuda=True, bf16=False, device_name="Tesla T4"))


def test_secrets_never_reach_logs_rendered_commands_or_saved_files(tiny, tmp_path):
    """HF_TOKEN and WANDB_API_KEY in the environment AND in the recipe (the token pasted into the recipe's
    description, the W&B key in an override): redacted from a real run's output (console, recipe.yaml,
    checkpoints, the W&B offline run) and from the rendered launch and sbatch commands."""
    import os
    import subprocess
    import sys

    import yaml

    from tinyrecipe import REPO

    secrets = {"HF_TOKEN": "hf_SCALESFTsecret123", "WANDB_API_KEY": "wandbSCALESFTsecret456"}
    env = {**os.environ, **secrets, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    path = write_recipe(tmp_path / "r.yaml", tiny, tmp_path / "out",
                        training={"max_steps": 2, "save_steps": 1, "report_to": "wandb"})
    raw = yaml.safe_load(path.read_text())
    raw["description"] = f"base pulled with {secrets['HF_TOKEN']}"
    path.write_text(yaml.safe_dump(raw))
    assert secrets["HF_TOKEN"] in path.read_text()  # the recipe really carries it
    runs = [subprocess.run([sys.executable, "-m", "trainer.train", str(path), "--verbose"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)]
    assert runs[0].returncode == 0, runs[0].stderr[-2000:]
    assert "description: base pulled with ***" in runs[0].stdout  # the printed recipe (--verbose), redacted
    override = f"description=key {secrets['WANDB_API_KEY']}"
    for argv in (["train", str(path), override, "--gpus", "2", "--strategy", "zero3", "--dry-run"],
                 ["slurm", str(path), override, "--nodes", "2", "--gpus-per-node", "0", "--dry-run"]):
        runs.append(subprocess.run([sys.executable, "-m", "scalesft.launch.cli", *argv], cwd=REPO, env=env,
                                   capture_output=True, text=True, timeout=120))
        assert runs[-1].returncode == 0, runs[-1].stderr[-2000:]
        assert "'description=key ***'" in runs[-1].stdout  # the command is printed, the key is not
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p != path]
    assert any(p.name == "adapter_model.safetensors" for p in files) and any("offline-run" in str(p) for p in files)
    assert yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())["description"] == "base pulled with ***"
    for value in secrets.values():
        for run in runs:
            assert value not in run.stdout + run.stderr
        for p in files:
            assert value.encode() not in p.read_bytes(), p


def test_redacted_hides_secret_keys_environment_values_and_hf_tokens():
    from scalesft.core.secrets import redact_text, redacted

    environ = {"HF_TOKEN": "hf_abcdefghijklmnop", "WANDB_API_KEY": "0123456789abcdef", "MY_PASSWORD": "hunter2hunter2",
               "TOKENIZERS_PARALLELISM": "false-but-long", "SHORT_TOKEN": "abc"}
    tree = {"model": {"name_or_path": "org/model", "hub_token": "anything", "revision": "v1.0"},
            "training": {"run_name": "run with 0123456789abcdef", "sample_prompts": ["pw hunter2hunter2?"],
                         "output_dir": "/out/false-but-long/abc"},
            "description": "token hf_ZZZZZZZZZZZZZZZZZZZZ from elsewhere", "lora": {"r": 8}}
    assert redacted(tree, environ) == {
        "model": {"name_or_path": "org/model", "hub_token": "***", "revision": "v1.0"},
        "training": {"run_name": "run with ***", "sample_prompts": ["pw ***?"],
                     "output_dir": "/out/false-but-long/abc"},  # not secret variables, or too short to tell
        "description": "token *** from elsewhere", "lora": {"r": 8}}
    assert redact_text("accelerate launch -m trainer.train r.yaml x=hf_abcdefghijklmnop", environ).endswith("x=***")



def test_rank_report_is_cheap_unless_asked_for(basic):
    """Every run writes what really ran; the full-adapter digest (a gather of the whole adapter on every rank)
    only with SCALESFT_RANK_REPORT=1, which the multi-process tests set."""
    import os

    assert os.environ.get("SCALESFT_RANK_REPORT") is None
    report = json.loads((basic["out"] / "ranks" / "rank-0.json").read_text())
    assert report["strategy"] == "single" and report["world_size"] == 1 and report["process_group_size"] == 1
    assert "adapter_digest" not in report


def test_generate_chat_merge_refuse_remote_code_without_the_flag(basic, tmp_path, capsys):
    """An output folder's recipe.yaml asking for model.trust_remote_code does not by itself run the model
    repository's code: generate, chat and merge refuse with one line unless --trust-remote-code is given."""
    import yaml

    from scalesft.launch.cli import main as cli

    out = tmp_path / "out"
    shutil.copytree(basic["out"], out, ignore=shutil.ignore_patterns("checkpoint-*"))
    raw = yaml.safe_load((out / "recipe.yaml").read_text())
    raw["model"]["trust_remote_code"] = True
    (out / "recipe.yaml").write_text(yaml.safe_dump(raw))
    for argv in (["generate", str(out), "안녕?"], ["chat", str(out)], ["merge", str(out), str(tmp_path / "m")]):
        assert cli(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"scalesft: error: {out / 'recipe.yaml'} sets model.trust_remote_code: true, which runs code "
                       f"from the model repository '{raw['model']['name_or_path']}': pass --trust-remote-code if "
                       "you trust it"), err
    assert not (tmp_path / "m").exists()
    assert cli(["generate", str(out), "안녕?", "--max-new-tokens", "3", "--trust-remote-code"]) == 0


def test_liger_goes_through_trls_switch_with_trls_loss(tiny, tmp_path, monkeypatch):
    """model.liger_kernel on: the run sets SFTConfig(use_liger_kernel=True) and nothing else, so the Trainer
    applies Liger when training starts with the config TRL set: fused linear cross-entropy off (TRL's own fused
    LM head computes the loss). Liger's Triton kernels cannot run on a CPU: the application is recorded and the
    run stopped there; what the kernels do on a GPU is not checked here."""
    import transformers.trainer

    import scalesft.trainer.train as train_mod

    class Applied(Exception):
        pass

    def record(model, config):
        raise Applied(model, config)

    monkeypatch.setattr(transformers.trainer, "apply_liger_kernel", record)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny, tmp_path / "out", training={"max_steps": 1}))
    r = train_mod.resolve(recipe)
    r.liger = True
    with pytest.raises(Applied) as got:
        train(recipe, resolved=r)
    model, config = got.value.args
    assert config == {"fused_linear_cross_entropy": False}
    assert type(model).__name__ == "PeftModelForCausalLM"  # the trained model, LoRA attached
    # and the loaded base model was left alone until then: no Liger module anywhere
    assert not any("Liger" in type(m).__name__ for m in model.modules())


def test_auto_micro_batch_equals_the_explicit_one(tiny, tmp_path):
    """micro_batch_size auto on padding-free rows (micro-batches sized by tokens) trains the same rows in every
    optimizer step as micro 2 x accumulation 4 at global batch 8, with the CPU default budget (one micro-step
    per step) and with a budget of 80 tokens that splits each step into micro-batches of different row counts;
    over 6 steps of 32 rows, i.e. into the second epoch; and resuming mid-epoch 2 continues exactly."""
    from safetensors.torch import load_file

    def run(name, **training):
        recipe = load_recipe(write_recipe(tmp_path / f"{name}.yaml", tiny, tmp_path / name, data={"limit": 32},
                                          training={"max_steps": 6, "save_steps": 5, **training}))
        return train(recipe)

    explicit = run("explicit")
    auto = run("auto", micro_batch_size="auto")
    small = run("small", micro_batch_size="auto", micro_batch_tokens=80)
    shutil.copytree(tmp_path / "auto" / "checkpoint-5", tmp_path / "resumed" / "checkpoint-5")
    # a checkpoint copied into a fresh folder has no run record: continue it deliberately (training.resume=force)
    resumed = run("resumed", micro_batch_size="auto", resume="force")
    assert resumed["resumed_from"].endswith("checkpoint-5") and resumed["global_step"] == 6
    assert explicit["gradient_accumulation_steps"] == 4 and explicit["micro_batch_size"] == 2
    assert auto["gradient_accumulation_steps"] == 1 and auto["micro_batch_tokens"] == 4096
    assert small["gradient_accumulation_steps"] > 2 and small["micro_batch_tokens"] == 80
    assert explicit["tokens_trained"] == auto["tokens_trained"] == small["tokens_trained"]  # the same rows
    assert explicit["tokens_processed"] == auto["tokens_processed"] == small["tokens_processed"]
    ref = load_file(tmp_path / "explicit" / "adapter_model.safetensors")
    for name in ("auto", "small", "resumed"):
        got = load_file(tmp_path / name / "adapter_model.safetensors")
        diff = max((ref[k] - got[k]).abs().max().item() for k in ref)
        assert diff <= 1e-5, (name, diff)
    assert max(v.abs().max().item() for k, v in ref.items() if "lora_B" in k) > 1e-2  # training moved them
    losses = [x["loss"] for x in explicit["train_loss"]]
    assert max(abs(a - b["loss"]) for a, b in zip(losses, small["train_loss"])) < 1e-5


def test_token_counts_cover_every_processed_token_at_its_length():
    """What MFU counts: every input token (not only the loss-bearing ones) and the causal attention pairs at
    each row's real length, from padding-free and from padded batches alike, on the device."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from scalesft.core.flops import Shape, train_flops, train_flops_terms
    from scalesft.trainer.metrics import count_tokens

    rows = [{"input_ids": list(range(1, n + 1))} for n in (3, 17, 40)]
    lens = [3, 17, 40]
    pairs = sum(n * (n + 1) // 2 for n in lens)
    for padding_free in (True, False):
        batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)(rows)
        assert ("attention_mask" in batch) is not padding_free
        counts = count_tokens(batch)
        loss_tokens = int((batch["labels"][..., 1:] != -100).sum())
        assert counts.tolist() == [loss_tokens, sum(lens), pairs], padding_free
        assert count_tokens(batch, counts.clone()).tolist() == [2 * loss_tokens, 2 * sum(lens), 2 * pairs]
    shape = Shape(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256)
    per_token, per_pair = train_flops_terms(shape, lora_r=64)
    assert per_token * sum(lens) + per_pair * pairs == train_flops(shape, lens, lora_r=64)
    # at 4096-token rows attention is a sizeable share that a per-token count would miss
    assert train_flops(shape, [4096], lora_r=64) > 1.1 * per_token * 4096


def test_auto_micro_batch_on_padded_rows_is_the_largest_that_fits(tiny, tmp_path):
    """data.padding_free false: auto takes the largest row micro batch that divides global / world and fits the
    token budget (8 rows of <= 64 tokens in 4096: micro 8, no accumulation) and trains what micro 2 x 4 does."""
    from safetensors.torch import load_file

    runs = {}
    for name, micro in (("explicit", 2), ("auto", "auto")):
        recipe = load_recipe(write_recipe(tmp_path / f"{name}.yaml", tiny, tmp_path / name,
                                          data={"padding_free": False},
                                          training={"max_steps": 3, "micro_batch_size": micro}))
        runs[name] = train(recipe)
    assert (runs["auto"]["micro_batch_size"], runs["auto"]["gradient_accumulation_steps"]) == (8, 1)
    a, b = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("explicit", "auto"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
