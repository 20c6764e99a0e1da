"""``python -m jaxembed.merge``: one model from several — checkpoint averaging, souping, slerp.

    # the last 3 checkpoints of a run, averaged
    python -m jaxembed.merge --run runs/x --last 3 --out exported/x-avg
    # a weighted soup of runs and exported folders of one architecture
    python -m jaxembed.merge --inputs runs/a runs/b exported/c --weights 2,1,1 --out DIR
    # spherical interpolation of two, 30% of the way from the first to the second
    python -m jaxembed.merge --inputs runs/a runs/b --method slerp --t 0.3 --out DIR
    # only the last two layers merged; every other parameter is the first input's
    python -m jaxembed.merge --inputs runs/a runs/b --only 'layer\\.(4|5)\\.' --out DIR

Inputs are training runs (WORKDIR, WORKDIR/STEP; a LoRA run with its adapters merged) or
HF / sentence-transformers folders, all of one architecture (same parameter names and
shapes, same pooling): anything else is refused, naming the first tensor that differs.
Every parameter is merged, the backbone's and a Dense head's, in float64 on the host, one
input at a time (two models in memory, whatever the number of inputs).

- ``average`` (default): the weighted mean, weights normalised to sum to one (uniform
  without ``--weights``): checkpoint averaging and model soups.
- ``slerp`` (two inputs): per tensor, interpolation along the great circle between the two
  (``--t`` from the first, 0, to the second, 1), linear where they are nearly parallel; as
  Qwen3-Embedding merges its checkpoints.

Output: an HF / sentence-transformers folder (``--format hf``, default) whose model card
records the recipe, or (``--format run``, the first input a run) a run directory with a
step-0 checkpoint of the merged weights, which `jaxembed.load`, `jaxembed.convert` and
`jaxembed.train` (to continue training, with a fresh optimizer) all take.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from jaxembed import checkpoint, cli, sharding, trained_model, workdir
from jaxembed import step as step_lib
from jaxembed.files import atomic_dir
from jaxembed.model_card import merge_card
from jaxembed.model_folder import write_model_folder

METHODS = ("average", "slerp")
DOT_THRESHOLD = 0.9995  # beyond this cosine, slerp is linear interpolation (mergekit's)


@dataclasses.dataclass
class Loaded:
    """One input: its parameters (flat: dotted path -> host array) and what describes it."""

    name: str
    params: dict[str, np.ndarray]
    model: nnx.Module
    head: nnx.Module | None
    st: object
    tokenizer_dir: Path
    ckpt: workdir.Checkpoint | None


def flat_params(model: nnx.Module, head) -> dict[str, np.ndarray]:
    out = {}
    for prefix, module in (("", model), ("head.", head)):
        if module is None:
            continue
        for path, value in nnx.to_flat_state(nnx.state(module)):
            out[prefix + ".".join(map(str, path))] = np.asarray(value.get_value())
    return out


def load(path: str) -> Loaded:
    model, head, st, tokenizer_dir = trained_model.load_model_or_run(Path(path))
    # As jaxembed.load reads it: mean pooling when the folder names none, unit vectors
    # (a sparse model's: its top-k latents).
    st = dataclasses.replace(st, pooling=st.pooling or "mean", normalize=not st.sparse)
    ckpt = workdir.find_checkpoint(path) if workdir.is_checkpoint(path) else None
    return Loaded(path, flat_params(model, head), model, head, st, tokenizer_dir, ckpt)


def check_same_architecture(first: Loaded, other: Loaded) -> None:
    """Same parameters with the same shapes, same pooling and head; else name the difference."""
    a, b = first.params, other.params
    for key in sorted(a.keys() | b.keys()):
        if key not in a or key not in b:
            has, lacks = (first, other) if key in a else (other, first)
            raise ValueError(
                f"{lacks.name} and {has.name} are not the same architecture: tensor {key!r} is "
                f"in {has.name} only"
            )
        if a[key].shape != b[key].shape:
            raise ValueError(
                f"{first.name} and {other.name} are not the same architecture: tensor {key!r} "
                f"is {a[key].shape} in the first, {b[key].shape} in the second"
            )
    if first.st.pooling != other.st.pooling:
        raise ValueError(
            f"{first.name} pools by {first.st.pooling!r}, {other.name} by {other.st.pooling!r}: "
            "merged weights would serve neither"
        )


def slerp(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spherical interpolation of two tensors seen as vectors, linear when nearly parallel."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
    if na == 0 or nb == 0:
        return (1 - t) * a64 + t * b64
    dot = float(np.clip(np.vdot(a64 / na, b64 / nb), -1.0, 1.0))
    if abs(dot) > DOT_THRESHOLD:
        return (1 - t) * a64 + t * b64
    theta = np.arccos(dot)
    return (np.sin((1 - t) * theta) * a64 + np.sin(t * theta) * b64) / np.sin(theta)


def selected(key: str, only: Sequence[str]) -> bool:
    return not only or any(re.search(pattern, key) for pattern in only)


def merge(
    paths: Sequence[str],
    *,
    method: str = "average",
    weights: Sequence[float] | None = None,
    t: float = 0.5,
    only: Sequence[str] = (),
) -> tuple[Loaded, dict[str, np.ndarray], dict]:
    """``(first input, merged flat parameters, the recipe)`` of ``paths``.

    Inputs are read one at a time: the running sum and the current input are in memory.
    """
    if method not in METHODS:
        raise ValueError(f"--method {method!r}; choose one of {list(METHODS)}")
    if len(paths) < 2:
        raise ValueError(f"merging needs at least two inputs, got {len(paths)}")
    if method == "slerp" and (len(paths) != 2 or weights):
        raise ValueError("--method slerp takes exactly two inputs and no --weights (use --t)")
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"--t {t} must be in [0, 1]")
    weights = list(weights) if weights else [1.0] * len(paths)
    if len(weights) != len(paths) or sum(weights) <= 0 or min(weights) < 0:
        raise ValueError(
            f"--weights {weights}: one non-negative weight per input ({len(paths)}), not all zero"
        )
    weights = [w / sum(weights) for w in weights]
    first = load(paths[0])
    for p in only:
        re.compile(p)  # a bad pattern fails before any arithmetic
    picked = [k for k in first.params if selected(k, only)]
    if not picked:
        raise ValueError(f"--only {list(only)} selects no parameter of {paths[0]}")
    if method == "slerp":
        other = load(paths[1])
        check_same_architecture(first, other)
        merged = {k: slerp(t, first.params[k], other.params[k]) for k in picked}
    else:
        merged = {k: weights[0] * first.params[k].astype(np.float64) for k in picked}
        for path, w in zip(paths[1:], weights[1:], strict=True):
            other = load(path)
            check_same_architecture(first, other)
            for k in picked:
                merged[k] += w * other.params[k].astype(np.float64)
            del other
    out = {k: merged[k].astype(v.dtype) if k in merged else v for k, v in first.params.items()}
    recipe = {
        "method": method,
        "inputs": [str(p) for p in paths],
        "weights": None if method == "slerp" else weights,
        "t": t if method == "slerp" else None,
        "only": list(only),
        "merged_tensors": len(picked),
        "tensors": len(first.params),
    }
    return first, out, recipe


def last_steps(run_dir: str, k: int) -> list[str]:
    """The last ``k`` checkpoint steps of a run, as WORKDIR/STEP paths (oldest first)."""
    steps = sorted(checkpoint.all_steps(Path(run_dir)))
    if len(steps) < k:
        raise ValueError(f"{run_dir}: --last {k}, but the run keeps the checkpoints {steps}")
    return [str(Path(run_dir) / str(s)) for s in steps[-k:]]


def with_params(loaded: Loaded, flat: dict[str, np.ndarray]) -> tuple[nnx.Module, nnx.Module]:
    """The first input's model and head carrying the merged parameters."""
    out = []
    for prefix, module in (("", loaded.model), ("head.", loaded.head)):
        if module is None:
            out.append(None)
            continue
        state = nnx.state(module)
        for path, var in nnx.to_flat_state(state):
            var.set_value(flat[prefix + ".".join(map(str, path))])
        out.append(nnx.merge(nnx.graphdef(module), state))
    return out[0], out[1]


def write_hf(first: Loaded, flat: dict, recipe: dict, out: Path, dtype: str) -> Path:
    model, head = with_params(first, flat)

    def card(files):
        return merge_card(recipe, model.config, first.st, dtype, files)

    with atomic_dir(out) as tmp:
        write_model_folder(tmp, model, head, first.st, first.tokenizer_dir, dtype, card)
    return out


def write_run(first: Loaded, flat: dict, recipe: dict, out: Path) -> Path:
    """A run directory holding the merged weights as step 0 (fresh optimizer state)."""
    if first.ckpt is None:
        raise ValueError(
            f"--format run: the first input ({first.name}) must be a training run, whose config "
            "and data description the new run inherits"
        )
    cfg = ml_collections.ConfigDict(first.ckpt.config)
    cfg.model.lora.rank = 0  # adapters are merged in: the new run trains every weight
    model, head = with_params(first, flat)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    state = step_lib.make_step(cfg, mesh, model, head).init(model, head)
    meta = dict(first.ckpt.meta, config=cfg.to_json_best_effort(), merge=recipe)
    with atomic_dir(out) as tmp:
        shutil.copytree(first.ckpt.model_dir, tmp / workdir.MODEL_DIR)
        info_file = tmp / workdir.MODEL_DIR / "jaxembed.json"
        info = json.loads(info_file.read_text())
        info_file.write_text(json.dumps(dict(info, merged_from=recipe["inputs"]), indent=2))
        meta["model_dir"] = str((out / workdir.MODEL_DIR).absolute())
        mngr = checkpoint.manager(tmp, async_save=False)
        checkpoint.save(mngr, 0, state, {"next_batch": 0}, meta)
        mngr.close()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser(
        "jaxembed.merge",
        "Merge models of one architecture: average the last checkpoints of a run, a weighted "
        "soup of runs or exported folders, or slerp two; write an HF / sentence-transformers "
        "folder (model card with the recipe) or a run to continue training from.",
        epilog=__doc__.split("\n\n")[1],
        multihost=False,
    )
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--inputs", nargs="+", metavar="PATH", help="runs (WORKDIR[/STEP]) or model folders"
    )
    source.add_argument("--run", metavar="WORKDIR", help="average this run's last checkpoints")
    p.add_argument("--last", type=int, default=2, metavar="K", help="with --run (default 2)")
    p.add_argument("--method", choices=METHODS, default="average")
    p.add_argument(
        "--weights",
        type=lambda s: [float(x) for x in s.split(",")],
        metavar="W1,W2,...",
        help="one per input, normalised to sum to 1 (default: uniform)",
    )
    p.add_argument("--t", type=float, default=0.5, help="slerp position, 0 = first input")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="REGEX",
        help="merge only parameters whose path matches (repeatable; e.g. 'layer\\.11\\.', "
        "'^head\\.'); the others are the first input's",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist)")
    p.add_argument("--format", choices=("hf", "run"), default="hf")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    return cli.main(p, _main, argv)


def _main(args) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: output directory is not empty")
    paths = last_steps(args.run, args.last) if args.run else args.inputs
    first, flat, recipe = merge(
        paths, method=args.method, weights=args.weights, t=args.t, only=args.only
    )
    if args.format == "run":
        write_run(first, flat, recipe, out)
    else:
        write_hf(first, flat, recipe, out, args.dtype)
    print(
        f"wrote {out}: {recipe['method']} of {len(paths)} inputs, "
        f"{recipe['merged_tensors']}/{recipe['tensors']} tensors merged"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
