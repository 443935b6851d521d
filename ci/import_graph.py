"""Which room imports which: the import graph between the layers of this repository, from the source.

Layers, lowest first: `contract` (the shared leaf); `data_pipeline` and `pretrain.model` (the
single-device model), which know only the contract; `pretrain.config` (config + configlib, which
holds data_pipeline's DataConfig); then
the rooms of pretrain/ by job, each allowed to import the rooms before it:
`pretrain.plan` (batch plan, estimates, dry run) <- `pretrain.train` (loop, engine, checkpoints)
<- `pretrain.artifacts` (export, HF Llama, init_from) <- `pretrain.inference` (generation)
<- `pretrain.evaluation` (evaluate, judge, FID). The apps (`pretrain.demo` and every `__main__`
module, e.g. pretrain/train/__main__.py that joins the trainer's hooks) may import any room.
Every import statement counts, also those inside functions (a lazy import is still a dependency).

    python ci/import_graph.py [--root CHECKOUT] [--check]

Reads files as text (ast), imports nothing, so it runs on any checkout, old or new: give `--root`.
Prints a table of layer -> layer edges (module-level and local imports) and every import that
breaks the direction; `--check` exits 1 when there is one (tests/test_import_graph.py runs it).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOMS = ("pretrain.plan", "pretrain.train", "pretrain.artifacts", "pretrain.inference", "pretrain.evaluation")
LAYERS = ("contract", "data_pipeline", "pretrain.model", "pretrain.config", *ROOMS, "apps")
BASE = {"contract", "data_pipeline", "pretrain.model", "pretrain.config"}
ALLOWED: dict[str, set[str]] = {
    "contract": set(),
    "data_pipeline": {"contract"},
    "pretrain.model": {"contract"},
    "pretrain.config": {"contract", "data_pipeline", "pretrain.model"},
    **{room: BASE | set(ROOMS[:i]) for i, room in enumerate(ROOMS)},
    "apps": set(LAYERS) - {"apps"},
}
APPS = ("pretrain.demo",)


def layer_of(module: str) -> str | None:
    """The layer a dotted module name belongs to (None: not ours)."""
    if module in APPS or module.endswith(".__main__"):
        return "apps"
    if module in ("pretrain", "pretrain.config", "pretrain.configlib"):
        return "pretrain.config"
    for layer in LAYERS:
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path: Path, module: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level?) for every import statement of a file."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level] if not path.name == "__init__.py" else module.split(".")
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            # `from pkg import sub` may import the submodule pkg.sub: count both names
            out += [(f"{name}.{a.name}", node.lineno, id(node) in top) for a in node.names]
    return out


def graph(root: Path) -> tuple[dict[tuple[str, str], list[str]], list[str]]:
    """Edges (from layer, to layer) -> ["file:line (local)"...], and the list of violations."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)  # one entry per import statement
    bad = []
    for top in ("contract", "data_pipeline", "pretrain"):
        for path in sorted((root / top).rglob("*.py")) if (root / top).is_dir() else []:
            mod = module_name(root, path)
            src = layer_of(mod)
            for name, line, at_top in imports(path, mod):
                dst = layer_of(name)
                if dst is None or dst == src or src is None:
                    continue
                where = f"{path.relative_to(root)}:{line}" + ("" if at_top else " (local)")
                if where not in edges[(src, dst)]:
                    edges[(src, dst)].append(where)
                if dst not in ALLOWED[src]:
                    bad.append(f"{where}: {src} imports {name} ({dst}); allowed for {src}: "
                               f"{', '.join(sorted(ALLOWED[src])) or 'nothing of ours'}")
    return edges, sorted(set(bad))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="checkout to read")
    ap.add_argument("--check", action="store_true", help="exit 1 if an import breaks the direction")
    a = ap.parse_args(argv)
    edges, bad = graph(a.root)
    print(f"import graph of {a.root} (layers: {', '.join(LAYERS)})\n")
    print("| from | to | module-level | local (inside functions) | allowed |\n|---|---|---|---|---|")
    for (src, dst), where in sorted(edges.items()):
        local = sum(w.endswith("(local)") for w in where)
        print(f"| {src} | {dst} | {len(where) - local} | {local} | {'yes' if dst in ALLOWED[src] else 'NO'} |")
    print(f"\n{len(bad)} imports against the direction" + (":" if bad else ""))
    for b in bad:
        print(f"  {b}")
    locals_ = [w for (src, dst), ws in sorted(edges.items()) for w in ws if w.endswith("(local)")]
    if locals_:
        print(f"\n{len(locals_)} cross-layer imports inside functions:")
        for w in locals_:
            print(f"  {w}")
    return 1 if (a.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
