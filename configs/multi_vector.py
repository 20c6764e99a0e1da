"""Multi-vector (late interaction, ColBERT) on the retrofit recipe: all-MiniLM-L6-v2 with a
vector per token.

``model.multi_vector_dim=128``: every token's last hidden state goes through a bias-free
Dense (384 -> 128, new, randomly initialised, as sentence-transformers' MultiVectorEncoder
starts a bare model) and is normalised; a query scores a document by MaxSim, the sum over
the query's tokens of its best cosine with a document token. Queries are ColBERT's: 32
tokens, padded with [MASK] (``model.query_expansion=32``), which MaxSim scores and which
read the query but nothing reads (classic ColBERT and sentence-transformers' default;
``model.query_expansion_attend=True`` scored the same on Debian dev: bench/RESULTS.md),
and the texts carry sentence-transformers' markers as prompts ("[Q] ", "[D] "). The loss
is the recipe's symmetric InfoNCE with in-batch and hard negatives, on MaxSim / temperature:
1.0, sentence-transformers' and PyLate's default for an unbounded score (a sum over 32
query tokens).

Everything else is examples/debian_retrofit/config.py's recipe (mined-linked batch groups,
false-negative masking, lr 1e-4, packing, the Cyrillic rewrite), on its data: build and
mine it as that file says (retrofit.sh), then

    .venv/bin/python -m jaxembed.train --config configs/multi_vector.py --workdir runs/colbert
    .venv/bin/python -m jaxembed.evaluate --model runs/colbert --data data/debian/dev
    .venv/bin/python -m jaxembed.convert --checkpoint runs/colbert --out exported/colbert

The export is a sentence-transformers ``MultiVectorEncoder`` folder; `jaxembed.load` gives
`Encoder.encode_tokens`. Memory: the loss holds the token vectors of the global batch
(queries B x 32, passages B x (1 + K) x 128 tokens, 128 floats each) and scores
MAXSIM_CHUNK documents at a time (`jaxembed.search.maxsim`).
"""

from pathlib import Path

from jaxembed.config import load

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "debian_retrofit" / "config.py"


def get_config():
    c = load(str(RECIPE))
    c.model.multi_vector_dim = 128
    c.model.query_expansion = c.data.max_query_length = 32
    c.data.query_buckets = (32,)  # every query is 32 tokens
    c.data.query_prefix, c.data.passage_prefix = "[Q] ", "[D] "
    c.loss.temperature = 1.0
    return c
