"""The benchmark's CPU smoke mode (both engines, both data cases, tiny model) and the two speed changes it
measures on GPUs, checked for equal results on CPU: variable-length attention for padding-free batches and the
fused LoRA forward."""

import copy
import json

import pytest
import torch

from bench import bench


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "model"
    bench.make(str(path), tiny=True)
    return path


def test_smoke_mode_runs_both_engines_on_both_data_cases(tiny_model, tmp_path):
    results = bench.smoke(str(tiny_model.parent))
    assert {(r["variant"], r["data"]) for r in results} == {(v, d) for v in ("seeds", "scalesft")
                                                            for d in ("fixed", "var")}
    for r in results:
        assert "error" not in r, r.get("error")
        assert r["tok_s"] > 0 and r["s_per_step"] > 0 and len(r["losses"]) == 3
        assert r["gflop_per_token"] > 0
        # same rows, same global batch: the trainer's loss trajectory matches the seeds' recipe
        assert r["loss_max_rel_diff_vs_seeds"] < 2e-3
    written = json.loads((tiny_model.parent / "res" / "results.json").read_text())
    assert len(written) == 4
    assert "| scalesft | var |" in (tiny_model.parent / "res" / "results.md").read_text()


def test_pack_rows_keeps_every_row_within_budget():
    rows = bench.make_rows("var", 64, 1024, 128256, seed=1)
    bins = bench.pack_rows(rows, 2048)
    assert sorted(map(len, (r for b in bins for r in b))) == sorted(map(len, rows))
    assert all(sum(map(len, b)) <= 2048 for b in bins)
    assert all(50 <= len(r) <= 1024 for r in rows)


def test_padfree_collator_masks_the_first_label_of_each_row():
    out = bench.Collator("flat")([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert out["labels"].tolist() == [[-100, 2, 3, -100, 5]]


def test_varlen_attention_equals_separate_rows(tiny_model):
    from transformers import AutoModelForCausalLM

    from scalesft.trainer.model import register_varlen_attention

    name = register_varlen_attention()
    torch.manual_seed(0)
    packed = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=name, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", dtype=torch.float32)
    lens = [5, 9, 3]
    rows = [torch.randint(0, 300, (n,)) for n in lens]
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    out = packed(input_ids=torch.cat(rows)[None], position_ids=torch.cat([torch.arange(n) for n in lens])[None],
                 cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9, use_cache=False).logits[0]
    sep = torch.cat([ref(input_ids=r[None], use_cache=False).logits[0] for r in rows])
    assert (out - sep).abs().max().item() < 1e-5
    # a padded batch (attention mask, no cu_seq_lens) takes the sdpa path unchanged
    ids = torch.randint(0, 300, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    a = packed(input_ids=ids, attention_mask=mask, use_cache=False).logits
    b = ref(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert (a - b).abs().max().item() < 1e-5


def test_fused_lora_forward_equals_peft(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from scalesft.trainer.model import fuse_lora

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    m = get_peft_model(base, LoraConfig(r=8, lora_alpha=24, lora_dropout=0.0, target_modules="all-linear"))
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)  # B starts at zero: make the adapter matter
    fused = copy.deepcopy(m)
    assert fuse_lora(fused) == 14
    ids = torch.randint(0, 300, (2, 12))
    la = m(input_ids=ids, labels=ids).loss
    lb = fused(input_ids=ids, labels=ids).loss
    la.backward()
    lb.backward()
    assert abs(la.item() - lb.item()) < 1e-6
    for (name, p), q in zip(m.named_parameters(), fused.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-6), name
    # dropout > 0 keeps peft's own forward (the fused add has no dropout): nothing is replaced, and in training
    # mode the output is peft's, dropout included, to the bit
    d = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                       LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear"))
    for n, p in d.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    ref = copy.deepcopy(d)
    assert fuse_lora(d) == 0
    from peft.tuners.lora import LoraLayer

    layers = [m for m in d.modules() if isinstance(m, LoraLayer) and hasattr(m, "base_layer")]
    assert len(layers) == 14 and all("forward" not in vars(m) for m in layers)  # the class's (peft's) forward
    d.train()
    ref.train()

    def logits(model, seed):
        torch.manual_seed(seed)
        return model(input_ids=ids).logits

    assert torch.equal(logits(d, 1), logits(ref, 1))
    assert not torch.equal(logits(ref, 1), logits(ref, 2))  # the dropout really acts, so equality means something
    # the fused forward itself also falls back to peft's when a layer has dropout (a layer fused before)
    import types

    from scalesft.trainer.model import _fused_lora_forward

    for m in layers:
        m.forward = types.MethodType(_fused_lora_forward, m)
    assert torch.equal(logits(d, 3), logits(ref, 3))


def test_varlen_attention_finds_boundaries_from_position_ids(tiny_model):
    """A collator that gives only position_ids (no cu_seq_lens) must not attend across rows."""
    from transformers import AutoModelForCausalLM

    from scalesft.trainer.model import register_varlen_attention

    torch.manual_seed(0)
    packed = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=register_varlen_attention(),
                                                  dtype=torch.float32)
    lens = [4, 6]
    rows = [torch.randint(0, 300, (n,)) for n in lens]
    out = packed(input_ids=torch.cat(rows)[None], position_ids=torch.cat([torch.arange(n) for n in lens])[None],
                 use_cache=False).logits[0]
    sep = torch.cat([packed(input_ids=r[None], use_cache=False).logits[0] for r in rows])
    assert (out - sep).abs().max().item() < 1e-5
