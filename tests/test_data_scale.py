"""The Arrow data pipeline (trainer/data.py) equals the per-row reference and shares one cache between ranks.

- encode_batch (what Dataset.map runs, through the fast tokenizer's backend) gives exactly encode()'s tokens and
  labels for every format, template, truncation and drop, and the same with worker processes;
- the cache key follows the data's content, the tokenizer and CODE_VERSION, not the file's path;
- a non-main local rank reads no rows: it waits for the main process's cache entry (a marker, with a timeout),
  and a main process's RecipeError reaches it as the same line.
"""

from __future__ import annotations

import json
import threading

import pytest

from scalesft.trainer import data
from scalesft.core.recipe import DataConfig, RecipeError
from scalesft.trainer.data import encode, encode_batch, prepare, tokenize


@pytest.fixture(scope="module")
def tok(tiny):
    from scalesft.core.recipe import ModelConfig
    from scalesft.trainer.model import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(tiny["model"])))


def _rows(n=40):
    from scalesft.trainer.tiny import korean_qa_rows

    rows = korean_qa_rows(n, seed=3)
    rows[5]["question"] = "서울 " * 60  # prompt alone too long at small max_seq_length
    return rows


def _columns(rows):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: [r.get(k) for r in rows] for k in keys}


CONFIGS = {
    "qa ko-qa": (dict(), lambda rows: rows),
    "qa truncated and dropped": (dict(max_seq_length=24), lambda rows: rows),
    "qa full loss": (dict(completion_only_loss=False, max_seq_length=24), lambda rows: rows),
    "qa literal template": (dict(template="Q: {question}\nA: {answer}!"), lambda rows: rows),
    "qa chat with system prompt": (dict(template="chat", system_prompt="친절하게"), lambda rows: rows),
    "alpaca": (dict(format="alpaca", max_seq_length=400),
               lambda rows: [{"instruction": r["question"], "input": "" if i % 2 else "입력", "output": r["answer"]}
                             for i, r in enumerate(rows)]),
    "messages": (dict(format="messages", max_seq_length=160),
                 lambda rows: [{"messages": [{"role": "user", "content": r["question"]},
                                             {"role": "assistant", "content": r["answer"]},
                                             {"role": "user", "content": "또?"},
                                             {"role": "assistant", "content": r["answer"][:9]}]} for r in rows]),
    "text": (dict(format="text", max_seq_length=20), lambda rows: [{"text": r["answer"]} for r in rows]),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_encoding_equals_the_per_row_reference(tok, name):
    overrides, shape = CONFIGS[name]
    cfg = DataConfig(path="x.json", **{"max_seq_length": 64, **overrides})
    rows = shape(_rows())
    expected = [e for e in (encode(r, tok, cfg) for r in rows) if e is not None]
    got = encode_batch(_columns(rows), tok, cfg).to_pydict()
    assert got["input_ids"] == [e[0] for e in expected]
    assert got["labels"] == [e[1] for e in expected]
    assert got["truncated"] == [e[2] for e in expected]
    assert expected and (len(expected) < len(rows) or "dropped" not in name)


def test_worker_processes_give_the_same_dataset(tok, tmp_path, monkeypatch):
    rows = _rows(60)
    cfg = DataConfig(path="x.json", max_seq_length=24)
    monkeypatch.setenv("SCALESFT_CACHE", str(tmp_path / "one"))
    one, r1 = tokenize(rows, tok, cfg, num_proc=None)
    monkeypatch.setenv("SCALESFT_CACHE", str(tmp_path / "two"))
    two, r2 = tokenize(rows, tok, cfg, num_proc=2)
    assert len(list(next((tmp_path / "two" / "tokenized").iterdir()).glob("tokens*.arrow"))) == 2
    assert one["input_ids"] == two["input_ids"] and one["labels"] == two["labels"] and r1 == r2
    assert r1.dropped_prompt_too_long >= 1 and r1.truncated > 0
    assert one.column_names == ["input_ids", "labels"]


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def test_cache_key_is_content_tokenizer_and_code_version(tok, tiny, tmp_path, monkeypatch):
    rows = _rows(10)
    a, b = _write(tmp_path / "a.jsonl", rows), _write(tmp_path / "b.jsonl", rows)
    key = lambda path, **kw: data.cache_key(data.source_id(DataConfig(path=str(path), **kw)), tok,  # noqa: E731
                                            DataConfig(path=str(path), **kw))
    assert key(a) == key(b)  # same content, another path
    assert key(a) != key(a, max_seq_length=100) and key(a) != key(a, limit=3)
    assert key(a) == key(a, eval_fraction=0.1, packing=True)  # decided after tokenizing
    _write(b, rows[:-1])
    assert key(a) != key(b)
    monkeypatch.setattr(data, "CODE_VERSION", data.CODE_VERSION + 1)
    new = key(a)
    monkeypatch.undo()
    assert new != key(a)


def test_other_ranks_wait_for_the_main_process_cache(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("SCALESFT_CACHE", str(tmp_path / "cache"))
    f = _write(tmp_path / "rows.jsonl", _rows(30))
    cfg = DataConfig(path=str(f), max_seq_length=64, eval_fraction=0.2)
    got = {}
    waiter = threading.Thread(target=lambda: got.update(
        w=prepare(cfg, tok, seed=0, local_main=False, rank=1, timeout=60, log=None)))
    waiter.start()
    train, held, report = prepare(cfg, tok, seed=0, local_main=True)
    waiter.join(30)
    wtrain, wheld, wreport = got["w"]
    assert wreport == report and wtrain["input_ids"] == train["input_ids"] and wheld["input_ids"] == held["input_ids"]
    assert len(train) + len(held) == report.used and len(held) == -(-report.used * 2 // 10)
    # the split datasets' train_test_split makes
    ref = data._load_entry(data._entry(data.cache_key(data.source_id(cfg), tok, cfg)))[0].train_test_split(
        test_size=0.2, seed=0)
    assert ref["train"]["input_ids"] == train["input_ids"] and ref["test"]["input_ids"] == held["input_ids"]


def test_main_process_error_reaches_the_waiting_rank(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("SCALESFT_CACHE", str(tmp_path / "cache"))
    f = _write(tmp_path / "rows.jsonl", [{"question": "q"}] * 3)
    cfg = DataConfig(path=str(f))
    errors = {}

    def wait():
        try:
            prepare(cfg, tok, seed=0, local_main=False, rank=1, timeout=60)
        except RecipeError as e:
            errors["w"] = str(e)

    waiter = threading.Thread(target=wait)
    waiter.start()
    with pytest.raises(RecipeError, match=r"3 row\(s\) lack field 'answer'") as main_error:
        prepare(cfg, tok, seed=0, local_main=True)
    waiter.join(30)
    assert errors["w"] == str(main_error.value)


def test_waiting_rank_times_out_with_one_line(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("SCALESFT_CACHE", str(tmp_path / "cache"))
    f = _write(tmp_path / "rows.jsonl", _rows(8))
    with pytest.raises(RecipeError, match=r"rank 1 waited 1 s for the local main process .*training.ddp_timeout"):
        prepare(DataConfig(path=str(f)), tok, seed=0, local_main=False, rank=1, timeout=1)


def test_arrow_and_python_row_checks_agree(tmp_path):
    from scalesft.trainer.data import check_rows, load_rows

    rows = [{"question": "q", "answer": "a"}, {"question": "q"}, {"question": " ", "answer": "a"}] * 3
    f = _write(tmp_path / "r.jsonl", rows)
    for cfg in (DataConfig(path=str(f)), DataConfig(path=str(f), fields={"question": "answer"})):
        messages = []
        for form in (load_rows(cfg), load_rows(cfg).to_list()):
            with pytest.raises(RecipeError) as e:
                check_rows(form, cfg)
            messages.append(str(e.value))
        assert messages[0] == messages[1], messages
