"""Templates and label masks at the token level, truncation accounting, caching, packing boundaries."""

from __future__ import annotations

import json

import pytest

from scalesft.core import templates
from scalesft.core.recipe import DataConfig, RecipeError
from scalesft.trainer.data import IGNORE, check_rows, encode, read_rows, tokenize


@pytest.fixture(scope="module")
def tok(tiny):
    from scalesft.trainer.model import load_tokenizer
    from scalesft.core.recipe import ModelConfig

    return load_tokenizer(ModelConfig(name_or_path=str(tiny["model"])))


def test_seed_templates_render_exactly():
    prompt, completion = templates.split("ko-qa", {"question": "서울은?", "answer": "수도입니다."})
    assert prompt == "### 질문: 서울은?\n\n### 답변: "
    assert completion == "수도입니다."
    prompt, completion = templates.split("ko-alpaca", {"instruction": "번역하세요", "input": "hi", "output": "안녕"})
    assert prompt.startswith("아래에는 작업을 설명하는 지시 사항과")
    assert prompt.endswith("### instruction:\n번역하세요\n\n### input:\nhi\n\n### output:\n")
    assert completion == "안녕"


def test_qa_mask_covers_exactly_answer_and_eos(tok):
    cfg = DataConfig(path="x.json", max_seq_length=512)
    row = {"question": "서울에 대해 데이터은 어떻습니까?", "answer": "모델는 빠릅니다. 음악는 좋아요."}
    ids, labels, truncated = encode(row, tok, cfg)
    prompt_ids = tok("### 질문: 서울에 대해 데이터은 어떻습니까?\n\n### 답변: ")["input_ids"]
    answer_ids = tok("모델는 빠릅니다. 음악는 좋아요.", add_special_tokens=False)["input_ids"]
    assert ids == prompt_ids + answer_ids + [tok.eos_token_id]
    assert labels == [IGNORE] * len(prompt_ids) + answer_ids + [tok.eos_token_id]
    assert not truncated
    # The same prompt tokens at generation time.
    from scalesft.trainer.data import prompt_text
    assert tok(prompt_text({"question": row["question"]}, tok, cfg))["input_ids"] == prompt_ids


def test_full_loss_when_completion_only_is_off(tok):
    cfg = DataConfig(path="x.json", completion_only_loss=False)
    ids, labels, _ = encode({"question": "q", "answer": "a"}, tok, cfg)
    assert labels == ids


def test_alpaca_missing_input_is_empty(tok):
    cfg = DataConfig(path="x.json", format="alpaca")
    ids, labels, _ = encode({"instruction": "하세요", "output": "네"}, tok, cfg)
    text = tok.decode(ids)
    assert "### input:\n\n\n### output:\n네" in text
    assert tok.decode([t for t in labels if t != IGNORE]) == "네" + tok.eos_token


def test_chat_masks_every_assistant_turn_and_nothing_else(tok):
    cfg = DataConfig(path="x.json", format="messages", max_seq_length=512)
    msgs = [{"role": "user", "content": "안녕"}, {"role": "assistant", "content": "네 안녕하세요"},
            {"role": "user", "content": "서울은?"}, {"role": "assistant", "content": "좋아요"}]
    ids, labels, _ = encode({"messages": msgs}, tok, cfg)
    assert tok.decode(ids) == tok.apply_chat_template(msgs, tokenize=False)
    kept = tok.decode([t for t in labels if t != IGNORE])
    assert kept == "네 안녕하세요<|im_end|>\n좋아요<|im_end|>\n"


def test_truncation_and_prompt_too_long(tok):
    long_answer = " ".join(["서울는 좋아요."] * 40)
    rows = [{"question": "q", "answer": long_answer}, {"question": "서울 " * 80, "answer": "a"},
            {"question": "q", "answer": "a"}]
    cfg = DataConfig(path="x.json", max_seq_length=32)
    ds, report = tokenize(rows, tok, cfg)
    assert (report.rows, report.used, report.truncated, report.dropped_prompt_too_long) == (3, 2, 1, 1)
    assert len(ds[0]["input_ids"]) == 32 and ds[0]["labels"][-1] != IGNORE
    with pytest.raises(RecipeError, match="every row's prompt alone is >= data.max_seq_length=32"):
        tokenize(rows[1:2], tok, cfg)


def test_tokenized_cache_is_keyed_and_reused(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("SCALESFT_CACHE", str(tmp_path))
    rows = [{"question": "q", "answer": "a"}]
    cfg = DataConfig(path="x.json", max_seq_length=64)
    tokenize(rows, tok, cfg)
    tokenize(rows, tok, cfg)
    assert len(list((tmp_path / "tokenized").iterdir())) == 1
    tokenize(rows, tok, DataConfig(path="x.json", max_seq_length=65))
    tokenize(rows, tok, DataConfig(path="x.json", max_seq_length=64, template="Q {question} A {answer}"))
    assert len(list((tmp_path / "tokenized").iterdir())) == 3
    assert not list((tmp_path / "tokenized").glob("*.tmp*"))


def test_rows_lacking_a_field_are_named_by_number(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [{"question": "q", "answer": "a"}, {"question": "q"},
                                                    {"question": "q", "answer": ""}, {"q": 1}]))
    cfg = DataConfig(path=str(f))
    with pytest.raises(RecipeError, match=r"row\(s\) lack field 'question' .*rows \[4\]"):
        check_rows(read_rows(cfg), cfg)
    cfg = DataConfig(path=str(f), fields={"question": "question"})
    rows = read_rows(cfg)[:3]
    with pytest.raises(RecipeError, match=r"2 row\(s\) lack field 'answer' .*rows \[2, 3\].*data.fields.answer"):
        check_rows(rows, cfg)


def test_missing_and_empty_datasets(tmp_path):
    with pytest.raises(RecipeError, match="data.path '.*nope.json' does not exist"):
        read_rows(DataConfig(path=str(tmp_path / "nope.json")))
    (tmp_path / "e.json").write_text("[]")
    cfg = DataConfig(path=str(tmp_path / "e.json"))
    with pytest.raises(RecipeError, match="has no rows"):
        check_rows(read_rows(cfg), cfg)


def test_packing_keeps_sequence_boundaries(tok):
    """Padding-free packing (TRL's bfd + collator): positions restart at every sequence and no token is
    predicted across a boundary."""
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = [{"question": "q" * (i + 1), "answer": "서울는 좋아요. " * (i + 1)} for i in range(6)]
    ds, _ = tokenize(rows, tok, DataConfig(path="x.json", max_seq_length=64))
    lengths = [len(x) for x in ds["input_ids"]]
    packed = pack_dataset(ds, seq_length=64, strategy="bfd")
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(list(packed))
    pos, labels = batch["position_ids"][0], batch["labels"][0]
    starts = (pos == 0).nonzero().flatten().tolist()
    assert len(starts) == len(rows) and sum(lengths) == pos.numel()
    for s in starts:
        assert labels[s] == IGNORE  # the first token of a sequence is never a target
    # Every loss token of the unpacked rows survives packing.
    assert int((labels != IGNORE).sum()) == sum(sum(l != IGNORE for l in x) - (x[0] != IGNORE) for x in ds["labels"])


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_every_local_file_type_reads_the_same_rows(tmp_path, suffix):
    import datasets

    rows = [{"question": f"질문 {i}", "answer": f"답변 {i}"} for i in range(5)]
    f = tmp_path / f"rows{suffix}"
    ds = datasets.Dataset.from_list(rows)
    {".json": lambda: f.write_text(json.dumps(rows, ensure_ascii=False)),
     ".jsonl": lambda: ds.to_json(str(f), force_ascii=False),
     ".csv": lambda: ds.to_csv(str(f), index=False),
     ".parquet": lambda: ds.to_parquet(str(f))}[suffix]()
    assert read_rows(DataConfig(path=str(f))) == rows
    assert read_rows(DataConfig(path=str(f), limit=2)) == rows[:2]
