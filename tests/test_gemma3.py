"""Gemma3 text models: parity with transformers (causal and bidirectional, padded and packed)."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, masked_error, random_batch, torch_hidden

from jaxembed import hf
from jaxembed.hf.io import read_weights

# Four layers, the fourth global (every 4th), a 6-token window shorter than the texts, GQA
# (4 query heads on 2 key/value heads), scores scaled by query_pre_attn_scalar, not head_dim.
TINY = dict(
    vocab_size=300,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    sliding_window=6,
    sliding_window_pattern=4,
    query_pre_attn_scalar=24,
    rope_theta=1e6,
    rope_local_base_freq=1e4,
    pad_token_id=0,
    initializer_range=0.2,
)
LENGTHS = (13, 5, 1, 10)


def save_tiny(folder, cls="Gemma3TextModel", seed=0, **overrides):
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Gemma3TextConfig(**dict(TINY, **overrides))
    model = getattr(transformers, cls)(cfg).eval()
    with torch.no_grad():  # norms start at zero (scale 1 + 0): make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("bidirectional", [False, True])
def test_hidden_states_match_transformers_padded_and_packed(tmp_path, bidirectional):
    folder = save_tiny(tmp_path, seed=int(bidirectional), use_bidirectional_attention=bidirectional)
    ids, mask = random_batch(TINY["vocab_size"], 0, LENGTHS, seed=1)
    model = hf.load_model(folder)
    assert model.config.layer_types.count("full_attention") == 1
    ref = torch_hidden(folder, ids, mask, cls="Gemma3TextModel")
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    err = masked_error(ours, ref, mask)
    print(f"gemma3 (bidirectional={bidirectional}) vs transformers, error of scale: {err:.2e}")
    assert err < 1e-5
    row = np.concatenate([ids[r, :n] for r, n in enumerate(LENGTHS)])[None]
    seg = np.concatenate([np.full(n, r + 1) for r, n in enumerate(LENGTHS)])[None]
    packed = np.asarray(model(jnp.asarray(row), jnp.asarray(seg > 0), segment_ids=jnp.asarray(seg)))
    starts = np.cumsum((0, *LENGTHS))
    for r, n in enumerate(LENGTHS):
        assert_close(packed[0, starts[r] : starts[r] + n], ref[r, :n])


def test_causal_lm_checkpoints_and_linear_rope_scaling(tmp_path):
    scaling = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}}
    save_tiny(tmp_path, cls="Gemma3ForCausalLM", seed=3, rope_parameters=scaling)
    assert any(k.startswith("model.") for k in read_weights(tmp_path))
    ids, mask = random_batch(TINY["vocab_size"], 0, LENGTHS, seed=4)
    model = hf.load_model(tmp_path)
    assert model.config.global_rope_factor == 4.0
    ours = model(jnp.asarray(ids), jnp.asarray(mask))
    ref = torch_hidden(tmp_path, ids, mask, cls="Gemma3ForCausalLM")
    assert masked_error(ours, ref, mask) < 1e-5


def test_export_round_trips_every_tensor(tmp_path):
    import transformers

    folder = save_tiny(tmp_path / "in", seed=5, use_bidirectional_attention=True)
    model = hf.load_model(folder)
    hf.save_model(model, tmp_path / "out")
    original, exported = read_weights(folder), read_weights(tmp_path / "out")
    assert sorted(original) == sorted(exported)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["use_bidirectional_attention"] is True
    _, info = transformers.Gemma3TextModel.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert hf.load_model(tmp_path / "out").config == model.config


def test_bidirectional_train_step_on_a_2x4_fsdp_mesh_equals_one_device():
    from flax import nnx
    from test_train_step import one_device_and_mesh

    from jaxembed.models.gemma3 import Gemma3Config, Gemma3Model

    tiny = Gemma3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=32,
        sliding_window=4,
        use_bidirectional_attention=True,
        layer_types=("sliding_attention", "full_attention"),
    )
    results = one_device_and_mesh(lambda: Gemma3Model(tiny, rngs=nnx.Rngs(0)))
    # 1e-5 of each gradient's scale (at least 1): Gemma's sqrt(hidden) embedding scale makes
    # some gradients O(1), where fp32 summation order alone moves the last digits.
    assert_close(results[1], results[0])


def test_an_embeddinggemma_style_folder_encodes_trains_and_exports(tmp_path):
    """EmbeddingGemma's layout on a tiny random Gemma3: bidirectional attention, mean pooling,
    two bias-free Dense layers (32 -> 64 -> 32), Normalize. jaxembed.load equals
    SentenceTransformer on the folder; configs/embeddinggemma.py trains it (Dense layers and
    Matryoshka included) and the export equals jaxembed.load(run)."""
    import torch
    from helpers import save_qwen3_tokenizer, toy_records, write_jsonl
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as st_modules

    import jaxembed
    from jaxembed import config as config_lib
    from jaxembed import convert, train
    from jaxembed.hf.sentence_transformers import read_st_config

    source = save_tiny(tmp_path / "gemma", seed=3, use_bidirectional_attention=True)
    save_qwen3_tokenizer(source, TINY["vocab_size"])  # any small tokenizer will do
    torch.manual_seed(0)
    identity = torch.nn.Identity()
    layers = [
        st_modules.Transformer(str(source), max_seq_length=48),
        st_modules.Pooling(32, pooling_mode="mean"),
        st_modules.Dense(32, 64, bias=False, activation_function=identity),
        st_modules.Dense(64, 32, bias=False, activation_function=identity),
        st_modules.Normalize(),
    ]
    folder = tmp_path / "embeddinggemma"
    SentenceTransformer(modules=layers, device="cpu").save(str(folder))
    texts = ["task: search result | query: a fast tool", "title: none | text: Debian tools.", "?"]
    ref = SentenceTransformer(str(folder), device="cpu").encode(texts)
    assert_close(jaxembed.load(folder).encode(texts), ref)

    data = write_jsonl(tmp_path / "retr.jsonl", toy_records("retr", "retrieval", 32, 3))
    c = config_lib.load(str(Path(__file__).parents[1] / "configs" / "embeddinggemma.py"))
    c.model.path, c.model.dtype, c.data.train = str(folder), "float32", (str(data),)
    c.data.max_query_length = c.data.max_passage_length = 32
    c.loss.matryoshka_dims = (32, 16)
    c.train.global_batch, c.train.steps, c.optim.warmup_steps = 8, 2, 1
    c.ckpt.async_save, c.log.tensorboard = False, False
    train.main(c, tmp_path / "run")
    out = tmp_path / "export"
    assert convert.main(["--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0
    st = read_st_config(out)
    assert [x.out_features for x in st.head] == [64, 32] and st.normalize
    exported = SentenceTransformer(str(out), device="cpu")
    assert exported.prompts["query"] == "task: search result | query: "
    want = exported.encode(texts)
    assert_close(jaxembed.load(tmp_path / "run").encode(texts), want)


def test_lora_adapters_merge_and_load_in_peft(tmp_path):
    """LoRA on the stacked, scanned Gemma3 layers (bidirectional): PEFT agrees, merging is exact."""
    from helpers import check_lora

    folder = save_tiny(tmp_path / "base", use_bidirectional_attention=True)
    shapes = check_lora(
        folder, ("q_proj", "o_proj", "up_proj"), TINY["vocab_size"], 1e-5, tmp_path / "peft"
    )
    assert sorted(shapes) == [(4, 32, 4), (4, 32, 4), (4, 64, 4)]
