"""The package's shape, checked on the source: imports run one way (launch -> core <- trainer), the core is pure, no
module pair imports each other (lazy, in-function imports included), and the installed distribution claims one
top-level name, scalesft."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"core": "scalesft.core", "launch": "scalesft.launch", "trainer": "scalesft.trainer"}
HEAVY = {"torch", "transformers", "peft", "trl", "accelerate", "deepspeed", "bitsandbytes", "datasets", "numpy",
         "pyarrow", "wandb", "huggingface_hub"}


def modules() -> dict[str, Path]:
    return {f"{pkg}.{p.stem}" if p.stem != "__init__" else pkg: p
            for folder, pkg in FOLDERS.items() for p in sorted((ROOT / folder).glob("*.py"))}


def imported(name: str, path: Path) -> set[str]:
    """Every module `name` imports, at module level or inside functions, as absolute names."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {i for i in imported(m, p) if i in mods and i != m} for m, p in mods.items()}


def test_trainer_never_imports_launch_and_core_imports_neither():
    for name, path in modules().items():
        deps = imported(name, path)
        generic = sorted(d for d in deps if d.split(".")[0] in FOLDERS)
        assert not generic, f"{name} imports generic top-level names {generic}: import scalesft.* instead"
        if name.startswith("scalesft.trainer"):
            assert not [d for d in deps if d.startswith("scalesft.launch")], name
        if name.startswith("scalesft.core"):
            outside = sorted(d for d in deps if d.startswith("scalesft.") and not d.startswith("scalesft.core"))
            assert not outside, f"{name} imports {outside}"


def test_no_import_circles():
    g = graph()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(g[m]):
            if state.get(d) == 1:
                cycle = path[path.index(d):] + [d] if d in path else [m, d]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])


def test_core_is_pure():
    """No torch (or any ML library) and no environment reads in the core: its answers depend on its arguments."""
    for name, path in modules().items():
        if not name.startswith("scalesft.core"):
            continue
        heavy = sorted(d for d in imported(name, path) if d.split(".")[0] in HEAVY)
        assert not heavy, f"{name} imports {heavy}"
        tree = ast.parse(path.read_text())
        reads = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in ("environ", "getenv")]
        assert not reads, f"{name} reads the environment at lines {reads}"
    code = ("import sys, scalesft.core.recipe, scalesft.core.strategy, scalesft.core.memory, scalesft.core.batch, "
            "scalesft.core.flops, scalesft.core.secrets; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            f"{sorted(HEAVY)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.slow
def test_the_wheel_installs_only_the_scalesft_name(tmp_path):
    """`pip wheel .`: one top-level package, scalesft, holding core/launch/trainer; `scalesft` the console script."""
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    (wheel,) = tmp_path.glob("scalesft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"scalesft"}, tops
    for pkg in ("core", "launch", "trainer"):
        assert f"scalesft/{pkg}/__init__.py" in names
    info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "scalesft = scalesft.launch.cli:main" in zipfile.ZipFile(wheel).read(info).decode()
