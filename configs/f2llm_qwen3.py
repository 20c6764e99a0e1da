"""F2LLM: a Qwen3 foundation model (0.6B / 1.7B / 4B) trained as a text embedder.

Run (the variant after the colon picks the published per-size settings; point model.path
at a local Qwen3 base folder and data.train at F2LLM-layout Parquet / prepared data):

    .venv/bin/python -m jaxembed.train --config configs/f2llm_qwen3.py:0.6b \\
        --workdir runs/f2llm-0.6b --config.model.path=/models/Qwen3-0.6B \\
        --config.data.train=data/f2llm/retrieval,data/f2llm/clustering_prepared

Data: F2LLM's released files are one Parquet per dataset with columns
``query, passage, negative_1..negative_24`` (classification: ``negative_1`` only); the
query column already holds ``Instruct: {task}\\nQuery: {q}``. A Parquet without a ``task``
column is read as retrieval; give classification / clustering files their task once with
``python -m jaxembed.data.prepare --input FILES --task clustering --out DIR``. Records of our
JSONL layout may instead carry an ``instruction`` field, formatted with
``data.instruction_template`` (queries only; passages never get one).

Where the settings come from (../shared/research/seeds.md, F2LLM paper and code, v1):
- Backbone: the Qwen3 base models, bf16 compute, gradient checkpointing (remat), causal
  attention unchanged, no head; last-token pooling on an EOS appended after truncation
  (max length 1024 = 1023 text tokens + EOS), L2-normalised inside the loss.
- Loss "f2llm": retrieval = in-batch InfoNCE over the positives gathered from every device
  + InfoNCE over the row's own positive and hard negatives, summed; classification and
  clustering: the hard-negative term only; temperature 0.05, cosine similarity.
- Batches: one dataset per global batch, chosen with probability proportional to its
  remaining batches ("remaining"); 7 hard negatives sampled per step from the 24 stored
  (1 for classification).
- Optimiser: AdamW betas (0.9, 0.98), weight decay 0.01, 500 warmup steps, cosine decay to
  1e-7, global-norm clip 1.0, global batch 512; lr 1e-5 (0.6B), 9e-6 (1.7B), 8e-6 (4B).
- Length: 2 epochs. Over F2LLM's 5.93M rows at batch 512 that is about 23,000 steps; the
  run prints "global batches per epoch" at start: set train.steps to twice that.
- Parallelism: F2LLM used DeepSpeed ZeRO-2 on 16-32 GPUs. Here every device holds a shard
  of parameters and optimizer state (mesh.fsdp=-1), the batch is split over the same
  devices, and the in-batch negatives are gathered across all of them by the loss.

LoRA variants (``0.6b-lora``, ``1.7b-lora``, ``4b-lora``), for small GPU budgets: the same
recipe with the Qwen3 weights frozen and low-rank adapters trained on every linear layer
(q/k/v/o and the MLP's gate/up/down projections). F2LLM itself fine-tunes every weight;
these values are the decoder embedders' that train with LoRA: rank 16, alpha 32, adapter
dropout 0.1 (NV-Embed), learning rate 1e-4 (E5-Mistral: adapters move about ten times
faster than full fine-tuning's 1e-5). Optimizer state and checkpoints shrink about 59x
for 0.6B (bench/lora_memory.py); the export merges the adapters into a plain folder, or
``convert --adapters-only`` writes them for PEFT.
"""

from jaxembed.config import default_config

# variant -> peak learning rate (F2LLM, Table 1)
VARIANTS = {"0.6b": 1e-5, "1.7b": 9e-6, "4b": 8e-6}


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def get_config(variant: str = "0.6b"):
    variant = (variant or "0.6b").lower()
    size, lora = variant.removesuffix("-lora"), variant.endswith("-lora")
    if size not in VARIANTS:
        choices = sorted([*VARIANTS, *(f"{v}-lora" for v in VARIANTS)])
        raise ValueError(f"unknown F2LLM variant {variant!r}; choose one of {choices}")
    c = default_config()
    c.model.path = ""  # required: --config.model.path=/models/Qwen3-0.6B (a local folder)
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.pooling = "lasttoken"

    c.data.train = ()  # required: F2LLM Parquet files / prepared directories
    c.data.mixing = "remaining"
    c.data.num_negatives.retrieval = 7
    c.data.num_negatives.clustering = 7
    c.data.num_negatives.classification = 1
    c.data.max_query_length = 1024
    c.data.max_passage_length = 1024
    c.data.query_buckets = (128, 256, 512, 1024)
    c.data.passage_buckets = (128, 256, 512, 1024)
    c.data.workers = 8

    c.loss.style = "f2llm"
    c.loss.temperature = 0.05
    c.loss.false_negative_masking = False  # F2LLM does not mask duplicate passages

    c.train.global_batch = 512
    c.train.steps = 23_000
    c.train.dropout = False  # Qwen3 has no dropout (attention_dropout 0)

    c.optim.lr = VARIANTS[size]
    c.optim.b1, c.optim.b2 = 0.9, 0.98
    c.optim.weight_decay = 0.01
    c.optim.warmup_steps = 500
    c.optim.schedule = "cosine"
    c.optim.min_lr = 1e-7
    c.optim.clip_norm = 1.0

    c.mesh.data, c.mesh.fsdp = 1, -1

    c.ckpt.every = 1000
    c.ckpt.keep = 3
    c.log.every = 20
    if lora:
        c.model.lora.update(rank=16, alpha=32.0, dropout=0.1, targets=LORA_TARGETS)
        c.optim.lr = 1e-4
        c.train.dropout = True  # seeds the adapters' dropout (Qwen3 itself has none)
    return c
