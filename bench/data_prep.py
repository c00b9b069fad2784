"""Data preparation at scale: N Korean question/answer rows (JSONL) -> tokenized Arrow cache, measured.

    python bench/data_prep.py [--rows 1000000] [--tokenizer smollm2|tiny] [--work DIR] [--keep]

Writes DIR/rows.jsonl (~150 tokens per row with the chosen tokenizer, calibrated on a sample), then runs the
trainer's own pipeline (trainer/data.py prepare: datasets' json reader, batched Dataset.map in worker processes,
int32 Arrow shards written straight into the cache entry) in fresh child processes against an empty cache:

    cold     the local main process: read, check, tokenize, cache          wall time, peak RSS of its tree
    waiter   a second local rank started at the same time: it hashes the file and waits for the cache entry
             (no rows in Python), peak RSS
    warm     a second run: hash + load the cache entry                      wall time, peak RSS

Peak RSS is sampled every 0.1 s over the child and all its descendants (psutil, summed), and cross-checked
with getrusage's ru_maxrss of the largest single process. Prints one JSON object; --json FILE keeps it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SUBJECTS = ["서울", "부산", "한국어", "인공지능", "모델", "데이터", "학습", "날씨", "음식", "여행", "컴퓨터", "음악",
            "도서관", "경제", "역사", "과학", "바다", "산", "학교", "병원"]
VERBS = ["좋아요", "어렵습니다", "재미있어요", "중요합니다", "빠릅니다", "필요해요", "아름답습니다", "복잡합니다",
         "유명합니다", "조용해요"]


def tokenizer_path(name: str, work: Path) -> str:
    if name == "tiny":
        from scalesft.trainer.tiny import build

        model_dir, _ = build(work / "tiny", rows=4)
        return str(model_dir)
    from scalesft.trainer.assets import builtin_model

    return str(builtin_model("smollm2-135m-instruct"))


def make_rows(path: Path, rows: int, tok_path: str, target_tokens: int = 150, seed: int = 0) -> dict:
    """JSONL rows whose ko-qa encoding averages ~target_tokens tokens (answer clause count calibrated)."""
    from scalesft.core.recipe import DataConfig, ModelConfig
    from scalesft.trainer.data import encode
    from scalesft.trainer.model import load_tokenizer

    tok = load_tokenizer(ModelConfig(name_or_path=tok_path))
    cfg = DataConfig(path="x.jsonl", max_seq_length=1024)
    rng = random.Random(seed)

    def row(clauses: int) -> dict:
        q = f"{rng.choice(SUBJECTS)}에 대해 {rng.choice(SUBJECTS)}은 어떻습니까? {rng.randint(0, 10**6)}번 질문입니다."
        a = " ".join(f"{rng.choice(SUBJECTS)}는 {rng.choice(VERBS)}." for _ in range(clauses))
        return {"question": q, "answer": a}

    def mean_tokens(k: int) -> float:
        return sum(len(encode(row(k), tok, cfg)[0]) for _ in range(200)) / 200

    t2, t12 = mean_tokens(2), mean_tokens(12)  # tokens ~ a + b * clauses
    b = (t12 - t2) / 10
    mean_clauses = max(1.0, (target_tokens - (t2 - 2 * b)) / b)
    spread = max(1, round(mean_clauses * 0.5))
    lo, hi = max(1, round(mean_clauses) - spread), round(mean_clauses) + spread
    sample = [len(encode(row(rng.randint(lo, hi)), tok, cfg)[0]) for _ in range(500)]
    start = time.perf_counter()
    with path.open("w", encoding="utf-8") as f:
        for _ in range(rows):
            f.write(json.dumps(row(rng.randint(lo, hi)), ensure_ascii=False) + "\n")
    return {"rows": rows, "bytes": path.stat().st_size, "clauses": [lo, hi],
            "mean_tokens_sample": round(sum(sample) / len(sample), 1), "write_s": round(time.perf_counter() - start, 1)}


def child(args) -> None:
    """One process of a run: prepare() as the local main process or as a waiting rank."""
    import resource

    from scalesft.core.recipe import DataConfig, ModelConfig
    from scalesft.trainer.data import prepare
    from scalesft.trainer.model import load_tokenizer

    t0 = time.perf_counter()
    tok = load_tokenizer(ModelConfig(name_or_path=args.tokenizer_path))
    cfg = DataConfig(path=args.data, format="qa", template="ko-qa", max_seq_length=1024)
    t1 = time.perf_counter()
    train, _, report = prepare(cfg, tok, seed=0, local_main=args.role != "waiter", rank=1 if args.role == "waiter"
                               else 0, timeout=3600, log=lambda line: print(f"[{args.role}] {line}", flush=True))
    t2 = time.perf_counter()
    first = train[0]["input_ids"][:4]
    print(json.dumps({"role": args.role, "prepare_s": round(t2 - t1, 2), "tokenizer_s": round(t1 - t0, 2),
                      "rows": len(train), "report": report.__dict__, "first_ids": first,
                      "self_maxrss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
                      "children_maxrss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
                                                   3)}), flush=True)


def measured(argv: list[str], env: dict) -> dict:
    """Run a child; sample the RSS of its whole process tree; return its JSON line + wall time + peak tree RSS."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                total = sum(x.memory_info().rss for x in [p, *p.children(recursive=True)])
                peak[0] = max(peak[0], total)
            except psutil.Error:
                pass
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(wall_s=round(wall, 1), peak_tree_rss_gib=round(peak[0] / 2**30, 3),
                  log=[ln for ln in out.splitlines()[:-1]])
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--tokenizer", choices=["smollm2", "tiny"], default="smollm2")
    p.add_argument("--work", default="/tmp/scalesft-data-bench")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--no-waiter", action="store_true", help="skip the concurrent second rank")
    p.add_argument("--child", choices=["main", "waiter"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer-path", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.role = args.child
        child(args)
        return 0

    import shutil

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tok_path = tokenizer_path(args.tokenizer, work)
    data = work / f"rows-{args.rows}-{args.tokenizer}.jsonl"
    made = make_rows(data, args.rows, tok_path) if not data.is_file() else {"rows": args.rows, "reused": True,
                                                                           "bytes": data.stat().st_size}
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "SCALESFT_CACHE": str(cache), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    base = [sys.executable, str(Path(__file__).resolve()), "--data", str(data), "--tokenizer-path", tok_path]
    waiter = None
    if not args.no_waiter:
        box: dict = {}
        waiter = threading.Thread(target=lambda: box.update(measured([*base, "--child", "waiter"], env)))
        waiter.start()
    cold = measured([*base, "--child", "main"], env)
    if waiter is not None:
        waiter.join()
    warm = measured([*base, "--child", "main"], env)
    assert warm["report"] == cold["report"] and warm["first_ids"] == cold["first_ids"]
    result = {"machine": {"cpus": len(os.sched_getaffinity(0)), "load_avg_1m": os.getloadavg()[0]},
              "data": made, "tokenizer": args.tokenizer, "cold": cold, "warm": warm,
              "waiter": box if waiter is not None else None,
              "cache_bytes": sum(f.stat().st_size for f in (cache / "tokenized").rglob("*") if f.is_file())}
    text = json.dumps(result, indent=1, ensure_ascii=False)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
