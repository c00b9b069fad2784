"""The two GPU-only speed paths against the stock ones they replace, on the path users run: CUDA, bf16, bitsandbytes
4-bit weights. CPU tests (tests/test_bench.py) check them equal in fp32; these check the real kernels (addmm
in bf16 over bnb's 4-bit matmul; torch's varlen flash attention) within bf16 tolerance.

Run on a GPU machine: `pytest -m gpu tests/test_gpu.py`. Skipped without CUDA (never in CI).
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BF16_REL = 2e-2  # bf16 keeps 8 bits of mantissa: ~4e-3 per rounding, a few roundings apart


def _model_dir(tmp_path_factory, name="gpu-llama"):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    # widths that are multiples of bnb's 64-value blocks and of the flash kernels' head size
    cfg = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _model_dir(tmp_path_factory)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _lora_model(model_dir, bits):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from scalesft.trainer.model import keep_trainable_4bit_layout

    kw = dict(dtype=torch.bfloat16, device_map={"": "cuda:0"})
    if bits == 4:
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(model_dir, **kw)
    if bits == 4:
        keep_trainable_4bit_layout(base)
    torch.manual_seed(1)
    m = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)  # B starts at zero: make the adapter matter
    return m


def _loss_and_grads(m, ids):
    m.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # what the Trainer does with bf16=True
        out = m(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
    return out.logits.detach().clone(), out.loss.item(), grads


@pytest.mark.parametrize("bits", [4, None], ids=["qlora-nf4", "lora-bf16"])
def test_fused_lora_equals_peft_on_cuda(model_dir, bits):
    from peft.tuners.lora import LoraLayer

    from scalesft.trainer.model import fuse_lora

    m = _lora_model(model_dir, bits)
    m.train()
    ids = torch.randint(0, 1024, (4, 96), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    logits_ref, loss_ref, grads_ref = _loss_and_grads(m, ids)
    layers = [x for x in m.modules() if isinstance(x, LoraLayer) and hasattr(x, "base_layer")]
    assert fuse_lora(m) == len(layers) == 14
    assert all("forward" in vars(x) for x in layers)  # the fused forward is the one that runs
    logits, loss, grads = _loss_and_grads(m, ids)
    assert _rel(logits, logits_ref) < BF16_REL
    assert abs(loss - loss_ref) / loss_ref < 1e-3
    assert grads.keys() == grads_ref.keys() and len(grads) == 28  # every lora_A and lora_B
    for n in grads:
        cos = torch.nn.functional.cosine_similarity(grads[n].flatten().float(), grads_ref[n].flatten().float(), 0)
        assert cos > 0.999 and _rel(grads[n], grads_ref[n]) < 5 * BF16_REL, n


def test_varlen_attention_equals_separate_rows_on_cuda(model_dir):
    from transformers import AutoModelForCausalLM

    from scalesft.core.hardware import VARLEN_ATTN, attention
    from scalesft.trainer.hardware import detect
    from scalesft.trainer.model import register_varlen_attention

    hw = detect()
    assert hw.varlen_kernel, "torch has no torch.nn.attention.varlen"
    assert attention("auto", hw) == VARLEN_ATTN  # what a run on this machine loads (flash-attn not installed)
    packed = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": "cuda:0"},
                                                  attn_implementation=register_varlen_attention())
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": "cuda:0"},
                                               attn_implementation="sdpa")
    lens = [37, 120, 5, 64]
    g = torch.Generator("cuda").manual_seed(3)
    rows = [torch.randint(0, 1024, (n,), device="cuda", generator=g) for n in lens]
    ids = torch.cat(rows)[None]
    pos = torch.cat([torch.arange(n, device="cuda") for n in lens])[None]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    sep = torch.cat([ref(input_ids=r[None]).logits[0] for r in rows])
    # TRL's padding-free collator passes the boundaries; a plain packed batch has only position_ids
    with_cu = packed(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lens),
                     max_length_k=max(lens)).logits[0]
    from_pos = packed(input_ids=ids, position_ids=pos).logits[0]
    assert _rel(with_cu, sep) < BF16_REL
    assert _rel(from_pos, sep) < BF16_REL
    # the attention really is per row: one masked attention over the whole packed row differs by far more
    across = ref(input_ids=ids).logits[0]
    assert _rel(across, sep) > 10 * BF16_REL

    # gradients through the varlen kernel equal the per-row ones (each row's first label masked, so the packed
    # loss averages exactly the per-row terms)
    labels = ids.clone()
    labels[0, cu[:-1].long()] = -100
    packed(input_ids=ids, position_ids=pos, labels=labels).loss.backward()
    total = sum(n - 1 for n in lens)
    loss = sum(torch.nn.functional.cross_entropy(ref(input_ids=r[None]).logits[0, :-1].float(), r[1:],
                                                 reduction="sum") for r in rows) / total
    loss.backward()
    for w in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        ga, gb = dict(packed.named_parameters())[w].grad, dict(ref.named_parameters())[w].grad
        cos = torch.nn.functional.cosine_similarity(ga.flatten().float(), gb.flatten().float(), 0)
        assert cos > 0.999 and _rel(ga, gb) < 5 * BF16_REL, (w, cos)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_plan_and_start_line_agree_on_cuda(strategy, tmp_path):
    """A real QLoRA run on the GPU through `scalesft train --gpus 1 --strategy S`: the start line's layout (fused
    LoRA and sdpa_varlen for DDP; bf16 quant storage, no device_map, peft's LoRA for FSDP2) is the one
    `scalesft plan --json` printed, and the run trains."""
    import json
    import re
    import subprocess
    import sys

    from scalesft.core.strategy import layout_text
    from scalesft.trainer.tiny import build
    from tinyrecipe import REPO, write_recipe

    model, data = build(tmp_path, rows=64, seed=0)
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", {"model": model, "data": data}, out, quantization={"bits": 4},
                          training={"max_steps": 3, "micro_batch_size": "auto", "precision": "bf16"})
    cli = [sys.executable, "-m", "scalesft.launch.cli"]
    plan = subprocess.run([*cli, "plan", str(recipe), "--strategy", strategy, "--json"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0, plan.stderr[-3000:]
    planned = layout_text(json.loads(plan.stdout)[0]["layout"])
    run = subprocess.run([*cli, "train", str(recipe), "--gpus", "1", "--strategy", strategy, "--port", "0"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    text = run.stdout + run.stderr
    assert run.returncode == 0, text[-5000:]
    m = re.search(r"\[scalesft\] rank 0 \(local 0\) of 1 on cuda:0: (.*?) · ", text)
    assert m, text[-3000:]
    started = dict(kv.split("=", 1) for kv in m.group(1).split())
    assert started == planned
    expected = {"ddp": dict(strategy="single", sharded="false", device_map="local_rank", quant_storage="uint8",
                            attention="sdpa_varlen", lora="fused"),
                "fsdp2": dict(strategy="fsdp2", sharded="true", device_map="none", quant_storage="bfloat16",
                              attention="sdpa_varlen", lora="peft")}[strategy]
    assert {k: started[k] for k in expected} == expected
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["global_step"] == 3
