"""Rows -> token ids and labels, with the label mask on exactly the answer tokens plus EOS.

Steps, each testable alone:
    load_rows(cfg)                    an Arrow datasets.Dataset from a local file, the HF cache or a builtin set
    read_rows(cfg)                    the same as a list of dicts (small data, tests)
    check_rows(rows, cfg)             RecipeError naming the field and the row numbers that lack it (vectorised
                                      over Arrow columns; a list of dicts is checked the same way in Python)
    encode(row, tokenizer, cfg)       (input_ids, labels, truncated) for one row, or None if its prompt is too long
    encode_batch(batch, tok, cfg)     the same for a batch of columns (what Dataset.map runs), identical tokens
tokenize(rows, tokenizer, cfg) runs encode_batch over every row with Dataset.map (batched, num_proc workers for
large sets, Arrow end to end) and caches the result; prepare(cfg, tokenizer, ...) is the whole pipeline of a run:
only the local main process reads and tokenizes, the other local ranks wait for its cache entry (a completed
marker, polled with a timeout: no collective). The cache key is the data's content hash + the recipe's data
section + the tokenizer + CODE_VERSION.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scalesft.core import templates
from scalesft.core.recipe import DataConfig, RecipeError, field_map

from .assets import builtin_dataset, cache_root

IGNORE = -100
FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
CODE_VERSION = 2
"""Part of every cache key: bump it whenever encoding changes what a row becomes, so stale caches are not reused.
2: Arrow pipeline (int32 columns), batched encoding."""
TEXT_FIELDS = ("question", "answer", "instruction", "input", "output", "text")
PARALLEL_ROWS = 20_000
"""Datasets at least this long are tokenized by several worker processes (SCALESFT_DATA_PROC, default: the CPUs
this process may use, at most 8)."""


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars and no logged errors from datasets: scalesft says what went wrong in one line (unless
    --verbose, trainer/console.py)."""
    import logging

    import datasets

    from .console import verbose

    if verbose():
        yield
        return

    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


# ---------------------------------------------------------------- reading

def local_file(cfg: DataConfig) -> Path | None:
    """The local data file, checked (exists, is a file, readable); None for builtin: and HF cache names."""
    path = cfg.path
    if path.startswith("builtin:"):
        return None
    p = Path(path).expanduser()
    if p.is_dir():
        inside = sorted(f.name for f in p.iterdir() if f.suffix.lower() in FILE_TYPES)[:3]
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        raise RecipeError(f"data.path '{path}' is a folder, not a data file{hint}: give one .json/.jsonl/.csv/"
                          ".parquet file")
    if p.suffix.lower() not in FILE_TYPES:
        if p.is_file():
            raise RecipeError(f"data.path '{path}' is a {p.suffix or 'suffix-less'} file: give a .json, .jsonl, "
                              ".csv or .parquet file (rename it if it is one of those)")
        return None
    if not p.is_file():
        raise RecipeError(f"data.path '{path}' does not exist: give a .json/.jsonl/.csv/.parquet file")
    try:
        with p.open("rb") as f:
            f.read(1)
    except OSError as e:
        raise RecipeError(f"data.path '{path}' cannot be read ({e.strerror}): make it readable (chmod a+r) or "
                          "copy it somewhere you can read") from None
    return p


def load_rows(cfg: DataConfig):
    """Every row of the configured dataset as an Arrow datasets.Dataset (data.limit applied). RecipeError for a
    missing, unreadable or malformed source."""
    import datasets

    path = cfg.path
    file = local_file(cfg)
    with _quiet_datasets():
        if path.startswith("builtin:"):

            ds = datasets.Dataset.from_list(builtin_dataset(path.removeprefix("builtin:")))
        elif file is not None:
            ds = _load_file(file, cfg)
        else:
            ds = _load_hf_cache(path, cfg.split)
    if cfg.limit is not None and cfg.limit < len(ds):
        ds = ds.select(range(cfg.limit))
    return ds


def read_rows(cfg: DataConfig) -> list[dict[str, Any]]:
    """Every row as plain dicts (for small data and tests; runs use load_rows)."""
    return load_rows(cfg).to_list()


def _hf_cache_dir() -> str:
    return str(cache_root() / "hf-datasets")


def _load_file(file: Path, cfg: DataConfig):
    import datasets

    kind = FILE_TYPES[file.suffix.lower()]
    if kind == "json" and not _jsonl_or_array(file):
        return _from_python_rows(_read_json_python(file), file, cfg)
    try:
        return datasets.load_dataset(kind, data_files=str(file), split="train", cache_dir=_hf_cache_dir())
    except Exception as e:  # malformed: find the first bad line ourselves, with its real number
        if kind == "json":
            return _from_python_rows(_read_json_python(file), file, cfg)
        cause = e.__cause__ or e
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
        raise RecipeError(f"data.path '{file}' is not a readable {kind} file ({first}): fix or re-export it") from None


def _jsonl_or_array(file: Path) -> bool:
    """A JSON array, or JSON lines of more than one line: what datasets' json reader takes as rows. Anything else
    (one object, possibly {"data": [...]}, or broken text) is read by _read_json_python."""
    with file.open("rb") as f:
        head = f.read(1 << 16).removeprefix(b"\xef\xbb\xbf").lstrip()
        if head.startswith(b"["):
            return True
        if not head.startswith(b"{"):
            return False
        f.seek(0)
        first = f.readline().removeprefix(b"\xef\xbb\xbf")
        second = b""
        while not second.strip():
            second = f.readline()
            if not second:
                return False
    try:
        return isinstance(json.loads(first), dict)
    except ValueError:
        return False


def _read_json_python(file: Path) -> list[Any]:
    """A JSON file parsed in Python: a list of rows, an object with exactly one list of rows, one row, or JSON
    lines; errors name the real line."""
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise RecipeError(f"data.path '{file}' is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as whole:
        lines = text.splitlines()
        if len([ln for ln in lines if ln.strip()]) <= 1 or not lines[0].lstrip().startswith("{"):
            raise RecipeError(f"data.path '{file}' is not valid JSON: {whole.msg} at line {whole.lineno} column "
                              f"{whole.colno}; fix that line") from None
        data = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RecipeError(f"data.path '{file}' line {number} is not valid JSON ({e.msg} at column {e.colno}):"
                                  " fix that line (JSON lines: one object per line)") from None
        return data
    if isinstance(data, dict):  # {"data": [...]}, or a single row
        lists = [v for v in data.values() if isinstance(v, list) and all(isinstance(r, dict) for r in v)]
        if len(lists) == 1 and len(data) == 1:
            return lists[0]
        if len(lists) > 1:
            raise RecipeError(f"data.path '{file}' holds an object with {len(lists)} lists of rows: keep one "
                              "(or give a list of rows)")
        return [data]
    if not isinstance(data, list):
        raise RecipeError(f"data.path '{file}' must hold a list of rows, not a {type(data).__name__}")
    return data


def _from_python_rows(rows: list[Any], file: Path, cfg: DataConfig):
    import datasets

    bad = [i + 1 for i, r in enumerate(rows) if not isinstance(r, dict)]
    if bad:
        raise RecipeError(f"data.path '{file}': {len(bad)} row(s) are not objects with fields: rows {bad[:5]}; "
                          "each row must be an object like {\"question\": ..., \"answer\": ...}")
    check_rows(rows, cfg)
    columns = list(dict.fromkeys(field_map(cfg).values()))
    return datasets.Dataset.from_list([{c: r.get(c) for c in columns} for r in rows])


def _load_hf_cache(name: str, split: str):
    import datasets

    from .hub import go_offline, hub_unreachable

    if hub_unreachable():
        go_offline()  # the cached copy or an error at once, not ~50 s of retries
    try:
        return datasets.load_dataset(name, split=split, cache_dir=None)
    except Exception as e:  # not in the local cache, no network
        raise RecipeError(f"data.path '{name}' is not a local file (.json/.jsonl/.csv/.parquet) and could not be "
                          f"loaded from the local HF datasets cache ({type(e).__name__}): give a local file "
                          "or download the dataset first") from None


# ---------------------------------------------------------------- checking

def _rows_message(bad: list[int]) -> str:
    more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
    return f"rows {bad[:5]}{more}"


def _lack(bad: list[int], column: str, name: str, cfg: DataConfig) -> RecipeError:
    return RecipeError(f"{len(bad)} row(s) lack field '{column}' ({cfg.format} format '{name}'): "
                       f"{_rows_message(bad)}; fix the data or map the field with data.fields.{name}=COLUMN")


def _not_text(bad: list[int], column: str, name: str, kind: str) -> RecipeError:
    return RecipeError(f"{len(bad)} row(s) hold {kind} in field '{column}' ('{name}'), not text: "
                       f"{_rows_message(bad)}; give a string (it would be trained as its Python repr)")


def check_rows(rows, cfg: DataConfig) -> None:
    """Every row has what its format needs, as text. Names the field and up to five 1-based row numbers.
    rows: a datasets.Dataset (checked column by column in Arrow) or a list of dicts."""
    if isinstance(rows, list):
        return _check_python(rows, cfg)
    if len(rows) == 0:
        raise RecipeError(f"data.path '{cfg.path}' has no rows: give a dataset with at least one row")
    import datasets
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    table = rows.flatten_indices().data if rows._indices is not None else rows.data
    n = len(rows)
    fmap = field_map(cfg)
    optional = {"input"} if cfg.format == "alpaca" else set()
    for name, column in fmap.items():
        if name in optional and column not in rows.column_names:
            continue
        if column not in rows.column_names:
            if name in optional:
                continue
            raise _lack(list(range(1, n + 1)), column, name, cfg)
        feature = rows.features[column]
        if isinstance(feature, datasets.Json):  # mixed types in a JSON file: decode this column only
            _check_python([{column: v} for v in rows[column]], cfg, only={name: column})
            continue
        col = table.column(column).combine_chunks()
        if name == "messages":
            _check_messages_arrow(col, column, n)
            continue
        if pa.types.is_nested(col.type):
            bad = (np.flatnonzero(~np.asarray(col.is_null())) + 1).tolist()
            raise _not_text(bad, column, name, "lists" if pa.types.is_list(col.type) else "objects")
        missing = col.is_null()
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            missing = pc.or_kleene(missing, pc.equal(pc.utf8_trim_whitespace(col), ""))
        missing = np.asarray(missing.fill_null(True))
        if name not in optional and missing.any():
            raise _lack((np.flatnonzero(missing) + 1).tolist(), column, name, cfg)


def _check_messages_arrow(col, column: str, n: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    def bad_row(i: int) -> RecipeError:
        return RecipeError(f"row {i + 1}: '{column}' must be a list of {{role, content}} messages with at least "
                           "one assistant message")

    if not pa.types.is_list(col.type) and not pa.types.is_large_list(col.type):
        raise bad_row(0)
    item = col.type.value_type
    if not pa.types.is_struct(item) or item.get_field_index("role") < 0 or item.get_field_index("content") < 0:
        raise bad_row(0)
    nulls = np.asarray(col.is_null())
    if nulls.any():
        raise bad_row(int(np.flatnonzero(nulls)[0]))
    flat = pc.list_flatten(col)
    roles = pc.struct_field(flat, "role")
    if np.asarray(pc.is_null(roles)).any() or np.asarray(pc.is_null(pc.struct_field(flat, "content"))).any():
        parents = np.asarray(pc.list_parent_indices(col))
        holes = np.asarray(pc.or_(pc.is_null(roles), pc.is_null(pc.struct_field(flat, "content"))))
        raise bad_row(int(parents[holes][0]))
    parents = np.asarray(pc.list_parent_indices(col))
    has = np.zeros(n, dtype=bool)
    has[parents[np.asarray(pc.equal(roles, "assistant").fill_null(False))]] = True
    if not has.all():
        raise bad_row(int(np.flatnonzero(~has)[0]))


def _check_python(rows: list[dict[str, Any]], cfg: DataConfig, only: dict[str, str] | None = None) -> None:
    if not rows:
        raise RecipeError(f"data.path '{cfg.path}' has no rows: give a dataset with at least one row")
    fmap = only or field_map(cfg)
    optional = {"input"} if cfg.format == "alpaca" else set()
    for name, column in fmap.items():
        if name == "messages":
            continue
        kinds = [(i + 1, type(r.get(column)).__name__) for i, r in enumerate(rows)
                 if isinstance(r, dict) and isinstance(r.get(column), (dict, list))]
        if kinds:
            raise _not_text([i for i, _ in kinds], column, name,
                            "lists" if kinds[0][1] == "list" else "objects")
        if name in optional:
            continue
        bad = [i + 1 for i, r in enumerate(rows) if not isinstance(r, dict) or not _present(r.get(column))]
        if bad:
            raise _lack(bad, column, name, cfg)
    if cfg.format == "messages" and "messages" in fmap:
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


def _values(row: dict[str, Any], cfg: DataConfig) -> dict[str, str]:
    return {name: "" if row.get(col) is None else str(row.get(col)) for name, col in field_map(cfg).items()}


def _finish(ids: list[int], mask: list[bool], cfg: DataConfig) -> tuple[list[int], list[int], bool] | None:
    """Loss mask -> labels, truncation to max_seq_length; None when the prompt alone fills max_seq_length."""
    if not cfg.completion_only_loss:
        mask = [True] * len(ids)
    first = mask.index(True) if True in mask else len(ids)
    if first >= cfg.max_seq_length:
        return None
    truncated = len(ids) > cfg.max_seq_length
    ids, mask = ids[: cfg.max_seq_length], mask[: cfg.max_seq_length]
    labels = [t if m else IGNORE for t, m in zip(ids, mask)]
    return ids, labels, truncated


def encode(row: dict[str, Any], tokenizer, cfg: DataConfig) -> tuple[list[int], list[int], bool] | None:
    """(input_ids, labels, truncated) for one row; None when the prompt alone fills max_seq_length.

    Text templates: prompt and completion are tokenized apart (so the prompt tokens equal those seen at
    generation), EOS is appended to the completion, and the labels are the completion tokens + EOS.
    Chat: the conversation is rendered once; every assistant turn (as the chat template closes it) bears loss.
    The reference, one row at a time through the tokenizer's own __call__; encode_batch is the fast equal.
    """
    template = templates.resolve(cfg.template, cfg.format)
    if template == "chat":
        ids, mask = _encode_chat(conversation(row, cfg), tokenizer)
    else:
        values = _values(row, cfg)
        if template == "plain":
            ids = tokenizer(values["text"], add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
            mask = [True] * len(ids)
        else:
            prompt, completion = templates.split(template, values)
            p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids, mask = p + c, [False] * len(p) + [True] * len(c)
    return _finish(ids, mask, cfg)


def encode_batch(batch: dict[str, list], tokenizer, cfg: DataConfig):
    """Dataset.map(batched=True) function: columns in, a pyarrow Table of input_ids / labels (list<int32>) and
    truncated out, rows whose prompt alone fills max_seq_length left out. Row for row identical to encode()
    (tests/test_data_scale.py), at a fraction of the cost: the fast tokenizer's backend encodes the whole batch in
    Rust, and the rows are assembled, masked and truncated as flat numpy arrays (no per-token Python)."""
    import numpy as np

    n = len(next(iter(batch.values()))) if batch else 0
    template = templates.resolve(cfg.template, cfg.format)
    rows = ({k: v[i] for k, v in batch.items()} for i in range(n))
    limit = cfg.max_seq_length
    if template == "chat":
        rendered = [_render_chat(conversation(r, cfg), tokenizer) for r in rows]
        encoded = _backend_encode(tokenizer, [full for full, _ in rendered], False, offsets=True)
        done = [_finish(ids, [any(s <= a < e for s, e in spans) for a, _ in offsets], cfg)
                for (ids, offsets), (_, spans) in zip(encoded, rendered)]
        done = [d for d in done if d is not None]
        return _table(_flat([d[0] for d in done]), _flat([d[1] for d in done]),
                      np.array([len(d[0]) for d in done], dtype=np.int64), np.array([d[2] for d in done], dtype=bool))
    values = [_values(r, cfg) for r in rows]
    eos = np.array([tokenizer.eos_token_id], dtype=np.int32)
    if template == "plain":
        parts = [_backend_encode(tokenizer, [v["text"] for v in values], True)]
        loss = [True, True]
    else:
        pairs = [templates.split(template, v) for v in values]
        parts = [_backend_encode(tokenizer, [p for p, _ in pairs], True),
                 _backend_encode(tokenizer, [c for _, c in pairs], False)]
        loss = [not cfg.completion_only_loss, True, True]
    # Row i is parts[0][i] (+ parts[1][i]) + [eos]: segments gathered from one flat source array.
    flats = [_flat(p) for p in parts] + [eos]
    lens = [np.fromiter(map(len, p), dtype=np.int64, count=n) for p in parts] + [np.ones(n, dtype=np.int64)]
    source = np.concatenate(flats)
    bases = np.cumsum([0] + [len(f) for f in flats[:-1]])
    seg_start = np.stack([base + np.cumsum(ln) - ln for base, ln in zip(bases[:-1], lens[:-1])]
                         + [np.full(n, bases[-1], dtype=np.int64)], axis=1).ravel()
    seg_len = np.stack(lens, axis=1).ravel()
    seg_out = np.cumsum(seg_len) - seg_len
    total = int(seg_len.sum())
    idx = np.repeat(seg_start - seg_out, seg_len) + np.arange(total)
    ids = source[idx]
    labels = np.where(np.repeat(np.tile(np.array(loss), n), seg_len), ids, np.int32(IGNORE)).astype(np.int32)
    row_len = np.stack(lens, axis=1).sum(axis=1)
    unmasked = lens[0] if not loss[0] else np.zeros(n, dtype=np.int64)  # tokens before the first loss token
    keep_row = unmasked < limit
    pos = np.arange(total) - np.repeat(np.cumsum(row_len) - row_len, row_len)
    keep = (pos < limit) & np.repeat(keep_row, row_len)
    out_len = np.minimum(row_len, limit)[keep_row]
    return _table(ids[keep], labels[keep], out_len, (row_len > limit)[keep_row])


def _flat(lists: list[list[int]]):
    import itertools

    import numpy as np

    return np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=sum(map(len, lists)))


def _table(ids, labels, lengths, truncated):
    import numpy as np
    import pyarrow as pa

    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.table({"input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids, type=pa.int32())),
                     "labels": pa.ListArray.from_arrays(offsets, pa.array(labels, type=pa.int32())),
                     "truncated": pa.array(truncated, type=pa.bool_())})


def _backend_encode(tokenizer, texts: list[str], add_special_tokens: bool, offsets: bool = False) -> list:
    """Token ids (and offsets) of each text, as tokenizer(texts, add_special_tokens=...) gives them: through the
    Rust backend of a fast tokenizer without truncation or padding (the state __call__ leaves it in), else
    through __call__."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch") and backend.truncation is None \
            and backend.padding is None:
        if offsets:
            return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]
    enc = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=offsets)
    return list(zip(enc["input_ids"], enc["offset_mapping"])) if offsets else enc["input_ids"]


def _render_chat(msgs: list[dict[str, str]], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered once, and the character span of every assistant turn (as the template closes it).
    Each assistant turn costs two more renders: the prefix with the generation prompt, and the prefix with it."""
    if not getattr(tokenizer, "chat_template", None):
        raise RecipeError("data.template=chat but the tokenizer has no chat template: use data.template=ko-qa "
                          "(or another text template)")
    render = lambda m, gen=False: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    full = render(msgs)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before, upto = render(msgs[:i], True), render(msgs[: i + 1])
        if not full.startswith(upto) or not upto.startswith(before):
            raise RecipeError("the tokenizer's chat template does not render conversations prefix by prefix, so "
                              "assistant turns cannot be masked: use a text template (data.template=ko-qa)")
        spans.append((len(before), len(upto)))
    return full, spans


def _encode_chat(msgs: list[dict[str, str]], tokenizer) -> tuple[list[int], list[bool]]:
    full, spans = _render_chat(msgs, tokenizer)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]]


@dataclass
class DataReport:
    rows: int = 0
    used: int = 0
    dropped_prompt_too_long: int = 0
    truncated: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    max_seq_length: int = 0
    prepared: str = field(default="", compare=False)  # tokenized now (phase times) or from the cache

    def line(self) -> str:
        line = (f"data: {self.used:,} of {self.rows:,} rows, {self.tokens:,} tokens, "
                f"{self.loss_tokens:,} of them answer tokens (the loss)")
        if self.truncated:
            line += f"; {self.truncated:,} rows cut to max_seq_length={self.max_seq_length}"
        if self.dropped_prompt_too_long:
            line += (f"; {self.dropped_prompt_too_long:,} rows dropped (prompt alone >= "
                     f"max_seq_length={self.max_seq_length})")
        return f"{line} · {self.prepared}" if self.prepared else line


# ---------------------------------------------------------------- cache keys

def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes; computed once per process for the same (path, size, mtime): the run record
    (trainer/resume.py) and the tokenisation cache key both need it, and a large data file is read once."""
    st = Path(path).stat()
    return _file_digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def source_id(cfg: DataConfig, rows=None) -> str:
    """What the rows are, without reading them into Python: a local file's content hash; the rows themselves for
    a builtin set or a list; datasets' fingerprint for a dataset from the HF cache."""
    if rows is not None and isinstance(rows, list):
        return "rows:" + hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False, default=str)
                                        .encode()).hexdigest()
    if rows is not None:
        return "dataset:" + rows._fingerprint
    file = local_file(cfg)
    if file is not None:
        return f"file:{FILE_TYPES[file.suffix.lower()]}:{file_digest(file)}"
    if cfg.path.startswith("builtin:"):

        return source_id(cfg, builtin_dataset(cfg.path.removeprefix("builtin:")))
    with _quiet_datasets():
        return source_id(cfg, _load_hf_cache(cfg.path, cfg.split))


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    for part in (type(tokenizer).__name__, tokenizer.chat_template or "", str(tokenizer.eos_token_id),
                 str(tokenizer.bos_token_id)):
        h.update(part.encode())
    return h.hexdigest()


def cache_key(source: str, tokenizer, cfg: DataConfig) -> str:
    """The data's identity + the data section (minus the path, which the content hash replaces, and the choices
    made after tokenizing) + the tokenizer + the template text + CODE_VERSION."""
    section = {k: v for k, v in asdict(cfg).items() if k not in ("path", "packing", "padding_free", "eval_fraction")}
    h = hashlib.sha256()
    for part in (f"scalesft-data-v{CODE_VERSION}", source, tokenizer_fingerprint(tokenizer),
                 templates.text_template(templates.resolve(cfg.template, cfg.format)),
                 json.dumps(section, sort_keys=True, ensure_ascii=False)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _entry(key: str) -> Path:
    return cache_root() / "tokenized" / key


def _failure_marker(key: str) -> Path:
    return cache_root() / "tokenized-failed" / f"{key}.txt"


def _load_entry(target: Path):
    """(dataset, report) from a complete cache entry: its Arrow shards memory-mapped, nothing copied."""
    import datasets

    report = DataReport(**json.loads((target / "report.json").read_text()))
    shards = sorted(target.glob("tokens*.arrow"))
    with _quiet_datasets():
        parts = [datasets.Dataset.from_file(str(p)) for p in shards]
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return ds.remove_columns([c for c in ds.column_names if c not in ("input_ids", "labels")]), report


def num_proc_for(rows: int) -> int | None:
    if rows < PARALLEL_ROWS:
        return None
    want = os.environ.get("SCALESFT_DATA_PROC")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = int(want) if want else min(cpus, 8)
    return n if n > 1 else None


def tokenize(rows, tokenizer, cfg: DataConfig, *, source: str | None = None, num_proc: int | None = None):
    """Encode every row; returns (datasets.Dataset with input_ids/labels, DataReport). Cached on disk.

    rows: a datasets.Dataset (Arrow; the run's path) or a list of dicts. source: the rows' identity for the cache
    key when the caller knows it (a file's content hash); else computed from the rows. Encoding runs as a batched
    Dataset.map, in num_proc worker processes for large sets, writing int32 Arrow shards straight into the cache
    entry, which appears atomically (rename) once complete."""
    import datasets
    import numpy as np
    import pyarrow.compute as pc

    key = cache_key(source or source_id(cfg, rows), tokenizer, cfg)
    target = _entry(key)
    if (target / "report.json").is_file():
        return _load_entry(target)
    if isinstance(rows, list):
        check_rows(rows, cfg)  # what Dataset.from_list could not hold (objects in text fields) is named first
        columns = list(dict.fromkeys(field_map(cfg).values()))
        rows = datasets.Dataset.from_list([{c: r.get(c) for c in columns} for r in rows])
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                                  "labels": datasets.List(datasets.Value("int32")),
                                  "truncated": datasets.Value("bool")})
    num_proc = num_proc if num_proc is not None else num_proc_for(len(rows))
    try:
        with _quiet_datasets():
            ds = rows.map(encode_batch, fn_kwargs={"tokenizer": tokenizer, "cfg": cfg}, batched=True,
                          batch_size=1000, num_proc=num_proc, remove_columns=rows.column_names, features=features,
                          cache_file_name=str(tmp / "tokens.arrow"), load_from_cache_file=False,
                          desc="tokenizing")
        lengths = pc.list_value_length(ds.data.column("input_ids"))
        report = DataReport(rows=len(rows), used=len(ds), dropped_prompt_too_long=len(rows) - len(ds),
                            truncated=int(pc.sum(ds.data.column("truncated")).as_py() or 0),
                            tokens=int(pc.sum(lengths).as_py() or 0),
                            loss_tokens=int(np.count_nonzero(
                                np.asarray(pc.list_flatten(ds.data.column("labels"))) != IGNORE)),
                            max_seq_length=cfg.max_seq_length)
        if report.used == 0:
            raise RecipeError(f"every row's prompt alone is >= data.max_seq_length={cfg.max_seq_length} tokens: "
                              "raise data.max_seq_length or shorten the prompts")
        if report.loss_tokens == 0:
            raise RecipeError("no token bears loss after masking: check data.completion_only_loss and the template")
        (tmp / "report.json").write_text(json.dumps(asdict(report)))
        del ds
        try:
            tmp.rename(target)  # atomic: a reader sees the whole cache entry or none
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _load_entry(target)


def split_eval(dataset, cfg: DataConfig, seed: int):
    """(train, eval or None): data.eval_fraction of the rows held out, never all of them."""
    if cfg.eval_fraction <= 0:
        return dataset, None
    n = len(dataset)
    held = math.ceil(n * cfg.eval_fraction)
    if n - held < 1:
        raise RecipeError(f"data.eval_fraction={cfg.eval_fraction} of {n} usable row(s) holds out {held}, leaving "
                          "no training rows: lower data.eval_fraction (or 0 for no eval) or add rows")
    # datasets' train_test_split(test_size=fraction, seed=seed), row for row, with the indices kept in memory
    # (it would write index files into the shared cache entry, from every rank)
    import numpy as np

    order = np.random.default_rng(seed).permutation(n)
    return (dataset.select(order[held:], keep_in_memory=True), dataset.select(order[:held], keep_in_memory=True))


def prepare(cfg: DataConfig, tokenizer, *, seed: int, local_main: bool = True, rank: int = 0,
            timeout: float = 1800.0, log=None):
    """A run's data: (train, eval or None, DataReport). The local main process reads, checks and tokenizes (or
    loads the cache entry); every other local rank only hashes the data, then waits for that entry to be complete
    (polling its marker, at most `timeout` seconds; a RecipeError of the main process is handed on to it), so no
    process but one holds the rows and no collective waits on tokenization."""
    source = source_id(cfg)
    key = cache_key(source, tokenizer, cfg)
    target, failed = _entry(key), _failure_marker(key)
    if local_main:
        if (target / "report.json").is_file():
            dataset, report = _load_entry(target)
            report.prepared = f"from the cache {target}"
        else:
            failed.unlink(missing_ok=True)
            try:
                start = time.perf_counter()
                rows = load_rows(cfg)
                loaded = time.perf_counter()
                check_rows(rows, cfg)
                checked = time.perf_counter()
                dataset, report = tokenize(rows, tokenizer, cfg, source=source)
                report.prepared = (f"prepared in {time.perf_counter() - start:.1f} s (read {loaded - start:.1f}, "
                                   f"checked {checked - loaded:.1f}, tokenized {time.perf_counter() - checked:.1f}), "
                                   f"cached in {target}")
            except RecipeError as e:
                failed.parent.mkdir(parents=True, exist_ok=True)
                failed.write_text(str(e))
                raise
    else:
        dataset, report = wait_for_entry(target, failed, timeout=timeout, rank=rank, log=log)
    train, held = split_eval(dataset, cfg, seed)
    return train, held, report


def wait_for_entry(target: Path, failed: Path, *, timeout: float, rank: int, log=None, poll: float = 0.5):
    start = time.time()
    said = False
    while not (target / "report.json").is_file():
        if failed.is_file() and failed.stat().st_mtime >= start - 60:
            raise RecipeError(failed.read_text())
        waited = time.time() - start
        if waited > timeout:
            raise RecipeError(f"rank {rank} waited {int(waited)} s for the local main process to tokenize the data "
                              f"into {target} and it never completed: check that process's log, or raise "
                              "training.ddp_timeout")
        if not said and waited > 5 and log:
            log(f"rank {rank} waits for the local main process to tokenize the data ({target}; at most "
                f"{int(timeout)} s)")
            said = True
        time.sleep(poll)
    return _load_entry(target)
