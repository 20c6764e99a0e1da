"""`python -m jaxembed.convert`: checkpoint -> HF / sentence-transformers folder, and load(run).

HF -> jaxembed -> checkpoint -> convert must give back the original tensors when nothing was
trained; after training, sentence-transformers on the export and `jaxembed.load` on the run
must embed alike (prompts and pooling included) and `transformers` must load the export
with no missing or unexpected keys.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import transformers
from helpers import (
    launch_local,
    minilm_path,
    save_tiny_with_tokenizer,
    toy_records,
    write_jsonl,
    write_toy_beir,
)
from sentence_transformers import SentenceTransformer

import jaxembed
from jaxembed import checkpoint, convert, export_meta, hf, sharding, train, trained_model
from jaxembed import config as config_lib
from jaxembed import step as step_lib
from jaxembed import workdir as workdir_lib
from jaxembed.data import readers
from jaxembed.hf.io import read_weights
from jaxembed.hf.sentence_transformers import read_st_config

INSTRUCTION = "Given a need, find the Debian package that meets it"
TEXTS = [
    "network tool number 3",
    "A package about python: utility 1 with documentation.",
    "Ein schnelles, verteiltes Versionskontrollsystem.",
    "?!",
    "The quick brown fox jumps over the lazy dog. " * 6,  # truncated at max_seq_length
]


def tiny_config(model: Path, data, steps: int = 2, **kw):
    c = config_lib.default_config()
    c.model.path = str(model)
    c.data.train = tuple(str(p) for p in data)
    c.data.max_query_length, c.data.max_passage_length = 16, 16
    c.data.query_buckets, c.data.passage_buckets = (16,), (16,)
    c.data.num_negatives.retrieval = 1
    c.data.query_prefix, c.data.passage_prefix = "query: ", "passage: "
    c.train.global_batch, c.train.steps = 8, steps
    c.optim.warmup_steps, c.optim.lr = 1, 1e-3
    c.ckpt.every, c.log.every = steps, 1
    c.ckpt.async_save, c.log.tensorboard = False, False
    c.train.dropout = False  # compiles faster; the export does not depend on it
    for key, value in kw.items():
        group, name = key.split("__")
        c[group][name] = value
    return c


def untrained_checkpoint(source: Path, workdir: Path, config) -> Path:
    """HF -> jaxembed -> a step-0 checkpoint, saved as `train.main` saves its checkpoints."""
    model_dir = workdir_lib.prepare_model_dir(str(source), workdir / "model", config.model.pooling)
    pooling = config.model.pooling or read_st_config(model_dir).pooling or "mean"
    sources = readers.open_sources(list(config.data.train))
    # Saved from one device; export restores onto all eight (Orbax reshards).
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    model = hf.load_model(source)
    state = step_lib.make_step(config, mesh, model).init(model)
    meta = export_meta.run_meta(config, model_dir, pooling, sources)
    mngr = checkpoint.manager(workdir, async_save=False)
    checkpoint.save(mngr, 0, state, None, meta)
    mngr.close()
    return workdir


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    instructed = [dict(r, instruction=INSTRUCTION) for r in toy_records("retr", "retrieval", 32, 2)]
    data = {
        "retr": write_jsonl(root / "retr.jsonl", instructed),
        "plain": write_jsonl(root / "plain.jsonl", toy_records("plain", "retrieval", 16, 2)),
    }
    dev = write_toy_beir(root / "dev", 8)
    models = {
        "bert": save_tiny_with_tokenizer("bert", root / "bert", num_hidden_layers=1),
        "xlm-roberta": save_tiny_with_tokenizer("xlm-roberta", root / "xlmr", num_hidden_layers=1),
        "minilm": minilm_path(),
    }
    return root, models, data, dev


def strip_prefix(tensors: dict) -> dict:
    """HF keys without the model-class prefix ("bert."), without non-persistent buffers."""
    prefix = next(
        (
            k[: -len("embeddings.word_embeddings.weight")]
            for k in tensors
            if k.endswith("embeddings.word_embeddings.weight")
        ),
        "",
    )
    return {
        k[len(prefix) :]: v
        for k, v in tensors.items()
        if k.startswith(prefix) and not k.endswith("position_ids")
    }


# --- no training: the tensors come back unchanged -------------------------------------------


@pytest.mark.parametrize("name", ["bert", "xlm-roberta", "minilm"])
def test_untrained_export_gives_back_the_original_tensors(base, name, tmp_path):
    _, models, data, _ = base
    config = tiny_config(models[name], [data["retr"]])
    run = untrained_checkpoint(models[name], tmp_path / "run", config)
    out = tmp_path / "out"
    assert convert.main(["--checkpoint", str(run), "--out", str(out)]) == 0
    original, exported = strip_prefix(read_weights(models[name])), read_weights(out)
    if not any(k.startswith("pooler.") for k in exported):
        original = {k: v for k, v in original.items() if not k.startswith("pooler.")}
    assert set(exported) == set(original)
    for key, value in original.items():
        assert exported[key].dtype == np.float32, key
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    cfg = json.loads((out / "config.json").read_text())
    src_cfg = json.loads((models[name] / "config.json").read_text())
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "layer_norm_eps"):
        assert cfg[key] == src_cfg[key], key
    if name == "minilm":
        # The real model's own sentence-transformers pipeline (mean pooling, Normalize,
        # max_seq_length 256) survives the round trip: the embeddings are the originals'.
        texts = [*TEXTS, " ".join(TEXTS * 8)]  # past 256 tokens: truncation matters
        ref = SentenceTransformer(str(models[name]), device="cpu").encode(texts)
        exported = SentenceTransformer(str(out), device="cpu")
        np.testing.assert_allclose(exported.encode(texts), ref, atol=1e-6, rtol=0)
        st = read_st_config(out)
        assert (st.pooling, st.max_seq_length, st.normalize) == ("mean", 256, True)
        # And jaxembed.load(run) embeds as the export does, prompts included.
        run_encoder = jaxembed.load(run)
        for prompt_name in ("query", "document"):
            a = run_encoder.encode(texts, prompt_name=prompt_name)
            b = exported.encode(texts, prompt_name=prompt_name)
            err = np.abs(a - b).max()
            print(f"minilm ({prompt_name}): export vs jaxembed.load(run): max-abs {err:.2e}")
            assert err <= 1e-5


def test_qwen3_last_token_export(base, tmp_path):
    """A decoder (stacked layers, last-token pooling on an appended EOS) converts through the
    same generic path: tensors back unchanged, and sentence-transformers appends the EOS."""
    from helpers import save_tiny_qwen3

    _, _, data, _ = base
    source = save_tiny_qwen3(tmp_path / "qwen3")
    config = tiny_config(source, [data["retr"]], model__pooling="lasttoken")
    run = untrained_checkpoint(source, tmp_path / "run", config)
    out = tmp_path / "out"
    assert convert.main(["--checkpoint", str(run), "--out", str(out)]) == 0
    original, exported = read_weights(source), read_weights(out)
    assert set(exported) == set(original)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    st_model = SentenceTransformer(str(out), device="cpu")
    eos = st_model.tokenizer.eos_token_id
    assert st_model.tokenize(["hi"])["input_ids"][0, -1].item() == eos
    ours = jaxembed.load(run)
    for prompt_name in (None, "query"):
        err = np.abs(
            ours.encode(TEXTS, prompt_name=prompt_name)
            - st_model.encode(TEXTS, prompt_name=prompt_name)
        ).max()
        assert err <= 1e-5, (prompt_name, err)


def test_bfloat16_export_and_shards(base, tmp_path):
    _, models, data, _ = base
    run = untrained_checkpoint(
        models["bert"], tmp_path / "run", tiny_config(models["bert"], [data["retr"]])
    )
    out = tmp_path / "out"
    args = ["--checkpoint", str(run), "--out", str(out), "--dtype", "bfloat16"]
    assert convert.main([*args, "--max-shard-size", "400KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    original, exported = strip_prefix(read_weights(models["bert"])), read_weights(out)
    for key, value in original.items():
        assert exported[key].dtype.name == "bfloat16", key
        np.testing.assert_array_equal(exported[key], value.astype(exported[key].dtype), err_msg=key)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


# --- after training: sentence-transformers on the export == jaxembed.load(run) ---------------


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """A few training steps on tiny BERT (one instruction everywhere, mean pooling, dev eval)
    and tiny XLM-R (an instructed and a plain dataset, CLS pooling), each exported."""
    _, models, data, dev = base
    runs = {}
    for name, cfg in {
        "bert": tiny_config(models["bert"], [data["retr"]], eval__data=(str(dev),)),
        "xlm-roberta": tiny_config(
            models["xlm-roberta"], [data["retr"], data["plain"]], model__pooling="cls"
        ),
    }.items():
        workdir = tmp_path_factory.mktemp(f"run-{name}")
        train.main(cfg, workdir)
        out = workdir.parent / f"{workdir.name}-export"
        assert convert.main(["--checkpoint", str(workdir), "--out", str(out)]) == 0
        runs[name] = workdir, out
    return runs


EXPECTED_PROMPTS = {
    "bert": {
        "query": f"Instruct: {INSTRUCTION}\nQuery: ",
        "document": "passage: ",
    },
    "xlm-roberta": {
        "query": "query: ",
        "retr": f"Instruct: {INSTRUCTION}\nQuery: ",
        "document": "passage: ",
    },
}


@pytest.mark.parametrize("name", ["bert", "xlm-roberta"])
def test_trained_export_embeds_like_jaxembed(trained, name):
    workdir, out = trained[name]
    st_model = SentenceTransformer(str(out), device="cpu")
    assert st_model.prompts == EXPECTED_PROMPTS[name]
    assert st_model.default_prompt_name is None
    ours = jaxembed.load(workdir)
    assert ours.prompts == EXPECTED_PROMPTS[name]
    worst = 0.0
    for prompt_name in [None, *EXPECTED_PROMPTS[name]]:  # None: no prompt
        a = ours.encode(TEXTS, prompt_name=prompt_name)
        b = st_model.encode(TEXTS, prompt_name=prompt_name)
        worst = max(worst, float(np.abs(a - b).max()))
    print(f"{name}: sentence-transformers(export) vs jaxembed.load(run): max-abs {worst:.2e}")
    assert worst <= 1e-5
    # Training moved the weights: the export is not the base model.
    source = json.loads((workdir / "model" / "jaxembed.json").read_text())["source"]
    before, after = read_weights(source), read_weights(out)
    key = "embeddings.word_embeddings.weight"
    assert np.abs(before[key] - after[key]).max() > 1e-4
    _, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    mode = "pooling_mode_mean_tokens" if name == "bert" else "pooling_mode_cls_token"
    assert pooling[mode] and pooling["include_prompt"] is True


def test_model_card_describes_the_run(trained):
    workdir, out = trained["bert"]
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sentence-transformers")
    for needle in (
        "steps: 2 (of 2 planned), global batch 8",
        "| retr | retrieval | 32 |",
        "`joint` contrastive loss, temperature 0.05",
        "linear warmup from 0 to 0.001 over 1 steps, then cosine decay to 0 at step 2",
        "Last evaluation, at step 2",
        "| ndcg@10 |",
        "pooling: `mean`",
        "Instruct: Given a need",
    ):
        assert needle in card, needle
    metrics = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in metrics if "eval/ndcg@10" in m][-1]
    assert f"| ndcg@10 | {last['eval/ndcg@10']:.4f} |" in card


def test_a_given_step_and_the_checkpoints_path(trained, tmp_path):
    workdir, _ = trained["bert"]
    for path in (workdir / "2", workdir / "checkpoints" / "2", workdir / "checkpoints"):
        assert workdir_lib.is_checkpoint(path)
        assert workdir_lib.find_checkpoint(path).step == 2
    assert not workdir_lib.is_checkpoint(minilm_path())


def test_parameters_are_restored_sharded_over_the_devices(trained):
    workdir, _ = trained["bert"]
    mesh = sharding.make_mesh(data=1, fsdp=-1)
    model = trained_model.restore_model(workdir_lib.find_checkpoint(workdir), mesh=mesh)
    emb = model.embeddings.word_embeddings.embedding.get_value()
    assert len(emb.sharding.device_set) == 8 and not emb.sharding.is_fully_replicated


def test_two_processes_gather_to_process_0(trained, tmp_path):
    """Two hosts (processes) of 4 CPU devices, started by launch/local.sh: every parameter
    is split over both; process 0 gathers each tensor and writes the same files as a
    one-process export."""
    workdir, single = trained["bert"]
    out = tmp_path / "out"
    rc, log = launch_local(
        2, ["-m", "jaxembed.convert", "--checkpoint", str(workdir), "--out", str(out)]
    )
    assert rc == 0, log
    assert f"[0] wrote {out}" in log and "[1] wrote" not in log
    a, b = read_weights(out), read_weights(single)
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert (out / "README.md").exists() and (out / "tokenizer.json").exists()


# --- errors that name the problem ------------------------------------------------------------


def test_errors_name_the_problem(base, trained, tmp_path, capsys):
    workdir, out = trained["bert"]
    with pytest.raises(workdir_lib.CheckpointError, match=r"no checkpoint found"):
        convert.export(tmp_path, tmp_path / "x")
    with pytest.raises(workdir_lib.CheckpointError, match=r"no such directory"):
        convert.export(tmp_path / "missing", tmp_path / "x")
    with pytest.raises(workdir_lib.CheckpointError, match=r"model folder: load it directly"):
        convert.export(minilm_path(), tmp_path / "x")
    with pytest.raises(workdir_lib.CheckpointError, match=r"no checkpoint at step 7; steps: \[2\]"):
        convert.export(workdir / "7", tmp_path / "x")
    with pytest.raises(
        FileExistsError, match=r"output directory is not empty \(pass --overwrite\)"
    ):
        convert.export(workdir, out)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a model folder"):
        convert.export(workdir, tmp_path / "notes", overwrite=True)
    with pytest.raises(FileExistsError, match="it contains the run"):
        convert.export(workdir, workdir.parent, overwrite=True)
    # The CLI prints the message and exits with status 2.
    with pytest.raises(SystemExit) as info:
        convert.main(["--checkpoint", str(workdir / "7"), "--out", str(tmp_path / "y")])
    assert info.value.code == 2
    assert "no checkpoint at step 7" in capsys.readouterr().err
    # A model family we cannot map back.
    moved = tmp_path / "moved"
    shutil.copytree(workdir, moved)
    cfg_file = moved / "model" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "model_type": "t5"}))
    with pytest.raises(
        hf.ModelFolderError, match=r"cannot be mapped back to a Hugging Face family.*'t5'"
    ):
        convert.export(moved, tmp_path / "z")


def test_overwrite_replaces_an_export(trained, tmp_path):
    workdir, out = trained["bert"]
    target = tmp_path / "out"
    shutil.copytree(out, target)
    (target / "stale.txt").write_text("from an older export")
    convert.export(workdir, target, overwrite=True)
    assert not (target / "stale.txt").exists() and (target / "model.safetensors").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


# --- prompts as trained ----------------------------------------------------------------------


def meta(datasets, template="Instruct: {instruction}\nQuery: {query}"):
    return {
        "query_prefix": "q: ",
        "passage_prefix": "p: ",
        "instruction_template": template,
        "datasets": {
            n: {"task": "retrieval", "rows": 1, "instructions": i} for n, i in datasets.items()
        },
    }


def test_prompts_follow_the_training_data():
    docs = {"document": "p: "}
    assert export_meta.trained_prompts(meta({"a": [], "b": []})) == {"query": "q: ", **docs}
    assert export_meta.trained_prompts(meta({"a": ["X"], "b": ["X"]})) == {
        "query": "Instruct: X\nQuery: ",
        **docs,
    }
    # Mixed: a plain dataset, an instructed one, one with two instructions, a name clash.
    assert export_meta.trained_prompts(
        meta({"a": ["X"], "b": ["Y", "Z"], "c": [], "query": ["W"]})
    ) == {
        "query": "q: ",
        "a": "Instruct: X\nQuery: ",
        "b_0": "Instruct: Y\nQuery: ",
        "b_1": "Instruct: Z\nQuery: ",
        "query_instruction": "Instruct: W\nQuery: ",
        **docs,
    }
    with pytest.raises(ValueError, match=r"instruction_template=.* does not end with '\{query\}'"):
        export_meta.trained_prompts(meta({"a": ["X"]}, template="{query} ({instruction})"))


def test_sentence_transformers_files_round_trip(tmp_path):
    from jaxembed.hf.sentence_transformers import STConfig, write_st_config

    st = STConfig(
        pooling="lasttoken",
        include_prompt=False,
        max_seq_length=32,
        do_lower_case=True,
        prompts={"query": "Instruct: x\nQuery: ", "document": ""},
        default_prompt_name="query",
        normalize=True,
    )
    write_st_config(tmp_path, st, embedding_dim=8)
    assert read_st_config(tmp_path) == st


def test_int8_ranges_are_calibrated_at_export(trained, tmp_path, capsys):
    """--calibration writes the int8 ranges of the exported model's document embeddings of
    the corpus's first documents; evaluate and search read them. A bad corpus stops before
    anything is written."""
    import jaxembed
    from jaxembed import quantization
    from jaxembed.retrieval import encoder_fns

    workdir, _ = trained["bert"]
    corpus = tmp_path / "corpus.txt"
    texts = [f"document number {i} about packages" for i in range(7)]
    corpus.write_text("\n".join(texts) + "\n")
    out = tmp_path / "export"
    args = ["--checkpoint", str(workdir), "--out", str(out), "--calibration", str(corpus)]
    assert convert.main([*args, "--calibration-size", "5"]) == 0
    assert "int8 ranges of 5 documents" in capsys.readouterr().out
    _, docs, _ = encoder_fns(jaxembed.load(out), batch_size=64)
    want = quantization.int8_ranges(docs(texts[:5]))
    np.testing.assert_allclose(quantization.load_ranges(out), want, rtol=1e-6)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(SystemExit):
        convert.main([*args[:3], str(tmp_path / "other"), "--calibration", str(empty)])
    assert "the corpus is empty" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
