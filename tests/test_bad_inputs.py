"""Every bad input stops with exactly one `scalesft: error:` line, a nonzero exit, and nothing written to
training.output_dir, before any model weights load.

One table, one row per class of user error (recipe, data file, model folder, hub, output_dir, CLI). Each case
runs through the real entry point: `trainer.train.main` / `launch.cli.main` in-process (stderr captured at the
file descriptor, so library logging counts too) with model loading booby-trapped, or `python -m launch.cli` in a
subprocess where only a fresh interpreter is faithful (third-party import noise, another user's permissions).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tinyrecipe import REPO, write_recipe

QA = [{"question": f"질문 {i}", "answer": f"답변 {i}"} for i in range(8)]


def _jsonl(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    for number, text in (raw_lines or {}).items():
        lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# Each setup gets (tmp_path, tiny) and returns (argv tail after the recipe, recipe sections to update,
# extra environment). The argv tail holds overrides; `cli:` argv replaces the whole command line.
def data(path_fn):
    return lambda t, tiny: ([f"data.path={path_fn(t, tiny)}"], {}, {})


def over(*overrides, **sections):
    return lambda t, tiny: (list(overrides), sections, {})


def model(path_fn):
    return lambda t, tiny: ([f"model.name_or_path={path_fn(t, tiny)}"], {}, {})


def _model_copy(t: Path, tiny, drop=(), empty=False) -> Path:
    d = t / "model-copy"
    if empty:
        d.mkdir()
        return d
    shutil.copytree(tiny["model"], d)
    for pattern in drop:
        for f in d.glob(pattern):
            f.unlink()
    return d


def _folder_with_data(t: Path, tiny) -> Path:
    d = t / "datadir"
    d.mkdir()
    _jsonl(d / "rows.jsonl", QA)
    return d


def _duplicate_key_recipe(t: Path, tiny) -> Path:
    p = write_recipe(t / "dup.yaml", tiny, t / "out")
    text = p.read_text().replace("training:\n", "training:\n  max_steps: 3\n  learning_rate: 0.1\n", 1)
    p.write_text(text)
    return p


def _recipe_folder(t: Path, tiny) -> Path:
    (t / "recipes").mkdir()
    return t / "recipes"


def _bad_yaml(t: Path, tiny) -> Path:
    p = t / "bad.yaml"
    p.write_text("model: {name_or_path: x\ndata: [\n")
    return p


def _output_is_file(t: Path, tiny) -> Path:
    f = t / "out"
    f.write_text("not a folder")
    return f


def _unfinished_run(t: Path, tiny) -> Path:
    d = t / "run"
    d.mkdir()
    shutil.copy(write_recipe(t / "r2.yaml", tiny, d), d / "recipe.yaml")
    return d


CASES = {
    # ---- the recipe itself
    "unknown key": (over("training.learning_rat=1"),
                    "unknown recipe key 'training.learning_rat': did you mean 'learning_rate'?"),
    "wrong type": (over("training.max_steps=many"), "training.max_steps: expected int, got 'many'"),
    "duplicate YAML key": ("recipe", _duplicate_key_recipe, "key 'learning_rate' appears twice (lines"),
    "recipe is a folder": ("recipe", _recipe_folder, "is a folder, not a file"),
    "recipe missing": ("recipe", lambda t, tiny: t / "nope.yaml", "does not exist"),
    "recipe not YAML": ("recipe", _bad_yaml, "is not valid YAML"),
    "override without =": (over("training.max_steps"), "must look like section.key=value"),
    "negative warmup": (over("training.warmup_steps=-1"), "training.warmup_steps must be >= 0, got -1"),
    "warmup ratio >= 1": (over("training.warmup_ratio=1.5"), "training.warmup_ratio must be in [0, 1)"),
    "negative weight decay": (over("training.weight_decay=-0.1"), "training.weight_decay must be >= 0"),
    "eval_steps 0": (over("training.eval_steps=0"), "training.eval_steps must be >= 1"),
    "save_total_limit 0": (over("training.save_total_limit=0"), "training.save_total_limit must be >= 1"),
    "negative seed": (over("training.seed=-1"), "training.seed must be in [0, 2**32)"),
    "lora alpha 0": (over("lora.alpha=0"), "lora.alpha must be >= 1"),
    "data.limit=0": (over("data.limit=0"), "data.limit=0 leaves no rows"),
    "unknown template": (over("data.template=nonsense"), "is neither a known name"),
    # ---- LoRA targets, checked on the meta-device model
    "target_modules empty": (over("lora.target_modules=[]"), "lora.target_modules is empty"),
    "target_modules match nothing": (over("lora.target_modules=[q_proj,qkv_fused]"),
                                     "lora.target_modules entry 'qkv_fused' matches no module of LlamaForCausalLM: "
                                     "its linear layers are ['down_proj', 'gate_proj', 'k_proj', 'lm_head'"),
    "target_modules not linear": (over("lora.target_modules=[layers]"), "which LoRA cannot adapt"),
    # ---- hardware and batch plan
    "bf16 on CPU": (over("training.precision=bf16"),
                    "training.precision=bf16 but this CPU-only machine has no native bfloat16"),
    "batch does not divide": (over("training.global_batch_size=7"),
                              "training.global_batch_size=7 is not divisible by micro_batch_size (2) x world_size "
                              "(1) = 2; use training.micro_batch_size in [1, 7]"),
    # ---- the data
    "data file missing": (over("data.path=/nonexistent/rows.json"), "data.path '/nonexistent/rows.json' does not exist"),
    "data path is a folder": (data(_folder_with_data), "is a folder, not a data file (it holds rows.jsonl)"),
    "data file of unknown type": (data(lambda t, _: (t / "rows.txt").write_text("hi") and t / "rows.txt"),
                                  "is a .txt file: give a .json, .jsonl, .csv or .parquet file"),
    "empty data file": (data(lambda t, _: (t / "e.json").write_text("[]") and t / "e.json"), "has no rows"),
    "broken JSON line": (data(lambda t, _: _jsonl(t / "b.jsonl", QA, {5: '{"question": "q" "answer": "a"}'})),
                         "line 5 is not valid JSON"),
    "broken JSON array": (data(lambda t, _: (t / "b.json").write_text('[\n{"question": "q",\n"answer": }\n]')
                               and t / "b.json"), "is not valid JSON: Expecting value at line 3"),
    "rows lacking a field": (over("data.fields.answer=reply"),
                             "64 row(s) lack field 'reply' (qa format 'answer'): rows [1, 2, 3, 4, 5] (and 59 more)"),
    "empty answers": (data(lambda t, _: _jsonl(t / "e.jsonl", [*QA[:3], {"question": "q", "answer": " "}])),
                      "1 row(s) lack field 'answer' (qa format 'answer'): rows [4]"),
    "answer is a dict in some rows": (data(lambda t, _: _jsonl(t / "d.jsonl", [*QA[:2], {"question": "q",
                                                                "answer": {"text": "a"}}])),
                                      "1 row(s) hold objects in field 'answer' ('answer'), not text: rows [3]"),
    "answer is a list in every row": (data(lambda t, _: _jsonl(t / "l.jsonl", [{"question": "q", "answer": ["a", "b"]}
                                                                               for _ in range(3)])),
                                      "3 row(s) hold lists in field 'answer' ('answer'), not text: rows [1, 2, 3]"),
    "answer is a dict in every row": (data(lambda t, _: _jsonl(t / "s.jsonl", [{"question": "q", "answer": {"t": "a"}}
                                                                               for _ in range(2)])),
                                      "2 row(s) hold objects in field 'answer'"),
    "rows that are not objects": (data(lambda t, _: (t / "n.json").write_text('[{"question": "q", "answer": "a"}, 3]')
                                       and t / "n.json"), "1 row(s) are not objects with fields: rows [2]"),
    "messages without assistant": (lambda t, tiny: ([f"data.path={_jsonl(t / 'm.jsonl', [{'messages': [{'role': 'user', 'content': 'hi'}]}] * 2)}",
                                                     "data.format=messages", "data.template=auto"], {}, {}),
                                   "row 1: 'messages' must be a list of {role, content} messages with at least one "
                                   "assistant message"),
    "every prompt too long": (over("data.max_seq_length=8"), "every row's prompt alone is >= data.max_seq_length=8"),
    "eval split leaves no training rows": (over("data.limit=1", "data.eval_fraction=0.5"),
                                           "data.eval_fraction=0.5 of 1 usable row(s) holds out 1, leaving no "
                                           "training rows"),
    # ---- the model
    "model folder without weights": (model(lambda t, tiny: _model_copy(t, tiny, drop=["*.safetensors"])),
                                     "has config.json but no weights"),
    "empty model folder": (model(lambda t, tiny: _model_copy(t, tiny, empty=True)), "is an empty folder"),
    "model folder without config": (model(lambda t, tiny: _model_copy(t, tiny, drop=["config.json"])),
                                    "has no config.json"),
    "model path missing": (over("model.name_or_path=/nonexistent/model"), "'/nonexistent/model' does not exist"),
    "model path is a file": (model(lambda t, tiny: tiny["data"]), "is a file, not a model folder"),
    "hub id, offline mode": (lambda t, tiny: (["model.name_or_path=scalesft-test/not-cached"], {},
                                              {"HF_HUB_OFFLINE": "1"}),
                             "'scalesft-test/not-cached' is not in the local HF cache and HF_HUB_OFFLINE is set"),
    "hub id, no network": (lambda t, tiny: (["model.name_or_path=scalesft-test/not-cached"], {},
                                            {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"}),
                           "cannot be reached (no network)"),
    # ---- output_dir, checked first
    "output_dir is a file": (lambda t, tiny: ([f"training.output_dir={_output_is_file(t, tiny)}"], {}, {}),
                             "is a file, not a folder"),
    "output_dir under a file": (lambda t, tiny: ([f"training.output_dir={_output_is_file(t, tiny) / 'sub'}"], {}, {}),
                                "cannot be created: '"),
    "output_dir cannot be created": (over("training.output_dir=/sys/scalesft-test-out"),
                                     "cannot be created in '/sys' (Permission denied)"),
    "output_dir not writable": (over("training.output_dir=/sys/kernel"), "is not writable (Permission denied)"),
    # ---- the CLI
    "no recipe argument": ("cli", lambda t, tiny: ["train"], "scalesft train: the following arguments are required"),
    "unknown option": ("cli", lambda t, tiny: ["train", str(t / "r.yaml"), "--bogus"],
                       "unrecognized arguments: --bogus"),
    "unknown subcommand": ("cli", lambda t, tiny: ["trian"], "invalid choice: 'trian'"),
    "generate without an adapter": ("cli", lambda t, tiny: ["generate", str(_unfinished_run(t, tiny)), "hi"],
                                    "holds no adapter yet (no adapter_config.json)"),
    "generate on a missing folder": ("cli", lambda t, tiny: ["generate", str(t / "nothing"), "hi"], "is not a folder"),
}


def _no_model_loading(monkeypatch):
    import transformers

    def trap(*a, **k):
        raise AssertionError("model weights were loaded before the error")

    monkeypatch.setattr("scalesft.trainer.model.load_model", trap)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", trap)


def _case(name, tmp_path, tiny):
    """(kind, argv for launch.cli / trainer.train, env, output_dir)"""
    spec, expected = CASES[name][:-1], CASES[name][-1]
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny, out)
    if spec[0] == "recipe":
        return "train", [str(spec[1](tmp_path, tiny))], {}, out, expected
    if spec[0] == "cli":
        return "cli", spec[1](tmp_path, tiny), {}, out, expected
    overrides, sections, env = spec[0](tmp_path, tiny)
    if sections:
        recipe = write_recipe(recipe, tiny, out, **sections)
    for o in overrides:
        if o.startswith("training.output_dir="):
            out = Path(o.split("=", 1)[1])
    return "train", [str(recipe), *overrides], env, out, expected


def _snapshot(out: Path):
    if not out.exists():
        return None
    if out.is_file():
        return out.read_bytes()
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")) if os.access(out, os.W_OK) and \
        not str(out).startswith("/sys") else "system"


def _assert_one_line(rc, err: str, expected: str):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc not in (0, None), (rc, err)
    assert len(lines) == 1 and lines[0].startswith("scalesft: error: "), err
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_before_anything_loads(name, tiny, tmp_path, capfd, monkeypatch):
    from scalesft.launch.cli import main as cli
    from scalesft.trainer.train import main as train_main

    kind, argv, env, out, expected = _case(name, tmp_path, tiny)
    for k, v in env.items():
        monkeypatch.setenv(k, v) if v else monkeypatch.delenv(k, raising=False)
    if "HF_HUB_OFFLINE" in env:
        from scalesft.trainer import hub
        monkeypatch.setattr(hub, "_HUB_STATE", {})
    _no_model_loading(monkeypatch)
    before = _snapshot(out)
    capfd.readouterr()
    start = time.monotonic()
    try:
        rc = cli(argv) if kind == "cli" else train_main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    took = time.monotonic() - start
    _assert_one_line(rc, capfd.readouterr().err, expected)
    assert _snapshot(out) == before, f"{out} changed"
    assert took < 20, f"{name}: {took:.1f} s"


def test_json_with_a_bom_reads_like_csv_with_one(tmp_path):
    from scalesft.core.recipe import DataConfig
    from scalesft.trainer.data import read_rows

    for name, text in (("bom.json", json.dumps(QA, ensure_ascii=False)),
                       ("bom.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in QA)),
                       ("one.json", json.dumps({"data": QA}, ensure_ascii=False, indent=1))):
        f = tmp_path / name
        f.write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert read_rows(DataConfig(path=str(f))) == QA, name
    csv = tmp_path / "bom.csv"
    csv.write_bytes(b"\xef\xbb\xbfquestion,answer\n" + "\n".join(f"{r['question']},{r['answer']}" for r in QA).encode())
    assert read_rows(DataConfig(path=str(csv))) == QA


def _subprocess(argv, env=None, drop_root_powers=False, cwd=REPO):
    """`python -m launch.cli ARGV` in a fresh interpreter. drop_root_powers: without the capabilities that let
    root ignore file permissions (when the tests run as root), so a chmod means what it means for any user."""
    full = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    prefix = []
    if drop_root_powers and os.geteuid() == 0:
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    return subprocess.run([*prefix, sys.executable, "-m", "scalesft.launch.cli", *argv], env=full, cwd=cwd,
                          capture_output=True, text=True, timeout=240)


def test_no_third_party_noise_before_the_error_line(tiny, tmp_path):
    """A fresh interpreter: peft imports bitsandbytes, whose CPU backend logs "Failed to load CPU gemm_4bit_forward
    from kernels-community"; that line and argparse's usage dump must not precede scalesft's line."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny, tmp_path / "out", quantization={"bits": 4})
    run = _subprocess(["train", str(recipe), "data.max_seq_length=8"])
    _assert_one_line(run.returncode, run.stderr, "every row's prompt alone is >= data.max_seq_length=8")
    run = _subprocess(["train"])
    _assert_one_line(run.returncode, run.stderr, "the following arguments are required: recipe")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root without setpriv")
def test_unreadable_data_and_unwritable_output_dir(tiny, tmp_path):
    """Through the CLI in a fresh process that file permissions bind (see _subprocess)."""
    data = _jsonl(tmp_path / "rows.jsonl", QA)
    locked = tmp_path / "locked"
    locked.mkdir()
    recipe = write_recipe(tmp_path / "r.yaml", {"model": tiny["model"], "data": data}, tmp_path / "out")
    try:
        data.chmod(0o000)
        run = _subprocess(["train", str(recipe)], drop_root_powers=True)
        _assert_one_line(run.returncode, run.stderr, f"data.path '{data}' cannot be read (Permission denied)")
        data.chmod(0o644)
        locked.chmod(0o555)
        run = _subprocess(["train", str(recipe), f"training.output_dir={locked}"], drop_root_powers=True)
        _assert_one_line(run.returncode, run.stderr, f"training.output_dir '{locked}' is not writable (Permission denied)")
        assert not (tmp_path / "out").exists() and list(locked.iterdir()) == []
    finally:
        data.chmod(0o644)
        locked.chmod(0o755)


def test_recipe_yaml_keeps_its_other_meanings():
    """Duplicate keys are refused at any depth; everything else parses as yaml.safe_load does."""
    from scalesft.core.recipe import RecipeError, parse_yaml

    text = "a: {b: 1, c: [1, 2]}\nd: 2e-4\n"
    assert parse_yaml(text) == yaml.safe_load(text)
    with pytest.raises(RecipeError, match="key 'b' appears twice"):
        parse_yaml("a:\n  b: 1\n  b: 2\n")
