"""Load the tokenizer and the base model (quantized or not) and describe the LoRA adapter.

The adapter itself is attached by TRL's SFTTrainer (peft_config), which also enables input gradients for
checkpointing and handles the ZeRO-3 special cases.
"""

from __future__ import annotations

from scalesft.core.hardware import VARLEN_ATTN
from scalesft.core.recipe import LoraConfig, ModelConfig, QuantizationConfig, RecipeError
from .distributed import Strategy


def model_path(cfg: ModelConfig) -> str:
    if cfg.name_or_path.startswith("builtin:"):
        from .assets import builtin_model

        return str(builtin_model(cfg.name_or_path.removeprefix("builtin:")))
    return cfg.name_or_path


def load_tokenizer(cfg: ModelConfig, path: str | None = None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path or model_path(cfg), revision=cfg.revision,
                                            trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise RecipeError(f"model.name_or_path '{cfg.name_or_path}': no tokenizer found locally or in the HF "
                          f"cache ({str(e).splitlines()[0][:160]}): give a local model folder") from None
    if tok.eos_token_id is None:
        raise RecipeError(f"model.name_or_path '{cfg.name_or_path}': its tokenizer has no EOS token")
    if tok.pad_token is None:  # as the seeds do: pad with EOS (labels of padding are masked anyway)
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def bnb_config(q: QuantizationConfig, compute_dtype: str, quant_storage: str | None):
    import torch
    from transformers import BitsAndBytesConfig

    dtype = getattr(torch, compute_dtype if q.compute_dtype == "auto" else q.compute_dtype)
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant, bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_quant_storage=getattr(torch, quant_storage) if quant_storage else torch.uint8)


# VARLEN_ATTN (core/hardware.py decides when it runs): sdpa, except that padding-free batches run torch's
# variable-length flash attention per sequence instead of one masked attention over the whole flattened row (T x T
# work and a T x T mask: 16x the attention FLOPs at 16 rows of 1024). Sequence boundaries come from TRL's collator
# (cu_seq_lens_q), else from position_ids restarting at 0.




def _varlen(q, k, v, cu, max_len: int, scale):
    """q (T, Hq, D), k/v (T, Hkv, D), cu (N+1,) int32 -> (T, Hq, D), causal within each sequence."""
    import inspect

    import torch

    n_rep = q.shape[1] // k.shape[1]
    if q.is_cuda:
        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        kw = {"scale": scale}
        if "is_causal" in params:
            kw["is_causal"] = True
        else:
            kw["window_size"] = (-1, 0)  # (left, right): causal
        if n_rep > 1:
            if "enable_gqa" in params:
                kw["enable_gqa"] = True
            else:
                k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)
    # Reference path (CPU, tests): one causal sdpa per sequence.
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[s:e].transpose(0, 1)[None] for x in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                             enable_gqa=n_rep > 1)
        out[s:e] = o[0].transpose(0, 1)
    return out


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             is_causal=None, **kwargs):
    """transformers attention function (query/key/value [B, H, T, D]) -> ([B, T, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    import torch

    cu = kwargs.get("cu_seq_lens_q")
    pos = kwargs.get("position_ids")
    if (cu is None and attention_mask is None and query.shape[0] == 1 and pos is not None
            and kwargs.get("past_key_values") is None):
        # packed rows without the collator's boundaries: derive them from position_ids (one sync per layer)
        starts = (pos.reshape(-1) == 0).nonzero().flatten()
        if starts.numel() > 1 or (starts.numel() == 1 and int(starts[0]) != 0):
            cu = torch.cat([starts, starts.new_tensor([pos.numel()])])
            kwargs = {**kwargs, "max_length_q": None}
    if cu is None or query.shape[0] != 1 or kwargs.get("past_key_values") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)

    cu = cu.to(device=query.device, dtype=torch.int32)
    max_len = kwargs.get("max_length_q")
    max_len = int(max_len) if max_len is not None else int((cu[1:] - cu[:-1]).max())
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    return _varlen(q, k, v, cu, max_len, scaling)[None], None


def _varlen_mask(*args, attention_mask=None, **kwargs):
    """No mask for padding-free rows (the attention reads cu_seq_lens); sdpa's mask for padded batches."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_varlen_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTN, _varlen_mask)
    return VARLEN_ATTN


def load_model(cfg: ModelConfig, q: QuantizationConfig, *, dtype: str, attn: str, strategy: Strategy):
    """The base model as from_pretrained loads it for this strategy. Liger is not applied here: the Trainer
    applies it when training starts (SFTConfig use_liger_kernel, trainer/train.py), with TRL's loss path."""
    import torch
    from transformers import AutoModelForCausalLM

    if attn == VARLEN_ATTN:  # chosen by core.hardware.attention (the layout)
        register_varlen_attention()
    kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, dtype=getattr(torch, dtype),
                  attn_implementation=attn)
    if q.bits:
        kwargs["quantization_config"] = bnb_config(q, dtype, strategy.quant_storage)
    if strategy.device_map is not None:
        kwargs["device_map"] = strategy.device_map
    model = AutoModelForCausalLM.from_pretrained(model_path(cfg), **kwargs)
    model.config.use_cache = False  # no KV cache in training (and it conflicts with checkpointing)
    if q.bits == 4:
        keep_trainable_4bit_layout(model)
    return model


def keep_trainable_4bit_layout(model) -> int:
    """Keep bitsandbytes' 4-bit weights in the layout training needs, on every CPU; return the layers touched.

    On CPUs with avx512_bf16, bitsandbytes 0.50 repacks a Linear4bit's weight into an inference-only layout
    the first time it runs in eval mode without grad (a sample answer before training, an eval step), and from
    then on runs it through `gemv_4bit`, which has no backward: training after that would either crash (input
    widths below the 64-value block: `shape '[32, 0]' is invalid`) or send no gradient through the base layers.
    The switch is the layer's own `support_avx512bf16_for_cpu` attribute (set in its __init__); turning it off
    keeps the one layout that both inference and training use. Costs nothing on GPUs (the path is CPU-only)."""
    n = 0
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def peft_config(lo: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, bias=lo.bias,
                          target_modules=lo.target_modules, use_rslora=lo.use_rslora, use_dora=lo.use_dora,
                          task_type="CAUSAL_LM")


def _fused_lora_forward(self, x, *args, **kwargs):
    """peft's LoRA forward, base(x) + scaling * B(A(x)), with the scale and the add folded into one GEMM (addmm's
    epilogue) and without peft's defensive clone of the 4-bit output: two to three fewer passes over every
    projection's output per forward. Anything else (dropout, DoRA, several adapters, merged, mixed batches) takes
    peft's own forward."""
    import torch

    active = self.active_adapters
    a = active[0] if len(active) == 1 else None
    if (a is None or kwargs.get("adapter_names") is not None or self.disable_adapters or self.merged
            or a not in self.lora_A or a in self.lora_variant
            or not isinstance(self.lora_dropout[a], torch.nn.Identity) or self.lora_B[a].bias is not None):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    lora_a, lora_b = self.lora_A[a], self.lora_B[a]
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != lora_a.weight.dtype:
        x = x.to(lora_a.weight.dtype)
    h = lora_a(x)
    flat = result.reshape(-1, result.shape[-1])
    out = torch.addmm(flat, h.reshape(-1, h.shape[-1]).to(flat.dtype), lora_b.weight.t().to(flat.dtype),
                      alpha=self.scaling[a])
    return out.view(result.shape)


def fuse_lora(model) -> int:
    """Use _fused_lora_forward on every peft LoRA linear of `model`; return how many. Called only where the layout
    says lora=fused (core/strategy.py: not under ZeRO-3 / FSDP2, whose hooks gather lora_B's weight only when
    lora_B itself is called; peft in the tested versions). Layers with LoRA dropout keep peft's own forward (the
    fused add has no dropout)."""
    import types

    import torch

    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, LoraLayer) and hasattr(m, "lora_A") and hasattr(m, "base_layer") \
                and m.base_layer.__class__.__name__ in ("Linear", "Linear4bit", "Linear8bitLt") \
                and all(isinstance(d, torch.nn.Identity) for d in getattr(m, "lora_dropout", {}).values()):
            m.forward = types.MethodType(_fused_lora_forward, m)
            n += 1
    return n
