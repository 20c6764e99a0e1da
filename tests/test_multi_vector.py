"""Multi-vector (late-interaction, ColBERT) models: trained, evaluated by exact MaxSim,
resumed, exported as sentence-transformers' MultiVectorEncoder and loaded back there.

The loss's MaxSim against a float64 reference is in test_losses, the step on the mesh with
GradCache, packing and distillation in test_train_step."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import assert_close, save_tiny_qwen3

QUERIES = [
    "what installs packages",
    "a longer query about the debian package manager and its tools",
]
DOCS = ["apt installs packages.", "dpkg is the low-level tool under apt", "x"]


@pytest.fixture(scope="module")
def colbert_runs(train_setup, tmp_path_factory):
    """A 16-dimension token projection on the tiny BERT, queries expanded to 16 tokens that
    are not attended to (classic ColBERT), prompts as markers; four steps straight, and a
    copy cut back to its step 2 and resumed."""
    from trainrun import tiny_config

    from jaxembed import train

    base = tmp_path_factory.mktemp("colbert")

    def config():
        return tiny_config(
            train_setup, steps=4, model__multi_vector_dim=16, model__query_expansion=16,
            model__query_expansion_attend=False, data__query_prefix="[Q] ",
            data__passage_prefix="[D] ", loss__temperature=1.0, ckpt__every=2,
            data__train=train_setup[2][:1],
        )  # fmt: skip

    straight = train.main(config(), base / "straight")
    shutil.copytree(base / "straight", base / "resumed")
    shutil.rmtree(base / "resumed" / "checkpoints" / "4")  # steps 3 and 4 train again
    assert train.main(config(), base / "resumed")["step"] == 4
    return base, straight


def test_a_multi_vector_run_trains_evaluates_and_resumes_exactly(colbert_runs):
    from trainrun import read_losses

    base, straight = colbert_runs
    assert straight["after"]["eval/ndcg@10"] > 0
    assert straight["after"]["eval/ndcg@10"] != straight["before"]["eval/ndcg@10"]
    assert_close(read_losses(base / "resumed"), read_losses(base / "straight"), tol=1e-6,
                 what="loss at step ")  # fmt: skip


def test_the_export_is_a_multi_vector_encoder_with_our_tokens_and_scores(
    colbert_runs, train_setup, tmp_path
):
    """sentence-transformers 6's MultiVectorEncoder loads the export: its query tokens
    (markers, expansion to 16, not attended) and document tokens, and its MaxSim scores,
    are ours (the run's and the exported folder's through jaxembed.load, packed or not);
    `jaxembed.evaluate` gives the same metrics through either backend. The folder's
    expansion made attended reads as sentence-transformers reads it, and differently."""
    from sentence_transformers import MultiVectorEncoder

    import jaxembed
    from jaxembed import convert, evaluate, search
    from jaxembed.hf.sentence_transformers import read_st_config

    base, _ = colbert_runs
    out = tmp_path / "export"
    assert convert.main(["--checkpoint", str(base / "straight"), "--out", str(out)]) == 0
    st = read_st_config(out)
    assert st.multi_vector and st.query_expansion == 16 and st.normalize
    assert not st.query_expansion_attend
    assert [(x.kind, x.in_features, x.out_features, x.bias) for x in st.head] == [
        ("dense", 32, 16, False)
    ]
    cfg = json.loads((out / "config_sentence_transformers.json").read_text())
    assert cfg["model_type"] == "MultiVectorEncoder" and cfg["similarity_fn_name"] == "maxsim"
    assert cfg["prompts"] == {"query": "[Q] ", "document": "[D] "}
    ours = jaxembed.load(base / "straight")
    q = ours.encode_tokens(QUERIES, "query", query=True)
    d = ours.encode_tokens(DOCS, "document")
    assert [len(x) for x in q] == [16, 16] and all(x.shape[1] == 16 for x in d)
    packed = jaxembed.load(out, packing=True)
    for a, b in zip(packed.encode_tokens(QUERIES, "query", query=True), q, strict=True):
        assert_close(a, b)
    ref = MultiVectorEncoder(str(out), device="cpu")
    theirs_q, theirs_d = ref.encode_query(QUERIES), ref.encode_document(DOCS)
    for a, b in zip([*theirs_q, *theirs_d], [*q, *d], strict=True):
        assert a.shape == b.shape
        assert_close(a.numpy(), b)
    attended = tmp_path / "attended"  # the same weights, the expansion attended
    shutil.copytree(out, attended)
    cfg_file = attended / "sentence_bert_config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"attend": false', '"attend": true'))
    mine = jaxembed.load(attended).encode_tokens(QUERIES, "query", query=True)
    theirs = MultiVectorEncoder(str(attended), device="cpu").encode_query(QUERIES)
    for a, b in zip(theirs, mine, strict=True):
        assert_close(a.numpy(), b)
    assert np.abs(mine[0] - q[0]).max() > 1e-3  # the short query's expansion now read
    scores = np.asarray(
        search.maxsim(search.padded_tokens(q, True), search.padded_tokens(d, False))
    )
    assert_close(ref.similarity(theirs_q, theirs_d).numpy(), scores)
    assert scores.shape == (2, 3) and (scores > 0).all()
    card = (out / "README.md").read_text()
    assert "MultiVectorEncoder(" in card
    dev = ["--data", str(train_setup[3]), "--model", str(out)]
    jax_side = evaluate.main([*dev, "--backend", "jax"])["mean"]
    torch_side = evaluate.main([*dev, "--backend", "sentence-transformers"])["mean"]
    assert_close(torch_side, jax_side, tol=1e-4)
    assert torch.is_tensor(theirs_q[0])
    with pytest.raises(SystemExit):  # MTEB scores one vector per text: refused in one line
        evaluate.main([*dev, "--mteb"])


def test_multi_vector_settings_are_checked_in_one_line(train_setup, tmp_path):
    from trainrun import tiny_config

    from jaxembed import config as config_lib
    from jaxembed import train

    bad = tiny_config(train_setup, model__multi_vector_dim=8, model__pooling="cls")
    with pytest.raises(ValueError, match=r"multi_vector_dim: a multi-vector model keeps every"):
        config_lib.validate(bad)
    with pytest.raises(ValueError, match=r"query_expansion is ColBERT's: it needs"):
        train.main(tiny_config(train_setup, model__query_expansion=8), tmp_path / "a")
    with pytest.raises(ValueError, match=r"max_query_length=16: queries are 8 tokens"):
        c = tiny_config(train_setup, model__multi_vector_dim=8, model__query_expansion=8)
        train.main(c, tmp_path / "b")
    c = tiny_config(train_setup, model__multi_vector_dim=8, loss__quantization="binary")
    with pytest.raises(ValueError, match=r"multi-vector model's token vectors are not quantized"):
        train.main(c, tmp_path / "c")
    qwen = save_tiny_qwen3(tmp_path / "qwen")  # its tokenizer has no mask token to expand with
    c = tiny_config(train_setup, model__path=str(qwen), model__multi_vector_dim=8,
                    model__query_expansion=16)  # fmt: skip
    with pytest.raises(ValueError, match=r"has no mask token, which query expansion pads"):
        train.main(c, tmp_path / "d")


def test_a_folders_query_expansion_is_kept_unless_the_config_names_another():
    """`output_settings`: a new expansion is not attended unless asked (sentence-transformers'
    default); a multi-vector folder keeps its length and attend unless the config names
    them; attend without any expansion is one line."""
    from jaxembed.hf.sentence_transformers import STConfig, output_settings

    def settings(st, length=0, attend=None, dim=0):
        out = output_settings(st, 32, multi_vector=(dim, length, attend))
        return out, (out.query_expansion, out.query_expansion_attend)

    classic, got = settings(STConfig(), 8, dim=16)
    assert classic.multi_vector and got == (8, False)
    attended, got = settings(classic, attend=True)
    assert got == (8, True)
    assert settings(attended)[1] == settings(attended, 8)[1] == (8, True)
    assert settings(attended, 12, False)[1] == (12, False)
    with pytest.raises(ValueError, match=r"query_expansion_attend: the model has no query exp"):
        settings(STConfig(), attend=True, dim=16)


def test_a_multi_vector_model_mines_by_maxsim(colbert_runs, train_setup, tmp_path):
    """Mining with a multi-vector model: every query's tokens (expanded) against every
    document's by exact MaxSim, cached as (texts, tokens, dim) shards; the cosine default
    of max_score is refused in one line, before anything is read."""
    from jaxembed import mine
    from jaxembed.mining import MiningError

    base, _ = colbert_runs
    retr = train_setup[2][0]
    with pytest.raises(MiningError, match=r"max_score=0.8 is a cosine threshold.*multi-vector"):
        mine.mine(str(base / "straight"), retr, tmp_path / "refused.jsonl")
    out = tmp_path / "mined.jsonl"
    stats = mine.mine(str(base / "straight"), retr, out, max_score=None, num_negatives=2,
                      skip_top=0, relative_margin=0.0, cache=tmp_path / "cache")  # fmt: skip
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == stats["records_out"] == 48
    kept = [len(r["negatives"]) for r in rows]
    # The barely trained model scores many candidates above a row's positive, which the
    # margin drops (relative_margin=0: below the positive): some rows keep fewer.
    assert max(kept) == 2 and sum(k == 2 for k in kept) >= 12, kept
    assert all(r["positive"] not in r["negatives"] for r in rows)
    shard = np.load(next((tmp_path / "cache" / "queries").glob("shard_*.npy")))
    assert shard.shape[1:] == (16, 16)  # 16 expanded query tokens of 16 dimensions


def test_maxsim_search_ranks_as_a_float64_brute_force():
    """`search.top_k` on token vectors (padded as `search.padded_tokens` lays them out) in
    blocks of 4 documents of one width, cut to their real tokens, and 3 queries ranks as
    MaxSim over the real tokens in float64, equal documents by index; `search.own` scores
    each query with its own document alike."""
    from jaxembed import search

    rng = np.random.default_rng(0)

    def texts(n, longest):
        out = [rng.normal(size=(rng.integers(1, longest + 1), 8)) for _ in range(n)]
        return [(x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32) for x in out]

    q, d = texts(7, 5), texts(13, 70)
    d += [d[5], d[3]]  # exact ties: the lower index ranks first
    want = np.array([[(a.astype(np.float64) @ b.T).max(1).sum() for b in d] for a in q])
    qp, dp = search.padded_tokens(q, query=True), search.padded_tokens(d, query=False, width=80)
    np.testing.assert_array_equal(search.token_lengths(dp), [len(x) for x in d])
    widths = [w for _, w in search._blocks(dp, 4)]
    assert widths == sorted(widths, reverse=True) and min(widths) < 80, widths
    scores, idx = search.top_k(qp, dp, k=len(d), block=4, query_block=3)
    assert_close(scores, np.sort(want, 1)[:, ::-1])
    np.testing.assert_array_equal(idx, np.argsort(-want, 1, kind="stable"))
    whole = search.top_k(qp, dp, k=len(d))  # one block a width: the same ranking
    np.testing.assert_array_equal(whole[1], idx)
    assert_close(whole[0], scores)
    assert_close(np.asarray(search.own(qp, dp[:7, None]))[:, 0], want[np.arange(7), np.arange(7)])


def test_reused_document_tokens_score_as_fresh_ones(colbert_runs):
    """`retrieval.reuse_last` on a multi-vector model's documents: a call mixing texts kept
    from the previous call (padded to their own call's longest) with new, longer ones
    scores by MaxSim exactly as encoding them afresh."""
    import jaxembed
    from jaxembed import retrieval, search

    base, _ = colbert_runs
    enc = jaxembed.load(base / "straight")
    queries, docs, _ = retrieval.encoder_fns(enc)
    cached = retrieval.reuse_last(docs)
    cached(DOCS[2:])  # "x": a call of short documents
    mixed = cached(DOCS[::-1])  # "x" kept, two longer ones new
    q = queries(QUERIES)
    assert_close(
        np.asarray(search.maxsim(q, mixed)), np.asarray(search.maxsim(q, docs(DOCS[::-1])))
    )
