"""Atomic writes: a file is replaced whole or not at all."""

import json

import numpy as np
import pytest

from jaxembed.files import atomic_open, atomic_write_text, write_jsonl


def test_atomic_open_keeps_the_previous_file(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("old\n")
    with pytest.raises(KeyboardInterrupt), atomic_open(path) as f:
        f.write("half")
        raise KeyboardInterrupt
    assert path.read_text() == "old\n"
    assert list(tmp_path.iterdir()) == [path]


def test_binary_and_text_writes_replace_the_file(tmp_path):
    path = tmp_path / "sub" / "a.npy"
    with atomic_open(path, "wb") as f:
        np.save(f, np.arange(3))
    assert np.load(path).tolist() == [0, 1, 2]
    atomic_write_text(tmp_path / "t.txt", "é\n")
    assert (tmp_path / "t.txt").read_bytes() == "é\n".encode()
    assert write_jsonl(tmp_path / "r.jsonl", [{"q": "ü"}, {"q": 2}]) == 2
    lines = (tmp_path / "r.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines == ['{"q": "ü"}', '{"q": 2}'] and json.loads(lines[0]) == {"q": "ü"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl", "sub", "t.txt"]
    with pytest.raises(ValueError, match="mode 'w' or 'wb'"), atomic_open(path, "a"):
        pass
