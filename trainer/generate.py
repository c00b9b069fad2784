"""Answer prompts with a base model + adapter, in the recipe's own prompt template."""

from __future__ import annotations

from pathlib import Path

from scalesft.core.recipe import Recipe, RecipeError, load_recipe


def answers(model, tokenizer, recipe: Recipe, questions: list[str], max_new_tokens: int = 48) -> list[str]:
    """Greedy answers (deterministic, so before/after comparisons mean something)."""
    return [answer(model, tokenizer, recipe, q, max_new_tokens=max_new_tokens) for q in questions]


def _values(recipe: Recipe, question: str) -> dict[str, str]:
    first = {"qa": "question", "alpaca": "instruction", "messages": "question", "text": "text"}[recipe.data.format]
    return {first: question}


def answer(model, tokenizer, recipe: Recipe, question: str, *, max_new_tokens: int = 256, stream: bool = False,
           sample: bool = False) -> str:
    import torch

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
                             streamer=_streamer(tokenizer) if stream else None)
    model.config.use_cache = use_cache
    if was_training:
        model.train()
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip().rstrip(BROKEN)


BROKEN = "\ufffd"
"""What decoding prints for a multi-byte character cut in the middle (max_new_tokens can end inside one)."""


def _streamer(tokenizer):
    """transformers' TextStreamer, minus the broken character a token limit can leave at the very end."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            super().on_finalized_text(text.rstrip(BROKEN) if stream_end else text, stream_end)

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def load_trained(output_dir: str | Path, *, dtype: str | None = None, merged: bool = False,
                 trust_remote_code: bool = False):
    """(model, tokenizer, recipe) from a finished run's output_dir: the base model (unquantized, 16-bit on a GPU,
    fp32 on CPU unless dtype says otherwise) with the adapter attached, or merged into it.

    An output folder is data, maybe someone else's: its recipe.yaml asking for model.trust_remote_code is not
    enough to run the model repository's code. The caller must pass trust_remote_code=True too (the CLI's
    --trust-remote-code); otherwise RecipeError."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .console import after_imports
    from .model import load_tokenizer, model_path

    after_imports()
    out = Path(output_dir)
    kind = folder_kind(out)
    recipe = load_recipe(out / "recipe.yaml")
    if recipe.model.trust_remote_code and not trust_remote_code:
        raise RecipeError(f"{out / 'recipe.yaml'} sets model.trust_remote_code: true, which runs code from the model "
                          f"repository '{recipe.model.name_or_path}': pass --trust-remote-code if you trust it")
    if dtype is None:
        dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if torch.cuda.is_available() else "float32"
    merged_folder = kind == "merged"
    base = AutoModelForCausalLM.from_pretrained(str(out) if merged_folder else model_path(recipe.model),
                                                dtype=getattr(torch, dtype),
                                                revision=None if merged_folder else recipe.model.revision,
                                                trust_remote_code=recipe.model.trust_remote_code,
                                                device_map="auto" if torch.cuda.is_available() else None)
    model = base if merged_folder else PeftModel.from_pretrained(base, str(out))
    if merged and not merged_folder:
        model = model.merge_and_unload()
    tokenizer = load_tokenizer(recipe.model, str(out))
    return model, tokenizer, recipe


def folder_kind(out: Path) -> str:
    """'adapter' (a training.output_dir) or 'merged' (written by scalesft merge); a RecipeError otherwise."""
    from scalesft.core.recipe import RecipeError

    if not out.is_dir():
        raise RecipeError(f"'{out}' is not a folder: give a finished run's training.output_dir or a folder written "
                          "by scalesft merge")
    has_recipe = (out / "recipe.yaml").is_file()
    if (out / "adapter_config.json").is_file() and has_recipe:
        return "adapter"
    if (out / "config.json").is_file() and has_recipe:
        return "merged"
    if not has_recipe:
        raise RecipeError(f"'{out}' has no recipe.yaml: scalesft generate/chat read the prompt template from it; "
                          "give a training.output_dir or a folder written by scalesft merge")
    raise RecipeError(f"'{out}' holds no adapter yet (no adapter_config.json): its run has not finished; run "
                      f"`scalesft train {out / 'recipe.yaml'}` to finish it, or give a finished output_dir")


def merge(output_dir: str | Path, merged_dir: str | Path, dtype: str = "bfloat16",
          trust_remote_code: bool = False) -> Path:
    """Write base + adapter merged into one 16-bit model (the base reloaded unquantized, merge_and_unload)."""
    model, tokenizer, _ = load_trained(output_dir, dtype=dtype, merged=True, trust_remote_code=trust_remote_code)
    merged_dir = Path(merged_dir)
    model.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    # The recipe travels along: generate/chat on the merged folder use the same prompt template.
    (merged_dir / "recipe.yaml").write_text((Path(output_dir) / "recipe.yaml").read_text())
    return merged_dir
