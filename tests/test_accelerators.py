"""First contact with GPUs and TPUs, checked on CPU: the real train step and encoder lowered
for cuda and tpu (JAX lowers for another platform on any host), TPU slices' device layouts
from fake devices, and the user's ``--dry-run``.

What a CPU test cannot see is stood in for, never skipped: cuDNN's version and the GPU's
compute capability (`dry_run.stand_in_gpu`), the chip splash is built for
(`attention.lowering_for`), a TPU slice's devices (fake objects with coordinates, as JAX's
own mesh tests build them).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import TINY_QWEN3, save_tiny_hf, save_tiny_qwen3
from test_train_step import TINY, random_batch

from jaxembed import config as config_lib
from jaxembed import dry_run, sharding, train
from jaxembed import step as step_lib
from jaxembed.data import pipeline
from jaxembed.models.bert import BertModel

# --- the real train step, lowered for the accelerators ---------------------------------------


def lowered_step(shape, platform: str, attention: str, packing: bool):
    """The lowered module of a BERT train step (bf16, dropout on: per-row seeds, GradCache
    chunks of 8 rows, rows of 128 tokens) for ``platform`` on a ``shape`` mesh of CPU
    devices, and what its attention calls chose."""
    mesh = sharding.make_mesh(*shape, devices=jax.devices()[: int(np.prod(shape))])
    c = config_lib.default_config()
    c.model.dtype, c.model.attention = "bfloat16", attention
    c.train.global_batch, c.train.dropout, c.train.packing = 16, True, packing
    c.train.gradcache, c.train.gradcache_chunk = True, 8
    c = config_lib.validate(c)
    cfg = dataclasses.replace(TINY, max_position_embeddings=128)
    model = nnx.eval_shape(lambda: BertModel(cfg, dtype=jax.numpy.bfloat16, rngs=nnx.Rngs(0)))
    model.attention = attention
    step = step_lib.make_step(c, mesh, model)
    packer = pipeline.Packing((128,), (128,), granule=8, num_segments=8 if packing else 1)
    batch = dry_run.on(packer.pack_local(random_batch()), mesh)
    return dry_run.lowered(step.jitted("retrieval"), (step.abstract, batch, None), platform)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_cudnn_takes_the_train_step_with_dropout(packing):
    """Dropout seeded per row without a per-row vmap of the backbone (cuDNN's batching rule
    reshapes its lengths and mask to the vmapped batch and fails to trace), and `auto` on a
    GPU asks JAX for cuDNN by name (``None`` is JAX's XLA attention): the fused kernel is in
    the module, and no (rows, heads, L, L) scores are."""
    text, calls = lowered_step((1, 1), "gpu", "auto", packing)
    assert set(calls) == {("cudnn", "")}
    assert text.count("__cudnn$fmha") >= 2  # forward and backward
    assert "4x128x128xf32" not in text and "4x128x128xbf16" not in text
    # Padded rows give the kernel key lengths; packed rows a (rows, 1, L, L) mask.
    assert ("1x128x128xbf16" in text) == packing


def test_splash_lowers_for_a_tpu_mesh():
    """On a 2 x 4 mesh, splash runs under shard_map: a Mosaic kernel cannot be partitioned
    automatically (JAX raises at lowering when the jit spans several devices)."""
    text, calls = lowered_step((2, 4), "tpu", "splash", packing=True)
    assert set(calls) == {("splash", "")} and "tpu_custom_call" in text


# --- TPU slices: the mesh follows the chips, hosts interleave along the data axis ------------


@dataclasses.dataclass(frozen=True)
class FakeTpu:
    """A TPU chip as `mesh_utils.create_device_mesh` reads it (JAX's own mesh tests mock it
    this way): a host holds a 2 x 2 block of chips; hosts are numbered x, then y, then z."""

    id: int
    process_index: int
    coords: tuple[int, int, int]
    device_kind: str
    platform: str = "tpu"
    core_on_chip: int = 0
    slice_index: int = 0


def fake_slice(x: int, y: int, z: int, kind: str) -> list[FakeTpu]:
    chips = []
    for zc in range(z):
        for yc in range(y):
            for xc in range(x):
                host = xc // 2 + (x // 2) * (yc // 2 + (y // 2) * zc)
                chips.append(FakeTpu(xc + x * (yc + y * zc), host, (xc, yc, zc), kind))
    return sorted(chips, key=lambda d: (d.process_index, d.id))


SLICES = {  # chips along x, y, z; device_kind as JAX reports it
    "v4-32": (2, 2, 4, "TPU v4"),
    "v5p-32": (2, 2, 4, "TPU v5"),
    "v5e-16": (4, 4, 1, "TPU v5 lite"),
}


@pytest.mark.parametrize("name", list(SLICES))
def test_every_host_places_its_rows_where_the_mesh_puts_them(name):
    """A slice's batch axis interleaves hosts (v4-32: processes 0, 1, 2, 3, 0, ...); each
    host's rows are its blocks of the batch in increasing order (what
    `jax.make_array_from_process_local_data` fills), every row exactly once."""
    devices = fake_slice(*SLICES[name])
    for shape in ((16, 1, 1), (4, 4, 1), (2, 8, 1), (8, 1, 2)):
        grid = sharding.device_grid(shape, devices)
        owners = [d.process_index for d in grid.reshape(-1, shape[2])[:, 0]]
        per = 64 // (shape[0] * shape[1])
        got = [sharding.rows_of_process(grid, p, 64) for p in range(4)]
        assert sorted(np.concatenate(got).tolist()) == list(range(64)), (shape, owners)
        for p, rows in enumerate(got):
            blocks = [b for b, owner in enumerate(owners) if owner == p]
            assert rows.tolist() == [b * per + r for b in blocks for r in range(per)], shape
    data_axis = [d.process_index for d in sharding.device_grid((16, 1, 1), devices).flat]
    assert data_axis != sorted(data_axis)  # interleaved: one block per host does not hold


def test_packed_slots_address_rows_of_an_interleaved_mesh():
    """Two hosts whose batch blocks interleave (0, 1, 0, 1), each packing its half of the
    texts into its own global rows: in the assembled batch, every text's slot points at a
    segment holding exactly that text."""
    host = random_batch(seed=2, b=16, k=2)
    grid = np.array([FakeTpu(i, p, (i, 0, 0), "TPU v4") for i, p in enumerate((0, 1, 0, 1))])
    packer = pipeline.Packing((8,), (12,), granule=4, num_segments=4)
    halves = [pipeline_half(host, p) for p in (0, 1)]
    lengths = {"query": 8, "passage": 12}
    plans = [packer.plan(h, lengths) for h in halves]
    rows = {t: max(packer.rows(len(plan[t])) for plan in plans) for t in plans[0]}
    placed = {}
    for p, (half, plan) in enumerate(zip(halves, plans, strict=True)):
        where = {
            t: sharding.rows_of_process(grid.reshape(4, 1, 1), p, 2 * r) for t, r in rows.items()
        }
        out = packer.pack(half, plan, lengths, rows, where)
        for t in rows:
            ids = placed.setdefault(
                t, np.full((2 * rows[t], lengths["query" if t == "query" else "passage"]), -1)
            )
            seg = placed.setdefault(f"{t}_seg", np.zeros_like(ids))
            ids[where[t]], seg[where[t]] = out[f"{t}_ids"], out[f"{t}_seg"]
            for text, (r, s) in zip(half[t], out[f"{t}_slot"].reshape(-1, 2), strict=True):
                if text:
                    assert ids[r][seg[r] == s + 1].tolist() == text
    assert all((placed[f"{t}_seg"] >= 0).all() for t in rows)


def pipeline_half(host: dict, p: int) -> dict:
    """Host ``p``'s half of a host batch of 16 rows (8 rows, their K negatives)."""
    k = host["neg_valid"].shape[1]
    half = {
        key: host[key][8 * p : 8 * p + 8]
        for key in ("query", "pos", "neg_valid", "pos_hash", "neg_hash")
    }
    return {**half, "neg": host["neg"][8 * k * p : 8 * k * (p + 1)], "pad_id": host["pad_id"]}


# --- the dry run ------------------------------------------------------------------------------


def test_dry_run_lowers_the_demo_for_a_tpu_pod_slice(capsys, tmp_path):
    """`--dry-run tpu:8` for configs/demo.py with splash: exit 0, splash named, the kernel in
    the lowered step and encoder; nothing written."""
    train.cli(
        ["--config", "configs/demo.py", "--workdir", str(tmp_path / "run"), "--dry-run", "tpu:8",
         "--config.model.attention=splash"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "dry run for 8 TPU devices" in out and "mesh {'data': 8, 'fsdp': 1, 'tensor': 1}" in out
    assert out.count("attention: splash") == 2 and out.count("tpu_custom_call calls") == 2, out
    assert not (tmp_path / "run").exists()


def tiny_folder(kind: str, tmp_path):
    """A random tiny HF folder of the family, head size 8 (cuDNN takes multiples of 8)."""
    from test_gemma3 import save_tiny as save_gemma3
    from test_modernbert import save_tiny as save_modernbert

    if kind == "modernbert":
        return save_modernbert(tmp_path)
    if kind == "embeddinggemma":
        return save_gemma3(tmp_path, use_bidirectional_attention=True)
    if kind == "qwen3":
        return save_tiny_qwen3(tmp_path, **TINY_QWEN3)
    return save_tiny_hf("bert", tmp_path)


@pytest.mark.parametrize(
    ("kind", "target", "want"),
    [
        ("modernbert", "tpu:8", ["attention: splash (auto on tpu)"]),
        ("modernbert", "gpu:8", ["cudnn in", "xla (cuDNN: two-sided window"]),
        ("embeddinggemma", "gpu:1", ["cudnn in", "xla (cuDNN: two-sided window"]),
        ("qwen3", "gpu:2", ["attention: cudnn (auto on gpu)"]),
        ("colbert", "gpu:2", ["attention: cudnn (auto on gpu)"]),
    ],
)
def test_dry_run_reports_each_backbones_masks(kind, target, want, tmp_path):
    """Windows both ways, causal and grouped-query heads, bf16, packed rows: each backbone's
    step and encoder lower for the target; `auto` runs the fused kernel where it can, XLA
    (saying why) for ModernBERT's and EmbeddingGemma's two-sided windows, which cuDNN asked
    for by name refuses in one line. ``colbert``: BERT as a multi-vector model whose query
    expansion nothing attends to (the step's query rows with keys of their own)."""
    c = config_lib.default_config()
    c.model.path, c.model.dtype = str(tiny_folder(kind, tmp_path)), "bfloat16"
    if kind == "colbert":
        c.model.multi_vector_dim, c.model.query_expansion = 8, 128
        c.model.query_expansion_attend = False
    c.train.global_batch, c.train.packing, c.eval.batch_size = 16, True, 16
    c.data.max_query_length = c.data.max_passage_length = 128
    c.data.query_buckets = c.data.passage_buckets = (128,)
    c.data.num_negatives.retrieval = 1
    report = "\n".join(dry_run.dry_run(config_lib.validate(c), target))
    for text in want:
        assert text in report, report
    kernel = "__cudnn$fmha calls" if target.startswith("gpu") else "tpu_custom_call calls"
    assert kernel in report, report
    if "xla" in "".join(want) and target.startswith("gpu"):
        c.model.attention = "cudnn"
        with pytest.raises(ValueError, match=r"cuDNN cannot take this attention \(two-sided"):
            dry_run.dry_run(config_lib.validate(c), target)
