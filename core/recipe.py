"""The recipe: one YAML file -> typed, validated config. No model, tokenizer or torch import here.

A recipe has five sections, each owned by one part of the trainer:

    model:        what to load                       (ModelConfig)
    quantization: how the base weights are stored    (QuantizationConfig)
    lora:         the adapter                        (LoraConfig)
    data:         rows -> prompt/completion tokens   (DataConfig)
    training:     batch, optimiser, schedule, output (TrainingConfig)

Field names follow transformers / TRL / peft where those libraries have one. Overrides are
`section.field=value` strings (YAML-parsed values), e.g. `training.max_steps=10`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import RecipeError
from .templates import DEFAULT_FIELDS


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    name_or_path: str
    """Local folder, hub id (resolved from the local HF cache), or `builtin:<name>` for a model shipped in a
    PyPI package (see trainer/assets.py)."""
    revision: str | None = None
    trust_remote_code: bool = False
    """Run code from the model repository. Off unless the recipe asks for it."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3"] = "auto"
    """auto: flash_attention_2 when installed and on a GPU, else sdpa."""
    liger_kernel: bool | Literal["auto"] = "auto"
    """Liger's fused Triton kernels (RMSNorm, SwiGLU, RoPE), through TRL's use_liger_kernel; the loss stays TRL's
    own (TRL turns Liger's fused linear cross-entropy off). auto: on a CUDA GPU when liger-kernel is installed."""


@dataclass(kw_only=True, slots=True)
class QuantizationConfig:
    bits: Literal[4, 8] | None = None
    """4 (QLoRA), 8 (LLM.int8) or null (no quantization: LoRA on 16-bit weights)."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = False
    """Quantize the quantization constants too: -0.33 GiB on an 8B model, -3% tokens/s (bench/RESULTS.md)."""
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """auto: the training precision's dtype."""


@dataclass(kw_only=True, slots=True)
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    use_dora: bool = False


@dataclass(kw_only=True, slots=True)
class DataConfig:
    path: str
    """A local .json/.jsonl/.csv/.parquet file, a dataset name in the local HF cache, or `builtin:<name>`."""
    format: Literal["qa", "alpaca", "messages", "text"] = "qa"
    fields: dict[str, str] = field(default_factory=dict)
    """Map the format's field names to your column names, e.g. {question: q, answer: a}."""
    template: str = "auto"
    """A name from core/templates.py (ko-qa, ko-alpaca, alpaca, chat, plain) or a literal string with
    {field} placeholders whose last placeholder is the completion. auto: chat for messages, plain for text,
    ko-qa for qa, ko-alpaca for alpaca."""
    system_prompt: str | None = None
    """Prepended as a system message when template is chat."""
    split: str = "train"
    max_seq_length: int = 1024
    padding_free: bool = True
    """Concatenate each micro batch into one sequence with position_ids restarting per row, instead of padding
    to the longest row: no compute on padding, same loss (tests/test_train.py proves it). Batches still count
    rows."""
    packing: bool = False
    """Also pack rows into max_seq_length bins (TRL's bfd): a batch then counts bins, not rows."""
    completion_only_loss: bool = True
    """Loss on the answer tokens plus EOS only; the prompt is masked out."""
    eval_fraction: float = 0.0
    """Hold this fraction of rows out for evaluation (0: no eval split)."""
    limit: int | None = None
    """Use only the first N rows of the file."""


@dataclass(kw_only=True, slots=True)
class TrainingConfig:
    output_dir: str
    global_batch_size: int = 32
    """Sequences per optimizer step, over all GPUs. Gradient accumulation is derived per world size."""
    micro_batch_size: int | Literal["auto"] = "auto"
    """Sequences per GPU per forward/backward. auto: the planner chooses per world size and GPU memory: on
    padding-free data micro-batches sized by tokens (training.micro_batch_tokens; short rows grouped, long rows
    not over-packed, the accumulation fixed up front from the data's lengths), else the largest row count that
    divides global / world and fits. An integer: exactly that many rows, accumulation = global / (micro x world).
    Either way the loss is normalised over the whole global batch."""
    micro_batch_tokens: int | Literal["auto"] = "auto"
    """With micro_batch_size auto: the most tokens one micro-batch holds on one GPU (>= data.max_seq_length).
    auto: from core/memory.py's model of the recipe on the GPU's memory (capped at 16384), 4096 on CPU."""
    num_train_epochs: float = 1.0
    max_steps: int = -1
    """Optimizer steps; overrides num_train_epochs when > 0."""
    learning_rate: float = 2e-4
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    optim: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit",
                   "adafactor"] = "adamw_torch"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto: bf16 where the GPU supports it, else fp16 with loss scaling; fp32 on CPU."""
    gradient_checkpointing: bool = True
    """Non-reentrant activation checkpointing (reentrant only where a backend needs it)."""
    seed: int = 42
    ddp_timeout: int = 1800
    """Seconds a collective may wait before the job fails (a hung rank). Lower it to fail faster."""
    logging_steps: int = 10
    eval_steps: int | None = None
    save_steps: int = 500
    save_total_limit: int | None = 2
    """Complete checkpoints kept (null: all). An older one is deleted only once a newer one is complete, so a
    crash at any instant leaves the newest complete checkpoint (trainer/preemption.py rotate)."""
    report_to: Literal["none", "wandb", "tensorboard"] = "none"
    sample_prompts: list[str] = field(default_factory=list)
    """Questions answered (greedy) before and after training on rank 0: printed and kept in train_metrics.json."""
    run_name: str | None = None
    wandb_project: str = "scalesft"
    resume: Literal["auto", "never", "force"] = "auto"
    """What a run does when output_dir already holds a run (trainer/resume.py). auto: continue it from the
    newest complete checkpoint when it is the same run (the recipe minus run-length and logging fields, the
    data file's content, the model and tokenizer, the scalesft version), do nothing when it already finished,
    and otherwise stop with one line naming each difference. never: start over in this output_dir (the previous
    run's checkpoints are deleted). force: continue from the newest complete checkpoint despite the differences
    (its optimizer and scheduler state, learning rate included, are the checkpoint's)."""


@dataclass(kw_only=True, slots=True)
class Recipe:
    model: ModelConfig
    data: DataConfig
    training: TrainingConfig
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "quantization": QuantizationConfig, "lora": LoraConfig,
    "data": DataConfig, "training": TrainingConfig,
}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check value against the annotation tp; return it (ints accepted for floats). Raise RecipeError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, where)
            except RecipeError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
    elif tp is type(None):
        if value is None:
            return None
    elif origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, list):
            return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if isinstance(value, dict):
            return {_coerce(k, k_tp, where): _coerce(v, v_tp, f"{where}.{k}") for k, v in value.items()}
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 2e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _unknown(key: str, known: list[str], where: str) -> RecipeError:
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"did you mean '{near[0]}'?" if near else "known keys: " + ", ".join(known)
    return RecipeError(f"unknown recipe key '{where}{key}': {hint}")


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise _unknown(str(key), list(fields), f"{where}.")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecipeError(f"{where}.{missing[0]} is required: add it to the recipe")
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"override '{text}' must look like section.key=value, e.g. training.max_steps=10")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override '{text}': '{part}' is not a section")
        node[path[-1]] = value
    return raw


def recipe_from_dict(raw: dict[str, Any]) -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError("a recipe must be a YAML mapping with sections model, data, training, ...")
    top = list(SECTIONS) + ["description"]
    for key in raw:
        if key not in top:
            raise _unknown(str(key), top, "")
    kwargs: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        if name in raw:
            kwargs[name] = _build(cls, raw[name] or {}, name)
        elif name in ("model", "data", "training"):
            raise RecipeError(f"the recipe has no '{name}' section: add one")
    if "description" in raw:
        kwargs["description"] = _coerce(raw["description"], str, "description")
    recipe = Recipe(**kwargs)
    validate(recipe)
    return recipe


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: let the base class report it
                continue
            if first != key_node.start_mark.line + 1:
                raise RecipeError(f"key '{key}' appears twice (lines {first} and {key_node.start_mark.line + 1})"
                                  ": keep one of them")
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """yaml.safe_load, except that duplicate keys are an error (RecipeError)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe. Loads no model, no tokenizer, no data."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"recipe '{path}' is a folder, not a file: pass the path of a YAML recipe inside it "
                          "(see recipes/)")
    if not path.is_file():
        raise RecipeError(f"recipe file '{path}' does not exist: pass a path to a YAML recipe (see recipes/)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise RecipeError(f"recipe '{path}' cannot be read ({e.strerror}): check its permissions") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"recipe '{path}' is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    try:
        raw = parse_yaml(text) or {}
    except RecipeError as e:
        raise RecipeError(f"recipe '{path}': {e}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe '{path}' is not valid YAML: {' '.join(str(e).split())}") from None
    recipe = recipe_from_dict(apply_overrides(raw, overrides or []))
    # Relative data paths are relative to the recipe's folder only when they exist there; else to the cwd.
    data_path = Path(recipe.data.path)
    if not data_path.is_absolute() and not data_path.exists() and (path.parent / data_path).exists():
        recipe.data.path = str(path.parent / data_path)
    return recipe


def validate(r: Recipe) -> None:
    """Checks that need no hardware, data or model. Each raises one RecipeError naming the field."""
    t, d, lo = r.training, r.data, r.lora
    checks = [
        (t.global_batch_size >= 1, "training.global_batch_size must be >= 1"),
        (t.micro_batch_size == "auto" or t.micro_batch_size >= 1, "training.micro_batch_size must be >= 1"),
        (t.micro_batch_size == "auto" or t.micro_batch_size <= t.global_batch_size,
         f"training.micro_batch_size ({t.micro_batch_size}) exceeds global_batch_size ({t.global_batch_size})"),
        (t.micro_batch_tokens == "auto" or t.micro_batch_size == "auto",
         f"training.micro_batch_tokens applies to training.micro_batch_size: auto, not {t.micro_batch_size}: "
         "remove one of them"),
        (t.micro_batch_tokens == "auto" or t.micro_batch_tokens >= d.max_seq_length,
         f"training.micro_batch_tokens={t.micro_batch_tokens} is below data.max_seq_length={d.max_seq_length}: "
         "one row must fit one micro-batch"),
        (t.learning_rate > 0, "training.learning_rate must be > 0"),
        (t.warmup_steps >= 0, f"training.warmup_steps must be >= 0, got {t.warmup_steps}: use 0 for no warmup"),
        (0 <= t.warmup_ratio < 1, f"training.warmup_ratio must be in [0, 1), got {t.warmup_ratio}"),
        (t.max_steps > 0 or t.num_train_epochs > 0, "set training.max_steps > 0 or training.num_train_epochs > 0"),
        (t.num_train_epochs >= 0, f"training.num_train_epochs must be >= 0, got {t.num_train_epochs}"),
        (t.weight_decay >= 0, f"training.weight_decay must be >= 0, got {t.weight_decay}"),
        (t.max_grad_norm >= 0, f"training.max_grad_norm must be >= 0 (0: no clipping), got {t.max_grad_norm}"),
        (t.logging_steps >= 1, "training.logging_steps must be >= 1"),
        (t.save_steps >= 1, "training.save_steps must be >= 1"),
        (t.eval_steps is None or t.eval_steps >= 1,
         f"training.eval_steps must be >= 1 or null (= save_steps), got {t.eval_steps}"),
        (t.save_total_limit is None or t.save_total_limit >= 1,
         f"training.save_total_limit must be >= 1 or null (keep all), got {t.save_total_limit}"),
        (t.ddp_timeout >= 1, f"training.ddp_timeout must be >= 1 second, got {t.ddp_timeout}"),
        (0 <= t.seed < 2**32, f"training.seed must be in [0, 2**32), got {t.seed}"),
        (t.output_dir.strip() != "", "training.output_dir is empty: give a folder for the adapter and checkpoints"),
        (d.max_seq_length >= 8, "data.max_seq_length must be >= 8"),
        (0 <= d.eval_fraction < 1, "data.eval_fraction must be in [0, 1)"),
        (d.limit is None or d.limit >= 1,
         f"data.limit={d.limit} leaves no rows: use data.limit >= 1, or null for every row"),
        (d.path.strip() != "", "data.path is empty: give a data file (.json/.jsonl/.csv/.parquet)"),
        (lo.r >= 1, "lora.r must be >= 1"),
        (lo.alpha >= 1, f"lora.alpha must be >= 1, got {lo.alpha}"),
        (0 <= lo.dropout < 1, "lora.dropout must be in [0, 1)"),
        (lo.target_modules != [], "lora.target_modules is empty: list module names (e.g. [q_proj, v_proj]) "
                                  "or use all-linear"),
        (not (r.quantization.bits == 8 and r.quantization.quant_type != "nf4"),
         "quantization.quant_type applies to 4-bit only: remove it or set quantization.bits=4"),
    ]
    for ok, msg in checks:
        if not ok:
            raise RecipeError(msg)
    from . import templates

    templates.check(templates.resolve(d.template, d.format), d.format)
    unknown = set(d.fields) - set(DEFAULT_FIELDS[d.format])
    if unknown:
        raise RecipeError(f"data.fields has {sorted(unknown)}, which format '{d.format}' does not use: "
                          f"its fields are {list(DEFAULT_FIELDS[d.format])}")


def field_map(d: DataConfig) -> dict[str, str]:
    """The format's field names -> the dataset's column names."""
    return {**DEFAULT_FIELDS[d.format], **d.fields}
