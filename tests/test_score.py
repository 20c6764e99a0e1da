"""Teacher scores (``python -m jaxembed.score``) and training on them (distillation)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import TINY, assert_close, minilm_path, toy_records, write_jsonl
from trainrun import tiny_config

import jaxembed
from jaxembed import score, train
from jaxembed.data.records import check_record
from jaxembed.tokenizer import TOKENIZER_FILES

torch = pytest.importorskip("torch")

PAIRS = [
    ("how do I sync files?", "A fast, scalable, distributed revision control system."),
    ("network tool", "A package about network: utility 3 with documentation."),
    ("?", "The quick brown fox jumps over the lazy dog. " * 20),  # truncated
]


def save_cross_encoder(model_type: str, folder, **overrides):
    """A tiny random ``*ForSequenceClassification`` (one output) with MiniLM's tokenizer."""
    import shutil

    import transformers

    torch.manual_seed(0)
    kwargs = dict(TINY, vocab_size=30522, num_hidden_layers=1, num_labels=1, **overrides)
    if model_type == "xlm-roberta":
        kwargs.update(pad_token_id=1, max_position_embeddings=66, type_vocab_size=1)
    if model_type == "modernbert":
        kwargs.pop("type_vocab_size")
        kwargs.update(pad_token_id=0, global_attn_every_n_layers=1, classifier_pooling="mean")
    cfg = transformers.AutoConfig.for_model(model_type, **kwargs)
    model = transformers.AutoModelForSequenceClassification.from_config(cfg).eval()
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (minilm_path() / name).exists():
            shutil.copy(minilm_path() / name, folder / name)
    return folder


@pytest.mark.parametrize("model_type", ["bert", "xlm-roberta", "modernbert"])
def test_cross_encoder_scores_equal_transformers(model_type, tmp_path):
    import transformers

    folder = save_cross_encoder(model_type, tmp_path / model_type)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ref_model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    enc = tok(
        [q for q, _ in PAIRS],
        [p for _, p in PAIRS],
        truncation="longest_first",
        max_length=48,
        padding=True,
        return_tensors="pt",
    )
    if model_type != "bert":  # no segment embeddings: MiniLM's tokenizer emits them anyway
        enc.pop("token_type_ids", None)
    with torch.no_grad():
        want = ref_model(**enc).logits[:, 0].numpy()
    got = score.CrossEncoderScorer(str(folder), max_length=48, batch_size=2)(PAIRS)
    print(f"{model_type} cross-encoder vs transformers: max-abs {np.abs(got - want).max():.2e}")
    assert_close(got, want)


def test_scores_written_and_distilled_from(train_setup, tmp_path):
    """A bi-encoder teacher's cosines and a cross-encoder's logits, per row; a run trains on
    the scored file with KL + Margin-MSE beside InfoNCE."""
    _, model, _, _ = train_setup
    records = toy_records("retr", "retrieval", 16, 3)
    data = write_jsonl(tmp_path / "retr.jsonl", records)
    out = tmp_path / "scored.jsonl"
    assert score.main(["--teacher", str(model), "--input", str(data), "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 16 and all(len(r["scores"]) == 4 for r in rows)
    check_record(rows[0], "scored.jsonl:1")
    enc = jaxembed.load(model)
    q = enc.encode([records[5]["query"]])[0]
    p = enc.encode([records[5]["positive"], *records[5]["negatives"]])
    assert_close(rows[5]["scores"], p @ q)

    cross = save_cross_encoder("bert", tmp_path / "ce")
    out_ce = tmp_path / "scored-ce.jsonl"
    info = score.score(str(cross), [str(data)], str(out_ce), batch_size=8, max_length=32)
    assert info["teacher"] == "cross-encoder" and info["pairs"] == 64
    rows_ce = [json.loads(x) for x in out_ce.read_text().splitlines()]
    want = score.CrossEncoderScorer(str(cross), 32, 8)(
        [(records[2]["query"], t) for t in (records[2]["positive"], *records[2]["negatives"])]
    )
    np.testing.assert_allclose(rows_ce[2]["scores"], want, atol=1e-6)

    c = tiny_config(train_setup, steps=4)
    c.data.train = (str(out_ce),)
    c.loss.kl_weight.retrieval, c.loss.margin_mse_weight.retrieval = 1.0, 0.05
    c.eval.data = ()
    result = train.main(c, tmp_path / "run")
    assert result["step"] == 4 and np.isfinite(result["last"]["loss"])
