"""Throughput and memory of the seeds' recipe vs scalesft on one GPU, same model, same data, one run.

    python bench/bench.py make /dev/shm/llama8b                  # random-init Llama-3.1-8B shape, on the GPU
    python bench/bench.py suite /dev/shm/llama8b --out DIR       # seeds (4 x GA 4) vs scalesft (16), fixed + var
    python bench/bench.py suite /dev/shm/llama8b --variants seeds@4,scalesft-pack@16 --data var
    python bench/bench.py suite /dev/shm/llama8b --variants seeds,seeds-liger --global-batch 0 --steps 14
    python bench/bench.py suite /dev/shm/llama8b --data short --seq 128 --global-batch 32   # short Q/A rows
    python bench/bench.py user /dev/shm/llama8b                  # `scalesft train` of seed-000, Korean Q/A rows
    python bench/bench.py list                                   # the variants and their knobs
    python bench/bench.py --smoke                                # CPU, tiny model, both engines, ~30 s
    bash bench/gpu.sh "300 fixed seeds@4,scalesft@16" "200 var seeds@4,scalesft@16,scalesft-pack@16"
                                                                 # on the device machine: wheels, make, suites

NAME@MB runs a variant at micro batch MB; every variant runs the same global batch (--global-batch, default 16)
on the same rows, so the seeds' 4 x 4 accumulation and scalesft's 16 x 1 compute the same loss per step.

Every variant runs in its own subprocess (clean peak memory, no monkeypatch leaking between variants) on the
same rows: fixed length (every row `--seq` tokens) or variable length (lognormal, median ~250, clipped to
[50, seq], like Korean Q/A). Reported per variant: useful (non-pad) tokens/s over the timed steps (step 4 on),
seconds per optimizer step, peak allocated/reserved memory, MFU with the LoRA-correct FLOP count
(core/flops.py), the loss per step, and the ratio to the seeds' recipe on the same data. Results go to
DIR/results.json (one object per variant) and DIR/results.md (the table).

Variants `seeds*` and `hf-*` build the model with transformers' Trainer as the seeds do (the knobs are the
candidates measured one by one); `scalesft*` runs scalesft's own `trainer.train.train(recipe, ...)` with the
recipe in SCALESFT_RECIPE, so what is measured is what users run.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LLAMA31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                  rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Knobs of the transformers-Trainer variants. The seeds' recipe is SEEDS; a candidate changes a few knobs.
SEEDS = dict(engine="hf", quant="nf4", upcast=True, dropout=0.05, ckpt=True, ckpt_layers=None, liger=False,
             collate="pad", r=64, alpha=128)
VARIANTS: dict[str, dict] = {
    "seeds": {},
    "seeds-liger": dict(liger=True),
    "seeds-d0": dict(dropout=0.0),
    "seeds-nockpt": dict(ckpt=False),
    # prepare_model_for_kbit_training upcasts every non-4-bit weight (norms, embeddings, LM head) to fp32, which
    # makes the whole residual stream fp32; "bf16" skips that upcast (the norm weights stay in bf16).
    "hf-bf16": dict(upcast=False),
    "hf-bf16-liger-d0": dict(upcast=False, liger=True, dropout=0.0),
    "hf-bf16-liger-d0-nockpt": dict(upcast=False, liger=True, dropout=0.0, ckpt=False),
    "hf-bf16-liger-d0-ck16": dict(upcast=False, liger=True, dropout=0.0, ckpt_layers=16),
    "hf-bf16-liger-d0-padfree": dict(upcast=False, liger=True, dropout=0.0, collate="padfree", varlen=True),
    "hf-bf16-liger-d0-compile": dict(upcast=False, liger=True, dropout=0.0, compile=True),
    "hf-bf16-liger-d0-pack": dict(upcast=False, liger=True, dropout=0.0, collate="pack"),
    "hf-bf16-liger-d0-padfree-nockpt": dict(upcast=False, liger=True, dropout=0.0, collate="padfree", ckpt=False),
    "lora-bf16": dict(quant=None, upcast=False),
    "lora-bf16-liger-d0-nockpt": dict(quant=None, upcast=False, liger=True, dropout=0.0, ckpt=False),
    "lora-bf16-liger-d0-nockpt-padfree": dict(quant=None, upcast=False, liger=True, dropout=0.0, ckpt=False,
                                              collate="padfree"),
    # scalesft: its own train() with its default recipe (SCALESFT_RECIPE below); overrides as "key=value".
    "scalesft": dict(engine="scalesft"),
    "scalesft-lora": dict(engine="scalesft", overrides=["quantization.bits=null"]),
    "scalesft-lora-nockpt": dict(engine="scalesft", overrides=["quantization.bits=null",
                                                                "training.gradient_checkpointing=false"]),
    "scalesft-nockpt": dict(engine="scalesft", overrides=["training.gradient_checkpointing=false"]),
    "scalesft-pack": dict(engine="scalesft", overrides=["data.packing=true"]),
    "scalesft-dq": dict(engine="scalesft", overrides=["quantization.double_quant=true"]),
    "scalesft-noliger": dict(engine="scalesft", overrides=["model.liger_kernel=false"]),
    "scalesft-r16": dict(engine="scalesft", r=16, overrides=["lora.r=16", "lora.alpha=32"]),
}
DEFAULT_SUITE = ["seeds@4", "scalesft@16"]  # same global batch (16): seeds 4 x 4 accumulation, scalesft 16 x 1

# scalesft's default QLoRA recipe for this model, as recipes/ ships it (model/data paths filled in by the bench).
SCALESFT_RECIPE = {
    "model": {"attn_implementation": "auto", "liger_kernel": "auto"},
    "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": False, "compute_dtype": "auto"},
    "lora": {"r": 64, "alpha": 128, "dropout": 0.0, "target_modules": TARGETS},
    "data": {"format": "text", "packing": False},
    "training": {"learning_rate": 2e-4, "lr_scheduler_type": "linear", "optim": "adamw_torch",
                 "precision": "bf16", "gradient_checkpointing": True, "logging_steps": 1, "save_steps": 100000,
                 "report_to": "none", "seed": 0},
}


# ----------------------------------------------------------------------------------------------- data
def make_rows(kind: str, n: int, seq: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n token rows. Learnable but not trivial: each row repeats a random motif (8-32 tokens) drawn from the
    first 2,000 ids, so the loss falls in a few steps (a flat loss would hide differences between variants).
    fixed: every row `seq` tokens; var: lognormal lengths, median ~250, clipped to [50, seq]; short: lognormal,
    median ~70, clipped to [16, 128] (question/answer rows)."""
    import random
    rng = random.Random(seed)
    sub = min(vocab, 2000)
    rows = []
    for _ in range(n):
        if kind == "fixed":
            L = seq
        elif kind == "var":
            L = int(min(seq, max(50, math.exp(rng.gauss(5.52, 0.6)))))
        elif kind == "short":  # question/answer and chat rows as users have them: median ~70, at most 128
            L = int(min(seq, 128, max(16, math.exp(rng.gauss(4.25, 0.45)))))
        else:
            raise ValueError(f"data kind {kind!r}: use fixed, var or short")
        motif = [rng.randrange(sub) for _ in range(rng.randint(8, 32))]
        rows.append([motif[i % len(motif)] if rng.random() > 0.1 else rng.randrange(sub) for i in range(L)])
    return rows


def pack_rows(rows: list[list[int]], budget: int) -> list[list[list[int]]]:
    """Greedy first-fit-decreasing bins of at most `budget` tokens (each bin one micro-batch)."""
    bins: list[list[list[int]]] = []
    room: list[int] = []
    for r in sorted(rows, key=len, reverse=True):
        for i, left in enumerate(room):
            if len(r) <= left:
                bins[i].append(r)
                room[i] -= len(r)
                break
        else:
            bins.append([r])
            room.append(budget - len(r))
    return bins


class Collator:
    """pad: right-pad to the batch max (labels -100, attention mask), as the seeds do (DataCollatorForSeq2Seq).
    padfree / pack: the rows flattened into one row, position_ids restarting per row, the first label of each
    row -100 (no attention mask: transformers builds the block-diagonal mask from position_ids)."""

    def __init__(self, mode: str, pad_id: int = 0):
        self.mode, self.pad_id, self.tokens = mode, pad_id, []

    def __call__(self, feats):
        import torch
        rows = [r for f in feats for r in (f["input_ids"] if isinstance(f["input_ids"][0], list) else [f["input_ids"]])]
        self.tokens.append(sum(len(r) - 1 for r in rows))  # loss-bearing: labels after the shift
        if self.mode == "pad":
            T = max(len(r) for r in rows)
            ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
            lab = torch.full((len(rows), T), -100, dtype=torch.long)
            att = torch.zeros((len(rows), T), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, :len(r)] = torch.tensor(r)
                lab[i, :len(r)] = torch.tensor(r)
                att[i, :len(r)] = 1
            return {"input_ids": ids, "labels": lab, "attention_mask": att}
        ids = torch.tensor([t for r in rows for t in r])[None]
        lab = ids.clone()
        pos = torch.cat([torch.arange(len(r)) for r in rows])[None]
        lab[pos == 0] = -100
        cu = torch.tensor([0] + [len(r) for r in rows]).cumsum(0).to(torch.int32)
        longest = max(len(r) for r in rows)
        return {"input_ids": ids, "labels": lab, "position_ids": pos, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                "max_length_q": longest, "max_length_k": longest}


# ----------------------------------------------------------------------------------------------- model
def make(path: str, tiny: bool = False) -> None:
    """Build the random-init checkpoint (on the GPU when there is one) and a small tokenizer beside it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from scalesft.trainer.tiny import build_tokenizer, korean_qa_rows
    t = time.time()
    tok = build_tokenizer([f"{r['question']} {r['answer']}" for r in korean_qa_rows(200)])
    shape = dict(LLAMA31_8B)
    if tiny:
        shape.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=max(len(tok), 512), max_position_embeddings=2048)
    cfg = LlamaConfig(**shape, eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):
        m = LlamaForCausalLM(cfg)
    torch.set_default_dtype(prev)
    m.save_pretrained(path, max_shard_size="5GB")
    tok.save_pretrained(path)
    print(json.dumps({"made": path, "s": round(time.time() - t, 1),
                      "params": sum(p.numel() for p in m.parameters())}), flush=True)


def _load_hf(path: str, v: dict, device_map):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    if v["liger"]:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama()
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    attn = "sdpa"
    if v.get("varlen"):
        from scalesft.trainer.model import register_varlen_attention
        attn = register_varlen_attention()
    kw = dict(dtype=dtype, attn_implementation=attn, device_map=device_map)
    if v["quant"] == "nf4":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    model.config.use_cache = False
    ck = {"use_reentrant": False}
    if v["quant"] and v["upcast"]:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=v["ckpt"],
                                                gradient_checkpointing_kwargs=ck)
    elif v["quant"]:  # the same preparation without the fp32 upcast
        for p in model.parameters():
            p.requires_grad_(False)
        if v["ckpt"]:
            model.enable_input_require_grads()
    lcfg = LoraConfig(r=v["r"], lora_alpha=v["alpha"], lora_dropout=v["dropout"], bias="none",
                      task_type="CAUSAL_LM", target_modules=TARGETS)
    model = get_peft_model(model, lcfg)
    if v.get("compile"):
        from transformers.modeling_layers import GradientCheckpointingLayer
        torch._dynamo.config.cache_size_limit = 256
        for m in model.modules():
            if isinstance(m, GradientCheckpointingLayer):
                m.compile()
    return model


def _partial_checkpointing(model, k: int) -> int:
    """Keep activation checkpointing on the first k decoder layers only; return how many are checkpointed."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = layer.gradient_checkpointing and i < k
    return sum(bool(layer.gradient_checkpointing) for layer in layers)


# ----------------------------------------------------------------------------------------------- one run
def run(spec: dict) -> dict:
    """Train one variant; return its measurements."""
    import torch
    from transformers import TrainerCallback
    from scalesft.core import flops as F

    v = {**SEEDS, **VARIANTS.get(spec["variant"], {}), **spec.get("knobs", {})}
    cuda = torch.cuda.is_available()
    path, mb, seq, steps = spec["model"], spec["mb"], spec["seq"], spec["steps"]
    cfg = json.loads((Path(path) / "config.json").read_text())
    shape = F.Shape.from_config(cfg)
    gbs = spec.get("global_batch") or mb
    if gbs % mb:
        raise ValueError(f"global batch {gbs} is not a multiple of micro batch {mb}")
    ga = gbs // mb
    warm = min(spec.get("warm", 3), steps - 1)
    collate = v["collate"]
    n_rows = steps * gbs * (4 if any("packing=true" in o for o in v.get("overrides", [])) else 1)
    rows = make_rows(spec["data"], n_rows, seq, cfg["vocab_size"], seed=spec.get("seed", 0))
    if collate == "pack":
        # same rows, packed into bins of mb*seq tokens: fewer, fuller micro-batches (a step = one bin)
        items = [{"input_ids": b} for b in pack_rows(rows, mb * seq)]
        steps = len(items)
        warm = min(spec.get("warm", 3), steps - 1)
        per_device, ga = 1, 1
    else:
        items = [{"input_ids": r} for r in rows]
        per_device = mb
    coll = Collator("pad" if collate == "pad" else "flat")

    marks, losses = [], []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **k):
            if cuda:
                torch.cuda.synchronize()
            marks.append(time.time())

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(round(float(logs["loss"]), 5))

    prof_cb = []
    if spec.get("profile") and cuda:
        prof_cb = [_profiler_callback(spec, steps)]
    t0 = time.time()
    if v["engine"] == "hf":
        from transformers import Trainer, TrainingArguments
        model = _load_hf(path, v, {"": 0} if cuda else None)
        load_s = time.time() - t0
        if v["ckpt"] and v["ckpt_layers"] is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        args = TrainingArguments(
            output_dir=spec.get("workdir", "/tmp/bench_out"), per_device_train_batch_size=per_device,
            gradient_accumulation_steps=ga,
            max_steps=steps, learning_rate=2e-4, bf16=cuda, logging_steps=1, save_strategy="no",
            gradient_checkpointing=v["ckpt"], gradient_checkpointing_kwargs={"use_reentrant": False},
            report_to="none", optim="adamw_torch", dataloader_num_workers=0, seed=0, use_cpu=not cuda)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        tr = Trainer(model=model, args=args, train_dataset=items, data_collator=coll,
                     callbacks=[Timer(), *prof_cb])
        if v["ckpt"] and v["ckpt_layers"] is not None:
            # Trainer enables checkpointing on every layer in train(); trim it in on_train_begin
            class Partial(TrainerCallback):
                def on_train_begin(self, args, state, control, model=None, **k):
                    v["ckpt_layers_on"] = _partial_checkpointing(model, v["ckpt_layers"])
            tr.add_callback(Partial())
        tr.train()
        model_desc = "transformers.Trainer (seeds' code path)"
    else:
        from datasets import Dataset
        from scalesft.core.recipe import recipe_from_dict
        from scalesft.trainer.train import train
        raw = json.loads(json.dumps(SCALESFT_RECIPE))
        raw["model"]["name_or_path"] = path
        raw["data"].update(path="unused-bench-passes-rows", max_seq_length=seq)
        raw["training"].update(output_dir=spec.get("workdir", "/tmp/bench_out"), micro_batch_size=mb,
                               global_batch_size=gbs, max_steps=steps)
        if not cuda:
            raw["training"]["precision"] = "fp32"
        from scalesft.core.recipe import apply_overrides
        raw = apply_overrides(raw, list(v.get("overrides", [])) + list(spec.get("overrides", [])))
        recipe = recipe_from_dict(raw)
        ds = Dataset.from_dict({"input_ids": rows, "labels": rows})
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        metrics = train(recipe, train_dataset=ds, callbacks=[Timer(), *prof_cb]) or {}
        load_s = float("nan")
        model_desc = "scalesft trainer.train.train"
        v["recipe"] = recipe.to_dict()
        v["scalesft_metrics"] = {k: metrics[k] for k in metrics if k != "train_loss"} if isinstance(metrics, dict) else {}
        # the trainer owns its collator: count the tokens of the timed steps from the rows themselves
        # tokens and time of the steady steps as the trainer itself counts them (train_metrics.json)
        st = (metrics or {}).get("steady_state") or {}
        v["trainer_steady_state"] = st
    wall = time.time() - t0
    n_marks = len(marks)
    if prof_cb and n_marks > warm + 3:
        n_marks -= 2  # the profiled steps are slower: keep them out of the timing
    timed = max(1, n_marks - warm)
    dt = marks[n_marks - 1] - marks[warm - 1] if n_marks > warm and warm >= 1 else marks[-1] - t0
    step_tokens = [sum(coll.tokens[i * ga:(i + 1) * ga]) for i in range(len(coll.tokens) // ga)]
    tok = sum(step_tokens[warm:n_marks]) if step_tokens else float("nan")
    if v["engine"] == "scalesft" and v.get("trainer_steady_state", {}).get("tokens_per_second_per_device"):
        st = v["trainer_steady_state"]
        dt, timed = st["seconds_per_step"] * st["steps"], st["steps"]
        tok = st["tokens_per_second_per_device"] * dt
    if collate == "pack":
        seq_of_step = [[len(r) for r in it["input_ids"]] for it in items]
    else:
        seq_of_step = [[len(r) for r in rows]]
    # the Trainer samples rows at random; lengths per step differ, totals over timed steps ~ equal: use the mean
    all_lens = [L for s in seq_of_step for L in s]
    flops_per_tok = F.train_flops(shape, all_lens, lora_r=v["r"]) / max(1, sum(all_lens))
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    res = {
        "variant": spec["variant"], "data": spec["data"], "mb": mb, "global_batch": gbs, "seq": seq, "steps": n_marks,
        "timed_steps": timed, "tok_s": round(tok / dt, 1) if dt > 0 else None, "s_per_step": round(dt / timed, 4),
        "tokens_timed": tok,
        "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "mfu": None, "gflop_per_token": float(f"{flops_per_tok / 1e9:.4g}"),
        "load_s": round(load_s, 1), "wall_s": round(wall, 1), "losses": losses, "device": name,
        "engine": model_desc, "knobs": {k: v[k] for k in v if k not in ("recipe",)},
    }
    m = F.mfu(flops_per_tok * (tok / dt), 1.0, name) if dt > 0 and tok == tok else None
    res["mfu"] = round(m, 4) if m else None
    return res


def _profiler_callback(spec: dict, steps: int):
    """Profile the last two steps; write the top kernels and a per-category breakdown."""
    import torch
    from transformers import TrainerCallback
    out = Path(spec.get("out_dir", "."))

    class Prof(TrainerCallback):
        p = None

        def on_step_begin(self, args, state, control, **k):
            if state.global_step == steps - 2 and self.p is None:
                self.p = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                self.p.__enter__()

        def on_train_end(self, args, state, control, **k):
            if self.p is None:
                return
            torch.cuda.synchronize()
            self.p.__exit__(None, None, None)
            ev = [e for e in self.p.key_averages() if e.device_time_total > 0]
            total = sum(e.device_time_total for e in ev) or 1
            cats: dict[str, float] = {}
            for e in ev:
                cats[_kernel_category(e.key)] = cats.get(_kernel_category(e.key), 0) + e.device_time_total
            lines = [f"# profile {spec['variant']} {spec['data']} mb{spec['mb']}: 2 steps, "
                     f"{total / 2e3:.1f} ms GPU time per step", "", "| category | ms/step | share |", "|---|---|---|"]
            for c, t in sorted(cats.items(), key=lambda x: -x[1]):
                lines.append(f"| {c} | {t / 2e3:.1f} | {t / total:.1%} |")
            lines += ["", "| kernel | calls/step | ms/step | share |", "|---|---|---|---|"]
            for e in sorted(ev, key=lambda e: -e.device_time_total)[:25]:
                lines.append(f"| {e.key[:90]} | {e.count // 2} | {e.device_time_total / 2e3:.1f} | "
                             f"{e.device_time_total / total:.1%} |")
            text = "\n".join(lines)
            print(text, flush=True)
            (out / f"profile_{spec['variant']}_{spec['data']}.md").write_text(text + "\n")

    return Prof()


def _kernel_category(name: str) -> str:
    n = name.lower()
    if "dequant" in n or "kdequantize" in n:
        return "nf4 dequantize"
    if "flash" in n or "fmha" in n or "attention" in n or "efficient" in n:
        return "attention"
    if "gemm" in n or "cutlass" in n or "sm90_xmma" in n or "nvjet" in n or "cublas" in n or "matmul" in n:
        return "matmul (cuBLAS/CUTLASS)"
    if "liger" in n or "_kernel" in n and "triton" in n or n.startswith("triton"):
        return "triton (liger)"
    if "adam" in n or "foreach" in n or "multi_tensor" in n:
        return "optimizer / foreach"
    if "copy" in n or "cast" in n or "memcpy" in n or "to_copy" in n or "memset" in n:
        return "copy / cast / memset"
    if "reduce" in n or "norm" in n or "softmax" in n or "nll" in n or "log_softmax" in n:
        return "reductions / norm / softmax / loss"
    if "elementwise" in n or "vectorized" in n or "unrolled" in n:
        return "elementwise"
    return "other"


# ----------------------------------------------------------------------------------------------- suite
def _ratio_rows(results: list[dict]) -> list[dict]:
    base = {r["data"]: r for r in results if r["variant"] == "seeds" and r.get("tok_s")}
    for r in results:
        b = base.get(r["data"])
        r["x_seeds"] = round(r["tok_s"] / b["tok_s"], 2) if b and r.get("tok_s") else None
        if b and b.get("losses") and r.get("losses"):
            n = min(len(b["losses"]), len(r["losses"]))
            r["loss_max_rel_diff_vs_seeds"] = round(
                max(abs(a - c) / max(abs(a), 1e-9) for a, c in zip(b["losses"][:n], r["losses"][:n])), 4)
    return results


def table(results: list[dict]) -> str:
    head = ("| variant | data | mb | tokens/s | x seeds | s/step | peak alloc GiB | peak reserved GiB | MFU | "
            "loss first->last | max rel loss diff vs seeds |")
    lines = [head, "|" + "|".join(["---"] * 11) + "|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['data']} | {r.get('mb')} | FAILED: {r['error'][:80]} |" + " |" * 7)
            continue
        ls = r.get("losses") or []
        lines.append("| {variant} | {data} | {mb} | {tok} | {x} | {sps} | {pa} | {pr} | {mfu} | {l0}->{l1} | {d} |".format(
            variant=r["variant"], data=r["data"], mb=r["mb"],
            tok=f"{r['tok_s']:,.0f}" if r.get("tok_s") else "-", x=r.get("x_seeds") or "-",
            sps=r["s_per_step"], pa=r["peak_alloc_gib"], pr=r["peak_reserved_gib"],
            mfu=f"{r['mfu']:.1%}" if r.get("mfu") else "-",
            l0=ls[0] if ls else "-", l1=ls[-1] if ls else "-", d=r.get("loss_max_rel_diff_vs_seeds", "-")))
    return "\n".join(lines)


def suite(args) -> list[dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    jobs = []
    for data in args.data.split(","):
        for name in args.variants.split(","):
            name, _, mbs = name.partition("@")  # "variant@16" = micro batch 16
            jobs.append((name, data, int(mbs) if mbs else args.mb))
    for name, data, mb in jobs:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        steps = args.steps if data == "fixed" else args.var_steps
        if not args.global_batch and mb > args.mb:
            steps = max(6, steps * args.mb // mb)  # a bigger micro batch: fewer steps
        spec = dict(variant=name, data=data, mb=mb, seq=args.seq, steps=steps, model=args.model,
                    global_batch=args.global_batch, warm=args.warm,
                    profile=name in (args.profile or "").split(","), out_dir=str(out),
                    overrides=args.override or [])
        tag = f"{name}_{data}_mb{mb}"
        spec["workdir"] = str(out / "work" / tag)
        shutil.rmtree(spec["workdir"], ignore_errors=True)  # scalesft resumes from checkpoints in output_dir
        log = out / f"{tag}.log"
        t = time.time()
        cmd = [sys.executable, str(Path(__file__).resolve()), "run", json.dumps(spec)]
        if args.inprocess:
            try:
                res = run(spec)
            except Exception as e:  # noqa: BLE001 - one failed variant must not end the suite
                res = {"variant": name, "data": data, "mb": mb, "error": f"{type(e).__name__}: {e}"}
        else:
            with open(log, "w") as f:
                p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=args.timeout)
            res = None
            for line in log.read_text().splitlines():
                if line.startswith("BENCH_RESULT "):
                    res = json.loads(line[len("BENCH_RESULT "):])
            if res is None:
                tail = log.read_text()[-600:].replace("\n", " / ")
                res = {"variant": name, "data": data, "mb": mb, "error": f"rc={p.returncode}: {tail}"}
        res["bench_s"] = round(time.time() - t, 1)
        results.append(res)
        print(json.dumps({k: res.get(k) for k in ("variant", "data", "mb", "tok_s", "s_per_step", "peak_alloc_gib",
                                                  "peak_reserved_gib", "mfu", "bench_s", "error")}), flush=True)
        _ratio_rows(results)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        (out / "results.md").write_text(table(results) + "\n")
    print(table(results), flush=True)
    return results


def smoke(out: str | None = None, variants: str = "seeds,scalesft") -> list[dict]:
    """CPU, tiny model (trainer/tiny.py shape): both engines, both data cases, in one process. Seconds."""
    import tempfile
    tmp = Path(out or tempfile.mkdtemp(prefix="bench_smoke_"))
    model = tmp / "model"
    if not (model / "config.json").exists():
        make(str(model), tiny=True)
    ns = argparse.Namespace(model=str(model), out=str(tmp / "res"), data="fixed,var", variants=variants, mb=2,
                            seq=32, steps=3, var_steps=3, global_batch=2, warm=1, profile="", override=[],
                            inprocess=True, timeout=600)
    VARIANTS["scalesft"] = {**VARIANTS["scalesft"], "overrides": ["model.liger_kernel=false"]}
    return suite(ns)


def user_path(args) -> dict:
    """The user's path, beside the harness: `scalesft train` of a shipped recipe, unchanged but for the model and
    data paths (and max_steps), on Korean question/answer rows written as JSONL; its own train_metrics.json."""
    from scalesft.trainer.tiny import korean_qa_rows

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "user_rows.jsonl"
    with data.open("w") as f:
        for r in korean_qa_rows(args.rows, seed=1):
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    work = out / "work" / "user"
    shutil.rmtree(work, ignore_errors=True)
    cmd = [sys.executable, "-m", "scalesft.launch.cli", "train", str(ROOT / args.recipe), f"model.name_or_path={args.model}",
           f"data.path={data}", f"training.output_dir={work}", f"training.max_steps={args.steps}",
           "training.save_steps=100000", "training.logging_steps=1", *(args.override or [])]
    t = time.time()
    with open(out / "user.log", "w") as log:
        p = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
    res = {"variant": f"user:{Path(args.recipe).name}", "data": "korean-qa", "command": " ".join(cmd),
           "bench_s": round(time.time() - t, 1)}
    if p.returncode != 0:
        res["error"] = f"rc={p.returncode}: " + (out / "user.log").read_text()[-600:].replace("\n", " / ")
    else:
        m = json.loads((work / "train_metrics.json").read_text())
        st = m.get("steady_state") or {}
        res.update(tok_s=st.get("tokens_per_second_per_device"), s_per_step=st.get("seconds_per_step"),
                   mfu=st.get("mfu"), peak_alloc_gib=m.get("peak_memory_gib"), global_batch=m.get("global_batch_size"),
                   mb=m.get("micro_batch_size"), accumulation=m.get("gradient_accumulation_steps"),
                   rows_tokens=(m.get("data") or {}).get("tokens"))
    print(json.dumps(res, ensure_ascii=False), flush=True)
    (out / "user.json").write_text(json.dumps(res, indent=1, ensure_ascii=False))
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run with a tiny model (seconds)")
    sub = ap.add_subparsers(dest="cmd")
    m = sub.add_parser("make")
    m.add_argument("path")
    m.add_argument("--tiny", action="store_true")
    s = sub.add_parser("suite")
    s.add_argument("model")
    s.add_argument("--out", default="bench_results")
    s.add_argument("--variants", default=",".join(DEFAULT_SUITE),
                   help="comma-separated; NAME@MB sets that variant's micro batch")
    s.add_argument("--data", default="fixed,var")
    s.add_argument("--mb", type=int, default=4)
    s.add_argument("--seq", type=int, default=1024)
    s.add_argument("--steps", type=int, default=6, help="optimizer steps per variant, fixed-length data")
    s.add_argument("--var-steps", type=int, default=6, help="optimizer steps per variant, variable-length data")
    s.add_argument("--global-batch", type=int, default=16,
                   help="sequences per optimizer step, the same for every variant (0: = each variant's micro batch)")
    s.add_argument("--warm", type=int, default=2, help="optimizer steps left out of the timing")
    s.add_argument("--profile", default="", help="variants to profile (last two steps)")
    s.add_argument("--override", action="append", help="scalesft recipe override, section.key=value")
    s.add_argument("--inprocess", action="store_true")
    s.add_argument("--timeout", type=int, default=600)
    u = sub.add_parser("user", help="scalesft train of a shipped recipe on Korean Q/A rows (the user's path)")
    u.add_argument("model")
    u.add_argument("--recipe", default="recipes/seed-000-kanana-qlora.yaml")
    u.add_argument("--rows", type=int, default=3000)
    u.add_argument("--steps", type=int, default=8)
    u.add_argument("--out", default="bench_results")
    u.add_argument("--override", action="append", help="recipe override, section.key=value")
    u.add_argument("--timeout", type=int, default=900)
    r = sub.add_parser("run")
    r.add_argument("spec")
    sub.add_parser("list")
    a = ap.parse_args(argv)
    if a.smoke:
        smoke()
    elif a.cmd == "make":
        make(a.path, tiny=a.tiny)
    elif a.cmd == "suite":
        suite(a)
    elif a.cmd == "user":
        user_path(a)
    elif a.cmd == "run":
        res = run(json.loads(a.spec))
        print("BENCH_RESULT " + json.dumps(res), flush=True)
    elif a.cmd == "list":
        for k, v in VARIANTS.items():
            print(k, v if v.get("engine") == "scalesft" else {**SEEDS, **v})
        print("scalesft recipe:", json.dumps(SCALESFT_RECIPE))
    else:
        ap.print_help()


if __name__ == "__main__":
    main()
