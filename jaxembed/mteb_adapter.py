"""MTEB (2.x) without a hub: a jaxembed encoder as an MTEB model, local BEIR data as tasks.

- `MTEBEncoder` wraps a `jaxembed.Encoder` in MTEB's encoder protocol
  (``encode(DataLoader, *, task_metadata, hf_split, hf_subset, prompt_type)``), choosing
  prompts the way MTEB's sentence-transformers wrapper does, so an exported folder run
  through sentence-transformers and the JAX encoder read the same prompts.
- `beir_task` turns a local BEIR-layout folder into an ``AbsTaskRetrieval`` whose
  ``load_data`` reads the files (`jaxembed.beir.load_beir`), never the hub.
- `run` evaluates a model on such tasks and keeps MTEB's result files in an output folder.

Importing this module imports ``mteb`` (and with it torch and ``datasets``): the rest of
jaxembed never does. It also switches the Hugging Face libraries to offline mode.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxembed.beir import load_beir
from jaxembed.files import hf_offline
from jaxembed.retrieval import DOC_PROMPTS, MTEB_KEYS, QUERY_PROMPTS, pick_prompt

hf_offline()  # local files only: nothing may reach for the hub


def _import_mteb():
    # `import mteb` creates its default result cache (~/.cache/mteb, or $MTEB_CACHE) as a
    # side effect; we never use that cache (results go where `run` is told), so unless the
    # user chose a folder, let it land in the temp directory instead of the home folder.
    if "mteb" not in sys.modules and "MTEB_CACHE" not in os.environ:
        os.environ["MTEB_CACHE"] = os.path.join(tempfile.gettempdir(), "jaxembed-mteb-cache")
        try:
            import mteb
        finally:
            del os.environ["MTEB_CACHE"]
    import mteb

    return mteb


mteb = _import_mteb()
import datasets  # noqa: E402  (after mteb: same offline settings)
from datasets import Dataset  # noqa: E402
from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402
from mteb.models.abs_encoder import AbsEncoder, get_prompt_name  # noqa: E402
from mteb.models.model_meta import ModelMeta, ScoringFunction  # noqa: E402
from mteb.types import PromptType  # noqa: E402

# Our sets carry no language tag; "und-Zyyy" (undetermined language and script) is a valid
# MTEB code that claims nothing.
UNKNOWN_LANGUAGE = "und-Zyyy"


class MTEBEncoder(AbsEncoder):
    """A `jaxembed.Encoder` behind MTEB's encoder protocol.

    Prompts per task: MTEB's lookup over the model's prompts (``"<task>-<query|document>"``,
    ``"<task>"``, ``"<task type>-<...>"``, ``"<task type>"``, ``"query"`` / ``"document"``);
    when nothing matches, sentence-transformers' ``encode_query`` / ``encode_document``
    defaults (`jaxembed.hf.sentence_transformers.pick_prompt`); without a prompt type (non-retrieval
    tasks), the model's default prompt. ``query_prompt`` / ``doc_prompt`` (prompt names)
    override the lookup for every task.
    """

    def __init__(
        self,
        encoder,
        *,
        name: str | None = None,
        revision: str = "local",
        batch_size: int = 32,
        query_prompt: str | None = None,
        doc_prompt: str | None = None,
    ):
        self.model = encoder
        self.batch_size = batch_size
        # Checked now, so an undefined name fails before any task runs.
        self.fixed = {
            PromptType.query: None
            if query_prompt is None
            else pick_prompt(encoder.prompts, query_prompt, (), encoder.name),
            PromptType.document: None
            if doc_prompt is None
            else pick_prompt(encoder.prompts, doc_prompt, (), encoder.name),
        }
        # What MTEB's sentence-transformers wrapper looks prompts up in: the valid keys only
        # (e.g. "passage" is not one; it warns about each, which says nothing new here).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.model_prompts, _ = AbsEncoder.validate_task_to_prompt_name(
                dict(encoder.prompts) or None, raise_for_invalid_keys=False
            )
        folder = Path(encoder.name).name if encoder.name else "model"
        self.mteb_model_meta = ModelMeta.create_empty(
            overwrites=dict(
                name=name or f"jaxembed/{folder}",
                revision=revision,
                embed_dim=encoder.dim,
                max_tokens=encoder.max_length,
                # A sparse model's vectors are compared as its loss compared them.
                similarity_fn_name=(
                    ScoringFunction.DOT_PRODUCT if encoder.sparse else ScoringFunction.COSINE
                ),
                framework=["JAX"],
                modalities=["text"],
            )
        )

    def prompt_text(self, task_metadata, prompt_type: PromptType | None) -> str:
        """The prompt text used for a task's queries or documents."""
        if self.fixed.get(prompt_type) is not None:
            return self.fixed[prompt_type]
        name = get_prompt_name(self.model_prompts, task_metadata, prompt_type)
        if name is not None:
            return self.model.prompts[name]
        if prompt_type == PromptType.query:
            return pick_prompt(self.model.prompts, None, QUERY_PROMPTS)
        if prompt_type == PromptType.document:
            return pick_prompt(self.model.prompts, None, DOC_PROMPTS)
        return self.model.resolve_prompt(None)

    def encode(
        self,
        inputs,
        *,
        task_metadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs,
    ) -> np.ndarray:
        """Embeds every text of ``inputs`` (MTEB's DataLoader of ``{"text": [...]}``)."""
        texts = [t for batch in inputs for t in batch["text"]]
        return self.model.encode(
            texts,
            batch_size=kwargs.get("batch_size") or self.batch_size,
            prompt=self.prompt_text(task_metadata, prompt_type),
        )


def beir_task(
    folder: str | os.PathLike, split: str = "dev", name: str | None = None, data=None
) -> AbsTaskRetrieval:
    """An MTEB retrieval task reading the BEIR-layout ``folder`` (``qrels/<split>.tsv``).

    ``name`` defaults to the folder's name; ``data`` may pass a `load_beir` result. The
    main score is nDCG@10, MTEB's for retrieval.
    """
    folder = Path(folder)
    task_metadata = TaskMetadata(
        name=name or folder.name,
        description=f"Local BEIR-layout retrieval set {folder}",
        dataset={"path": str(folder), "revision": "local"},
        type="Retrieval",
        category="t2t",
        modalities=["text"],
        eval_splits=[split],
        eval_langs=[UNKNOWN_LANGUAGE],
        main_score="ndcg_at_10",
    )

    class LocalBEIRTask(AbsTaskRetrieval):
        __doc__ = task_metadata.description
        metadata = task_metadata

        def load_data(self, num_proc=None, **kwargs):
            if self.data_loaded:
                return
            corpus, queries, qrels = data if data is not None else load_beir(folder, split)
            self.dataset = {
                "default": {
                    split: {
                        "corpus": Dataset.from_dict(
                            {
                                "id": list(corpus),
                                "title": [""] * len(corpus),
                                "text": list(corpus.values()),
                            }
                        ),
                        # As MTEB's own loader: only queries that have judgments.
                        "queries": Dataset.from_dict(
                            {"id": list(qrels), "text": [queries[q] for q in qrels]}
                        ),
                        "relevant_docs": {q: dict(r) for q, r in qrels.items()},
                        "top_ranked": None,
                    }
                }
            }
            self.data_loaded = True

    return LocalBEIRTask()


def wrap(
    model, *, name: str | None = None, batch_size: int = 32, query_prompt=None, doc_prompt=None
):
    """An MTEB model for a `jaxembed.Encoder` or a ``SentenceTransformer``.

    A SentenceTransformer goes through MTEB's own ``SentenceTransformerEncoderWrapper``;
    either way the model is named after its folder (``name`` overrides), never looked up on
    the hub, with revision "local".
    """
    from sentence_transformers import SentenceTransformer

    if not isinstance(model, SentenceTransformer):
        return MTEBEncoder(
            model,
            name=name,
            batch_size=batch_size,
            query_prompt=query_prompt,
            doc_prompt=doc_prompt,
        )
    from mteb.models.sentence_transformer_wrapper import SentenceTransformerEncoderWrapper

    prompts = {k: v for k, v in model.prompts.items() if v is not None}
    overrides = None
    if query_prompt is not None or doc_prompt is not None:
        overrides = {
            "query": pick_prompt(prompts, query_prompt, QUERY_PROMPTS),
            "document": pick_prompt(prompts, doc_prompt, DOC_PROMPTS),
        }
    wrapped = SentenceTransformerEncoderWrapper(model, model_prompts=overrides)
    if name is None:
        folder = getattr(model.tokenizer, "name_or_path", "") or "model"
        name = f"sentence-transformers/{Path(folder).name}"
    wrapped.mteb_model_meta = wrapped.mteb_model_meta.model_copy(
        update={"name": name, "revision": "local"}
    )
    return wrapped


def run(
    model,
    folders: Sequence[str | os.PathLike],
    split: str = "dev",
    out: str | os.PathLike | None = None,
    *,
    batch_size: int = 32,
    query_prompt: str | None = None,
    doc_prompt: str | None = None,
    data: dict | None = None,
    name: str | None = None,
) -> dict[str, dict]:
    """Runs MTEB on each BEIR folder; returns ``{set name: metrics}`` (`METRICS` names).

    ``model`` is a `jaxembed.Encoder`, a ``SentenceTransformer`` or an already wrapped
    MTEB model. With ``out``, MTEB writes its result files under ``out/mteb/results/``
    (its cache layout: ``<model name>/<revision>/<task>.json``); they are rewritten on
    every run, never read back. ``data`` may map folder names to `load_beir` results;
    ``name`` is the model's name in MTEB's results (default: from its folder).
    """
    if not hasattr(model, "mteb_model_meta"):
        model = wrap(
            model,
            name=name,
            batch_size=batch_size,
            query_prompt=query_prompt,
            doc_prompt=doc_prompt,
        )
    data = data or {}
    tasks = [beir_task(f, split, data=data.get(Path(f).name)) for f in folders]
    names = [t.metadata.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"two BEIR folders share a name (MTEB keys results by it): {names}")
    datasets.disable_progress_bars()  # MTEB maps tiny in-memory datasets: no bars needed
    cache = mteb.ResultCache(cache_path=Path(out) / "mteb") if out is not None else None
    results = mteb.evaluate(
        model,
        tasks,
        cache=cache,
        overwrite_strategy="always",
        co2_tracker=False,
        show_progress_bar=False,
        encode_kwargs={"batch_size": batch_size, "show_progress_bar": False},
    )
    per_set = {}
    for task_result in results.task_results:
        scores = task_result.scores[split][0]
        per_set[task_result.task_name] = {m: float(scores[k]) for m, k in MTEB_KEYS.items()}
        per_set[task_result.task_name]["main_score"] = float(scores["main_score"])
    return {n: per_set[n] for n in names}
