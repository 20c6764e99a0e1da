"""Retrofit a ~300M multilingual encoder (XLM-R base class) for retrieval.

Run (point model.path at a local XLM-R-family folder, e.g. xlm-roberta-base or
multilingual-e5-base; build the Debian data first with `python -m examples.debian_retrofit.debian`,
then mine the cross-lingual pairs with the base model as teacher, as
examples/debian_retrofit/retrofit.sh does for all-MiniLM-L6-v2):

    .venv/bin/python -m jaxembed.mine --model /models/xlm-roberta-base \\
        --input data/debian/train/debian-xling.jsonl --out data/debian/train-mined/xling.jsonl \\
        --top-k 10 --skip-top 0 --max-score none --relative-margin 0.05 --num-negatives 10
    .venv/bin/python -m jaxembed.train --config configs/retrofit_xlmr_base.py \\
        --workdir runs/retrofit --config.model.path=/models/xlm-roberta-base

The recipe choices measured on all-MiniLM-L6-v2 (examples/debian_retrofit/config.py, bench/
RESULTS.md "Retrofit" and "Retrofit ablations", dev packages) carry over: cross-lingual
retrieval pairs only, mined negatives used as in-batch candidates by grouping linked rows
into batches (data.group_size 16), symmetric InfoNCE with false-negative masking. Not the
Cyrillic rewrite of queries (the example's data.query_transform): it teaches an English
vocabulary to read Cyrillic, which XLM-R's already does. A larger, multilingual model may
gain more from explicit hard negatives than MiniLM did at equal CPU time: raise
data.num_negatives.retrieval to try.

Where the settings come from (../shared/research/seeds.md):
- Tu, Zhou, Yavuz, "Retrofitting Small Multilingual Models for Retrieval" (2025): hard
  negatives are essential, more data plateaus early (hence a modest step count), and task
  diversity matters more than language diversity. The last did not hold for our target:
  on dev zero-shot cross-lingual retrieval, replacing three quarters of the cross-lingual
  rows by monolingual retrieval, Section classification and clustering rows cost -0.068
  nDCG@10 (two seeds). Those tasks teach what the paper scores (MTEB's task types), not
  retrieval into English; for a general-purpose embedder add them back:
      --config.data.train="('data/debian/train-mined/xling.jsonl', \
        'data/debian/train/debian-mono.jsonl', 'data/debian/train/debian-section.jsonl', \
        'data/debian/train/debian-cluster.jsonl')"
  (clustering then takes 7 hard negatives per row, F2LLM's count, classification 1).
  The paper's own hyper-parameters are not public; the rest is ours, as below.
- E5 / multilingual-e5 conventions: mean pooling, "query: " / "passage: " prefixes.
- F2LLM (Zhang et al., 2025): one dataset per global batch chosen proportionally to its
  remaining batches, global batch 512, AdamW betas (0.9, 0.98), weight decay 0.01,
  clipping 1.0, temperature 0.05, cosine decay to a floor.
- Our choices for a ~300M encoder: lr 2e-5 (the common BERT-base fine-tuning rate),
  500 warmup steps, bf16 compute with fp32 master weights, and GradCache sized per device:
  train.gradcache_chunk counts rows of the whole global batch, spread over the
  data-parallel devices, so 256-row chunks are 16 rows per chip on the README's v4-32 (16
  chips), 32 per GPU on 8 GPUs (64 per device on a 4-device host: lower it there). One
  chunk's activations are what a device holds: at 16 rows of 256 tokens, 12 layers of
  XLM-R base, ~2 GB in bf16 (32 rows: ~4 GB), beside 4.4 GB of fp32 parameters and AdamW
  state (less with mesh.fsdp). GradCache already encodes each chunk twice (once without
  gradients, once under vjp); remat would add a third forward per chunk (+~33% compute) to
  save memory the chunk size already bounds, so it is off. The run prints the rows per
  device of a chunk at start (and --dry-run before any device is rented).
"""

from jaxembed.config import default_config


def get_config():
    c = default_config()
    c.model.path = ""  # required: --config.model.path=/path/to/xlm-roberta-base
    c.model.dtype = "bfloat16"
    c.model.remat = False  # GradCache's chunks bound the activations (the docstring)
    c.model.pooling = "mean"

    c.data.train = ("data/debian/train-mined/xling.jsonl",)  # other tasks: the docstring
    c.data.query_prefix = "query: "
    c.data.passage_prefix = "passage: "
    c.data.max_query_length = 64
    c.data.max_passage_length = 256
    c.data.num_negatives.retrieval = 0  # the mined ones arrive as in-batch candidates
    c.data.group_size = 16
    c.data.num_negatives.clustering = 7
    c.data.num_negatives.classification = 1
    c.data.workers = 4

    c.loss.style = "joint"
    c.loss.temperature = 0.05
    c.loss.symmetric = True

    c.train.global_batch = 512
    c.train.steps = 5000
    c.train.gradcache = True
    c.train.gradcache_chunk = 256  # 16 rows per chip on a v4-32, 32 per GPU on 8 GPUs

    c.optim.lr = 2e-5
    c.optim.b1, c.optim.b2 = 0.9, 0.98
    c.optim.weight_decay = 0.01
    c.optim.warmup_steps = 500
    c.optim.schedule = "cosine"
    c.optim.min_lr = 1e-7
    c.optim.clip_norm = 1.0

    c.eval.data = tuple(
        f"data/debian/dev/{kind}-{lang}"
        for kind in ("xling", "mono")
        for lang in ("de", "fr", "ja", "pl")
    )
    c.eval.every = 500
    c.ckpt.every = 500
    c.ckpt.keep = 3
    c.ckpt.keep_best = 1
    c.log.every = 20
    return c
