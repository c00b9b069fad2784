"""Load the tokenizer and the base model (quantized or not) and describe the LoRA adapter.

The adapter itself is attached by TRL's SFTTrainer (peft_config), which also enables input gradients for
checkpointing and handles the ZeRO-3 special cases.
"""

from __future__ import annotations

from .config import LoraConfig, ModelConfig, QuantizationConfig, RecipeError
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


def load_model(cfg: ModelConfig, q: QuantizationConfig, *, dtype: str, attn: str, strategy: Strategy,
               liger: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, dtype=getattr(torch, dtype),
                  attn_implementation=attn)
    if q.bits:
        kwargs["quantization_config"] = bnb_config(q, dtype, strategy.quant_storage)
    if strategy.device_map is not None:
        kwargs["device_map"] = strategy.device_map
    model = AutoModelForCausalLM.from_pretrained(model_path(cfg), **kwargs)
    model.config.use_cache = False  # no KV cache in training (and it conflicts with checkpointing)
    if liger:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
    return model


def peft_config(lo: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, bias=lo.bias,
                          target_modules=lo.target_modules, use_rslora=lo.use_rslora, use_dora=lo.use_dora,
                          task_type="CAUSAL_LM")
