"""Issue 29.4: every CLI's --help shows its defaults.

Walks every module of data_pipeline/ and pretrain/ that builds an argparse parser, builds the parser
through the module's own `main` (argparse's parse_args is intercepted, so nothing runs), and checks
that each option with a default (not None, not an on/off flag) shows it in its --help text: either
argparse.ArgumentDefaultsHelpFormatter's "(default: ...)" or the help's own "%(default)s" / "default: ...".
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI_MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts)
    for top in ("data_pipeline", "pretrain") for p in (ROOT / top).rglob("*.py")
    if re.search(r"ArgumentParser\((?!add_help=False)", p.read_text(encoding="utf-8"))  # not an inner parser
)


class _Built(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def build_parser(module: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The parser `module.main` builds: its first parse_args/parse_known_args call raises it back."""
    def capture(self, *args, **kwargs):
        raise _Built(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    mod = importlib.import_module(module)
    main = getattr(mod, "main", None)
    assert callable(main), f"{module}: builds an ArgumentParser but has no main() to build it"
    takes_argv = bool(inspect.signature(main).parameters)  # a main() without argv reads sys.argv
    try:
        main(["--help"]) if takes_argv else main()
    except _Built as built:
        return built.parser
    raise AssertionError(f"{module}.main never parsed its arguments")


def undocumented_defaults(parser: argparse.ArgumentParser) -> list[str]:
    """Options whose default is a value (not None or empty) but whose --help text does not show it."""
    formatter = parser._get_formatter()
    missing = []
    for action in parser._actions:
        if not action.option_strings or action.default in (None, argparse.SUPPRESS, [], "") or action.nargs == 0:
            continue  # positionals, no default (or an empty list), --help, store_true/false/const flags
        shown = formatter._expand_help(action) if action.help else ""
        if "default" not in shown.lower():
            missing.append(f"{'/'.join(action.option_strings)} (default {action.default!r}): help {shown!r}")
    return missing


def test_the_walk_finds_the_documented_commands() -> None:
    for cli in ("data_pipeline.vae", "data_pipeline.precompute", "data_pipeline.pack", "data_pipeline.tokenizer",
                "data_pipeline.demo_data", "pretrain.demo", "pretrain.evaluation.evaluate",
                "pretrain.inference.generate",
                "pretrain.artifacts.export", "pretrain.plan.estimate"):
        assert cli in CLI_MODULES, cli


@pytest.mark.parametrize("module", CLI_MODULES)
def test_every_option_with_a_default_shows_it_in_help(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser(module, monkeypatch)
    assert undocumented_defaults(parser) == [], f"python -m {module} --help hides these defaults"


def test_the_check_catches_a_hidden_default() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)  # no help: no default shown
    ap.add_argument("--lr", type=float, default=0.1, help="learning rate")  # plain formatter: not shown
    ap.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    ap.add_argument("--fast", action="store_true")
    assert [m.split(" ")[0] for m in undocumented_defaults(ap)] == ["--steps", "--lr"]
