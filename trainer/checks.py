"""Checks of a run's inputs that need the file system, the model's config or the network, but load no weights
and write nothing. Each failure is one RecipeError line naming the field, the value and the fix.

    preflight(recipe)              all of them, in order; trainer/train.py calls it before anything expensive
    check_output_dir(path)         a folder that exists or can be created, and is writable
    check_model_source(cfg)        a local model folder with config and weights, or a hub id that can be reached
    check_lora_targets(recipe)     every lora.target_modules entry names modules LoRA can adapt, checked on the
                                   model built on the meta device from its config (no weights read)
    (trainer/hub.py: is the hub reachable, one short TCP connect; offline mode)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from scalesft.core.recipe import ModelConfig, Recipe, RecipeError

from .hub import go_offline, hub_endpoint, hub_unreachable, offline_env

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.gguf", "model.safetensors.index.json",
                   "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
LORA_MODULE_TYPES = ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "Linear4bit", "Linear8bitLt",
                     "MultiheadAttention")


def preflight(recipe: Recipe) -> None:
    from .data import local_file

    check_output_dir(recipe.training.output_dir)
    local_file(recipe.data)  # the data file exists, is a file, and can be read
    check_model_source(recipe.model)
    check_lora_targets(recipe)


# ---------------------------------------------------------------- output_dir

def check_output_dir(path: str) -> None:
    """The folder exists (or its nearest existing parent does) and a file can be created there. Creates nothing
    that stays: the write probe is a temporary file removed at once."""
    out = Path(path).expanduser()
    field = f"training.output_dir '{path}'"
    if out.exists() and not out.is_dir():
        raise RecipeError(f"{field} is a file, not a folder: give a folder path (it is created if missing)")
    parent = out
    while not parent.exists():
        if parent.is_symlink():
            raise RecipeError(f"{field}: '{parent}' is a broken symbolic link: fix the link or choose another folder")
        parent = parent.parent
    if not parent.is_dir():
        raise RecipeError(f"{field} cannot be created: '{parent}' is a file, not a folder; choose another path")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".scalesft-write-check-")
    except OSError as e:
        what = "is not writable" if parent == out else f"cannot be created in '{parent}'"
        raise RecipeError(f"{field} {what} ({e.strerror}): choose a folder you can write to, or fix its "
                          "permissions") from None
    os.close(fd)
    os.unlink(probe)


# ---------------------------------------------------------------- the model

def looks_local(name: str) -> bool:
    """A path rather than a hub id ('org/name' or 'name')."""
    return (name.startswith(("/", "./", "../", "~", "."))
            or name.count("/") > 1 or os.sep != "/" and os.sep in name or Path(name).expanduser().exists())


def network_or_offline(what: str, cached: bool) -> None:
    """For a hub id: fine when cached (offline mode switched on when the hub is unreachable, so nothing waits on
    retries); else an error at once when offline mode is on or the hub cannot be reached."""
    if offline_env():
        if not cached:
            raise RecipeError(f"{what} is not in the local HF cache and HF_HUB_OFFLINE is set, so it cannot be "
                              "downloaded: give a local folder, or download it first (unset HF_HUB_OFFLINE)")
        return
    if not hub_unreachable():
        return
    if not cached:
        raise RecipeError(f"{what} is not in the local HF cache and {hub_endpoint()} cannot be reached (no "
                          "network): give a local folder, or download it on a machine with network first")
    go_offline()


def _hub_cached(repo: str, filename: str, revision: str | None, repo_type: str = "model") -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, filename, revision=revision, repo_type=repo_type)
    except Exception:  # an id huggingface_hub refuses (bad characters): not cached
        return False
    return isinstance(found, str)


def check_model_source(cfg: ModelConfig) -> None:
    name = cfg.name_or_path
    field = f"model.name_or_path '{name}'"
    if name.startswith("builtin:"):
        return  # trainer/assets.py names the package to install
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RecipeError(f"{field} is a file, not a model folder: give the folder that holds config.json "
                              "and the weights")
        if not any(path.iterdir()):
            raise RecipeError(f"{field} is an empty folder: give a folder with config.json, the weights "
                              "(model.safetensors) and the tokenizer")
        if not (path / "config.json").is_file():
            raise RecipeError(f"{field} has no config.json: give a transformers model folder (config.json, "
                              "model.safetensors, tokenizer files)")
        if not any(next(path.glob(p), None) for p in WEIGHT_PATTERNS):
            raise RecipeError(f"{field} has config.json but no weights (no *.safetensors or pytorch_model*.bin): "
                              "copy the weight files into it, or give the complete model folder")
        return
    if looks_local(name):
        raise RecipeError(f"{field} does not exist: give a local model folder or a hub id like org/name")
    network_or_offline(field, _hub_cached(name, "config.json", cfg.revision))


# ---------------------------------------------------------------- LoRA targets

def module_names(cfg: ModelConfig) -> tuple[str, list[tuple[str, str]]]:
    """(architecture, [(module name, module class name)]) of the model built on the meta device from its config:
    no weights are read or allocated."""
    from .model import model_path

    path = model_path(cfg)
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise RecipeError(f"model.name_or_path '{cfg.name_or_path}': its config.json does not describe a causal "
                          f"language model transformers can build ({first}): give a causal LM folder") from None
    return type(model).__name__, [(n, type(m).__name__) for n, m in model.named_modules() if n]


def check_lora_targets(recipe: Recipe) -> None:
    targets = recipe.lora.target_modules
    if targets == "all-linear":
        return  # peft picks every linear layer but the output head: always some
    if not targets:
        raise RecipeError("lora.target_modules is empty: list module names (e.g. [q_proj, v_proj]) or use all-linear")
    arch, names = module_names(recipe.model)
    linear = sorted({n.rsplit(".", 1)[-1] for n, kind in names if kind in ("Linear", "Conv1D")})
    for target in targets:
        hits = [kind for n, kind in names if n == target or n.endswith("." + target)]
        if not hits:
            raise RecipeError(f"lora.target_modules entry '{target}' matches no module of {arch}: its linear layers "
                              f"are {linear}; use some of those or all-linear")
        if not any(kind in LORA_MODULE_TYPES for kind in hits):
            raise RecipeError(f"lora.target_modules entry '{target}' names {sorted(set(hits))[0]} modules, which "
                              f"LoRA cannot adapt: name linear layers ({linear}) or use all-linear")
