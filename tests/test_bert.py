"""BERT / RoBERTa / XLM-RoBERTa ports against transformers' PyTorch models."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from helpers import assert_close, random_batch, save_tiny_hf

from jaxembed import hf
from jaxembed.hf.io import read_weights, write_safetensors
from jaxembed.models.pooling import pool

FAMILIES = ["bert", "roberta", "xlm-roberta"]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    folder = save_tiny_hf(request.param, tmp_path_factory.mktemp(request.param))
    torch_model = transformers.AutoModel.from_pretrained(folder).eval()
    return request.param, folder, torch_model


def torch_hidden(torch_model, ids, mask):
    with torch.no_grad():
        out = torch_model(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
        )
    return out.last_hidden_state.numpy()


def test_hidden_states_match_transformers(tiny):
    model_type, folder, torch_model = tiny
    model = hf.load_model(folder)
    assert model.config.model_type == model_type
    ids, mask = random_batch(model.config.vocab_size, model.config.pad_token_id, [12, 7, 3])
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    ref = torch_hidden(torch_model, ids, mask)
    print(f"{model_type}: hidden-state max-abs diff {np.abs(ours - ref).max():.2e}")
    assert_close(ours, ref)
    # Pooled embeddings over the real tokens only.
    m = mask[..., None].astype(np.float32)
    ref_mean = (ref * m).sum(1) / m.sum(1)
    assert_close(np.asarray(pool(ours, mask, "mean")), ref_mean)
    assert_close(np.asarray(pool(ours, mask, "cls")), ref[:, 0])
    last = mask.sum(1) - 1
    assert_close(np.asarray(pool(ours, mask, "lasttoken")), ref[np.arange(3), last])


def test_export_round_trips_every_tensor(tiny, tmp_path):
    model_type, folder, _ = tiny
    model = hf.load_model(folder)
    files = hf.save_model(model, tmp_path)
    assert "model.safetensors" in files
    original, exported = read_weights(folder), read_weights(tmp_path)
    original = {k: v for k, v in original.items() if not k.endswith("position_ids")}
    assert set(exported) == set(original)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    # transformers loads the export with no missing or unexpected keys.
    _, info = transformers.AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model_type


def test_remat_and_dropout(tiny):
    _, folder, _ = tiny
    plain = hf.load_model(folder)
    remat = hf.load_model(folder, remat=True)
    ids, mask = random_batch(plain.config.vocab_size, plain.config.pad_token_id, [9, 4])
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    key = jax.random.key(3)

    def loss(model, rng):
        return jnp.sum(pool(model(ids, mask, dropout_seed=rng), mask, "mean") ** 2)

    # Same key, same dropout masks: remat changes memory, never values or gradients.
    l1, g1 = nnx.value_and_grad(loss)(plain, key)
    l2, g2 = nnx.value_and_grad(loss)(remat, key)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    # fp32 recomputation reorders a few sums: equal up to rounding, 1e-5 of the gradient scale
    # (the key bias's true gradient is 0, so a per-tensor relative check would compare noise).
    scale = max(np.abs(a).max() for a in jax.tree.leaves(g1))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        assert np.abs(a - b).max() <= 1e-5 * scale
    # Dropout is on with a key and off without one.
    assert not np.allclose(loss(plain, key), loss(plain, None))
    assert np.allclose(loss(plain, None), loss(plain, None))


def test_bf16_compute_is_close(tiny):
    _, folder, torch_model = tiny
    model = hf.load_model(folder, dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    ids, mask = random_batch(model.config.vocab_size, model.config.pad_token_id, [10, 5])
    ours = model(jnp.asarray(ids), jnp.asarray(mask))
    assert ours.dtype == jnp.bfloat16
    ref = torch_hidden(torch_model, ids, mask)
    # Within bf16's precision (2^-8 of the scale) of fp32 torch on the real tokens: at most
    # 4 such steps anywhere, 1 on average (measured: 0.8% and 0.18% of the scale).
    real = mask > 0
    err, scale = np.abs(np.asarray(ours, np.float32) - ref)[real], np.abs(ref[real]).max()
    step = 2.0**-8 * scale
    assert err.max() <= 4 * step and err.mean() <= step, (err.max() / scale, err.mean() / scale)


def test_pytorch_bin_loads_without_torch_unpickling(tiny, tmp_path):
    _, folder, torch_model = tiny
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    torch.save(torch_model.state_dict(), tmp_path / "pytorch_model.bin")
    a, b = read_weights(folder), read_weights(tmp_path)
    for key, value in a.items():
        np.testing.assert_array_equal(b[key], value, err_msg=key)
    model = hf.load_model(tmp_path)
    ids, mask = random_batch(model.config.vocab_size, model.config.pad_token_id, [6])
    assert_close(
        np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))), torch_hidden(torch_model, ids, mask)
    )


# --- errors that name the problem ------------------------------------------------------------


def test_folder_without_config(tmp_path):
    with pytest.raises(hf.ModelFolderError, match=r"no config\.json"):
        hf.load_model(tmp_path)
    with pytest.raises(hf.ModelFolderError, match="not a directory"):
        hf.load_model(tmp_path / "nope")


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(
        hf.ModelFolderError, match=r"unsupported model_type 't5'.*'bert'.*'xlm-roberta'"
    ):
        hf.load_model(tmp_path)


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    return save_tiny_hf("bert", tmp_path_factory.mktemp("bert-err"))


def _copy_with_tensors(src, dst, edit):
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = {k: np.array(v) for k, v in read_weights(src).items()}
    edit(tensors)
    write_safetensors(dst / "model.safetensors", tensors)
    return dst


def test_missing_tensor_is_named(bert_folder, tmp_path):
    key = "encoder.layer.1.attention.self.key.weight"
    _copy_with_tensors(bert_folder, tmp_path, lambda t: t.pop(key))
    with pytest.raises(hf.ModelFolderError, match=rf"missing tensor '{key}'") as e:
        hf.load_model(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_misshaped_tensor_names_key_and_shapes(bert_folder, tmp_path):
    key = "encoder.layer.0.intermediate.dense.weight"

    def edit(t):
        t[key] = np.zeros((36, 32), np.float32)

    _copy_with_tensors(bert_folder, tmp_path, edit)
    with pytest.raises(
        hf.ModelFolderError, match=rf"'{key}' has shape \(36, 32\), expected \(37, 32\)"
    ):
        hf.load_model(tmp_path)


def test_no_weights(bert_folder, tmp_path):
    shutil.copy(bert_folder / "config.json", tmp_path / "config.json")
    with pytest.raises(hf.ModelFolderError, match="no weights found"):
        hf.load_model(tmp_path)


def test_damaged_and_truncated_safetensors_name_the_file(bert_folder, tmp_path):
    shutil.copy(bert_folder / "config.json", tmp_path / "config.json")
    blob = (bert_folder / "model.safetensors").read_bytes()
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\xff" * 8 + blob[8:])  # a header length beyond the file
    with pytest.raises(hf.ModelFolderError, match=r"model.safetensors: damaged or not a safet"):
        hf.load_model(tmp_path)
    weights.write_bytes(blob[: len(blob) - 1000])  # cut short
    with pytest.raises(hf.ModelFolderError, match=r"model.safetensors: tensor '.*' needs bytes"):
        hf.load_model(tmp_path)


def test_sharded_safetensors_round_trip(bert_folder, tmp_path):
    from jaxembed.hf.io import write_weights

    tensors = {k: np.array(v) for k, v in read_weights(bert_folder).items()}
    tensors["bf16"] = np.arange(6, dtype=np.float32).astype(jnp.bfloat16).reshape(2, 3)
    files = write_weights(tmp_path, tensors, max_shard_bytes=20_000)
    assert "model.safetensors.index.json" in files and len(files) > 3
    back = read_weights(tmp_path)
    assert set(back) == set(tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    assert back["bf16"].dtype == jnp.bfloat16
    shutil.copy(bert_folder / "config.json", tmp_path / "config.json")
    model = hf.load_model(tmp_path)  # loads through the shard index
    assert model.config.num_hidden_layers == 2
