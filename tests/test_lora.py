"""LoRA: adapters on the linear layers, only they train, merged at export, PEFT's format.

(The sharded step with adapter dropout and the tiny model's learning are in
test_train_step.py, beside the full fine-tuning versions of the same checks.)
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import (
    TINY_QWEN3,
    assert_close,
    check_lora,
    masked_error,
    peft_hidden,
    random_batch,
    save_tiny_hf,
    save_tiny_qwen3,
)
from trainrun import read_losses, tiny_config

import jaxembed
from jaxembed import convert, hf, train
from jaxembed.hf.io import read_weights
from jaxembed.models.lora import LoRASpec
from jaxembed.trained_model import with_adapters

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

LENGTHS = (9, 4, 1, 7)
CASES = {
    # family: (folder maker, HF class, targets, tolerance of the family's parity tests)
    "bert": (
        lambda d: save_tiny_hf("bert", d, num_hidden_layers=2),
        ("query", "value", "intermediate.dense"),
        1e-5,
    ),
    "qwen3": (
        lambda d: save_tiny_qwen3(d, tokenizer=False),
        ("q_proj", "self_attn.o_proj", "down_proj"),
        1e-4,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_adapters_start_at_the_base_merge_exactly_and_load_in_peft(name, tmp_path):
    """List layers (BERT) and stacked, scanned layers (Qwen3); ModernBERT and Gemma3 run the
    same check in their own test files."""
    make, targets, tol = CASES[name]
    folder = make(tmp_path / "base")
    vocab = 99 if name == "bert" else TINY_QWEN3["vocab_size"]
    shapes = check_lora(folder, targets, vocab, tol, tmp_path / "peft")
    if name == "bert":  # one adapter per targeted layer and per transformer layer
        assert shapes == [(32, 4)] * 6  # query, value, intermediate.dense: all take 32
    else:  # one per targeted kernel, stacked over the scanned layers
        assert sorted(shapes) == [(2, 32, 4), (2, 48, 4), (2, 64, 4)]


def test_targets_that_name_nothing_are_errors(tmp_path):
    folder = save_tiny_hf("bert", tmp_path / "bert", num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"'q_proj' names no linear layer of this bert model.*"):
        with_adapters(hf.load_model(folder), LoRASpec(4, 8.0, targets=("q_proj",)))
    from jaxembed import config as config_lib

    c = config_lib.default_config()
    c.model.lora.rank = 8
    with pytest.raises(ValueError, match=r"config.model.lora.targets is empty"):
        config_lib.validate(c)


# --- a LoRA run: resumes exactly, checkpoints only adapters, exports merged and as PEFT ---------


def lora_config(setup, steps):
    c = tiny_config(setup, steps=steps)
    c.model.lora.update(rank=4, alpha=8.0, dropout=0.1, targets=("query", "value", "dense"))
    c.optim.lr = 1e-2
    c.ckpt.every, c.log.tensorboard = 2, False
    return c


def dir_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def lora_run(train_setup, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lora-run")
    results = train.main(lora_config(train_setup, 4), workdir)
    return workdir, results


def test_a_lora_run_resumes_exactly_and_checkpoints_only_adapters(lora_run, train_setup, tmp_path):
    workdir, results = lora_run
    assert results["step"] == 4
    # The checkpoint holds the adapters and their Adam moments, not the frozen weights.
    step = workdir / "checkpoints" / "4"
    base_bytes = dir_bytes(train_setup[1])
    print(f"LoRA checkpoint {dir_bytes(step):,} bytes; the base model {base_bytes:,} bytes")
    assert dir_bytes(step) < base_bytes / 10
    # Resumed from step 2 (adapter dropout on): the same losses as the uninterrupted run.
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed, ignore=shutil.ignore_patterns("4", "metrics.jsonl"))
    train.main(lora_config(train_setup, 4), resumed)
    want, got = read_losses(workdir), read_losses(resumed)
    assert got.keys() == {3, 4}
    for s in (3, 4):
        assert abs(got[s] - want[s]) < 1e-6, (s, got[s], want[s])


def test_a_lora_run_exports_merged_and_as_peft_adapters(lora_run, train_setup, tmp_path):
    import transformers
    from sentence_transformers import SentenceTransformer

    workdir, _ = lora_run
    base_folder = train_setup[1]
    merged = tmp_path / "merged"
    assert convert.main(["--checkpoint", str(workdir), "--out", str(merged)]) == 0
    # A plain folder: no adapter keys, and the adapted layers' weights moved.
    before, after = read_weights(base_folder), read_weights(merged)
    assert before.keys() == after.keys()
    moved = [k for k in after if np.abs(after[k] - before[k]).max() > 0]
    assert moved and all(
        k.endswith(("query.weight", "value.weight", "dense.weight")) for k in moved
    )
    texts = ["network tool number 3", "A package about python: utility 1.", "?!"]
    ours = jaxembed.load(workdir).encode(texts)
    ref = SentenceTransformer(str(merged), device="cpu").encode(texts)
    assert_close(ours, ref)

    adapters = tmp_path / "adapters"
    args = ["--checkpoint", str(workdir), "--out", str(adapters), "--adapters-only"]
    assert convert.main(args) == 0
    cfg = json.loads((adapters / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == (
        4,
        8.0,
        ["query", "value", "dense"],
    )
    ids, mask = random_batch(30522, 0, LENGTHS, seed=2)
    want = transformers.AutoModel.from_pretrained(merged).eval()
    with torch.no_grad():
        want = want(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    got = peft_hidden(base_folder, adapters, ids, mask)
    err = masked_error(got, want.last_hidden_state.numpy(), mask)
    print(f"PEFT(base, adapters) vs the merged export: error (of its scale) {err:.2e}")
    assert err < 1e-5


def test_adapters_only_refuses_a_full_run(train_setup, straight_run, tmp_path, capsys):
    workdir, _ = straight_run
    args = ["--checkpoint", str(workdir), "--out", str(tmp_path / "a"), "--adapters-only"]
    with pytest.raises(SystemExit, match="2"):
        convert.main(args)
    assert "not a LoRA run (config.model.lora.rank is 0)" in capsys.readouterr().err
