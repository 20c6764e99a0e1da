"""ModernBERT (mmBERT-style): parity with transformers, padded and packed, export round trip."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, masked_error, random_batch, torch_hidden

from jaxembed import hf
from jaxembed.hf.io import read_weights

# Five layers with a global layer every third (0 and 3) and a window of 4 tokens each side,
# shorter than the texts below: both attention kinds and the window boundary are exercised.
TINY = dict(
    vocab_size=300,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=5,
    num_attention_heads=4,
    max_position_embeddings=64,
    global_attn_every_n_layers=3,
    local_attention=8,
    global_rope_theta=160000.0,
    local_rope_theta=10000.0,
    pad_token_id=0,
    initializer_range=0.2,
)
LENGTHS = (13, 5, 1, 10)


def save_tiny(folder, cls="ModernBertModel", seed=0, **overrides):
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.ModernBertConfig(**dict(TINY, **overrides))
    getattr(transformers, cls)(cfg).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("modernbert") / "model")


def test_hidden_states_match_transformers_padded_and_packed(folder):
    ids, mask = random_batch(TINY["vocab_size"], 0, LENGTHS, seed=1)
    model = hf.load_model(folder)
    assert model.config.layer_types[:4] == (
        "full_attention",
        "sliding_attention",
        "sliding_attention",
        "full_attention",
    )
    assert model.layers[0].attn_norm is None and model.layers[1].attn_norm is not None
    ref = torch_hidden(folder, ids, mask, cls="ModernBertModel")
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    err = masked_error(ours, ref, mask)
    print(f"modernbert fp32 hidden error (of scale) vs transformers: {err:.2e}")
    assert err < 1e-5
    # All four texts packed into one row: each attends to itself only, window included.
    row = np.concatenate([ids[r, :n] for r, n in enumerate(LENGTHS)])[None]
    seg = np.concatenate([np.full(n, r + 1) for r, n in enumerate(LENGTHS)])[None]
    packed = np.asarray(model(jnp.asarray(row), jnp.asarray(seg > 0), segment_ids=jnp.asarray(seg)))
    starts = np.cumsum((0, *LENGTHS))
    for r, n in enumerate(LENGTHS):
        assert_close(packed[0, starts[r] : starts[r] + n], ref[r, :n])


def test_masked_lm_checkpoints_load_without_their_head(tmp_path):
    save_tiny(tmp_path, cls="ModernBertForMaskedLM", seed=3)
    assert any(k.startswith("model.") for k in read_weights(tmp_path))
    ids, mask = random_batch(TINY["vocab_size"], 0, LENGTHS, seed=4)
    ours = hf.load_model(tmp_path)(jnp.asarray(ids), jnp.asarray(mask))
    ref = torch_hidden(tmp_path, ids, mask, cls="ModernBertForMaskedLM")
    assert masked_error(ours, ref, mask) < 1e-5


def test_biases_and_new_style_configs(tmp_path):
    # Biases on norms, attention and MLP, and a config in transformers 5's layout.
    save_tiny(tmp_path, seed=5, norm_bias=True, attention_bias=True, mlp_bias=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "layer_types" in cfg and "rope_parameters" in cfg
    ids, mask = random_batch(TINY["vocab_size"], 0, LENGTHS, seed=6)
    ours = hf.load_model(tmp_path)(jnp.asarray(ids), jnp.asarray(mask))
    assert masked_error(ours, torch_hidden(tmp_path, ids, mask, "ModernBertModel"), mask) < 1e-5
    # An old-style folder (an interval and two thetas, as the released checkpoints have).
    old = {k: v for k, v in cfg.items() if k not in ("layer_types", "rope_parameters")}
    old.update(global_attn_every_n_layers=3, global_rope_theta=160000.0, local_rope_theta=1e4)
    parsed = hf.family("modernbert").config_from_hf(old)
    assert parsed == hf.family("modernbert").config_from_hf(cfg)
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        hf.family("modernbert").config_from_hf(
            {**cfg, "rope_parameters": {"full_attention": {"rope_type": "yarn"}}}
        )


def test_export_round_trips_every_tensor(folder, tmp_path):
    import transformers

    model = hf.load_model(folder)
    hf.save_model(model, tmp_path)
    original, exported = read_weights(folder), read_weights(tmp_path)
    assert sorted(original) == sorted(exported)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "modernbert" and cfg["architectures"] == ["ModernBertModel"]
    _, info = transformers.ModernBertModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids, mask = random_batch(TINY["vocab_size"], 0, LENGTHS, seed=7)
    again = hf.load_model(tmp_path)(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(again), np.asarray(model(ids, mask)))


def test_sentence_transformers_folder_embeds_the_same_padded_and_packed(tmp_path):
    """A mean-pooled ModernBERT sentence-transformers folder (the gte-modernbert layout)."""
    import shutil

    from helpers import TOKENIZER_FILES, minilm_path
    from sentence_transformers import SentenceTransformer

    import jaxembed
    from jaxembed.hf.sentence_transformers import STConfig, write_st_config

    save_tiny(tmp_path, seed=8, vocab_size=30522)  # all-MiniLM-L6-v2's tokenizer
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_path() / name, tmp_path / name)
    write_st_config(tmp_path, STConfig(pooling="mean", max_seq_length=48, normalize=True), 32)
    texts = [
        "a short one",
        "Python 3 interface to the SQLite 3 database engine",
        "Interfaz de Python 3 para el motor de bases de datos SQLite 3, " * 2,
        "?",
    ]
    ref = SentenceTransformer(str(tmp_path), device="cpu").encode(texts, normalize_embeddings=True)
    for packing in (False, True):
        ours = jaxembed.load(tmp_path, packing=packing).encode(texts, batch_size=2)
        assert np.abs(ours - ref).max() <= 1e-5, packing


def test_train_step_on_a_2x4_fsdp_mesh_equals_one_device():
    """Loss and gradients of a ModernBERT step, sharded, equal one device's.

    Dropout off: released ModernBERT configs have none, and the per-row dropout replay is
    tested across meshes on BERT (test_train_step); with it on, this compile takes minutes.
    """
    from flax import nnx
    from test_train_step import one_device_and_mesh

    from jaxembed.models.modernbert import ModernBertConfig, ModernBertModel

    layer_types = ("full_attention", "sliding_attention")  # one of each: compiles stay short
    tiny = ModernBertConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        layer_types=layer_types,
        local_attention=4,
        pad_token_id=0,
    )
    results = one_device_and_mesh(lambda: ModernBertModel(tiny, rngs=nnx.Rngs(0)))
    assert_close(results[1], results[0])


def test_dropout_is_seeded_and_off_without_a_seed(tmp_path):
    folder = save_tiny(
        tmp_path, seed=9, embedding_dropout=0.1, attention_dropout=0.1, mlp_dropout=0.1
    )
    model = hf.load_model(folder)
    ids, mask = random_batch(TINY["vocab_size"], 0, LENGTHS, seed=10)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    plain = np.asarray(model(ids, mask))
    assert (
        masked_error(plain, torch_hidden(folder, ids, mask, "ModernBertModel"), mask) < 1e-5
    )  # eval mode
    a, b = (np.asarray(model(ids, mask, dropout_seed=jnp.uint32(s))) for s in (1, 1))
    c = np.asarray(model(ids, mask, dropout_seed=jnp.uint32(2)))
    np.testing.assert_array_equal(a, b)
    assert masked_error(a, plain, mask) > 1e-2 and masked_error(a, c, mask) > 1e-2


def test_lora_adapters_merge_and_load_in_peft(tmp_path):
    """LoRA on the fused Wqkv and the MLP's Wi: PEFT on transformers agrees, merging is exact."""
    from helpers import check_lora

    folder = save_tiny(tmp_path / "base")
    shapes = check_lora(folder, ("Wqkv", "mlp.Wi"), TINY["vocab_size"], 1e-5, tmp_path / "peft")
    assert len(shapes) == 2 * TINY["num_hidden_layers"]
