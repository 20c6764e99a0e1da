"""``python -m jaxembed.convert``: a checkpoint as a Hugging Face / sentence-transformers folder.

    python -m jaxembed.convert --checkpoint runs/demo --out exported/demo [--dtype bfloat16]

The folder loads with one line in ``transformers`` (``AutoModel.from_pretrained``),
``sentence-transformers`` (``SentenceTransformer``) and so MTEB, and embeds exactly as
``jaxembed.load(checkpoint)`` does: same weights, pooling, prompts and normalisation. It
holds the original family's ``config.json`` (updated), ``model.safetensors`` (or shards and
an index), the tokenizer files, the sentence-transformers files and a model card
(``README.md``) describing the run.

Large and multi-host models: the parameters are restored sharded over every device of
every host (FSDP), then gathered and written one tensor at a time, by process 0 only, so
neither a device nor the host ever holds the whole model beyond its shards. Run the same
command on every host for a multi-host export (``launch/``; `jaxembed.distributed`).

``--calibration CORPUS`` also writes the int8 ranges of the exported model's document
embeddings on the corpus's first documents (``quantization_ranges.json``,
`jaxembed.quantization.save_ranges`): an int8 index then codes queries and documents with
ranges fixed at export, which `jaxembed.evaluate --quantization int8` and
`jaxembed.quantization.search` read.

A LoRA run exports merged (``W + (alpha / r) A B``: a plain folder, no PEFT needed);
``--adapters-only`` writes the adapters alone in PEFT's format instead.

The other direction needs no tool: a Hugging Face / sentence-transformers folder is what
``config.model.path`` names to train from, and what `jaxembed.load` reads.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxembed import cli, hf, sharding
from jaxembed.choices import DTYPES, check
from jaxembed.encoder import load
from jaxembed.export_meta import trained_st_config
from jaxembed.files import atomic_dir
from jaxembed.hf.peft import adapter_tensors, write_adapters
from jaxembed.hf.sentence_transformers import read_st_config
from jaxembed.mining import CorpusFile
from jaxembed.model_card import model_card
from jaxembed.model_folder import write_model_folder
from jaxembed.quantization import RANGES_FILE, int8_ranges, save_ranges
from jaxembed.retrieval import encoder_fns
from jaxembed.trained_model import lora_spec, restore_adapted, restore_head, restore_model
from jaxembed.workdir import Checkpoint, find_checkpoint

# --- export -----------------------------------------------------------------------------------


def _to_host(x) -> np.ndarray:
    """A parameter on the host: shards of other hosts are gathered (a collective)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _check_out(out: Path, overwrite: bool, ckpt: Checkpoint) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{out}: output directory is not empty (pass --overwrite)")
    if ckpt.workdir.absolute().is_relative_to(out.absolute()):
        raise FileExistsError(f"{out}: refusing to overwrite: it contains the run {ckpt.workdir}")
    if not (out / "config.json").exists():
        raise FileExistsError(
            f"{out}: refusing to overwrite a directory that is not a model folder "
            "(no config.json); remove it yourself if that is what you want"
        )


def export(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    max_shard_bytes: int = 5 << 30,
) -> Path:
    """Writes the checkpoint as a Hugging Face / sentence-transformers folder ``out``.

    Every process must call this (parameters are gathered collectively); process 0 writes.
    The folder is assembled next to ``out`` and renamed into place when complete, so a
    failed export leaves no partial folder.

    Args:
      checkpoint: WORKDIR (its latest step), WORKDIR/STEP or WORKDIR/checkpoints/STEP.
      out: the folder to create; it must not exist, or be empty, unless ``overwrite``.
      dtype: "float32" or "bfloat16" weights.
      overwrite: replace an existing model folder at ``out``.
      max_shard_bytes: safetensors files beyond this size are split, with an index.
    """
    check(dtype, DTYPES, "dtype")
    ckpt = find_checkpoint(checkpoint)
    out = Path(out)
    _check_out(out, overwrite, ckpt)
    # Every parameter split over all devices (FSDP), so no device needs the whole model.
    model = restore_model(ckpt, mesh=sharding.make_mesh(data=1, fsdp=-1))
    st = trained_st_config(ckpt, model.config)  # before writing: errors stop every process
    if jax.process_index() != 0:
        for _ in hf.iter_export(model, jnp.dtype(dtype), fetch=_to_host):
            pass  # take part in the gathers; process 0 writes
        return out
    # Empty, or a model folder that overwrite=True replaces (checked above).
    head = restore_head(ckpt)

    def card(files):
        return model_card(ckpt, model, st, dtype, files)

    with atomic_dir(out) as tmp:
        write_model_folder(
            tmp,
            model,
            head,
            st,
            ckpt.model_dir,
            dtype,
            card,
            fetch=_to_host,
            max_shard_bytes=max_shard_bytes,
        )
    return out


def export_adapters(
    checkpoint: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Writes a LoRA run's adapters alone, in PEFT's format (`jaxembed.hf.peft`).

    For those who keep one base model and swap adapters; `export` writes the merged folder,
    which needs no PEFT. A run that also trained a Dense head is refused: PEFT adapters on
    the transformer cannot carry it.
    """
    ckpt = find_checkpoint(checkpoint)
    spec = lora_spec(ckpt.config)
    if spec is None:
        raise ValueError(
            f"{ckpt.name}: not a LoRA run (config.model.lora.rank is 0): there are no "
            "adapters to write; export the model without --adapters-only"
        )
    st = read_st_config(ckpt.model_dir)
    if st.has_weights or st.sparse:
        raise ValueError(
            f"{ckpt.name}: the run also trained layers after pooling (Dense, a sparse "
            "autoencoder) or pools an MLM head (SPLADE), which PEFT adapters cannot carry; "
            "export the merged model without --adapters-only"
        )
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: output directory is not empty (pass --overwrite)")
    model = restore_adapted(ckpt, mesh=sharding.make_mesh(data=1, fsdp=-1))
    base = json.loads((ckpt.model_dir / "jaxembed.json").read_text())["source"]
    if jax.process_index() != 0:
        adapter_tensors(model, spec, fetch=_to_host)  # take part in the gathers
        return out
    with atomic_dir(out) as tmp:
        write_adapters(model, tmp, spec, base, fetch=_to_host)
    return out


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"123"`` (bytes) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    unit = {"": 1, "B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[m.group(2).rstrip("B") or ""]
    return int(float(m.group(1)) * unit)


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(
        "jaxembed.convert",
        (
            "Export a jaxembed training checkpoint as a Hugging Face / sentence-transformers "
            "folder: config.json, safetensors weights, tokenizer, modules.json, 1_Pooling "
            "(pooling as trained), the Dense layers if the base model had them, Normalize (a "
            "sparse model: its SparseAutoEncoder instead, as a SparseEncoder folder), "
            "config_sentence_transformers.json (the prompts "
            "used in training) and a README.md model card. It loads with "
            "SentenceTransformer(DIR) (SparseEncoder(DIR)) or "
            "transformers.AutoModel.from_pretrained(DIR) and "
            "embeds as jaxembed.load(WORKDIR) does."
        ),
        epilog=(
            "The other direction needs no conversion: a Hugging Face / sentence-transformers "
            "folder is trained from with --config.model.path=DIR (python -m jaxembed.train) "
            "and loaded with jaxembed.load(DIR). Multi-host: run the same command on every "
            "host (launch/*.sh, or the flags below); process 0 writes."
        ),
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="WORKDIR[/STEP]",
        help="training run directory (its latest checkpoint), or WORKDIR/STEP "
        "(also WORKDIR/checkpoints/STEP) for a given step",
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (must not exist or be empty)"
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="weight dtype (default float32)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing model folder at --out"
    )
    parser.add_argument(
        "--adapters-only",
        action="store_true",
        help="a LoRA run: write only its adapters in PEFT's format (adapter_config.json, "
        "adapter_model.safetensors) instead of the merged model",
    )
    parser.add_argument(
        "--calibration",
        metavar="CORPUS",
        help="a corpus file as jaxembed.mine --corpus reads it (JSONL {text[, title]}, else "
        "one document per line): the exported model's document embeddings of its first "
        f"--calibration-size documents give the int8 ranges, written to {RANGES_FILE}",
    )
    parser.add_argument(
        "--calibration-size",
        type=int,
        default=10_000,
        metavar="N",
        help="documents of --calibration encoded (default 10000)",
    )
    parser.add_argument(
        "--max-shard-size",
        type=parse_size,
        default=5 << 30,
        metavar="SIZE",
        help="split model.safetensors into shards of at most this size, with an index "
        "(default 5GiB; e.g. 2GB, 500MB)",
    )
    return cli.main(parser, _main, argv)


def _main(args) -> int:
    # Bad input is the same on every host (the checkpoint is on shared storage): all stop.
    if args.calibration is not None and args.adapters_only:
        raise ValueError("--calibration: the int8 ranges belong with a model; not --adapters-only")
    if args.adapters_only:
        out = export_adapters(args.checkpoint, args.out, overwrite=args.overwrite)
        if jax.process_index() == 0:
            print(f"wrote {out} (PEFT LoRA adapters)")
        return 0
    calibration = None
    if args.calibration is not None:  # a bad corpus stops here, before anything is written
        if args.calibration_size < 2:
            raise ValueError(f"--calibration-size={args.calibration_size}: at least 2 documents")
        if read_st_config(find_checkpoint(args.checkpoint).model_dir).sparse:
            raise ValueError("--calibration: a sparse model's vectors are not quantized")
        calibration = CorpusFile(args.calibration)
    out = export(
        args.checkpoint,
        args.out,
        dtype=args.dtype,
        overwrite=args.overwrite,
        max_shard_bytes=args.max_shard_size,
    )
    if jax.process_index() == 0:
        print(f"wrote {out}")
        if calibration is not None:
            n = calibrate(out, calibration, args.calibration_size)
            print(f"wrote {out / RANGES_FILE} (int8 ranges of {n} documents of {args.calibration})")
    return 0


def calibrate(folder: Path, corpus, size: int) -> int:
    """Writes the int8 ranges of ``folder``'s document embeddings of the first ``size``
    texts of ``corpus`` (a sequence of texts) into ``folder``; returns how many."""
    texts = [corpus[i] for i in range(min(size, len(corpus)))]
    if len(texts) < 2:
        raise ValueError(f"{getattr(corpus, 'path', 'the corpus')}: int8 ranges need 2 documents")
    _, docs, _ = encoder_fns(load(folder), batch_size=64)
    save_ranges(folder, int8_ranges(docs(texts)))
    return len(texts)


if __name__ == "__main__":
    sys.exit(main())
