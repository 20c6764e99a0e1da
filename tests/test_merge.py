"""``python -m jaxembed.merge``: averaging, souping, slerp, parameter groups, the outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import assert_close, save_tiny_with_tokenizer

import jaxembed
from jaxembed import merge, trained_model
from jaxembed import workdir as workdir_lib
from jaxembed.hf.io import read_weights

TEXTS = ["network tool number 3", "A package about python: utility 1.", "?!"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    a = save_tiny_with_tokenizer("bert", root / "a", num_hidden_layers=1)
    b = save_tiny_with_tokenizer("bert", root / "b", num_hidden_layers=1)
    # save_tiny_hf seeds torch with 0 by default: make b differ by re-seeding its weights.
    from helpers import save_tiny_hf

    save_tiny_hf("bert", b, seed=1, vocab_size=30522, num_hidden_layers=1)
    return a, b


def test_weighted_average_of_two_folders(folders, tmp_path):
    a, b = folders
    out = tmp_path / "soup"
    args = ["--inputs", str(a), str(b), "--weights", "3,1", "--out", str(out)]
    assert merge.main(args) == 0
    wa, wb, got = read_weights(a), read_weights(b), read_weights(out)
    key = "encoder.layer.0.attention.self.query.weight"
    np.testing.assert_allclose(got[key], 0.75 * wa[key] + 0.25 * wb[key], atol=1e-7)
    card = (out / "README.md").read_text()
    assert "average" in card and "0.75" in card and str(b) in card
    # The folder is a plain sentence-transformers folder.
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(str(out), device="cpu").encode(TEXTS, normalize_embeddings=True)
    assert_close(jaxembed.load(out).encode(TEXTS), ref)


def test_slerp_and_parameter_groups(folders, tmp_path):
    a, b = folders
    first, flat, recipe = merge.merge([str(a), str(b)], method="slerp", t=0.3)
    key = "encoder.layer.0.intermediate.dense.kernel"
    x, y = first.params[key].astype(np.float64), merge.load(str(b)).params[key].astype(np.float64)
    theta = np.arccos(np.vdot(x, y) / np.linalg.norm(x) / np.linalg.norm(y))
    want = (np.sin(0.7 * theta) * x + np.sin(0.3 * theta) * y) / np.sin(theta)
    np.testing.assert_allclose(flat[key], want, atol=1e-6)
    # Nearly parallel tensors interpolate linearly; t=0 is the first input.
    np.testing.assert_allclose(merge.slerp(0.5, x, 1.0001 * x), 1.00005 * x, rtol=1e-9)
    _, at_zero, _ = merge.merge([str(a), str(b)], method="slerp", t=0.0)
    assert all(np.allclose(at_zero[k], first.params[k], atol=1e-7) for k in first.params)
    # --only: the attention merged, everything else the first input's.
    _, part, recipe = merge.merge([str(a), str(b)], only=[r"attention\.self\."])
    assert 0 < recipe["merged_tensors"] < recipe["tensors"]
    changed = {k for k, v in part.items() if not np.array_equal(v, first.params[k])}
    assert changed and all("attention.self." in k for k in changed)
    assert "encoder.layer.0.attention.self.query.kernel" in changed


def test_mismatched_inputs_name_the_first_differing_tensor(folders, tmp_path):
    a, _ = folders
    wider = save_tiny_with_tokenizer(
        "bert", tmp_path / "wider", num_hidden_layers=1, intermediate_size=40
    )
    with pytest.raises(
        ValueError,
        match=r"not the same architecture: tensor "
        r"'encoder.layer.0.intermediate.dense.bias' is \(37,\) in the first, "
        r"\(40,\) in the second",
    ):
        merge.merge([str(a), str(wider)])
    with pytest.raises(ValueError, match="slerp takes exactly two inputs"):
        merge.merge([str(a), str(a), str(a)], method="slerp")
    with pytest.raises(ValueError, match="selects no parameter"):
        merge.merge([str(a), str(a)], only=["nothing-like-this"])


def test_last_checkpoints_of_a_run_to_a_folder_and_to_a_run(straight_run, tmp_path):
    workdir, _ = straight_run
    steps = merge.last_steps(str(workdir), 2)
    models = [trained_model.restore_model(workdir_lib.find_checkpoint(s)) for s in steps]
    out = tmp_path / "avg"
    assert merge.main(["--run", str(workdir), "--last", "2", "--out", str(out)]) == 0
    kernel = np.asarray(models[0].encoder.layer[0].output.dense.kernel[...])
    kernel = (kernel + np.asarray(models[1].encoder.layer[0].output.dense.kernel[...])) / 2
    got = read_weights(out)["encoder.layer.0.output.dense.weight"]
    np.testing.assert_allclose(got, kernel.T, atol=1e-7)
    # The same merge as a run: loads, converts and embeds as the folder does.
    as_run = tmp_path / "avg-run"
    args = ["--run", str(workdir), "--last", "2", "--out", str(as_run), "--format", "run"]
    assert merge.main(args) == 0
    ckpt = workdir_lib.find_checkpoint(as_run)
    assert ckpt.step == 0 and ckpt.meta["merge"]["inputs"] == steps
    np.testing.assert_allclose(
        jaxembed.load(as_run).encode(TEXTS), jaxembed.load(out).encode(TEXTS), atol=1e-6
    )
    info = json.loads((as_run / "model" / "jaxembed.json").read_text())
    assert info["merged_from"] == steps
