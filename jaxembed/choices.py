"""The closed sets of names a user picks from, each defined once.

Every check of a config value, a record field or a flag reads its allowed values here (and
`jaxembed.models.pooling.POOLING_MODES` for pooling), so a new choice is added in one place.
"""

from __future__ import annotations

# A training record's task, which picks its loss (`jaxembed.losses.task_loss`).
TASKS = ("retrieval", "classification", "clustering")
# Retrieval loss styles: "joint" (one softmax over in-batch and hard negatives) or F2LLM's.
LOSS_STYLES = ("joint", "f2llm")
# Attention implementations (`jaxembed.models.attention`): "auto" picks per platform.
ATTENTION = ("auto", "xla", "cudnn", "splash")
# Compute dtypes; parameters always stay float32.
DTYPES = ("float32", "bfloat16")
SCHEDULES = ("cosine", "linear", "constant")
# Which dataset each global batch comes from (`jaxembed.data.pipeline`).
MIXING = ("remaining", "temperature")
# Where a row's negatives come from: its stored (mined) pool, or, as the control that shows
# what mining adds, other rows' positives drawn uniformly from the same dataset.
NEGATIVES = ("mined", "random")
# Row counts of a packed tower (`jaxembed.data.pipeline.Packing.rows`): "few" distinct ones
# (fewer compiles, some empty rows) or the "exact" next multiple of the granule.
PACKING_SHAPES = ("few", "exact")
# Output embeddings trained for (and evaluated as) a quantized index (`jaxembed.quantization`).
QUANTIZATIONS = ("none", "int8", "binary")
# A sparse output appended to a dense model (`jaxembed.models.sparse`).
SPARSE_MODELS = ("none", "csr", "splade")


def check(value, allowed: tuple, name: str):
    """``value`` if it is one of ``allowed``, else a ValueError naming ``name`` and the choices."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")
    return value
