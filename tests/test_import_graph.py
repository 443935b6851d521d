"""The package graph runs one way: contract <- data_pipeline, contract <- pretrain.model, pretrain <- all.

Two views: the source (every import statement, also inside functions, via bench/import_graph.py) and
what importing a module really loads (a fresh interpreter each, so sys.modules starts clean).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_no_import_against_the_direction_in_the_source() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench/import_graph.py"), "--check"], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 imports against the direction" in r.stdout
    assert "| data_pipeline | contract |" in r.stdout and "| pretrain.model | contract |" in r.stdout


def test_the_checker_sees_a_reverse_import(tmp_path: Path) -> None:
    """bench/import_graph.py flags a data_pipeline module importing the model, also from inside a function."""
    for pkg, body in {"contract": "", "pretrain": "", "pretrain/model": "",
                      "data_pipeline": "def f():\n    from pretrain.model import Transfusion\n"}.items():
        (tmp_path / pkg).mkdir(parents=True, exist_ok=True)
        (tmp_path / pkg / "__init__.py").write_text(body)
    r = subprocess.run([sys.executable, str(ROOT / "bench/import_graph.py"), "--root", str(tmp_path), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "data_pipeline/__init__.py:2 (local): data_pipeline imports pretrain.model" in r.stdout


@pytest.mark.parametrize(
    "module, forbidden",
    [
        ("contract.batch, contract.special_ids, contract.latents, contract.dist_env", ("data_pipeline", "pretrain")),
        ("data_pipeline.loader, data_pipeline.pack, data_pipeline.precompute, data_pipeline.demo_data", ("pretrain",)),
        ("pretrain.model", ("data_pipeline", "pretrain.config", "pretrain.configlib", "pretrain.train",
                            "pretrain.engine", "pretrain.distributed", "deepspeed")),
    ],
)
def test_importing_loads_nothing_upstream(module: str, forbidden: tuple[str, ...]) -> None:
    code = (f"import sys, {module}\n"
            f"bad = sorted(m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in {forbidden!r}))\n"
            "print(bad)\nsys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, f"importing {module} loaded {r.stdout.strip()} {r.stderr[-2000:]}"
