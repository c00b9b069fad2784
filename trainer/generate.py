"""Answer prompts with a base model + adapter, in the recipe's own prompt template."""

from __future__ import annotations

from pathlib import Path

from .config import Recipe, load_recipe


def answers(model, tokenizer, recipe: Recipe, questions: list[str], max_new_tokens: int = 48) -> list[str]:
    """Greedy answers (deterministic, so before/after comparisons mean something)."""
    return [answer(model, tokenizer, recipe, q, max_new_tokens=max_new_tokens) for q in questions]


def _values(recipe: Recipe, question: str) -> dict[str, str]:
    first = {"qa": "question", "alpaca": "instruction", "messages": "question", "text": "text"}[recipe.data.format]
    return {first: question}


def answer(model, tokenizer, recipe: Recipe, question: str, *, max_new_tokens: int = 256, stream: bool = False,
           sample: bool = False) -> str:
    import torch
    from transformers import TextStreamer

    from .data import prompt_text

    text = prompt_text(_values(recipe, question), tokenizer, recipe.data)
    add_special = not (recipe.data.format in ("messages",) or recipe.data.template == "chat")
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=add_special).to(model.device)
    was_training = model.training
    model.eval()
    use_cache = model.config.use_cache
    model.config.use_cache = True
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=sample, temperature=0.7 if sample else None,
                             top_p=0.9 if sample else None, pad_token_id=tokenizer.pad_token_id,
                             streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None)
    model.config.use_cache = use_cache
    if was_training:
        model.train()
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def load_trained(output_dir: str | Path, *, dtype: str | None = None, merged: bool = False):
    """(model, tokenizer, recipe) from a finished run's output_dir: the base model (unquantized, 16-bit on a GPU,
    fp32 on CPU unless dtype says otherwise) with the adapter attached, or merged into it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .model import load_tokenizer, model_path

    out = Path(output_dir)
    recipe = load_recipe(out / "recipe.yaml")
    if dtype is None:
        dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if torch.cuda.is_available() else "float32"
    base = AutoModelForCausalLM.from_pretrained(model_path(recipe.model), dtype=getattr(torch, dtype),
                                                revision=recipe.model.revision,
                                                trust_remote_code=recipe.model.trust_remote_code,
                                                device_map="auto" if torch.cuda.is_available() else None)
    model = PeftModel.from_pretrained(base, str(out))
    if merged:
        model = model.merge_and_unload()
    tokenizer = load_tokenizer(recipe.model, str(out))
    return model, tokenizer, recipe


def merge(output_dir: str | Path, merged_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """Write base + adapter merged into one 16-bit model (the base reloaded unquantized, merge_and_unload)."""
    model, tokenizer, _ = load_trained(output_dir, dtype=dtype, merged=True)
    merged_dir = Path(merged_dir)
    model.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    return merged_dir
