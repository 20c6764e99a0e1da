"""CSR (a sparse autoencoder over a dense model): against sentence-transformers' own module,
loss and SparseEncoder, trained on the mesh, resumed, exported and loaded back.

The references are the torch implementations themselves (``SparseAutoEncoder``,
``CSRReconstructionLoss``, ``SparseMultipleNegativesRankingLoss``) in float64, on the same
weights; the folders are written by sentence-transformers where it writes them.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_close

from jaxembed import losses
from jaxembed.hf.sentence_transformers import _fill_sparse
from jaxembed.models import sparse
from jaxembed.models.head import SPARSE, HeadLayer, build_head

torch = pytest.importorskip("torch")
st_sparse = pytest.importorskip("sentence_transformers.sparse_encoder")

DIM, HIDDEN, K, K_AUX = 12, 40, 5, 9


def torch_sae(tmp_path, seed=0):
    """sentence-transformers' module with random biases and dead counts, saved by itself,
    and ours read from its folder."""
    from sentence_transformers.sparse_encoder.modules import SparseAutoEncoder

    torch.manual_seed(seed)
    ref = SparseAutoEncoder(DIM, HIDDEN, k=K, k_aux=K_AUX, dead_threshold=30)
    with torch.no_grad():
        ref.pre_bias.normal_(0, 0.1)
        ref.latent_bias.normal_(0, 0.1)
        # Around the threshold (dead: > 30 after the top-k's update), and some long dead.
        ref.stats_last_nonzero.copy_(torch.tensor([29, 30, 31, 2, 60] * (HIDDEN // 5)))
    ref.save(str(tmp_path))
    head = build_head([HeadLayer(SPARSE, DIM, HIDDEN, k=K, k_aux=K_AUX)])
    _fill_sparse(head.sparse, tmp_path)
    return ref.double(), head


def inputs(seed, rows=6):
    x = np.random.default_rng(seed).normal(size=(rows, DIM))
    return x / np.linalg.norm(x, axis=-1, keepdims=True)  # unit vectors, as after Normalize


def test_the_sparse_vectors_are_sentence_transformers(tmp_path):
    ref, head = torch_sae(tmp_path)
    x = inputs(0, 8)
    with torch.inference_mode():
        want = ref({"sentence_embedding": torch.tensor(x)})["sentence_embedding"].numpy()
    got = np.asarray(head(jnp.asarray(x, jnp.float32)))
    assert_close(got, want, what="top-k latents")
    assert (got != 0).sum(-1).max() <= K and sparse.active_dims(got) > 0
    assert head.out_features == HIDDEN


def test_the_csr_loss_and_dead_counts_are_sentence_transformers(tmp_path):
    """sentence-transformers' columns: queries, positives, a first hard negative per row, a
    second one (two rows padded) and a third (all padding: no column at all). The
    reconstruction terms, the dead counts after the step and the InfoNCE on dot products
    equal CSRLoss's, and so do their gradients in the autoencoder's weights and the inputs."""
    from sentence_transformers.sparse_encoder.losses import CSRReconstructionLoss
    from sentence_transformers.sparse_encoder.losses.sparse_multiple_negatives_ranking import (
        SparseMultipleNegativesRankingLoss,
    )

    ref, head = torch_sae(tmp_path)
    stats0 = ref.stats_last_nonzero.clone()
    q, p, n1, n2, n3 = (inputs(seed) for seed in range(1, 6))
    real2 = np.arange(6) < 4  # the second negatives of rows 4 and 5 are padding
    beta = 0.1

    # The reference: each real column, its padding left out.
    ref.train()
    cols = [torch.tensor(a, requires_grad=True) for a in (q, p, n1, n2[real2])]
    outs = [ref({"sentence_embedding": c}) for c in cols]
    recon = CSRReconstructionLoss(model=None, beta=beta).compute_loss_from_embeddings(outs)
    mnrl = SparseMultipleNegativesRankingLoss(model=None)  # dot product, scale 1
    # InfoNCE on (anchor, positive, negative): the first negatives.
    emb = [o["sentence_embedding"] for o in outs[:3]]
    total = sum(recon.values()) + mnrl.compute_loss_from_embeddings(emb, None)
    total.backward()
    want_grads = {
        "encoder": {"kernel": ref.encoder.weight.grad.numpy().T},
        "latent_bias": ref.latent_bias.grad.numpy(),
        "pre_bias": ref.pre_bias.grad.numpy(),
        "q": cols[0].grad.numpy(),
    }

    graphdef = nnx.graphdef(head.sparse)
    real = [np.ones(6, bool)] * 3 + [real2, np.zeros(6, bool)]

    def ours(params, *x):
        sae = nnx.merge(graphdef, params)
        towers = [(a, jnp.asarray(r)) for a, r in zip(x, real, strict=True)]
        stats = jnp.asarray(stats0.numpy(), jnp.int32)
        rec, stats = sparse.reconstruction_loss(sae, towers, stats, beta)
        zq, zp, zn = sae(x[0]), sae(x[1]), sae(x[2])
        loss = losses.retrieval_loss(zq, zp, zn[:, None], temperature=1.0, similarity="dot")
        return rec + loss, (rec, stats)

    params = nnx.to_pure_dict(nnx.state(head.sparse))
    f32 = [jnp.asarray(a, jnp.float32) for a in (q, p, n1, n2, n3)]
    (value, (rec, stats)), grads = jax.value_and_grad(ours, (0, 1), has_aux=True)(params, *f32)
    assert_close(float(rec), sum(recon.values()).item(), what="reconstruction")
    assert_close(float(value), total.item(), what="CSR loss")
    np.testing.assert_array_equal(np.asarray(stats), ref.stats_last_nonzero.numpy())
    assert_close({**grads[0], "q": grads[1]}, want_grads, what="gradients")


TEXTS = [
    "how do I sync files between machines?",
    "A fast, scalable, distributed revision control system.",
    "Ein schnelles, verteiltes Versionskontrollsystem.",
    "?!",
]


@pytest.fixture(scope="module")
def csr_runs(train_setup, tmp_path_factory):
    """CSR appended to the tiny dense BERT (a bare HF folder: mean pooling, Normalize), four
    steps of retrieval straight, and a copy of the run cut back to its step 2 checkpoint
    and resumed. Latents die after 3 forward passes (2 per column and step), so the
    auxiliary loss reads the restored dead counts from the first resumed step on."""
    from trainrun import tiny_config

    from jaxembed import train

    base = tmp_path_factory.mktemp("csr")

    def config(**kw):
        return tiny_config(
            train_setup, steps=4, model__sparse="csr", model__csr_hidden_dim=64, model__csr_k=6,
            model__csr_dead_threshold=3, loss__temperature=1.0, ckpt__every=2,
            data__train=train_setup[2][:1], **kw,
        )  # fmt: skip

    straight = train.main(config(), base / "straight")
    shutil.copytree(base / "straight", base / "resumed")
    shutil.rmtree(base / "resumed" / "checkpoints" / "4")  # steps 3 and 4 train again
    resumed = train.main(config(), base / "resumed")
    assert resumed["step"] == 4
    return base, straight


def test_csr_trains_logs_its_sparsity_and_resumes_exactly(csr_runs):
    from trainrun import read_losses

    base, straight = csr_runs
    after = straight["after"]
    assert 0 < after["eval/query_active_dims"] <= 6 and 0 < after["eval/corpus_active_dims"] <= 6
    assert after["eval/ndcg@10"] > 0
    logs = [json.loads(x) for x in (base / "straight" / "metrics.jsonl").read_text().splitlines()]
    dead = {r["step"]: r["dead_latents"] for r in logs if "dead_latents" in r}
    assert max(dead.values()) > 0  # the auxiliary loss had latents to revive
    resumed = [json.loads(x) for x in (base / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: r["dead_latents"] for r in resumed if "dead_latents" in r} == dead
    want, got = read_losses(base / "straight"), read_losses(base / "resumed")
    assert_close(got, want, tol=1e-6, what="loss at step ")


def test_csr_exports_as_a_sparse_encoder_with_the_same_vectors(csr_runs, train_setup, tmp_path):
    """sentence-transformers' SparseEncoder loads the export: its sparse vectors and dot
    scores are ours (the run's and the exported folder's through jaxembed.load), and so are
    `jaxembed.evaluate`'s metrics and sparsity through either backend."""
    from sentence_transformers import SparseEncoder

    import jaxembed
    from jaxembed import convert, evaluate
    from jaxembed.hf.sentence_transformers import read_st_config

    base, _ = csr_runs
    out = tmp_path / "export"
    assert convert.main(["--checkpoint", str(base / "straight"), "--out", str(out)]) == 0
    st = read_st_config(out)
    assert st.sparse and [x.kind for x in st.head] == ["normalize", SPARSE]
    assert st.head[-1] == HeadLayer(SPARSE, 32, 64, k=6, k_aux=16, dead_threshold=3)
    cfg = json.loads((out / "config_sentence_transformers.json").read_text())
    assert (cfg["model_type"], cfg["similarity_fn_name"]) == ("SparseEncoder", "dot")
    ours = jaxembed.load(base / "straight")
    assert ours.sparse and ours.dim == 64
    mine = ours.encode(TEXTS)
    assert_close(jaxembed.load(out).encode(TEXTS), mine)
    ref = SparseEncoder(str(out), device="cpu")
    theirs = ref.encode(TEXTS, convert_to_tensor=True).to_dense().numpy()
    assert_close(theirs, mine)
    assert 0 < sparse.active_dims(mine) <= 6
    scores = ref.similarity(torch.tensor(theirs[:2]), torch.tensor(theirs[2:])).numpy()
    assert_close(scores, mine[:2] @ mine[2:].T)
    card = (out / "README.md").read_text()
    assert "SparseAutoEncoder 32->64 (top 6)" in card and "SparseEncoder(" in card
    dev = ["--data", str(train_setup[3]), "--model", str(out)]
    jax_side = evaluate.main([*dev, "--backend", "jax"])["mean"]
    torch_side = evaluate.main([*dev, "--backend", "sentence-transformers"])["mean"]
    assert 0 < jax_side["corpus_active_dims"] <= 6
    assert_close(torch_side, jax_side, tol=1e-4)
    with pytest.raises(SystemExit):  # int8 ranges of a sparse model: refused, nothing written
        convert.main(["--checkpoint", str(base / "straight"), "--out", str(tmp_path / "q"),
                      "--calibration", str(train_setup[2][0])])  # fmt: skip
    assert not (tmp_path / "q").exists()


def test_csr_mines_by_dot_product_and_refuses_a_cosine_threshold(csr_runs, train_setup, tmp_path):
    """A sparse model mines hard negatives (exact search over its sparse vectors); the
    default max_score, a cosine threshold, is refused in one line before anything is read."""
    from jaxembed import mine
    from jaxembed.mining import MiningError

    base, _ = csr_runs
    retr = train_setup[2][0]
    with pytest.raises(MiningError, match=r"max_score=0.8 is a cosine threshold.*sparse model"):
        mine.mine(str(base / "straight"), retr, tmp_path / "refused.jsonl")
    out = tmp_path / "mined.jsonl"
    stats = mine.mine(
        str(base / "straight"), retr, out, max_score=None, num_negatives=2, skip_top=0
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    kept = [len(r["negatives"]) for r in rows]
    # The barely trained model scores many candidates within 5% of (or above) a row's
    # positive, which the relative margin drops: a few rows keep fewer.
    assert len(rows) == 48 and max(kept) == 2 and sum(k == 2 for k in kept) >= 24, kept
    assert stats["records_out"] == 48


def test_a_step_saved_before_the_state_had_buffers_still_restores(tmp_path):
    """Checkpoints written before the train state carried ``buffers`` (every dense run's
    are empty) resume after the upgrade; a CSR state, whose buffers they lack, does not."""
    from flax import struct

    from jaxembed import checkpoint
    from jaxembed.train_state import TrainState

    @struct.dataclass
    class Before:  # the train state's fields until then
        step: jax.Array
        params: dict
        opt_state: tuple
        rng: jax.Array

    old = Before(jnp.int32(7), {"w": jnp.arange(3.0)}, (jnp.ones(2),), jnp.zeros(2, jnp.uint32))
    with checkpoint.manager(tmp_path, async_save=False) as mngr:
        checkpoint.save(mngr, 7, old, {"next_batch": 7}, {"k": 1}, force=True)
        mngr.wait_until_finished()

    def abstract(buffers):
        state = TrainState(old.step, old.params, old.opt_state, old.rng, buffers)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)

    with checkpoint.manager(tmp_path, read_only=True) as mngr:
        restored = checkpoint.restore(mngr, 7, abstract({}))
        assert restored.state.buffers == {} and int(restored.state.step) == 7
        np.testing.assert_array_equal(restored.state.params["w"], [0.0, 1.0, 2.0])
        assert restored.data == {"next_batch": 7} and restored.meta == {"k": 1}
        with pytest.raises(ValueError):
            checkpoint.restore(mngr, 7, abstract({sparse.STATS: jnp.zeros(4, jnp.int32)}))


# --- SPLADE ----------------------------------------------------------------------------------


def save_tiny_mlm(folder, model_type="bert", seed=0):
    """A random tiny *ForMaskedLM (its head's biases random too) with all-MiniLM-L6-v2's
    tokenizer (vocab 30522), saved by transformers."""
    import shutil

    import transformers
    from helpers import TINY, TOKENIZER_FILES, minilm_path

    torch.manual_seed(seed)
    kwargs = dict(TINY, vocab_size=30522, num_hidden_layers=1)
    if model_type != "bert":
        kwargs.update(pad_token_id=1, type_vocab_size=1)
        kwargs["max_position_embeddings"] += 2
    cfg = transformers.AutoConfig.for_model(model_type, **kwargs)
    model = transformers.AutoModelForMaskedLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # random biases; the vocabulary's below 0, as trained
                p.normal_(-1.5 if p.shape == (30522,) else 0.0, 0.5)  # ones are: most are 0
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_path() / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def splade_folder(tmp_path_factory):
    """The tiny BERT MLM as sentence-transformers 6 saves a SPLADE model."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sparse_encoder.modules import SpladePooling

    root = tmp_path_factory.mktemp("splade")
    mlm = save_tiny_mlm(root / "mlm")
    modules = [Transformer(str(mlm), transformer_task="fill-mask"), SpladePooling("max")]
    SparseEncoder(modules=modules, device="cpu").save(str(root / "st"))
    return mlm, root / "st"


def test_splade_vectors_are_sentence_transformers(splade_folder):
    """A SPLADE folder written by sentence-transformers encodes as its SparseEncoder does,
    padded and packed; both BERT's and XLM-R's MLM heads give transformers' logits."""
    from sentence_transformers import SparseEncoder

    import jaxembed
    from jaxembed import hf

    _, folder = splade_folder
    ref = SparseEncoder(str(folder), device="cpu")
    want = ref.encode(TEXTS, convert_to_tensor=True).to_dense().numpy()
    ours = jaxembed.load(folder)
    assert ours.sparse and ours.dim == 30522
    assert_close(ours.encode(TEXTS), want)
    assert_close(jaxembed.load(folder, packing=True).encode(TEXTS, batch_size=2), want)
    assert 0 < sparse.active_dims(want) < 30522 / 2

    import transformers

    for model_type in ("bert", "xlm-roberta"):
        path = save_tiny_mlm(folder.parent / f"mlm-{model_type}", model_type, seed=1)
        ids = np.array([[3, 50, 700, 9000, 2]])
        torch_model = transformers.AutoModelForMaskedLM.from_pretrained(path).eval()
        logits = torch_model(torch.tensor(ids)).logits.detach().numpy()
        model = hf.load_model(path, mlm_head=True)
        got = model.mlm_logits(model(jnp.asarray(ids), jnp.ones_like(ids)))
        assert_close(np.asarray(got), logits, what=model_type)


def test_flops_is_the_mean_over_the_global_batch():
    from sentence_transformers.sparse_encoder.losses import FlopsLoss

    x = np.abs(np.random.default_rng(0).normal(size=(10, 7)))
    want = FlopsLoss(model=None).compute_loss_from_embeddings(torch.tensor(x)).item()
    assert_close(float(losses.flops(jnp.asarray(x, jnp.float32))), want)
    rows = np.arange(10) < 6  # padded rows take no part
    assert_close(float(losses.flops(jnp.asarray(x), jnp.asarray(rows))), float(
        FlopsLoss(model=None).compute_loss_from_embeddings(torch.tensor(x[:6])).item()
    ))  # fmt: skip


@pytest.fixture(scope="module")
def splade_run(splade_folder, train_setup, tmp_path_factory):
    """Three steps of SPLADE from the plain *ForMaskedLM folder (no sentence-transformers
    files), the FLOPS regularisers at full weight from the second step."""
    from trainrun import tiny_config

    from jaxembed import train

    config = tiny_config(
        train_setup, steps=3, model__path=str(splade_folder[0]), model__sparse="splade",
        loss__temperature=1.0, loss__splade_warmup_steps=1, data__train=train_setup[2][:1],
    )  # fmt: skip
    workdir = tmp_path_factory.mktemp("splade-run")
    return workdir, train.main(config, workdir)


def test_splade_trains_exports_and_mines(splade_run, splade_folder, train_setup, tmp_path):
    from sentence_transformers import SparseEncoder

    import jaxembed
    from jaxembed import convert, mine
    from jaxembed.hf.sentence_transformers import read_st_config

    workdir, result = splade_run
    after = result["after"]
    assert 0 < after["eval/corpus_active_dims"] < 30522 and after["eval/ndcg@10"] > 0
    out = tmp_path / "export"
    assert convert.main(["--checkpoint", str(workdir), "--out", str(out)]) == 0
    assert read_st_config(out).pooling == "splade"
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    ours = jaxembed.load(workdir).encode(TEXTS)
    ref = SparseEncoder(str(out), device="cpu")
    assert_close(ref.encode(TEXTS, convert_to_tensor=True).to_dense().numpy(), ours)
    assert_close(jaxembed.load(out).encode(TEXTS), ours)
    before = jaxembed.load(splade_folder[1]).encode(TEXTS)  # the same weights, untrained
    assert np.abs(before - ours).max() > 1e-3
    mined = tmp_path / "mined.jsonl"  # and it mines, by dot product
    retr = train_setup[2][0]
    stats = mine.mine(str(workdir), retr, mined, max_score=None, num_negatives=2, skip_top=0)
    assert stats["records_out"] == 48 and mined.stat().st_size > 0


def test_splade_needs_an_mlm_head(train_setup, tmp_path):
    from jaxembed.hf.io import ModelFolderError
    from jaxembed.workdir import prepare_model_dir

    dense = train_setup[1]  # a BertModel: no MLM head
    with pytest.raises(ModelFolderError, match=r"model.sparse=splade needs a masked-language"):
        prepare_model_dir(str(dense), tmp_path / "model", sparse="splade")
    assert not (tmp_path / "model").exists()


def test_sparse_search_ranks_as_the_dense_search():
    """Exact search over sparse matrices: the dense search's ranking, ties (integer scores,
    many) broken alike by the lower document index, across query blocks."""
    import scipy.sparse

    from jaxembed.search import sparse_top_k, top_k

    rng = np.random.default_rng(0)
    d = rng.integers(0, 3, (300, 50)).astype(np.float32) * (rng.random((300, 50)) < 0.2)
    q = rng.integers(0, 3, (40, 50)).astype(np.float32) * (rng.random((40, 50)) < 0.3)
    want_s, want_i = top_k(q, d, 20)
    got_s, got_i = sparse_top_k(scipy.sparse.csr_matrix(q), scipy.sparse.csr_matrix(d), 20, 7)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_s, want_s)


@pytest.mark.parametrize("kind", ["csr", "splade"])
def test_dry_run_lowers_a_sparse_run_for_a_tpu_slice(kind, splade_folder):
    """`--dry-run` builds what the run will train (the autoencoder appended, or the MLM
    head loaded and the logits pooled) from the folder's config files, and lowers it."""
    from jaxembed import config as config_lib
    from jaxembed import dry_run

    c = config_lib.default_config()
    c.model.path, c.model.sparse = str(splade_folder[0]), kind
    c.train.global_batch, c.eval.batch_size = 16, 16
    c.data.max_query_length = c.data.max_passage_length = 32
    c.data.query_buckets = c.data.passage_buckets = (32,)
    model, head = dry_run.abstract_model(c)
    if kind == "csr":
        assert head.sparse.layer == HeadLayer(SPARSE, 32, 128, k=8, k_aux=16)
    else:
        assert head is None and model.mlm is not None
    report = "\n".join(dry_run.dry_run(config_lib.validate(c), "tpu:8"))
    assert "train step (rows x tokens" in report and "encoder (16 rows" in report, report
    if kind == "splade":  # the step holds the MLM logits of a tower's rows: rows x 32 x vocab
        assert "largest tensor: 112x32x30522xf32" in report, report
