"""sentence-transformers Dense / Normalize modules after pooling: read, encoded, trained, exported.

The folders are written by sentence-transformers itself (LaBSE-style tanh Dense with a bias,
EmbeddingGemma-style bias-free Dense layers, a residual, a Normalize between two Dense), so
the checks are against the reference implementation's own files and outputs.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import assert_close, save_tiny_with_tokenizer, toy_records, write_jsonl

import jaxembed
from jaxembed import convert, train
from jaxembed.hf.io import read_weights
from jaxembed.hf.sentence_transformers import load_head, read_st_config, write_st_config
from jaxembed.models.head import HeadLayer

torch = pytest.importorskip("torch")
sentence_transformers = pytest.importorskip("sentence_transformers")

TEXTS = [
    "how do I sync files between machines?",
    "A fast, scalable, distributed revision control system.",
    "Ein schnelles, verteiltes Versionskontrollsystem.",
    "?!",
    "The quick brown fox jumps over the lazy dog. " * 4,
]


def st_folder(source, out, pooling="mean"):
    """``source`` (a plain HF folder) saved by sentence-transformers with a Dense head:
    Dense 32->48 (tanh, bias, projected residual), Normalize, Dense 48->24 (no bias)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models

    torch.manual_seed(0)
    word = models.Transformer(str(source), max_seq_length=24)
    layers = [
        word,
        models.Pooling(32, pooling_mode=pooling),
        models.Dense(32, 48, activation_function=torch.nn.Tanh(), use_residual=True),
        models.Normalize(),
        models.Dense(48, 24, bias=False, activation_function=torch.nn.Identity()),
        models.Normalize(),
    ]
    SentenceTransformer(modules=layers, device="cpu").save(str(out))
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("head")
    source = save_tiny_with_tokenizer("bert", root / "bert", num_hidden_layers=1)
    return st_folder(source, root / "st")


def test_reads_the_modules_and_encodes_as_sentence_transformers(folder):
    from sentence_transformers import SentenceTransformer

    st = read_st_config(folder)
    assert st.head == (
        HeadLayer("dense", 32, 48, True, "tanh", residual=True),
        HeadLayer("normalize"),
        HeadLayer("dense", 48, 24, False, "identity"),
    )
    assert st.head_dirs == ("2_Dense", "", "4_Dense") and st.normalize
    ours = jaxembed.load(folder)
    assert ours.dim == 24
    ref = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, normalize_embeddings=True)
    assert_close(ours.encode(TEXTS), ref)
    packed = jaxembed.load(folder, packing=True).encode(TEXTS, batch_size=2)
    assert_close(packed, ref)


def test_written_back_in_the_same_layout(folder, tmp_path):
    """read -> write gives sentence-transformers' files: configs equal, tensors bit-identical."""
    from sentence_transformers import SentenceTransformer

    st = read_st_config(folder)
    out = tmp_path / "copy"
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("[0-9]_*", "modules.json"))
    write_st_config(out, st, 32, load_head(folder, st))
    assert read_st_config(out) == st
    for name in ("2_Dense", "4_Dense"):
        a, b = read_weights(folder / name), read_weights(out / name)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        cfg_a, cfg_b = (json.loads((f / name / "config.json").read_text()) for f in (folder, out))
        assert {k: cfg_a[k] for k in cfg_b} == cfg_b
    ref = SentenceTransformer(str(folder), device="cpu").encode(TEXTS)
    again = SentenceTransformer(str(out), device="cpu").encode(TEXTS)
    np.testing.assert_array_equal(ref, again)


def test_errors_name_the_module(folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    cfg_file = bad / "2_Dense" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps(dict(cfg, activation_function="my.Swish")))
    with pytest.raises(ValueError, match=r"2_Dense/config.json: activation_function 'my.Swish'"):
        read_st_config(bad)
    cfg_file.write_text(json.dumps(dict(cfg, in_features=31)))
    with pytest.raises(ValueError, match=r"head layer 0 .*takes 31 features but receives 32"):
        jaxembed.load(bad)
    cfg_file.write_text(json.dumps(cfg))
    (bad / "2_Dense" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="2_Dense: no weights found"):
        jaxembed.load(bad)


def test_trained_with_the_backbone_and_exported(folder, tmp_path):
    """Training moves the Dense weights; the export embeds as jaxembed.load(run) does."""
    from sentence_transformers import SentenceTransformer

    from jaxembed import config as config_lib

    data = write_jsonl(tmp_path / "retr.jsonl", toy_records("retr", "retrieval", 32, 1))
    c = config_lib.default_config()
    c.model.path = str(folder)
    c.data.train = (str(data),)
    c.data.max_query_length = c.data.max_passage_length = 16
    c.data.query_buckets = c.data.passage_buckets = (16,)
    c.data.num_negatives.retrieval = 1
    c.train.global_batch, c.train.steps, c.train.dropout = 8, 2, False
    c.optim.warmup_steps, c.optim.lr = 1, 1e-2
    c.ckpt.every, c.ckpt.async_save, c.log.tensorboard = 2, False, False
    workdir = tmp_path / "run"
    train.main(c, workdir)
    out = tmp_path / "export"
    assert convert.main(["--checkpoint", str(workdir), "--out", str(out)]) == 0
    assert read_st_config(out).head == read_st_config(folder).head
    before, after = read_weights(folder / "4_Dense"), read_weights(out / "4_Dense")
    assert np.abs(before["linear.weight"] - after["linear.weight"]).max() > 1e-4
    ours = jaxembed.load(workdir)
    assert ours.dim == 24
    ref = SentenceTransformer(str(out), device="cpu").encode(TEXTS)
    assert_close(ours.encode(TEXTS), ref)
    assert (
        "Dense 32->48 (tanh, residual), Normalize, Dense 48->24" in (out / "README.md").read_text()
    )
