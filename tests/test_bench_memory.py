"""The peak-memory estimate (core/memory.py) against measured peaks, and the LoRA-correct FLOP count
(core/flops.py). Pure arithmetic: no torch, milliseconds.

FITTED: the 14 H100 peaks the estimate's constants were calibrated on (bench/runs/h100_run{1,3}.json).
HELD_OUT: 7 peaks measured on an H200 after the fit, never used to set a constant (bench/runs/h200_run4.json):
both held to core.memory.VALIDATED_WITHIN."""

import pytest

from scalesft.core.memory import VALIDATED_WITHIN, GiB, choose_checkpointing, estimate
from scalesft.core.flops import Shape, mfu, peak_tflops, train_flops

LLAMA_8B = Shape(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256)
QLORA = dict(bits=4, lora_r=64, seq_len=1024)
# transformers.Trainer (the seeds' code path) holds the whole logits for its loss when Liger is off
SEEDS = dict(QLORA, double_quant=False, upcast_fp32=True, liger=False, lora_dropout=0.05, adapter_bytes=4,
             full_logits=True)
HF_BF16 = dict(QLORA, double_quant=False, adapter_bytes=4, full_logits=True)  # Trainer + peft, no fp32 upcast

# (bench run, variant, estimate kwargs, measured peak allocated GiB)
FITTED = [
    ("run3", "scalesft mb16", dict(QLORA, micro_batch=16), 13.54),
    ("run3", "scalesft double_quant=false mb16", dict(QLORA, micro_batch=16, double_quant=False), 13.87),
    ("run3", "scalesft no checkpointing mb8", dict(QLORA, micro_batch=8, checkpointing=False), 44.40),
    ("run3", "scalesft LoRA bf16 no checkpointing mb8",
     dict(QLORA, bits=None, micro_batch=8, checkpointing=False), 55.62),
    ("run3", "seeds mb4 x GA4", dict(SEEDS, micro_batch=4), 19.10),
    ("run1", "seeds mb4", dict(SEEDS, micro_batch=4), 18.46),
    ("run1", "seeds + Liger", dict(SEEDS, micro_batch=4, liger=True), 13.24),
    ("run1", "seeds, dropout 0", dict(SEEDS, micro_batch=4, lora_dropout=0.0), 18.46),
    ("run1", "bf16 stream", dict(HF_BF16, micro_batch=4, liger=False, lora_dropout=0.05), 14.53),
    ("run1", "bf16 stream + Liger, d0", dict(HF_BF16, micro_batch=4), 9.42),
    ("run1", "bf16 stream + Liger, d0, no ckpt", dict(HF_BF16, micro_batch=4, checkpointing=False), 25.28),
    ("run1", "bf16 stream + Liger, d0, mb16", dict(HF_BF16, micro_batch=16), 14.61),
    ("run1", "LoRA bf16 + Liger, d0, no ckpt", dict(HF_BF16, bits=None, micro_batch=4, checkpointing=False), 38.83),
    ("run1", "scalesft mb4 (before varlen/fused LoRA)", dict(QLORA, micro_batch=4), 8.08),
]


# scalesft's own train() (TRL SFTTrainer), the bench's recipe: QLoRA nf4 r64, no double quant, dropout 0
H200 = dict(QLORA, double_quant=False)
HELD_OUT = [
    ("run4", "scalesft mb8 seq1024", dict(H200, micro_batch=8), 10.58),
    ("run4", "scalesft Liger off mb8 seq1024", dict(H200, micro_batch=8, liger=False), 10.99),
    ("run4", "scalesft no checkpointing mb4 seq1024", dict(H200, micro_batch=4, checkpointing=False), 25.98),
    ("run4", "scalesft mb4 seq2048", dict(H200, micro_batch=4, seq_len=2048), 10.58),
    ("run4", "scalesft LoRA bf16 mb4 seq2048", dict(H200, bits=None, micro_batch=4, seq_len=2048), 21.15),
    ("run4", "scalesft r16 mb16 seq2048", dict(H200, lora_r=16, micro_batch=16, seq_len=2048), 20.34),
    ("run4", "scalesft Liger off mb16 seq2048", dict(H200, micro_batch=16, seq_len=2048, liger=False), 22.71),
]


def _error(kw, measured):
    return (estimate(LLAMA_8B, **kw).total / GiB - measured) / measured


@pytest.mark.parametrize("run,variant,kw,measured", FITTED, ids=[m[1] for m in FITTED])
def test_estimate_on_the_peaks_it_was_fitted_to(run, variant, kw, measured):
    assert abs(_error(kw, measured)) <= VALIDATED_WITHIN, f"{variant}: {_error(kw, measured):+.1%}"


@pytest.mark.parametrize("run,variant,kw,measured", HELD_OUT, ids=[m[1] for m in HELD_OUT])
def test_estimate_on_held_out_peaks(run, variant, kw, measured):
    assert abs(_error(kw, measured)) <= VALIDATED_WITHIN, f"{variant}: {_error(kw, measured):+.1%}"


def test_held_out_peaks_are_the_recorded_measurements():
    """The held-out figures are the bench's own output, not typed in: each one is in bench/runs/h200_run4.json."""
    import json
    from pathlib import Path

    runs = json.loads((Path(__file__).resolve().parents[1] / "bench/runs/h200_run4.json").read_text())
    recorded = {(r["variant"], r["mb"], r["seq"], r["peak_alloc_gib"]) for r in runs}
    names = {"scalesft mb8 seq1024": "scalesft", "scalesft Liger off mb8 seq1024": "scalesft-noliger",
             "scalesft no checkpointing mb4 seq1024": "scalesft-nockpt", "scalesft mb4 seq2048": "scalesft",
             "scalesft LoRA bf16 mb4 seq2048": "scalesft-lora", "scalesft r16 mb16 seq2048": "scalesft-r16",
             "scalesft Liger off mb16 seq2048": "scalesft-noliger"}
    for _, variant, kw, measured in HELD_OUT:
        assert (names[variant], kw["micro_batch"], kw.get("seq_len", 1024), measured) in recorded, variant


def test_strategies_shard_what_they_should():
    kw = dict(QLORA, micro_batch=4)
    single = estimate(LLAMA_8B, **kw)
    z2 = estimate(LLAMA_8B, strategy="zero2", world_size=8, **kw)
    z3 = estimate(LLAMA_8B, strategy="zero3", world_size=8, **kw)
    ddp = estimate(LLAMA_8B, strategy="ddp", world_size=8, **kw)
    assert z2.optimizer == pytest.approx(single.optimizer / 8) and z2.weights == single.weights
    assert z3.weights < single.weights / 4 and z3.activations == single.activations
    assert ddp.gradients == 2 * single.gradients and ddp.weights == single.weights
    assert z3.total < z2.total < single.total < ddp.total


def test_checkpointing_choice_follows_the_budget():
    kw = dict(QLORA, micro_batch=4)
    assert choose_checkpointing(18.5, LLAMA_8B, **kw) is True  # no-ckpt needs ~27 GiB
    assert choose_checkpointing(70.0, LLAMA_8B, **kw) is False


def test_lora_flops_llama8b():
    per_tok = train_flops(LLAMA_8B, [1024], lora_r=64) / 1024
    # ~30 GFLOP/token without recomputation (2 FLOPs x 2 passes x ~7.5 B linear params), ~45 with it (3 passes)
    assert 29e9 < per_tok < 33e9
    assert 44e9 < train_flops(LLAMA_8B, [1024], lora_r=64, recompute=True) / 1024 < 48e9
    full = train_flops(LLAMA_8B, [1024], lora_r=None) / 1024
    assert full > 1.4 * per_tok  # full fine-tuning also computes weight gradients
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4 and peak_tflops("some cpu") is None
    assert mfu(989.4e12, 1.0, "NVIDIA H100 80GB HBM3") == pytest.approx(1.0)


def test_scalesft_plan_shows_the_estimate(tmp_path):
    import json

    from scalesft.launch.plan import format_plan, plan_entries
    from scalesft.core.recipe import recipe_from_dict

    model = tmp_path / "llama8b"
    model.mkdir()
    json.dump({"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
              open(model / "config.json", "w"))
    recipe = recipe_from_dict({
        "model": {"name_or_path": str(model)}, "quantization": {"bits": 4, "double_quant": False},
        "lora": {"r": 64, "alpha": 128, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"]},
        "data": {"path": str(tmp_path / "rows.json"), "max_seq_length": 1024},
        "training": {"output_dir": str(tmp_path / "out"), "global_batch_size": 32, "micro_batch_size": 16}})
    entries = plan_entries(recipe, recipe_path="r.yaml", overrides=[], nodes=[1], gpus_per_node=[1, 2],
                           strategy="ddp")
    m = entries[0]["memory"]
    assert abs(m["peak_gib_checkpointing"] - 13.87) / 13.87 < 0.15  # measured on an H100 (bench/RESULTS.md)
    assert m["peak_gib_no_checkpointing"] > 2 * m["peak_gib_checkpointing"]
    assert entries[1]["memory"]["peak_gib_checkpointing"] > m["peak_gib_checkpointing"]  # DDP buckets
    assert "predicted peak memory per GPU at world size 1: 13.5 GiB" in format_plan(entries, "r.yaml")
