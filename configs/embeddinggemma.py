"""Fine-tune EmbeddingGemma-300m (Gemma3, bidirectional, mean pooling, Dense 768->3072->768).

Run (point model.path at a local copy of the full sentence-transformers folder of
google/embeddinggemma-300m: config.json, model.safetensors, tokenizer, modules.json,
1_Pooling/, 2_Dense/, 3_Dense/, 4_Normalize/; data as in examples/debian_retrofit/config.py, or your
own pairs with mined negatives):

    .venv/bin/python -m jaxembed.train --config configs/embeddinggemma.py \\
        --workdir runs/embeddinggemma --config.model.path=/models/embeddinggemma-300m \\
        --config.data.train=runs/retrofit-debian/mined.jsonl
    .venv/bin/python -m jaxembed.convert --checkpoint runs/embeddinggemma \\
        --out exported/embeddinggemma     # same module layout, Dense layers trained
    # LoRA instead of every weight (adapters on the attention and MLP projections):
    #   --config embeddinggemma.py:lora

Where each value comes from:
- Model: the folder's own pipeline, read from its sentence-transformers files (mean
  pooling, the two bias-free Dense layers, Normalize); the Gemma3 transformer with
  ``use_bidirectional_attention`` (jaxembed.models.gemma3). The Dense layers train with the
  transformer and are exported back as ``2_Dense`` / ``3_Dense``. bf16 compute: Gemma3's
  activations overflow float16, and the model card asks for bf16 or fp32.
- Prompts: the model card's retrieval prompts, ``task: search result | query: `` for
  queries and ``title: none | text: `` for documents; the export names them ``query`` and
  ``document`` (the original folder's names for them; its other task prompts are dropped).
- Matryoshka at 768 / 512 / 256 / 128: the dimensions EmbeddingGemma was trained for (model
  card; the paper's MRL), so a fine-tune keeps its truncated embeddings usable.
- Loss: in-batch InfoNCE with the row's hard negatives (the paper's NCE loss with hard
  negatives) at temperature 0.05 (sentence-transformers' MultipleNegativesRankingLoss
  default, scale 20), symmetric, duplicates of the positive masked. Not reproduced: the
  paper's spread-out regulariser and its distillation from Gemini Embedding (no teacher).
- Optimisation: our choice for fine-tuning an already-trained embedder, not a published
  value (the paper gives no fine-tuning learning rate): lr 2e-5, 10% warmup then linear
  decay, batch 128, weight decay 0.01 on matrices only.
- Lengths: queries 128 and passages 512 tokens (the model handles 2,048; longer costs more
  than Debian descriptions need).

None of these values were measured here: there are no EmbeddingGemma weights on this
machine. The architecture and the Dense head are checked against `transformers` and
`sentence-transformers` on random tiny models (tests/test_gemma3.py, tests/test_head.py).
"""

from jaxembed.config import default_config

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def get_config(variant: str = ""):
    if variant not in ("", "lora"):
        raise ValueError(
            f"configs/embeddinggemma.py: unknown variant {variant!r}; use '' or 'lora'"
        )
    c = default_config()
    c.model.path = ""  # required: --config.model.path=/path/to/embeddinggemma-300m
    c.model.dtype = "bfloat16"
    c.model.pooling = ""  # the folder's: mean

    c.data.train = ()  # required: JSONL / Parquet pairs with negatives
    c.data.query_prefix = "task: search result | query: "
    c.data.passage_prefix = "title: none | text: "
    c.data.max_query_length = 128
    c.data.max_passage_length = 512
    c.data.num_negatives.retrieval = 3

    c.loss.temperature = 0.05
    c.loss.symmetric = True
    c.loss.false_negative_masking = True
    c.loss.matryoshka_dims = (768, 512, 256, 128)

    c.train.global_batch = 128
    c.train.steps = 1000  # set to one epoch: the run prints "global batches per epoch"
    c.train.dropout = False  # Gemma3 has no dropout (attention_dropout 0)
    c.train.packing = True

    c.optim.lr = 2e-5
    c.optim.warmup_steps = 100  # 10% of the steps
    c.optim.schedule = "linear"
    c.optim.weight_decay = 0.01

    c.mesh.data, c.mesh.fsdp = -1, 1
    c.ckpt.every = 500
    c.log.every = 20
    if variant == "lora":
        # As configs/f2llm_qwen3.py's LoRA variants: rank 16, alpha 32, dropout 0.1
        # (NV-Embed), lr 1e-4 (E5-Mistral); the Dense head still trains in full.
        c.model.lora.update(rank=16, alpha=32.0, dropout=0.1, targets=LORA_TARGETS)
        c.optim.lr = 1e-4
        c.train.dropout = True  # seeds the adapters' dropout
    return c
