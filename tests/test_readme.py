"""Every command the README and the config docstrings show parses: its program knows each
flag as spelled, and a training command's ``--config`` file and ``--config.KEY`` overrides
load and validate. Nothing is run (each program's parser is taken at `cli.main`)."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from jaxembed import cli
from jaxembed import config as config_lib

ROOT = Path(__file__).resolve().parents[1]
# A command line of a code block: at the start of a line (after the launcher, if any).
COMMAND = re.compile(r"^[ \t]*(?:[\w./]*/)?python -m (jaxembed[\w.]*)((?:[^\n]*\\\n)*[^\n]*)", re.M)


def commands(text: str) -> list[tuple[str, list[str]]]:
    """``(module, argv)`` of every ``python -m jaxembed.X ...`` command (continued lines
    joined, comments and shell redirections dropped)."""
    text = text.replace("\\\\\n", "\\\n")  # a docstring's escaped line continuation
    out = []
    for module, rest in COMMAND.findall(text):
        line = rest.replace("\\\n", " ").split("#")[0].split("|")[0]
        out.append((module, shlex.split(line)))
    return out


DOCS = [ROOT / "README.md", *sorted((ROOT / "configs").glob("*.py"))]
CASES = [(doc.name, m, argv) for doc in DOCS for m, argv in commands(doc.read_text())]


def test_the_docs_show_every_program():
    shown = {m for _, m, _ in CASES}
    programs = {"jaxembed.train", "jaxembed.convert", "jaxembed.evaluate", "jaxembed.mine"}
    programs |= {"jaxembed.merge", "jaxembed.score"}
    assert programs <= shown, programs - shown


@pytest.mark.parametrize(("doc", "module", "argv"), CASES, ids=lambda x: str(x)[:40])
def test_command_parses(doc, module, argv, monkeypatch):
    parsed = {}

    def parse_only(parser, run, args=None, extra=False):
        if extra:
            ns, rest = parser.parse_known_args(args)
            ns.extra = rest
        else:
            ns = parser.parse_args(args)
        parsed["args"] = ns
        return 0

    monkeypatch.setattr(cli, "main", parse_only)
    program = importlib.import_module(module)
    entry = getattr(program, "cli", None) if module == "jaxembed.train" else program.main
    entry(argv)
    args = parsed["args"]
    if module == "jaxembed.train":
        config = config_lib.load(str(ROOT / args.config))
        for key, text in config_lib.parse_overrides(args.extra):
            config_lib.override(config, key, text)
        if not config.model.path:
            config.model.path = "/a/model/folder"  # recipes leave it to the command line
        config_lib.validate(config)
