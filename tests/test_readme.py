"""Every command the README and the config docstrings show parses: its program knows each
flag as spelled, and a training command's ``--config`` file and ``--config.KEY`` overrides
load and validate. Nothing is run (each program's parser is taken at `cli.main`)."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
from helpers import assert_close

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
        overrides = config_lib.parse_overrides(args.extra)
        for key, text in overrides:
            config_lib.override(config, key, text)
        if not config.model.path:
            config.model.path = "/a/model/folder"  # recipes leave it to the command line
        config_lib.validate(config)
        for key, text in overrides:  # the value the docs show is the value the run gets
            value = config
            for part in key.split("."):
                value = value[part]
            assert shown_value(value) == shown_value(text, like=value), (key, text, value)


def shown_value(value, like=None):
    """A config value as the docs would write it, for comparing a ``--config.KEY=TEXT``
    with the value it set: tuples as lists of strings, numbers as floats, booleans."""
    like = value if like is None else like
    if isinstance(value, str) and not isinstance(like, str):
        if isinstance(like, bool):
            return value.strip().lower() in ("true", "1", "yes")
        if isinstance(like, (int, float)):
            return float(value)
        text = value.strip("()[] ")
        return [t.strip().strip("'\"") for t in text.split(",") if t.strip()]
    if isinstance(value, (tuple, list)):
        return [str(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def test_train_on_your_data_runs_as_the_readme_says(tmp_path):
    """The README's "Train on your data" commands, run as written on a hand-written
    200-row JSONL with its own negatives (a tiny model and 2 steps stand in for yours and
    1000), then the export loads in sentence-transformers and encodes as `jaxembed.load`."""
    import json
    import subprocess
    import sys

    from helpers import save_tiny_with_tokenizer
    from sentence_transformers import SentenceTransformer

    import jaxembed

    section = (ROOT / "README.md").read_text().split("## Train on your data")[1]
    script = section.split("```bash\n")[1].split("```")[0]
    # The demo config's lengths (64 / 128 tokens) need 128 positions.
    model = save_tiny_with_tokenizer("bert", tmp_path / "model", max_position_embeddings=128)
    rows = [
        {"query": f"how do I use tool {i}?", "positive": f"Tool {i} does job {i}.",
         "negatives": [f"Tool {i + 1} does job {i + 1}."]}
        for i in range(200)
    ]  # fmt: skip
    (tmp_path / "my_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for old, new in (
        (".venv/bin/python", sys.executable),
        ("my_pairs.jsonl", str(tmp_path / "my_pairs.jsonl")),
        ("runs/mine", str(tmp_path / "run")),
        ("exported/mine", str(tmp_path / "exported")),
        ("/path/to/a/local/hf-or-sentence-transformers-folder", str(model)),
        ("--config.train.steps=1000", "--config.train.steps=2"),
    ):
        assert old in script, old
        script = script.replace(old, new)
    done = subprocess.run(["bash", "-ec", script], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    st = SentenceTransformer(str(tmp_path / "exported"), device="cpu", local_files_only=True)
    texts = ["how do I use tool 3?", "Tool 3 does job 3."]
    ours = jaxembed.load(tmp_path / "run").encode(texts)
    assert_close(st.encode(texts), ours)
