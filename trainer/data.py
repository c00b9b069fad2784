"""Rows -> token ids and labels, with the label mask on exactly the answer tokens plus EOS.

Three steps, each testable alone:
    read_rows(cfg)                    a list of dicts from a local file, the HF cache, or a builtin set
    check_rows(rows, cfg)             RecipeError naming the field and the row numbers that lack it
    encode(row, tokenizer, cfg)       (input_ids, labels) for one row, or None if its prompt alone is too long
tokenize(rows, tokenizer, cfg) runs encode over every row once (main process first) and caches the result,
keyed on the tokenizer, the template, the max length and the rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import templates
from .config import DataConfig, RecipeError, field_map

IGNORE = -100
FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def cache_root() -> Path:
    return Path(os.environ.get("SCALESFT_CACHE", Path.home() / ".cache" / "scalesft"))


# ---------------------------------------------------------------- reading

def read_rows(cfg: DataConfig) -> list[dict[str, Any]]:
    """Read every row of the configured dataset as plain dicts. Raises RecipeError for a missing source."""
    path = cfg.path
    if path.startswith("builtin:"):
        from .assets import builtin_dataset

        rows = builtin_dataset(path.removeprefix("builtin:"))
    elif Path(path).suffix.lower() in FILE_TYPES:
        file = Path(path)
        if not file.is_file():
            raise RecipeError(f"data.path '{path}' does not exist: give a .json/.jsonl/.csv/.parquet file")
        rows = _read_file(file)
    else:
        rows = _read_hf_cache(path, cfg.split)
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    return rows


def _read_file(file: Path) -> list[dict[str, Any]]:
    kind = FILE_TYPES[file.suffix.lower()]
    if kind == "json":
        text = file.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            try:  # JSON lines
                data = [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as e:
                raise RecipeError(f"data.path '{file}' is neither JSON nor JSON lines: {e}") from None
        if isinstance(data, dict):  # {"data": [...]} or a single split
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise RecipeError(f"data.path '{file}' holds an object; expected a list of rows "
                                  "(or an object with exactly one list of rows)")
            data = lists[0]
        if not isinstance(data, list):
            raise RecipeError(f"data.path '{file}' must hold a list of rows")
        return data
    import datasets

    return datasets.load_dataset(kind, data_files=str(file), split="train").to_list()


def _read_hf_cache(name: str, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        return datasets.load_dataset(name, split=split).to_list()
    except Exception as e:  # not in the local cache, no network
        raise RecipeError(f"data.path '{name}' is not a local file (.json/.jsonl/.csv/.parquet) and could not be "
                          f"loaded from the local HF datasets cache ({type(e).__name__}): give a local file "
                          "or download the dataset first") from None


# ---------------------------------------------------------------- checking

def check_rows(rows: list[dict[str, Any]], cfg: DataConfig) -> None:
    """Every row has what its format needs. Names the field and up to five 1-based row numbers."""
    if not rows:
        raise RecipeError(f"data.path '{cfg.path}' has no rows: give a dataset with at least one row")
    fmap = field_map(cfg)
    optional = {"input"} if cfg.format == "alpaca" else set()
    for name, column in fmap.items():
        if name in optional:
            continue
        bad = [i + 1 for i, r in enumerate(rows) if not isinstance(r, dict) or not _present(r.get(column))]
        if bad:
            more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
            raise RecipeError(f"{len(bad)} row(s) lack field '{column}' ({cfg.format} format '{name}'): rows "
                              f"{bad[:5]}{more}; fix the data or map the field with data.fields.{name}=COLUMN")
    if cfg.format == "messages":
        column = fmap["messages"]
        for i, r in enumerate(rows):
            msgs = r[column]
            ok = isinstance(msgs, list) and all(isinstance(m, dict) and "role" in m and "content" in m
                                                for m in msgs)
            if not ok or not any(m["role"] == "assistant" for m in msgs):
                raise RecipeError(f"row {i + 1}: '{column}' must be a list of {{role, content}} messages with at "
                                  "least one assistant message")


def _present(value: Any) -> bool:
    return value is not None and (not isinstance(value, str) or value.strip() != "")


# ---------------------------------------------------------------- encoding

def conversation(row: dict[str, Any], cfg: DataConfig) -> list[dict[str, str]]:
    """A row as chat messages (messages format, or qa rendered with the chat template)."""
    fmap = field_map(cfg)
    if cfg.format == "messages":
        msgs = [{"role": m["role"], "content": m["content"]} for m in row[fmap["messages"]]]
    else:
        msgs = [{"role": "user", "content": str(row[fmap["question"]])},
                {"role": "assistant", "content": str(row[fmap["answer"]])}]
    if cfg.system_prompt and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": cfg.system_prompt})
    return msgs


def prompt_text(values: dict[str, str], tokenizer, cfg: DataConfig) -> str:
    """The prompt for generation, exactly as training renders it (completion left out)."""
    template = templates.resolve(cfg.template, cfg.format)
    if template == "chat":
        msgs = [{"role": "user", "content": values.get("question", "")}]
        if cfg.system_prompt:
            msgs.insert(0, {"role": "system", "content": cfg.system_prompt})
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if template == "plain":
        return values.get("text", "")
    fields = list(templates.placeholders(templates.text_template(template)))
    return templates.split(template, {f: values.get(f, "") for f in fields})[0]


def encode(row: dict[str, Any], tokenizer, cfg: DataConfig) -> tuple[list[int], list[int], bool] | None:
    """(input_ids, labels, truncated) for one row; None when the prompt alone fills max_seq_length.

    Text templates: prompt and completion are tokenized apart (so the prompt tokens equal those seen at
    generation), EOS is appended to the completion, and the labels are the completion tokens + EOS.
    Chat: the conversation is rendered once; every assistant turn (as the chat template closes it) bears loss.
    """
    template = templates.resolve(cfg.template, cfg.format)
    if template == "chat":
        ids, mask = _encode_chat(conversation(row, cfg), tokenizer)
    else:
        fmap = field_map(cfg)
        values = {name: "" if row.get(col) is None else str(row.get(col)) for name, col in fmap.items()}
        if template == "plain":
            ids = tokenizer(values["text"], add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
            mask = [True] * len(ids)
        else:
            prompt, completion = templates.split(template, values)
            p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids, mask = p + c, [False] * len(p) + [True] * len(c)
    if not cfg.completion_only_loss:
        mask = [True] * len(ids)
    first = mask.index(True) if True in mask else len(ids)
    if first >= cfg.max_seq_length:
        return None
    truncated = len(ids) > cfg.max_seq_length
    ids, mask = ids[: cfg.max_seq_length], mask[: cfg.max_seq_length]
    labels = [t if m else IGNORE for t, m in zip(ids, mask)]
    return ids, labels, truncated


def _encode_chat(msgs: list[dict[str, str]], tokenizer) -> tuple[list[int], list[bool]]:
    if not getattr(tokenizer, "chat_template", None):
        raise RecipeError("data.template=chat but the tokenizer has no chat template: use data.template=ko-qa "
                          "(or another text template)")
    render = lambda m, gen=False: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    full = render(msgs)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start, end = len(render(msgs[:i], True)), len(render(msgs[: i + 1]))
        if not full.startswith(render(msgs[: i + 1])) or not render(msgs[: i + 1]).startswith(render(msgs[:i], True)):
            raise RecipeError("the tokenizer's chat template does not render conversations prefix by prefix, so "
                              "assistant turns cannot be masked: use a text template (data.template=ko-qa)")
        spans.append((start, end))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]]
    return enc["input_ids"], mask


@dataclass
class DataReport:
    rows: int = 0
    used: int = 0
    dropped_prompt_too_long: int = 0
    truncated: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    max_seq_length: int = 0

    def line(self) -> str:
        return (f"data: {self.used}/{self.rows} rows, {self.tokens} tokens ({self.loss_tokens} bear loss); "
                f"{self.truncated} truncated and {self.dropped_prompt_too_long} dropped "
                f"(prompt alone >= max_seq_length={self.max_seq_length})")


def _fingerprint(rows, tokenizer, cfg: DataConfig) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    for part in (tokenizer.chat_template or "", str(tokenizer.eos_token_id), str(tokenizer.bos_token_id),
                 templates.text_template(templates.resolve(cfg.template, cfg.format)),
                 json.dumps({k: v for k, v in asdict(cfg).items() if k not in ("path", "split", "limit",
                                                                                 "packing", "eval_fraction")},
                            sort_keys=True),
                 json.dumps(rows, sort_keys=True, ensure_ascii=False, default=str)):
        h.update(part.encode())
    return h.hexdigest()[:20]


def tokenize(rows, tokenizer, cfg: DataConfig):
    """Encode every row; returns (datasets.Dataset with input_ids/labels, DataReport). Cached on disk.

    Call inside the main-process-first context so one process per node writes the cache.
    """
    import datasets

    target = cache_root() / "tokenized" / _fingerprint(rows, tokenizer, cfg)
    if (target / "report.json").is_file():
        report = DataReport(**json.loads((target / "report.json").read_text()))
        return datasets.load_from_disk(str(target / "dataset")), report
    report = DataReport(rows=len(rows), max_seq_length=cfg.max_seq_length)
    columns: dict[str, list] = {"input_ids": [], "labels": []}
    for row in rows:
        out = encode(row, tokenizer, cfg)
        if out is None:
            report.dropped_prompt_too_long += 1
            continue
        ids, labels, truncated = out
        report.truncated += truncated
        report.tokens += len(ids)
        report.loss_tokens += sum(label != IGNORE for label in labels)
        columns["input_ids"].append(ids)
        columns["labels"].append(labels)
    report.used = len(columns["input_ids"])
    if report.used == 0:
        raise RecipeError(f"every row's prompt alone is >= data.max_seq_length={cfg.max_seq_length} tokens: "
                          "raise data.max_seq_length or shorten the prompts")
    if report.loss_tokens == 0:
        raise RecipeError("no token bears loss after masking: check data.completion_only_loss and the template")
    dataset = datasets.Dataset.from_dict(columns)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    dataset.save_to_disk(str(tmp / "dataset"))
    (tmp / "report.json").write_text(json.dumps(asdict(report)))
    try:
        tmp.rename(target)  # atomic: a reader sees the whole cache entry or none
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return dataset, report
