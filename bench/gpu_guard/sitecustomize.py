"""Import guard of the CPU rehearsal (bash bench/gpu_session.sh --rehearse): the GPU machine's Python sees
only its image's packages (bench/gpu_wheels.image.txt) and the carried wheels (bench/gpu_wheels.txt), so
here any other installed distribution's modules are not found (ModuleNotFoundError, find_spec None),
as there. Code that try-imports an optional package takes its fallback, as it will there; a hard import
of a package missing from both lists fails the rehearsal, naming it. Loaded as `sitecustomize` by
every Python process started with bench/gpu_guard first on PYTHONPATH (torchrun's ranks too).
Stdlib modules and this repository's packages are never blocked.
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata as md
from importlib.machinery import PathFinder
import re
import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _allowed() -> set[str]:
    names = set()
    for f in ("gpu_wheels.image.txt", "gpu_wheels.txt"):
        for line in (_BENCH / f).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                names.add(_norm(line.split("==")[0].split()[0]))
    return names


class _Guard(importlib.abc.MetaPathFinder):
    """Stands in for PathFinder on sys.meta_path: a blocked top-level name is not found (find_spec None), so
    `import x` raises ModuleNotFoundError and importlib.util.find_spec('x') says absent, as on the GPU machine."""

    def __init__(self) -> None:
        self.allowed = _allowed() | {"transfusion-pretrain"}
        self.blocked: set[str] = set()
        for module, dists in md.packages_distributions().items():
            norm = [_norm(d) for d in dists]
            if module not in sys.modules and not any(d in self.allowed for d in norm):
                self.blocked.add(module)

    def find_spec(self, fullname: str, path: object = None, target: object = None):  # noqa: ANN201
        if fullname.partition(".")[0] in self.blocked:
            return None
        return PathFinder.find_spec(fullname, path, target)

    def find_distributions(self, *args: object, **kw: object):  # noqa: ANN201
        """importlib.metadata sees only the allowed distributions' metadata."""
        for d in PathFinder.find_distributions(*args, **kw):
            if _norm(d.metadata["Name"] or "") in self.allowed:
                yield d

    def invalidate_caches(self) -> None:
        PathFinder.invalidate_caches()


sys.meta_path[:] = [_Guard() if f is PathFinder else f for f in sys.meta_path]
