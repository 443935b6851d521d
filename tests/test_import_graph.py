"""The import graph runs one way, between packages and between the rooms of pretrain/.

contract <- data_pipeline, contract <- pretrain.model, and inside pretrain/:
plan <- train <- artifacts <- inference <- evaluation; the apps (`__main__` modules, pretrain.demo) join them.
Two views: the source (every import statement, also inside functions, via ci/import_graph.py) and
what importing a module really loads (a fresh interpreter each, so sys.modules starts clean).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKER = ROOT / "ci/import_graph.py"


def test_no_import_against_the_direction_in_the_source() -> None:
    r = subprocess.run([sys.executable, str(CHECKER), "--check"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 imports against the direction" in r.stdout
    for edge in ("| data_pipeline | contract |", "| pretrain.model | contract |", "| pretrain.train | pretrain.plan |",
                 "| pretrain.artifacts | pretrain.train |", "| pretrain.evaluation | pretrain.inference |",
                 "| apps | pretrain.artifacts |"):
        assert edge in r.stdout, edge
    # the loop reaches sampling, evaluation and init_from only through its hooks
    for reverse in ("| pretrain.train | pretrain.inference |", "| pretrain.train | pretrain.evaluation |",
                    "| pretrain.train | pretrain.artifacts |", "| pretrain.plan | pretrain.train |"):
        assert reverse not in r.stdout, reverse


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, body in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(body)


def test_the_checker_sees_a_reverse_import(tmp_path: Path) -> None:
    """ci/import_graph.py flags a data_pipeline module importing the model, also from inside a function."""
    _tree(tmp_path, {"contract/__init__.py": "", "pretrain/__init__.py": "", "pretrain/model/__init__.py": "",
                     "data_pipeline/__init__.py": "def f():\n    from pretrain.model import Transfusion\n"})
    r = subprocess.run([sys.executable, str(CHECKER), "--root", str(tmp_path), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 1 and "data_pipeline/__init__.py:2 (local): data_pipeline imports pretrain.model" in r.stdout


def test_the_checker_sees_the_loop_importing_a_tool_and_lets_the_entry_point(tmp_path: Path) -> None:
    """A training-room module importing generation is flagged; the same import in train/__main__.py is not."""
    files = {"contract/__init__.py": "", "pretrain/__init__.py": "", "pretrain/model/__init__.py": "",
             "data_pipeline/__init__.py": "", "pretrain/inference/__init__.py": "",
             "pretrain/inference/generate.py": "",
             "pretrain/train/__init__.py": "",
             "pretrain/train/__main__.py": "from pretrain.inference.generate import x\n",
             "pretrain/train/loop.py": "from pretrain.inference import generate\n"}
    _tree(tmp_path, files)
    r = subprocess.run([sys.executable, str(CHECKER), "--root", str(tmp_path), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 1, r.stdout
    assert "pretrain/train/loop.py:1: pretrain.train imports pretrain.inference.generate" in r.stdout
    assert "__main__.py:1:" not in r.stdout.split("imports against the direction")[1]


@pytest.mark.parametrize(
    "module, forbidden",
    [
        ("contract.batch, contract.special_ids, contract.latents, contract.dist_env", ("data_pipeline", "pretrain")),
        ("data_pipeline.loader, data_pipeline.pack, data_pipeline.precompute, data_pipeline.demo_data", ("pretrain",)),
        ("pretrain.model", ("data_pipeline", "pretrain.config", "pretrain.configlib", "pretrain.train",
                            "pretrain.plan", "deepspeed")),
        ("pretrain.plan.estimate, pretrain.plan.batch", ("pretrain.train", "pretrain.artifacts", "pretrain.inference",
                                                         "pretrain.evaluation", "deepspeed")),
        ("pretrain.train.loop", ("pretrain.artifacts", "pretrain.inference", "pretrain.evaluation")),
    ],
)
def test_importing_loads_nothing_upstream(module: str, forbidden: tuple[str, ...]) -> None:
    code = (f"import sys, {module}\n"
            f"bad = sorted(m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in {forbidden!r}))\n"
            "print(bad)\nsys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, f"importing {module} loaded {r.stdout.strip()} {r.stderr[-2000:]}"


@pytest.mark.slow  # imports DeepSpeed, diffusers, transformers... in one interpreter: 20-100 s
def test_every_module_imports_under_the_installed_torch_and_it_meets_the_declared_minimum() -> None:
    """Every module of contract, data_pipeline and pretrain imports (a pkgutil walk in a fresh interpreter), so
    an API missing from the installed torch/DeepSpeed (e.g. torch.nn.utils.get_total_norm, torch 2.6) shows at
    import; and the installed torch satisfies pyproject's `torch>=` minimum (CI pins one version in
    ci/requirements.txt: this catches a pin below what pyproject declares)."""
    import re

    code = ("import importlib, pkgutil, sys\n"
            "names = []\n"
            "for pkg in ('contract', 'data_pipeline', 'pretrain'):\n"
            "    mod = importlib.import_module(pkg)\n"
            "    names += [pkg] + [m.name for m in pkgutil.walk_packages(mod.__path__, pkg + '.')]\n"
            "failed = []\n"
            "for n in names:\n"
            "    try:\n"
            "        importlib.import_module(n)\n"
            "    except Exception as e:\n"
            "        failed.append(f'{n}: {type(e).__name__}: {e}')\n"
            "print(len(names)); print('\\n'.join(failed)); sys.exit(1 if failed else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert int(r.stdout.split()[0]) > 50  # the walk found the modules
    import torch

    minimum = re.search(r'"torch>=([\d.]+)', (ROOT / "pyproject.toml").read_text()).group(1)
    have = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    assert have >= tuple(int(x) for x in minimum.split(".")[:2]), (torch.__version__, minimum)
    assert hasattr(torch.nn.utils, "get_total_norm")  # the newest API the code calls (added in torch 2.6)
