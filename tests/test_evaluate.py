"""`jaxembed.evaluate`: metrics by hand and against MTEB, errors, the mesh, and the CLI on a
real Debian dev set (a short training run's checkpoint vs MTEB on its exported folder)."""

from __future__ import annotations

import importlib
import json
import math
import re
import socket
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_close, save_tiny_with_tokenizer, write_jsonl

from jaxembed import beir, retrieval
from jaxembed import evaluate as ev

FIXTURE = Path(__file__).parent / "fixtures" / "debian"
L2, L3, L4, L5 = (math.log2(n) for n in (2, 3, 4, 5))


# ------------------------------------------------------------------------------------------
# Metrics on hand-built cases


def test_binary_relevance_by_hand():
    qrels = {"q1": {"a": 1, "b": 1}, "q2": {"c": 1}}
    ranked = {"q1": ["x", "a", "y", "b"], "q2": ["c", "x"]}
    m = retrieval.retrieval_metrics(ranked, qrels)
    ndcg_q1 = (1 / L3 + 1 / L5) / (1 + 1 / L3)
    assert m["ndcg@10"] == pytest.approx((ndcg_q1 + 1) / 2)
    assert m["mrr@10"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["map@100"] == pytest.approx(((1 / 2 + 2 / 4) / 2 + 1) / 2)
    assert m["recall@1"] == pytest.approx((0 + 1) / 2)
    assert m["recall@10"] == m["recall@100"] == pytest.approx(1.0)


def test_graded_relevance_by_hand():
    # Grades 3 and 1 are relevant with gains 3 and 1; 0 and -1 are not relevant.
    qrels = {"q": {"a": 3, "b": 1, "c": 0, "d": -1}}
    m = retrieval.retrieval_metrics({"q": ["d", "b", "a", "c"]}, qrels)
    assert m["ndcg@10"] == pytest.approx((1 / L3 + 3 / L4) / (3 + 1 / L3))
    assert m["mrr@10"] == pytest.approx(1 / 2)
    assert m["map@100"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["recall@1"] == 0.0 and m["recall@10"] == 1.0


def test_cutoffs_and_unretrieved_relevant():
    # The relevant document at rank 11: outside @10, inside @100; a second one never found.
    ranked = {"q": [f"x{i}" for i in range(10)] + ["a"]}
    m = retrieval.retrieval_metrics(ranked, {"q": {"a": 1, "z": 1}})
    assert m["ndcg@10"] == m["mrr@10"] == m["recall@10"] == 0.0
    assert m["recall@100"] == pytest.approx(1 / 2)
    assert m["map@100"] == pytest.approx((1 / 11) / 2)  # divided by all relevant documents


def test_query_whose_judgments_are_all_non_relevant_scores_zero():
    # trec_eval (so MTEB) scores such a query 0 and keeps it in the mean.
    m = retrieval.retrieval_metrics({"q1": ["a"], "q2": ["a"]}, {"q1": {"a": 1}, "q2": {"a": 0}})
    assert all(m[k] == pytest.approx(0.5) for k in retrieval.METRICS)
    with pytest.raises(beir.EvalDataError, match="no query"):
        retrieval.retrieval_metrics({"q": ["a"]}, {"q": {"a": 0}})


def fake_encoders(query_vecs: dict[str, np.ndarray], doc_vecs: dict[str, np.ndarray]):
    return (
        lambda texts: np.stack([query_vecs[t] for t in texts]),
        lambda texts: np.stack([doc_vecs[t] for t in texts]),
    )


def test_ties_rank_by_document_id_descending():
    # Every document scores the same: trec_eval's order is by id, descending (string order):
    # "d2" > "d10" > "d1", so the relevant d1 is third.
    corpus = {"d1": "one", "d10": "ten", "d2": "two"}
    same = np.array([1.0, 0.0], np.float32)
    q_fn, d_fn = fake_encoders({"query": same}, dict.fromkeys(corpus.values(), same))
    data = (corpus, {"q": "query"}, {"q": {"d1": 1}})
    m = retrieval.evaluate_beir(q_fn, d_fn, None, data=data)
    assert m["ndcg@10"] == pytest.approx(1 / L4)
    assert m["mrr@10"] == pytest.approx(1 / 3)
    assert m["recall@1"] == 0.0


def random_case(seed: int, n_q: int = 12, n_d: int = 150):
    """Scores with many ties (one decimal) and graded qrels, as BEIR data + fake encoders.

    Documents are one-hot vectors and queries carry their score rows, so ``q @ d.T`` is
    exactly the score matrix.
    """
    rng = np.random.default_rng(seed)
    doc_ids = [f"d{i}" for i in rng.permutation(n_d)]  # ids unrelated to corpus order
    scores = np.round(rng.random((n_q, n_d)), 1).astype(np.float32)
    corpus = {d: f"text {d}" for d in doc_ids}
    queries = {f"q{i}": f"query {i}" for i in range(n_q)}
    qrels = {}
    for i in range(n_q):
        judged = rng.choice(n_d, size=rng.integers(1, 30), replace=False)
        qrels[f"q{i}"] = {doc_ids[j]: int(rng.integers(-1, 4)) for j in judged}
    qrels["q0"][doc_ids[0]] = 2  # at least one relevant document somewhere
    eye = np.eye(n_d, dtype=np.float32)
    q_fn, d_fn = fake_encoders(
        {f"query {i}": scores[i] for i in range(n_q)},
        {f"text {d}": eye[j] for j, d in enumerate(doc_ids)},
    )
    run = {f"q{i}": {d: float(scores[i, j]) for j, d in enumerate(doc_ids)} for i in range(n_q)}
    return (corpus, queries, qrels), q_fn, d_fn, run


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_mteb_scoring_on_the_same_scores(seed):
    # Through the adapter: it imports mteb without mteb creating ~/.cache/mteb.
    from jaxembed import mteb_adapter  # noqa: F401

    scorer = importlib.import_module("mteb._evaluators.retrieval_metrics")
    data, q_fn, d_fn, run = random_case(seed)
    ours = retrieval.evaluate_beir(q_fn, d_fn, None, data=data)
    # MTEB's scorer (pytrec_eval + its MRR) on the full score lists, ties included.
    _, ndcg, _map, recall, _, _, mrr, _, _ = scorer.calculate_retrieval_scores(
        run, data[2], [1, 10, 100]
    )
    theirs = {
        "ndcg@10": ndcg["NDCG@10"],
        "mrr@10": mrr["MRR@10"],
        "map@100": _map["MAP@100"],
        "recall@1": recall["Recall@1"],
        "recall@10": recall["Recall@10"],
        "recall@100": recall["Recall@100"],
    }
    for metric, value in theirs.items():
        assert ours[metric] == pytest.approx(value, abs=1e-5), metric  # MTEB rounds to 5 places


def test_blocked_search_does_not_depend_on_block_sizes():
    rng = np.random.default_rng(0)
    q = np.round(rng.normal(size=(7, 4)), 1).astype(np.float32)
    d = np.round(rng.normal(size=(23, 4)), 1).astype(np.float32)
    d[5] = d[17] = d[2]  # exact ties
    s = q @ d.T
    order = np.lexsort((np.broadcast_to(np.arange(23), s.shape), -s), axis=1)[:, :10]
    for block, query_block in [(1, 1), (3, 2), (8, 4), (64, 64)]:
        scores, idx = retrieval.top_k(q, d, 10, block=block, query_block=query_block)
        np.testing.assert_array_equal(idx, order)
        np.testing.assert_allclose(scores, np.take_along_axis(s, order, 1), rtol=1e-6)
    scores, idx = retrieval.top_k(q, d[:3], 100)  # k beyond the corpus: the whole corpus, ranked
    assert idx.shape == (7, 3)


# ------------------------------------------------------------------------------------------
# Errors


def write_beir(folder: Path, corpus, queries, qrels_lines, split="dev") -> Path:
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    (folder / "qrels" / f"{split}.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(line + "\n" for line in qrels_lines)
    )
    return folder


def test_qrels_query_missing_from_queries_names_it_and_the_file(tmp_path, capsys):
    folder = write_beir(
        tmp_path / "set",
        [{"_id": "d1", "text": "x"}],
        [{"_id": "q1", "text": "y"}],
        ["q1\td1\t1", "q9\td1\t1"],
    )
    with pytest.raises(beir.EvalDataError) as info:
        beir.load_beir(folder, "dev")
    msg = str(info.value)
    assert msg.startswith(f"{folder / 'qrels' / 'dev.tsv'}:3:")
    assert "'q9'" in msg and str(folder / "queries.jsonl") in msg
    with pytest.raises(SystemExit) as info:
        ev.main(["--model", "unused", "--data", str(folder)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'q9'" in err and len(err.splitlines()) == 1


def test_empty_corpus_and_missing_files(tmp_path):
    folder = write_beir(tmp_path / "set", [], [{"_id": "q1", "text": "y"}], [])
    with pytest.raises(beir.EvalDataError, match="corpus is empty") as info:
        beir.load_beir(folder, "dev")
    assert str(folder / "corpus.jsonl") in str(info.value)
    with pytest.raises(beir.EvalDataError, match=r"missing qrels/test\.tsv"):
        beir.load_beir(folder, "test")
    with pytest.raises(beir.EvalDataError, match="not a BEIR folder"):
        beir.find_sets(tmp_path / "set" / "qrels")


def test_corpus_text_joins_title_as_mteb_does():
    assert beir.corpus_text({"title": "T", "text": " body "}) == "T  body"
    assert beir.corpus_text({"title": "", "text": " body "}) == "body"
    assert beir.corpus_text({"text": "body"}) == "body"


def test_undefined_prompt_name_names_it_and_the_defined_ones():
    with pytest.raises(ValueError, match=r"'nope' is not defined by m; defined prompts: \['a'\]"):
        retrieval.pick_prompt({"a": "x"}, "nope", (), "m")
    assert retrieval.pick_prompt({"passage": "p: "}, None, retrieval.DOC_PROMPTS) == "p: "
    assert retrieval.pick_prompt({}, None, retrieval.QUERY_PROMPTS) == ""


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as info:
        ev.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--data", "--split", "--query-prompt", "--mteb", "--out"):
        assert flag in text


# ------------------------------------------------------------------------------------------
# Debian dev set: training run -> checkpoint -> jaxembed.evaluate vs MTEB on the export


@pytest.fixture(scope="module")
def debian_data(tmp_path_factory):
    from examples.debian_retrofit import debian

    out = tmp_path_factory.mktemp("debian")
    debian.build(
        out, lists_dir=FIXTURE, langs=["de", "fr", "ja", "pl"], max_per_task=100, verbose=False
    )
    return out


@pytest.fixture(scope="module")
def trained(debian_data, tmp_path_factory):
    """A few steps on Debian's train split; evaluated by the training loop on dev."""
    from jaxembed import config as config_lib
    from jaxembed import train

    base = tmp_path_factory.mktemp("evaluate")
    model = save_tiny_with_tokenizer("bert", base / "model", num_hidden_layers=1)
    c = config_lib.default_config()
    c.model.path = str(model)
    # Without their instruction, training queries carry the query prefix, which is what
    # the training loop's evaluation and the checkpoint's "query" prompt use.
    rows = [json.loads(x) for x in (debian_data / "train" / "debian-xling.jsonl").open()]
    train_file = write_jsonl(base / "xling.jsonl", [{**r, "instruction": ""} for r in rows])
    c.data.train = (str(train_file),)
    # Equal query / passage lengths: the checkpoint then encodes both as training did.
    c.data.max_query_length = c.data.max_passage_length = 32
    c.data.query_buckets = c.data.passage_buckets = (32,)
    c.data.num_negatives.retrieval = 0
    c.data.query_prefix, c.data.passage_prefix = "query: ", "passage: "
    c.train.global_batch, c.train.steps = 8, 2
    c.optim.warmup_steps, c.optim.lr = 1, 1e-3
    c.eval.data = tuple(str(p) for p in sorted((debian_data / "dev").iterdir()))
    c.ckpt.every, c.ckpt.async_save, c.log.tensorboard = 2, False, False
    c.loss.quantization = "binary"  # its index's metrics are logged too
    workdir = base / "run"
    return workdir, train.main(c, workdir), debian_data / "dev"


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open an internet connection fails the test (even if caught)."""
    attempts = []

    def refuse(self, address, *args):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"network access attempted: {address}")
        return real_connect(self, address, *args)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield
    assert not attempts, f"network access attempted: {attempts}"


def test_cli_on_checkpoint_matches_the_training_loops_evaluation(trained, tmp_path):
    workdir, results, dev = trained
    args = ["--model", str(workdir), "--data", str(dev), "--out", str(tmp_path)]
    out = ev.main([*args, "--quantization", "binary"])
    assert out["prompts"] == {"query": "query: ", "document": "passage: "}
    assert json.loads((tmp_path / "metrics.json").read_text())["sets"] == out["sets"]
    after = results["after"]
    for name, metrics in out["sets"].items():
        for metric in retrieval.METRICS:
            assert metrics[metric] == pytest.approx(after[f"eval/{name}/{metric}"], abs=1e-6)
    assert out["mean"]["ndcg@10"] == pytest.approx(after["eval/ndcg@10"], abs=1e-6)
    for how in ("index", "rescored"):  # the binary index of a run trained for one
        for metric in retrieval.METRICS:
            want = after[f"eval/binary_{how}/{metric}"]
            assert out["quantized"][how][metric] == pytest.approx(want, abs=1e-6)
    # A barely trained tiny model: rankings are far from perfect, so agreement means something.
    assert min(m["ndcg@10"] for m in out["sets"].values()) < 0.9


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    from jaxembed import convert

    return convert.export(trained[0], tmp_path_factory.mktemp("export") / "folder")


def test_mteb_on_exported_folder_matches_jaxembed_on_checkpoint(
    trained, exported, tmp_path, no_network, recwarn
):
    workdir, _, dev = trained
    ours = ev.main(["--model", str(workdir), "--data", str(dev), "--out", str(tmp_path / "jax")])
    args = ["--model", str(exported), "--data", str(dev), "--out", str(tmp_path / "st")]
    st = ev.main([*args, "--mteb", "--backend", "sentence-transformers"])
    assert st["scorer"] == "mteb" and st["prompts"] == ours["prompts"]
    # Our export's prompt names are all ones MTEB knows: it warns about none.
    assert not [str(w.message) for w in recwarn if "is not valid" in str(w.message)]
    for name, metrics in ours["sets"].items():
        for metric in retrieval.METRICS:
            assert st["sets"][name][metric] == pytest.approx(metrics[metric], abs=1e-4), (
                name,
                metric,
            )
    # MTEB's own result files, in the output folder.
    files = list((tmp_path / "st" / "mteb" / "results").rglob("xling-de.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())["scores"]["dev"][0]
    assert saved["ndcg_at_10"] == pytest.approx(ours["sets"]["xling-de"]["ndcg@10"], abs=1e-4)


def test_exported_folder_reads_the_trained_prompts_by_default(trained, exported):
    # sentence-transformers 6 always defines a "document" prompt (empty unless saved), so
    # an export must save the passage prefix under that name for MTEB to use it.
    from sentence_transformers import SentenceTransformer

    import jaxembed

    st = SentenceTransformer(str(exported), device="cpu", local_files_only=True)
    assert retrieval.st_encoder_fns(st)[2] == retrieval.encoder_fns(jaxembed.load(trained[0]))[2]


def test_mteb_runs_the_jax_encoder_through_the_adapter(trained, tmp_path, no_network):
    workdir, results, dev = trained
    out = ev.main(["--model", str(workdir), "--data", str(dev), "--mteb", "--out", str(tmp_path)])
    assert (tmp_path / "mteb" / "results").is_dir()
    for name, metrics in out["sets"].items():
        for metric in retrieval.METRICS:
            want = results["after"][f"eval/{name}/{metric}"]
            assert metrics[metric] == pytest.approx(want, abs=1e-4), (name, metric)


def test_adapter_prompts_follow_mteb_lookup(trained):

    import jaxembed
    from jaxembed import mteb_adapter

    PromptType = mteb_adapter.PromptType
    enc = jaxembed.load(trained[0])
    task = mteb_adapter.beir_task(trained[2] / "xling-de")
    # No task-specific prompt: sentence-transformers' encode_query / encode_document defaults.
    model = mteb_adapter.MTEBEncoder(enc)
    assert model.prompt_text(task.metadata, PromptType.query) == "query: "
    assert model.prompt_text(task.metadata, PromptType.document) == "passage: "
    # By task type, then by prompt type (MTEB's order).
    enc.prompts = {**enc.prompts, "Retrieval-query": "rq: ", "Retrieval": "retrieval: "}
    model = mteb_adapter.MTEBEncoder(enc)
    assert model.prompt_text(task.metadata, PromptType.query) == "rq: "
    assert model.prompt_text(task.metadata, PromptType.document) == "retrieval: "
    fixed = mteb_adapter.MTEBEncoder(enc, query_prompt="query", doc_prompt="document")
    assert fixed.prompt_text(task.metadata, PromptType.query) == "query: "
    assert fixed.prompt_text(task.metadata, PromptType.document) == "passage: "
    with pytest.raises(ValueError, match="'nope' is not defined"):
        mteb_adapter.MTEBEncoder(enc, query_prompt="nope")


def test_cli_undefined_prompt_name_stops_before_encoding(trained, capsys):
    workdir, _, dev = trained
    with pytest.raises(SystemExit) as info:
        ev.main(["--model", str(workdir), "--data", str(dev), "--query-prompt", "nope"])
    assert info.value.code == 2
    assert re.search(r"'nope' is not defined .*\['document', 'query'\]", capsys.readouterr().err)


def test_mesh_encoding_equals_single_device(trained):
    import jax

    import jaxembed

    texts = ["Java OpenStreetMap tile viewer", "a music pack", "x", "cron frontend for KDE", "y"]
    plain = jaxembed.load(trained[0])
    single = plain.encode(texts, batch_size=4)
    sharded = retrieval.on_mesh(jaxembed.load(trained[0]))
    assert sharded._mesh.size == jax.local_device_count() == 8
    assert_close(sharded.encode(texts, batch_size=4), single)


def test_importing_the_mteb_adapter_leaves_the_home_folder_alone(tmp_path):
    """`import mteb` creates its result cache (~/.cache/mteb) as a side effect; through the
    adapter it lands in the temp directory, and MTEB_CACHE is not left set."""
    import os
    import subprocess
    import sys

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MTEB_CACHE"}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), TMPDIR=str(tmp_path))
    probe = "import os, jaxembed.mteb_adapter; print(os.environ.get('MTEB_CACHE'))"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"
    assert not (home / ".cache" / "mteb").exists()
    assert (tmp_path / "jaxembed-mteb-cache").exists()  # where it went instead


def test_quantized_index_metrics_beside_the_float_ones(trained, exported, tmp_path):
    """--quantization: the float metrics unchanged, the index's alone and rescored; int8
    codes use the folder's ranges when it has them, else the corpus's."""
    import shutil

    from jaxembed import quantization

    workdir, results, dev = trained
    out = ev.main(["--model", str(workdir), "--data", str(dev), "--quantization", "binary"])
    after = results["after"]
    for name, metrics in out["sets"].items():
        assert metrics["ndcg@10"] == pytest.approx(after[f"eval/{name}/ndcg@10"], abs=1e-6)
        assert set(metrics["binary"]) == {"index", "rescored"}
    mean = out["quantized"]
    assert mean["rescored"]["ndcg@10"] == pytest.approx(
        np.mean([m["binary"]["rescored"]["ndcg@10"] for m in out["sets"].values()])
    )
    folder = tmp_path / "folder"
    shutil.copytree(exported, folder)
    args = ["--model", str(folder), "--data", str(dev), "--quantization", "int8"]
    calibrated = ev.main(args)
    quantization.save_ranges(folder, np.stack([np.full(32, -50.0), np.full(32, 50.0)]))
    coarse = ev.main(args)  # every value in one or two of 255 buckets: the index is blind
    assert coarse["quantized"]["index"]["ndcg@10"] < calibrated["quantized"]["index"]["ndcg@10"]
    assert coarse["sets"].keys() == calibrated["sets"].keys()
