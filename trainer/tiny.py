"""A tiny random Llama, a BPE tokenizer trained offline, and Korean Q/A rows of varying length.

For tests and the benchmark's CPU smoke mode: ~130k parameters, trains in well under a second per step.
Everything is built from a seed; nothing is downloaded.

    python -m trainer.tiny OUT_DIR      # writes OUT_DIR/model and OUT_DIR/data.json
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_SUBJECTS = ["서울", "부산", "한국어", "인공지능", "모델", "데이터", "학습", "날씨", "음식", "여행", "컴퓨터", "음악"]
_VERBS = ["좋아요", "어렵습니다", "재미있어요", "중요합니다", "빠릅니다", "필요해요", "아름답습니다"]


def korean_qa_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n question/answer rows whose lengths vary (answers 1-12 clauses), so padding and per-token loss
    normalisation matter in equivalence tests."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q = f"{rng.choice(_SUBJECTS)}에 대해 {rng.choice(_SUBJECTS)}은 어떻습니까?"
        a = " ".join(f"{rng.choice(_SUBJECTS)}는 {rng.choice(_VERBS)}." for _ in range(rng.randint(1, 12)))
        rows.append({"question": q, "answer": a})
    return rows


def build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=384, special_tokens=special,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>",
                                   chat_template=CHATML)


def build(out: str | Path, rows: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """Write a tiny model folder and a Q/A json file; return (model_dir, data_file)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    data = korean_qa_rows(rows, seed)
    texts = [f"### 질문: {r['question']}\n\n### 답변: {r['answer']}" for r in korean_qa_rows(400, seed + 1)]
    tokenizer = build_tokenizer(texts)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=None,
                      tie_word_embeddings=False, initializer_range=0.2)
    model = LlamaForCausalLM(cfg)
    model_dir = out / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data_file = out / "data.json"
    data_file.write_text(json.dumps(data, ensure_ascii=False, indent=0), encoding="utf-8")
    return model_dir, data_file


if __name__ == "__main__":
    print(*build(sys.argv[1]))
