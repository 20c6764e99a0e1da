"""`jaxembed.load(...).encode` against sentence-transformers on the real all-MiniLM-L6-v2."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
import torch
from helpers import minilm_path, save_tiny_qwen3, save_tiny_with_tokenizer
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling

import jaxembed
from jaxembed.models.pooling import POOLING_MODES, pool
from jaxembed.packing import MAX_SEGMENTS, length_buckets, pack_rows

# Real sentences of mixed lengths and languages (ASCII and not, short and past 128 tokens).
SENTENCES = [
    "apt",
    "Debian package manager",
    "A fast, scalable, distributed revision control system.",
    "GNU C Library: Shared libraries. Contains the standard libraries that are used by nearly "
    "all programs on the system, including the standard C library and the math library.",
    "Ein schnelles, skalierbares, verteiltes Versionskontrollsystem.",
    "Système de gestion de versions distribué, rapide et évolutif.",
    "Sistema de control de versiones distribuido, rápido y escalable.",
    "Sistema di controllo di versione distribuito, veloce e scalabile.",
    "Sistema de controle de versão distribuído, rápido e escalável.",
    "Et hurtigt, skalerbart, distribueret versionsstyringssystem.",
    "Szybki, skalowalny, rozproszony system kontroli wersji.",
    "Rychlý, škálovatelný a distribuovaný systém pro správu verzí.",
    "Быстрая масштабируемая распределённая система управления версиями.",
    "Швидка масштабована розподілена система керування версіями.",
    "高速でスケーラブルな分散型リビジョン管理システム",
    "快速、可扩展的分布式版本控制系统。",
    "빠르고 확장 가능한 분산 버전 관리 시스템",
    "Where do I find the source code of a package?",
    "How can I downgrade a package to an older version?",
    "Utilities for managing the kernel's network configuration and routing tables.",
    "This package provides the documentation in HTML format, including a tutorial, the "
    "language reference, the library reference and a guide to extending and embedding the "
    "interpreter in other applications. It also contains the release notes for every "
    "version since the first one, which makes it a large package; install it only if you "
    "read the documentation offline. " * 2,
    "A lightweight X11 window manager.",
    "Ein leichtgewichtiger Fenstermanager für X11, der wenig Speicher benötigt und sich über "
    "eine einfache Textdatei konfigurieren lässt.",
    "Un gestionnaire de fenêtres X11 léger.",
    "Command-line JSON processor",
    "Outil en ligne de commande pour traiter du JSON",
    "Herramienta de línea de órdenes para procesar JSON",
    "Python 3 interface to the SQLite 3 database engine",
    "Interfaz de Python 3 para el motor de bases de datos SQLite 3",
    "?!",
    "12345 67890",
    "The quick brown fox jumps over the lazy dog. " * 12,
]


@pytest.fixture(scope="module")
def minilm():
    return jaxembed.load(minilm_path())


@pytest.fixture(scope="module")
def st_minilm():
    return SentenceTransformer(str(minilm_path()), device="cpu")


def test_real_minilm_matches_sentence_transformers(minilm, st_minilm):
    assert len(SENTENCES) >= 30
    ours = minilm.encode(SENTENCES, batch_size=8)
    ref = st_minilm.encode(SENTENCES, batch_size=8, normalize_embeddings=True)
    assert ours.dtype == np.float32 and ours.shape == (len(SENTENCES), 384)
    err = np.abs(ours - ref).max()
    print(f"all-MiniLM-L6-v2 vs sentence-transformers: max-abs diff {err:.2e}")
    assert err <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    # A handful of shapes are compiled, not one per batch.
    assert minilm._jitted._cache_size() <= len(length_buckets(minilm.max_length)) + 1
    assert minilm.dim == 384 and minilm.max_length == 256


def test_length_buckets():
    assert length_buckets(256) == [16, 32, 48, 64, 80, 112, 144, 192, 240, 256]
    assert length_buckets(16) == [16] and length_buckets(10) == [10]
    for max_length in (77, 512, 8192):
        b = length_buckets(max_length)
        assert b[-1] == max_length and b == sorted(set(b))
        # Each bucket is at most a quarter (plus rounding up to a multiple of 16) above the last.
        assert all(
            x < y <= 1.25 * x + 16 and y % 16 in (0, max_length % 16)
            for x, y in itertools.pairwise(b)
        )


def test_matryoshka_truncation(minilm, st_minilm):
    ours = minilm.encode(SENTENCES[:6], truncate_dim=64)
    ref = st_minilm.encode(SENTENCES[:6], truncate_dim=64, normalize_embeddings=True)
    assert ours.shape == (6, 64)
    assert np.abs(ours - ref).max() <= 1e-5
    with pytest.raises(ValueError, match=r"truncate_dim=999 must be in 1\.\.384"):
        minilm.encode(["x"], truncate_dim=999)


def test_order_and_small_inputs(minilm):
    full = minilm.encode(SENTENCES, batch_size=16)
    np.testing.assert_allclose(minilm.encode(SENTENCES[3:4]), full[3:4], atol=1e-6)
    np.testing.assert_allclose(minilm.encode(SENTENCES[::-1])[::-1], full, atol=1e-6)
    assert minilm.encode([]).shape == (0, 384)
    with pytest.raises(TypeError, match="list of strings"):
        minilm.encode("one string")


@pytest.fixture(scope="module")
def prompted_folder(tmp_path_factory):
    """all-MiniLM with query/passage prompts and prompt tokens excluded from pooling."""
    src, dst = minilm_path(), tmp_path_factory.mktemp("prompted")
    for name in os.listdir(src):
        if name not in ("config_sentence_transformers.json", "1_Pooling"):
            os.symlink(src / name, dst / name)
    (dst / "1_Pooling").mkdir()
    pool_cfg = json.loads((src / "1_Pooling" / "config.json").read_text())
    (dst / "1_Pooling" / "config.json").write_text(
        json.dumps({**pool_cfg, "include_prompt": False})
    )
    (dst / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": "query: ", "passage": "passage: "}})
    )
    return dst


def test_prompts_excluded_from_pooling(prompted_folder):
    enc = jaxembed.load(prompted_folder)
    st = SentenceTransformer(str(prompted_folder), device="cpu")
    assert not enc.st.include_prompt
    for name in ("query", "passage"):
        ours = enc.encode(SENTENCES[:10], prompt_name=name)
        ref = st.encode(SENTENCES[:10], prompt_name=name, normalize_embeddings=True)
        assert np.abs(ours - ref).max() <= 1e-5, name
    assert not np.allclose(
        enc.encode(SENTENCES[:2], prompt_name="query"), enc.encode(SENTENCES[:2])
    )
    with pytest.raises(
        ValueError, match=r"prompt_name 'document' is not defined.*\['passage', 'query'\]"
    ):
        enc.encode(["x"], prompt_name="document")


def test_bf16_compute_is_close(minilm):
    enc = jaxembed.load(minilm_path(), dtype="bfloat16")
    cos = np.sum(enc.encode(SENTENCES) * minilm.encode(SENTENCES), axis=1)
    assert cos.min() > 0.99


@pytest.mark.parametrize("mode", POOLING_MODES)
@pytest.mark.parametrize("prompt_length", [0, 2])
def test_pooling_matches_sentence_transformers(mode, prompt_length):
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((3, 7, 8)).astype(np.float32)
    mask = np.array([[1] * 7, [1] * 4 + [0] * 3, [1] * 3 + [0] * 4], np.int64)
    st_pool = Pooling(8, pooling_mode=mode, include_prompt=prompt_length == 0)
    features = {"token_embeddings": torch.tensor(hidden), "attention_mask": torch.tensor(mask)}
    if prompt_length:
        features["prompt_length"] = prompt_length
    ref = st_pool(features)["sentence_embedding"].numpy()
    pool_mask = mask.copy()
    pool_mask[:, :prompt_length] = 0
    ours = np.asarray(pool(hidden, pool_mask, mode, attention_mask=mask))
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=1e-6)


def test_missing_tokenizer_is_named(tmp_path):
    src = minilm_path()
    for name in ("config.json", "model.safetensors"):
        os.symlink(src / name, tmp_path / name)
    with pytest.raises(FileNotFoundError, match=r"no tokenizer found.*tokenizer\.json"):
        jaxembed.load(tmp_path)


# --- sequence packing ------------------------------------------------------------------------


def test_pack_rows_places_every_text_once_within_the_row():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(1, 257, 500)] + [3] * 200 + [256] * 5
    rows = pack_rows(lengths, 256)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 256 for row in rows)
    assert all(len(row) <= MAX_SEGMENTS for row in rows)
    # Far fewer token positions than one text per row (each padded to 256).
    assert len(rows) * 256 < 0.6 * len(lengths) * 256


def test_packed_minilm_equals_unpacked_and_sentence_transformers(minilm, st_minilm):
    packed = jaxembed.load(minilm_path(), packing=True)
    ours = packed.encode(SENTENCES, batch_size=4)
    err_unpacked = np.abs(ours - minilm.encode(SENTENCES, batch_size=8)).max()
    err_st = np.abs(ours - st_minilm.encode(SENTENCES, normalize_embeddings=True)).max()
    print(f"packed vs unpacked {err_unpacked:.2e}, vs sentence-transformers {err_st:.2e}")
    assert err_unpacked <= 1e-5 and err_st <= 1e-5
    # At most one compilation per bucket length, and fewer token positions computed than
    # with one text per row (the short texts ride in the long rows' tails).
    assert packed._jitted._cache_size() <= len(length_buckets(packed.max_length)) + 1
    ids = packed.tokenize(SENTENCES)
    positions = {e: sum(n * length for _, n, length in e.batches(ids, 4)) for e in (packed, minilm)}
    assert positions[packed] < positions[minilm]
    # Split over 8 devices, embeddings unchanged.
    from jaxembed import retrieval

    retrieval.on_mesh(packed)
    assert np.abs(packed.encode(SENTENCES, batch_size=4) - ours).max() <= 1e-6


def test_packed_prompts_are_attended_but_not_pooled(prompted_folder):
    enc = jaxembed.load(prompted_folder, packing=True)
    st = SentenceTransformer(str(prompted_folder), device="cpu")
    ours = enc.encode(SENTENCES[:12], prompt_name="query", batch_size=2)
    ref = st.encode(SENTENCES[:12], prompt_name="query", normalize_embeddings=True)
    assert np.abs(ours - ref).max() <= 1e-5


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("packing")
    xlmr = save_tiny_with_tokenizer("xlm-roberta", base / "xlmr", num_hidden_layers=1)
    qwen = save_tiny_qwen3(base / "qwen3", num_hidden_layers=1)
    return {"xlmr": xlmr, "qwen3": qwen}


@pytest.mark.parametrize(
    "family, mode",
    # One case per code path of pool_segments (mean_sqrt_len_tokens shares mean's).
    [
        ("xlmr", "cls"),
        ("xlmr", "max"),
        ("xlmr", "weightedmean"),
        ("xlmr", "mean"),
        ("qwen3", "lasttoken"),
    ],
)
def test_every_pooling_packed_equals_unpacked(tiny_folders, family, mode):
    """RoBERTa-style positions (offset by the pad id) and Qwen3's causal rotary attention
    restart in every segment; each pooling mode pools each segment alone."""
    folder = tiny_folders[family]
    texts = SENTENCES[:14]
    plain = jaxembed.load(folder, pooling=mode, max_length=64).encode(texts, batch_size=4)
    packed = jaxembed.load(folder, pooling=mode, max_length=64, packing=True)
    got = packed.encode(texts, batch_size=2)
    assert np.abs(got - plain).max() <= 1e-5, (family, mode)
