"""The F2LLM recipe (configs/f2llm_qwen3.py) on a tiny random Qwen3, FSDP over 8 devices."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import save_tiny_qwen3, toy_records, write_jsonl

from jaxembed import config as config_lib
from jaxembed import train, trained_model, workdir

ROOT = Path(__file__).resolve().parents[1]


def f2llm_config(variant: str):
    path = ROOT / "configs" / "f2llm_qwen3.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def test_variants_follow_the_published_settings():
    lrs = {v: f2llm_config(v).optim.lr for v in ("0.6b", "1.7b", "4b")}
    assert lrs == {"0.6b": 1e-5, "1.7b": 9e-6, "4b": 8e-6}
    c = f2llm_config("0.6b")
    assert (c.model.pooling, c.loss.style, c.loss.temperature) == ("lasttoken", "f2llm", 0.05)
    assert (c.optim.b1, c.optim.b2, c.optim.warmup_steps, c.train.global_batch) == (
        0.9,
        0.98,
        500,
        512,
    )
    assert dict(c.data.num_negatives) == {"retrieval": 7, "classification": 1, "clustering": 7}
    assert c.data.max_passage_length == 1024
    with pytest.raises(ValueError, match="unknown F2LLM variant '8b'"):
        f2llm_config("8b")
    lora = config_lib.validate(f2llm_config("1.7b-lora"))
    assert (lora.model.lora.rank, lora.model.lora.alpha, lora.optim.lr) == (16, 32.0, 1e-4)
    assert len(lora.model.lora.targets) == 7 and lora.train.global_batch == 512


def test_lora_variant_trains_the_stacked_adapters_with_fsdp(tmp_path):
    """The LoRA variant on a tiny Qwen3: adapters stacked over the scanned layers, sharded
    over 8 devices, adapter dropout on; the loss falls and only adapters are saved."""
    model = save_tiny_qwen3(tmp_path / "qwen3", num_hidden_layers=2)
    data = write_jsonl(tmp_path / "retr.jsonl", toy_records("retr", "retrieval", 32, 3))
    c = f2llm_config("0.6b-lora")
    c.model.path, c.data.train = str(model), (str(data),)
    c.data.workers, c.data.max_query_length, c.data.max_passage_length = 0, 32, 32
    c.data.query_buckets, c.data.passage_buckets = (32,), (32,)
    c.data.num_negatives.retrieval = 2
    c.train.steps, c.train.global_batch = 8, 16
    c.optim.lr, c.optim.warmup_steps, c.optim.min_lr = 3e-3, 3, 3e-3
    c.ckpt.every, c.ckpt.async_save, c.log.every = 8, False, 1
    train.main(c, tmp_path / "run")
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    print(f"f2llm LoRA tiny qwen3 losses: {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2])
    ckpt = workdir.find_checkpoint(tmp_path / "run")
    adapted = trained_model.restore_adapted(ckpt)
    assert adapted.layers.mlp.down_proj.lora.a.shape == (2, 48, 16)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("f2llm")
    model = save_tiny_qwen3(base / "qwen3", num_hidden_layers=2)
    records = toy_records("retr", "retrieval", 32, 3)
    for r in records:  # F2LLM's format: the instruction goes in front of queries only
        r["instruction"] = "Given a tool name, retrieve its package description"
    data = write_jsonl(base / "retr.jsonl", records)
    c = f2llm_config("0.6b")
    c.model.path, c.data.train = str(model), (str(data),)
    c.data.workers, c.data.max_query_length, c.data.max_passage_length = 0, 32, 32
    c.data.query_buckets, c.data.passage_buckets = (32,), (32,)
    c.data.num_negatives.retrieval = 2
    c.train.steps, c.train.global_batch = 12, 16  # 2 batches per epoch: 6 epochs
    c.optim.lr, c.optim.warmup_steps, c.optim.min_lr = 3e-3, 3, 3e-3
    c.ckpt.every, c.ckpt.async_save, c.log.every = 12, False, 1
    workdir = base / "run"
    return workdir, c, train.main(c, workdir)


def test_recipe_trains_with_fsdp_and_reduces_the_loss(run):
    workdir, _, results = run
    assert results["step"] == 12
    recs = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 12 and np.all(np.isfinite(losses))
    print(f"f2llm tiny qwen3 losses: {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2])


def test_fsdp_shards_every_weight_matrix_over_8_devices(run):
    import jax
    from flax import nnx
    from jax.sharding import PartitionSpec as P

    from jaxembed import sharding
    from jaxembed.hf import load_model

    workdir, c, _ = run
    mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1} and jax.device_count() == 8
    model = load_model(workdir.parent / "qwen3")
    shardings = sharding.state_shardings(nnx.state(model, nnx.Param), mesh)
    flat = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(shardings)}
    # (layers, embed, mlp): the layer stack stays whole, the model dimension is split.
    assert flat["layers.mlp.gate_proj.kernel"].spec == P(None, "fsdp", None)
    assert flat["layers.self_attn.o_proj.kernel"].spec == P(None, None, "fsdp")
    assert flat["embed_tokens.embedding"].spec == P(None, "fsdp")


def test_every_training_text_ends_with_eos_after_truncation(run):
    from jaxembed.data import pipeline, readers

    workdir, c, _ = run
    builder = pipeline.BatchBuilder(
        readers.open_sources(list(c.data.train)),
        str(workdir / "model"),
        pipeline.PipelineConfig.from_config(c),
        c.train.steps,
        0,
        1,
    )
    batch = builder(0)
    eos = builder.tokenizer.eos_token_id
    for kind in ("query", "pos"):
        assert all(ids[-1] == eos for ids in batch[kind]), kind
    # Queries carry the instruction (and are long enough to be truncated to 32 tokens).
    text = builder.tokenizer.decode(batch["query"][0])
    assert text.startswith("Instruct: Given a tool name")
    assert max(map(len, batch["query"])) == 32


def test_exported_folder_embeds_like_jaxembed_in_sentence_transformers(run, tmp_path):
    """Trained Qwen3 -> convert -> SentenceTransformer: last-token pooling on EOS, the
    instruction as the query prompt, identical embeddings."""
    import transformers
    from sentence_transformers import SentenceTransformer

    import jaxembed
    from jaxembed import convert

    workdir, _, _ = run
    out = convert.export(workdir, tmp_path / "export")
    st_model = SentenceTransformer(str(out), device="cpu")
    pooling_cfg = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling_cfg["pooling_mode_lasttoken"] and not pooling_cfg["pooling_mode_mean_tokens"]
    instruction = "Instruct: Given a tool name, retrieve its package description\nQuery: "
    assert st_model.prompts["query"] == instruction
    _, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    ours = jaxembed.load(workdir)
    texts = ["network tool number 3", "A package about music: utility 5 with documentation."]
    texts.append(" ".join(["graphics editor"] * 40))  # truncated: EOS after truncation
    for name in ("query", "document"):
        want = st_model.encode(texts, prompt_name=name, normalize_embeddings=True)
        got = ours.encode(texts, prompt_name=name)
        err = float(np.abs(got - want).max())
        print(f"qwen3 {name}: max-abs jaxembed vs sentence-transformers {err:.2e}")
        assert err < 1e-5
