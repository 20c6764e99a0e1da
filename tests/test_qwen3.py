"""Qwen3 decoder: parity with transformers, stacked-layer HF mapping, scan == unrolled, EOS."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import TINY_QWEN3, masked_error, random_batch, save_tiny_qwen3, torch_hidden

from jaxembed import hf
from jaxembed.encoder import load
from jaxembed.hf.io import WeightsError, read_weights
from jaxembed.models.pooling import pool
from jaxembed.tokenizer import append_eos, load_tokenizer

LENGTHS = (9, 4, 1, 7)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_qwen3(tmp_path_factory.mktemp("qwen3") / "model")


def test_hidden_states_match_transformers_and_scan_equals_unrolled(folder):
    ids, mask = random_batch(TINY_QWEN3["vocab_size"], 0, LENGTHS, seed=1)
    model = hf.load_model(folder)
    assert model.layers.self_attn.q_proj.kernel.shape == (2, 32, 64)  # stacked layers
    ref = torch_hidden(folder, ids, mask, cls="Qwen3Model")
    scanned = model(jnp.asarray(ids), jnp.asarray(mask))
    err = masked_error(scanned, ref, mask)
    print(f"qwen3 fp32 hidden error (of scale) vs transformers: {err:.2e}")
    assert err < 1e-4
    model.scan = False
    unrolled = model(jnp.asarray(ids), jnp.asarray(mask))
    # Same arithmetic; only XLA fusion inside the scan body reorders fp32 rounding.
    assert masked_error(unrolled, scanned, mask) < 1e-5
    # Last-token pooling reads each right-padded row's last real position.
    pooled = pool(scanned, jnp.asarray(mask), "lasttoken")
    want = ref[np.arange(len(LENGTHS)), np.asarray(LENGTHS) - 1]
    assert np.abs(np.asarray(pooled) - want).max() < 1e-4


def test_bf16_compute_stays_close(folder):
    ids, mask = random_batch(TINY_QWEN3["vocab_size"], 0, LENGTHS, seed=2)
    f32 = hf.load_model(folder)(jnp.asarray(ids), jnp.asarray(mask))
    bf16 = hf.load_model(folder, dtype=jnp.bfloat16)(jnp.asarray(ids), jnp.asarray(mask))
    assert bf16.dtype == jnp.bfloat16
    rel = np.abs(np.asarray(bf16, np.float32) - np.asarray(f32)) / (np.abs(f32).max() + 1e-6)
    assert float(rel.max()) < 0.05


def test_remat_gives_the_same_gradients(folder):
    ids, mask = random_batch(TINY_QWEN3["vocab_size"], 0, LENGTHS, seed=3)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    # A random linear read-out: sum(h**2) would be constant under the final RMSNorm.
    w = jax.random.normal(jax.random.key(0), (TINY_QWEN3["hidden_size"],))

    def grads(remat):
        model = hf.load_model(folder, remat=remat)
        graphdef, state = nnx.split(model)

        def loss(state):
            return jnp.sum((nnx.merge(graphdef, state)(ids, mask) @ w) ** 2 * mask)

        return jax.jit(jax.grad(loss))(state)

    g0, g1 = grads(False), grads(True)
    # Relative to each gradient's scale: recomputation reorders fp32 rounding only.
    diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max() / jnp.abs(a).max()), g0, g1)
    assert max(jax.tree.leaves(diff)) < 1e-5


def test_export_round_trips_every_tensor(folder, tmp_path):
    import transformers

    model = hf.load_model(folder)
    hf.save_model(model, tmp_path)
    original, exported = read_weights(folder), read_weights(tmp_path)
    assert sorted(original) == sorted(exported)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["architectures"] == ["Qwen3Model"]
    _, info = transformers.Qwen3Model.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


@pytest.mark.parametrize("tied", [True, False])
def test_loads_causal_lm_checkpoints_without_their_head(tmp_path, tied):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(
        **dict(TINY_QWEN3, tie_word_embeddings=tied), eos_token_id=0, pad_token_id=0
    )
    transformers.Qwen3ForCausalLM(cfg).eval().save_pretrained(tmp_path)
    assert any(k.startswith("model.") for k in read_weights(tmp_path))
    ids, mask = random_batch(TINY_QWEN3["vocab_size"], 0, LENGTHS, seed=4)
    ours = hf.load_model(tmp_path)(jnp.asarray(ids), jnp.asarray(mask))
    ref = torch_hidden(tmp_path, ids, mask, cls="Qwen3ForCausalLM")
    assert masked_error(ours, ref, mask) < 1e-4


def test_bad_weights_name_the_tensor(folder, tmp_path):
    from safetensors.numpy import save_file

    tensors = read_weights(folder)
    tensors["layers.1.mlp.up_proj.weight"] = np.zeros((3, 3), np.float32)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"layers\.1\.mlp\.up_proj\.weight.*\(3, 3\)"):
        hf.load_model(tmp_path)
    del tensors["layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"missing tensor 'layers\.1\.mlp\.up_proj\.weight'"):
        hf.load_model(tmp_path)


def test_unsupported_configs_are_refused(folder, tmp_path):
    cfg = json.loads((folder / "config.json").read_text())
    with pytest.raises(ValueError, match="use_sliding_window"):
        hf.family("qwen3").config_from_hf({**cfg, "use_sliding_window": True})
    yarn = {**cfg, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        hf.family("qwen3").config_from_hf(yarn)
    legacy = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    assert hf.family("qwen3").config_from_hf({**legacy, "rope_theta": 5e5}).rope_theta == 5e5


def test_eos_is_appended_after_truncation(folder):
    tok = load_tokenizer(folder)
    plain = tok("the quick brown fox jumps")["input_ids"]
    assert plain[-1] != tok.eos_token_id  # Qwen tokenizers add nothing by default
    append_eos(tok, "lasttoken")
    full = tok("the quick brown fox jumps")["input_ids"]
    assert full == [*plain, tok.eos_token_id]
    cut = tok("the quick brown fox jumps", truncation=True, max_length=4)["input_ids"]
    assert cut == [*plain[:3], tok.eos_token_id]
    # Mean pooling leaves the tokenizer alone.
    assert (
        load_tokenizer(folder)("a")["input_ids"]
        == append_eos(load_tokenizer(folder), "mean")("a")["input_ids"]
    )


def test_encoder_pools_the_eos_state(folder):
    enc = load(folder, pooling="lasttoken", max_length=8)
    texts = ["the quick brown fox jumps over the lazy dog", "tools", "Ein Werkzeug"]
    emb = enc.encode(texts, batch_size=4)
    tok = enc.tokenizer
    ids = [tok(t, truncation=True, max_length=8)["input_ids"] for t in texts]
    assert all(row[-1] == tok.eos_token_id for row in ids) and len(ids[0]) == 8
    ref_ids, ref_mask = np.zeros((3, 8), np.int64), np.zeros((3, 8), np.int64)
    for r, row in enumerate(ids):
        ref_ids[r, : len(row)], ref_mask[r, : len(row)] = row, 1
    hidden = torch_hidden(folder, ref_ids, ref_mask, cls="Qwen3Model")
    want = hidden[np.arange(3), ref_mask.sum(1) - 1]
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert np.abs(emb - want).max() < 1e-4
