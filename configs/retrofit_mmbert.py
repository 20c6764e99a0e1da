"""Retrofit mmBERT (ModernBERT architecture, ~307M, 1,800+ languages) for retrieval.

Run (point model.path at a local mmBERT-base folder, or any ModernBERT folder: ModernBERT,
gte-modernbert; the data and the mined pairs as in configs/retrofit_xlmr_base.py, with this
model as the teacher):

    .venv/bin/python -m jaxembed.mine --model /models/mmBERT-base \\
        --input data/debian/train/debian-xling.jsonl --out data/debian/train-mined/xling.jsonl \\
        --top-k 10 --skip-top 0 --max-score none --relative-margin 0.05 --num-negatives 10
    .venv/bin/python -m jaxembed.train --config configs/retrofit_mmbert.py \\
        --workdir runs/retrofit-mmbert --config.model.path=/models/mmBERT-base

Everything is configs/retrofit_xlmr_base.py (the retrofit recipe for a ~300M multilingual
encoder, and where each of its values comes from) but what the architecture changes:

- passages up to 512 tokens: ModernBERT's local layers attend to 128-token windows, so a
  longer text costs less than in XLM-R, whose every layer is global (mmBERT was trained on
  8,192-token texts);
- no "query: " / "passage: " prefixes: mmBERT is a plain masked-language model, with no
  E5-style prefix convention to honour; the prefixes are free to add back;
- mean pooling (mmBERT has no sentence-transformers head; gte-modernbert pools CLS, pass
  ``--config.model.pooling=cls`` to keep it).

None of these values were measured here (no mmBERT weights on this machine); the tests
check the architecture against `transformers` on random tiny models.
"""

from pathlib import Path

from jaxembed.config import load


def get_config():
    c = load(str(Path(__file__).with_name("retrofit_xlmr_base.py")))
    c.model.path = ""  # required: --config.model.path=/path/to/mmBERT-base
    c.model.pooling = "mean"
    c.data.query_prefix = c.data.passage_prefix = ""
    c.data.max_passage_length = 512
    return c
