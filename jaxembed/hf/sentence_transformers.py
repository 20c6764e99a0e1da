"""The sentence-transformers files around an HF folder: pooling, head, prompts, max length.

`read_st_config` reads ``modules.json``, ``1_Pooling/config.json`` (legacy
``pooling_mode_*`` booleans and the newer ``pooling_mode`` key), the ``Dense`` and
``Normalize`` modules after pooling (`jaxembed.models.head`), ``sentence_bert_config.json``
and ``config_sentence_transformers.json``; `load_head` reads the Dense weights;
`write_st_config` writes it all back in the same module layout (the exporter,
`jaxembed.convert`). A ``MultiVectorEncoder`` folder (Transformer -> Dense on token
embeddings -> MultiVectorMask -> Normalize, ColBERT's query expansion in the Transformer's
settings) reads as pooling `TOKENS`. A pipeline we cannot reproduce exactly (a module we do
not know, several pooling modes concatenated, a skiplist) is an error, never a silent
difference.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxembed.files import atomic_write_text
from jaxembed.hf.io import WeightsError, read_weights, write_safetensors
from jaxembed.models.head import SPARSE, Head, HeadLayer, build_head, check_chain
from jaxembed.models.pooling import POOLING_MODES, SPLADE, TOKENS
from jaxembed.models.sparse import STATS

_LEGACY_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_SUPPORTED_MODULES = (
    "Transformer", "MLMTransformer", "Pooling", "SpladePooling", "Dense", "Normalize",
    "SparseAutoEncoder", "MultiVectorMask",
)  # fmt: skip
_SPLADE_TYPE = "sentence_transformers.sparse_encoder.modules.SpladePooling"
_SPARSE_TYPE = "sentence_transformers.sparse_encoder.modules.SparseAutoEncoder"
_MASK_TYPE = "sentence_transformers.multi_vector_encoder.modules.MultiVectorMask"
# sentence-transformers' names for a module's input: one vector per text, or per token.
_TEXT, _TOKEN = "sentence_embedding", "token_embeddings"
# sentence-transformers writes the activation's class path; these are the ones we compute.
_TORCH_ACTIVATIONS = {
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.Tanh": "tanh",
    "torch.nn.modules.activation.ReLU": "relu",
    "torch.nn.modules.activation.GELU": "gelu",
    "torch.nn.modules.activation.SiLU": "silu",
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
}
_ACTIVATION_PATHS = {v: k for k, v in _TORCH_ACTIVATIONS.items()}
_MODULE_NAMES = {"dense": "Dense", "normalize": "Normalize", SPARSE: "SparseAutoEncoder"}


@dataclasses.dataclass
class STConfig:
    """What sentence-transformers would do around the backbone; defaults for a bare HF folder."""

    pooling: str | None = None  # None: not specified by the folder
    include_prompt: bool = True
    max_seq_length: int | None = None
    do_lower_case: bool = False
    prompts: dict[str, str] = dataclasses.field(default_factory=dict)
    default_prompt_name: str | None = None
    # Modules between Pooling and a final Normalize (``normalize``), in order, and the
    # folder of each (relative to the model folder; "" for a parameter-free Normalize).
    head: tuple[HeadLayer, ...] = ()
    head_dirs: tuple[str, ...] = ()
    normalize: bool = False
    # A multi-vector model's query expansion (ColBERT): every query cut or padded with the
    # mask token to this many tokens, all scored (0: none); attended by the encoder or, as
    # sentence-transformers defaults, not (they read the query, nothing reads them).
    query_expansion: int = 0
    query_expansion_attend: bool = False

    @property
    def has_weights(self) -> bool:
        """Whether the folder has modules with parameters after pooling (Dense, CSR)."""
        return any(x.kind != "normalize" for x in self.head)

    @property
    def csr(self) -> bool:
        """The head ends in a sparse autoencoder (CSR)."""
        return bool(self.head) and self.head[-1].kind == SPARSE

    @property
    def sparse(self) -> bool:
        """A sparse model (a SparseEncoder): SPLADE pooling, or CSR."""
        return self.pooling == SPLADE or self.csr

    @property
    def multi_vector(self) -> bool:
        """A multi-vector (late-interaction) model: a vector per token, scored by MaxSim."""
        return self.pooling == TOKENS

    @property
    def model_class(self) -> str:
        """The sentence-transformers class that loads the folder."""
        if self.multi_vector:
            return "MultiVectorEncoder"
        return "SparseEncoder" if self.sparse else "SentenceTransformer"

    def output_dim(self, pooled: int, vocab_size: int = 0) -> int:
        """The embedding size: the last Dense (or CSR) layer's output, SPLADE's vocabulary
        (``vocab_size``), else the pooled size."""
        if self.pooling == SPLADE:
            return vocab_size
        sizes = [x.out_features for x in self.head if x.kind != "normalize"]
        return sizes[-1] if sizes else pooled

    def describe_head(self) -> str:
        """The head in words, e.g. "Dense 768->3072 (identity), Dense 3072->768 (identity)"."""
        return ", ".join(_describe(x) for x in self.head)


def _describe(x: HeadLayer) -> str:
    if x.kind == "normalize":
        return "Normalize"
    if x.kind == SPARSE:
        return f"SparseAutoEncoder {x.in_features}->{x.out_features} (top {x.k})"
    extra = (", no bias" if not x.bias else "") + (", residual" if x.residual else "")
    return f"Dense {x.in_features}->{x.out_features} ({x.activation}{extra})"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def _pooling_mode(cfg: dict, source: Path) -> str:
    if "pooling_mode" in cfg:
        modes = cfg["pooling_mode"]
        modes = [modes] if isinstance(modes, str) else list(modes)
    else:
        modes = [mode for key, mode in _LEGACY_POOLING.items() if cfg.get(key)]
    if len(modes) != 1:
        raise ValueError(
            f"{source}: exactly one pooling mode is supported, found {modes or 'none'}"
        )
    if modes[0] not in POOLING_MODES:
        raise ValueError(f"{source}: pooling mode {modes[0]!r}; supported: {list(POOLING_MODES)}")
    return modes[0]


def read_st_config(path: str | Path) -> STConfig:
    """The sentence-transformers settings of a model folder (empty ones if it has none)."""
    path = Path(path)
    st = STConfig()
    modules_file = path / "modules.json"
    if modules_file.exists():
        _read_modules(path, modules_file, st)
    bert_cfg = path / "sentence_bert_config.json"
    if bert_cfg.exists():
        cfg = _read_json(bert_cfg)
        st.max_seq_length = cfg.get("max_seq_length")
        st.do_lower_case = bool(cfg.get("do_lower_case", False))
        st.query_expansion, st.query_expansion_attend = _query_expansion(cfg, bert_cfg)
    st_cfg = path / "config_sentence_transformers.json"
    if st_cfg.exists():
        cfg = _read_json(st_cfg)
        st.prompts = dict(cfg.get("prompts") or {})
        st.default_prompt_name = cfg.get("default_prompt_name")
        score = cfg.get("similarity_fn_name")
        if st.multi_vector and score not in (None, "maxsim"):
            raise ValueError(f"{st_cfg}: similarity_fn_name={score!r}; supported: maxsim")
    return st


def _read_modules(path: Path, modules_file: Path, st: STConfig) -> None:
    """Fills ``st`` from ``modules.json``: Transformer, Pooling, then Dense / Normalize,
    and a SparseAutoEncoder last; or a multi-vector model's Transformer, Dense layers on
    token embeddings, MultiVectorMask and Normalize."""
    head, dirs, pooled = [], [], False
    for module in _read_json(modules_file):
        kind = module["type"].rsplit(".", 1)[-1]
        where = f"{modules_file}: module {module.get('idx', len(head))} ({kind})"
        if kind not in _SUPPORTED_MODULES:
            raise ValueError(
                f"{modules_file}: module {module['type']!r} is not supported "
                f"(supported: {', '.join(_SUPPORTED_MODULES)})"
            )
        if kind in ("SpladePooling", "Pooling") and head:
            raise ValueError(f"{where}: after a Dense on token embeddings (unsupported)")
        if kind == "SpladePooling":
            st.pooling, pooled = _splade_pooling(path / module["path"] / "config.json"), True
        elif kind == "Pooling":
            pool_file = path / module["path"] / "config.json"
            pool_cfg = _read_json(pool_file)
            st.pooling = _pooling_mode(pool_cfg, pool_file)
            st.include_prompt = bool(pool_cfg.get("include_prompt", True))
            pooled = True
        elif kind == "MultiVectorMask":
            _check_mask(path / module["path"] / "config.json")
            st.pooling, pooled = TOKENS, True
        elif kind in ("Dense", "Normalize", "SparseAutoEncoder"):
            tokens = _input_name(path / module["path"] / "config.json") == _TOKEN
            if not pooled and not (kind == "Dense" and tokens):
                raise ValueError(f"{where}: comes before Pooling (token-level heads unsupported)")
            if kind == "Normalize":
                head.append(HeadLayer("normalize"))
                dirs.append("")
                continue
            read = _dense_layer if kind == "Dense" else _sparse_layer
            head.append(read(path / module["path"]))
            dirs.append(module["path"])
    if head and not pooled:
        raise ValueError(f"{modules_file}: Dense layers on token embeddings without a "
                         "MultiVectorMask (a MultiVectorEncoder's); unsupported")  # fmt: skip
    # A final Normalize is the `normalize` flag; the rest is the head.
    st.normalize = bool(head) and head[-1].kind == "normalize"
    if st.normalize:
        head, dirs = head[:-1], dirs[:-1]
    check_chain(head)
    st.head, st.head_dirs = tuple(head), tuple(dirs)


def _input_name(cfg_file: Path) -> str:
    """A module's ``module_input_name``: one vector per text, or per token."""
    return _read_json(cfg_file).get("module_input_name", _TEXT) if cfg_file.exists() else _TEXT


def _check_mask(cfg_file: Path) -> None:
    """A MultiVectorMask that scores every real token (no skiplist, no allowlist)."""
    cfg = _read_json(cfg_file) if cfg_file.exists() else {}
    for key in ("skiplist_words", "keep_only_token_ids"):
        if cfg.get(key):
            raise ValueError(f"{cfg_file}: {key}={cfg[key]!r}; supported: none (every token)")


def _query_expansion(cfg: dict, cfg_file: Path) -> tuple[int, bool]:
    """The Transformer's ``query_expansion`` as (length, attended) ((0, False): none); only
    ColBERT's fixed width, by the tokenizer's mask token."""
    for key in ("query_length", "document_length"):
        if cfg.get(key) is not None:
            raise ValueError(f"{cfg_file}: {key}={cfg[key]!r}; supported: null (max_seq_length)")
    qe = cfg.get("query_expansion")
    if qe is None:
        return 0, False
    attend = qe.get("attend", False)
    if qe.get("strategy") != "fixed" or qe.get("token") is not None or not qe.get("length"):
        raise ValueError(
            f"{cfg_file}: query_expansion {qe}; supported: strategy fixed, token null (the "
            "mask token), a length"
        )
    if not isinstance(attend, bool):
        raise ValueError(f"{cfg_file}: query_expansion attend={attend!r}; true or false")
    return int(qe["length"]), attend


def _splade_pooling(cfg_file: Path) -> str:
    """`SPLADE`, if the ``SpladePooling`` module's settings are the ones computed here."""
    cfg = _read_json(cfg_file) if cfg_file.exists() else {}
    got = (cfg.get("pooling_strategy", "max"), cfg.get("activation_function", "relu"))
    if got != ("max", "relu"):
        raise ValueError(
            f"{cfg_file}: SpladePooling {got[0]} of {got[1]}; supported: max of relu (SPLADE v2)"
        )
    return SPLADE


def _dense_layer(folder: Path) -> HeadLayer:
    """A ``Dense`` module's config (``N_Dense/config.json``) as a `HeadLayer`."""
    cfg_file = folder / "config.json"
    cfg = _read_json(cfg_file)
    names = {cfg.get(key, _TEXT) for key in ("module_input_name", "module_output_name")}
    if names not in ({_TEXT}, {_TOKEN}):
        raise ValueError(f"{cfg_file}: module_input_name and module_output_name {sorted(names)}; "
                         f"supported: both {_TEXT} or both {_TOKEN}")  # fmt: skip
    act = cfg.get("activation_function", "torch.nn.modules.activation.Tanh")
    if act not in _TORCH_ACTIVATIONS:
        raise ValueError(
            f"{cfg_file}: activation_function {act!r}; supported: {sorted(_TORCH_ACTIVATIONS)}"
        )
    try:
        return HeadLayer(
            "dense",
            int(cfg["in_features"]),
            int(cfg["out_features"]),
            bool(cfg.get("bias", True)),
            _TORCH_ACTIVATIONS[act],
            bool(cfg.get("use_residual", False)),
        )
    except KeyError as e:
        raise ValueError(f"{cfg_file}: no {e.args[0]!r} key") from None


def _sparse_layer(folder: Path) -> HeadLayer:
    """A ``SparseAutoEncoder`` module's config (``N_SparseAutoEncoder/config.json``)."""
    cfg_file = folder / "config.json"
    cfg = _read_json(cfg_file)
    if cfg.get("normalize", False):
        raise ValueError(f"{cfg_file}: normalize=true (a LayerNorm before the encoder) is not "
                         "supported; supported: false")  # fmt: skip
    try:
        return HeadLayer(
            SPARSE,
            int(cfg["input_dim"]),
            int(cfg.get("hidden_dim", 512)),
            k=int(cfg.get("k", 8)),
            k_aux=int(cfg.get("k_aux", 512)),
            dead_threshold=int(cfg.get("dead_threshold", 30)),
        )
    except KeyError as e:
        raise ValueError(f"{cfg_file}: no {e.args[0]!r} key") from None


def load_head(path: str | Path, st: STConfig, pooled: int | None = None) -> Head | None:
    """The folder's Dense layers (and sparse autoencoder) with their weights (None when it
    has none).

    ``pooled``: the backbone's output size, which the first Dense layer must take.
    """
    head = build_head(st.head, pooled)
    if head is None:
        return None
    if head.sparse is not None:
        _fill_sparse(head.sparse, Path(path) / st.head_dirs[-1])
    denses = [d for x, d in zip(st.head, st.head_dirs, strict=True) if x.kind == "dense"]
    for module, folder in zip(head.dense, denses, strict=True):
        tensors = read_weights(Path(path) / folder)
        for name in ("linear", "residual"):
            linear = getattr(module, name)
            if linear is not None:
                _fill(linear, tensors, name, Path(path) / folder)
    return head


def _fill(linear, tensors: dict, name: str, folder: Path) -> None:
    """A Linear's kernel (in, out) and bias from PyTorch's ``weight`` (out, in) and ``bias``."""
    for attr, key in (("kernel", "weight"), ("bias", "bias")):
        var = getattr(linear, attr)
        if var is None:
            continue
        if f"{name}.{key}" not in tensors:
            raise WeightsError(f"{folder}: no tensor {name}.{key}")
        value = np.asarray(tensors[f"{name}.{key}"], np.float32)
        want = var.shape[::-1]  # PyTorch's layout: (out, in) for the weight
        if value.shape != want:
            raise WeightsError(f"{folder}: {name}.{key} has shape {value.shape}, expected {want}")
        var.set_value(value.T)


# sentence-transformers saves the tied weight once, under the decoder's name.
_SPARSE_WEIGHT = ("encoder.weight", "decoder.linear.weight")


def _fill_sparse(sae, folder: Path) -> None:
    tensors = read_weights(folder)
    weight = next((tensors[k] for k in _SPARSE_WEIGHT if k in tensors), None)
    if weight is None:
        raise WeightsError(f"{folder}: no tensor {' or '.join(_SPARSE_WEIGHT)}")
    for var, value, name in (
        (sae.encoder.kernel, np.asarray(weight, np.float32).T, "encoder.weight (transposed)"),
        (sae.pre_bias, tensors.get("pre_bias"), "pre_bias"),
        (sae.latent_bias, tensors.get("latent_bias"), "latent_bias"),
    ):
        if value is None:
            raise WeightsError(f"{folder}: no tensor {name}")
        if value.shape != var.shape:
            raise WeightsError(f"{folder}: {name} has shape {value.shape}, expected {var.shape}")
        var.set_value(np.asarray(value, np.float32))


def csr_layer(
    embedding_dim: int, hidden_dim: int = 0, k: int = 0, k_aux: int = 0, dead_threshold: int = 30
) -> HeadLayer:
    """The autoencoder sentence-transformers appends to a dense model of ``embedding_dim``
    (its defaults, where a size is 0: 4x as many latents, a quarter of the embedding size
    kept, half of it for the auxiliary loss)."""
    return HeadLayer(
        SPARSE,
        embedding_dim,
        hidden_dim or 4 * embedding_dim,
        k=k or max(embedding_dim // 4, 1),
        k_aux=k_aux or max(embedding_dim // 2, 1),
        dead_threshold=dead_threshold,
    )


def output_settings(
    st: STConfig,
    hidden_size: int,
    sparse: str = "none",
    csr: tuple = (),
    multi_vector=(0, 0, None),
) -> STConfig:
    """The sentence-transformers settings of a run started from a folder with ``st``, per
    the model type its config asks for: ``sparse`` (``model.sparse``) SPLADE pooling, or the
    folder's head, a Normalize and `csr_layer` (``csr``: its sizes); ``multi_vector`` =
    (``model.multi_vector_dim``, ``model.query_expansion``, ``model.query_expansion_attend``)
    a MultiVectorEncoder: every token's last hidden state through a bias-free Dense to that
    many dimensions, normalised (sentence-transformers' default head). A folder already of
    the asked type keeps its own (a multi-vector one takes a new query expansion, or a new
    attend; attend None keeps the folder's, whose default is sentence-transformers');
    without either, ``st`` itself."""
    dim, length, attend = multi_vector
    if length and not (dim or st.multi_vector):
        raise ValueError("model.query_expansion is ColBERT's: it needs model.multi_vector_dim")
    if attend is not None and not (length or st.query_expansion):
        raise ValueError("model.query_expansion_attend: the model has no query expansion "
                         "(set model.query_expansion)")  # fmt: skip
    expansion = dict(
        query_expansion=length or st.query_expansion,
        query_expansion_attend=st.query_expansion_attend if attend is None else attend,
    )
    if dim and not st.multi_vector:
        head = (HeadLayer("dense", hidden_size, dim, bias=False),)
        return dataclasses.replace(st, pooling=TOKENS, head=head, head_dirs=("1_Dense",),
                                   normalize=True, **expansion)  # fmt: skip
    if st.multi_vector:
        return dataclasses.replace(st, **expansion)
    if sparse == "splade" and st.pooling != SPLADE:
        return dataclasses.replace(st, pooling=SPLADE, head=(), head_dirs=(), normalize=False)
    if sparse == "csr" and not st.sparse:
        head = (*st.head, HeadLayer("normalize"), csr_layer(st.output_dim(hidden_size), *csr))
        dirs = tuple("" if x.kind == "normalize" else _module_dir(i, x) for i, x in enumerate(head))
        pooling = st.pooling or "mean"  # a bare folder's, as `jaxembed.load` reads it
        return dataclasses.replace(st, pooling=pooling, head=head, head_dirs=dirs, normalize=False)
    return st


def _module_dir(i: int, layer: HeadLayer) -> str:
    """The folder of the ``i``-th module after pooling, as sentence-transformers names it."""
    return f"{i + 2}_{_MODULE_NAMES[layer.kind]}"


def _sparse_config(layer: HeadLayer) -> dict:
    return {
        "input_dim": layer.in_features,
        "hidden_dim": layer.out_features,
        "k": layer.k,
        "k_aux": layer.k_aux,
        "normalize": False,
        "dead_threshold": layer.dead_threshold,
    }


def _write_sparse(folder: Path, layer: HeadLayer, sae, name: str) -> list[str]:
    """The ``SparseAutoEncoder`` module's ``config.json`` and ``model.safetensors`` (the
    configuration only without ``sae``).

    ``stats_last_nonzero`` (the dead-latent counts, training bookkeeping a loaded model
    never reads) is written as 0s, as a fresh torch module starts it.
    """
    _write_json(folder / "config.json", _sparse_config(layer))
    if sae is None:
        return [f"{name}/config.json"]
    tensors = {
        "encoder.weight": np.asarray(sae.encoder.kernel[...], np.float32).T,
        "pre_bias": np.asarray(sae.pre_bias[...], np.float32),
        "latent_bias": np.asarray(sae.latent_bias[...], np.float32),
        STATS: np.zeros((layer.out_features,), np.int64),
    }
    write_safetensors(folder / "model.safetensors", tensors)
    return [f"{name}/config.json", f"{name}/model.safetensors"]


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_st_config(
    path: str | Path, st: STConfig, embedding_dim: int, head: Head | None = None, weights=True
) -> list[str]:
    """Writes the sentence-transformers files of ``st`` around the backbone in ``path``.

    Transformer -> Pooling (-> Dense / Normalize ...) (-> Normalize): ``modules.json``,
    ``1_Pooling/config.json``, each Dense module's folder (``config.json`` and the weights
    of ``head``, fp32 safetensors), ``sentence_bert_config.json`` and
    ``config_sentence_transformers.json`` (prompts). `read_st_config` reads them back to the
    same `STConfig`, `load_head` to the same head. The pooling file uses the legacy
    ``pooling_mode_*`` booleans, which every sentence-transformers version reads (newer ones
    convert them). ``weights=False`` writes the modules' configurations only (a run's own
    model folder: the weights are the run's). Returns the paths written, relative to
    ``path``.
    """
    path = Path(path)
    if st.pooling == SPLADE:
        return _write_splade(path, st)
    if st.multi_vector:
        return _write_multi_vector(path, st, head if weights else None)
    if st.pooling not in POOLING_MODES:
        raise ValueError(f"pooling {st.pooling!r}; supported: {list(POOLING_MODES)}")
    if weights and st.has_weights and head is None:
        raise ValueError("the model has weights after pooling: pass its head to write")
    if not weights:
        head = None
    check_chain(st.head, embedding_dim)
    layers = [*st.head, *([HeadLayer("normalize")] if st.normalize else [])]
    modules = [("Transformer", ""), ("Pooling", "1_Pooling")]
    modules += [(_MODULE_NAMES[x.kind], _module_dir(i, x)) for i, x in enumerate(layers)]
    _write_json(
        path / "modules.json",
        [
            {
                "idx": i,
                "name": str(i),
                "path": p,
                "type": _SPARSE_TYPE
                if kind == "SparseAutoEncoder"
                else f"sentence_transformers.models.{kind}",
            }
            for i, (kind, p) in enumerate(modules)
        ],
    )
    pooling = {"word_embedding_dimension": int(embedding_dim)}
    pooling.update({key: mode == st.pooling for key, mode in _LEGACY_POOLING.items()})
    pooling["include_prompt"] = bool(st.include_prompt)
    _write_json(path / "1_Pooling" / "config.json", pooling)
    written = ["modules.json", "1_Pooling/config.json"]
    dense = iter(head.dense if head is not None else ())
    for layer, (_, folder) in zip(layers, modules[2:], strict=True):
        if layer.kind == "dense":
            written += _write_dense(path / folder, layer, next(dense, None), folder)
        elif layer.kind == SPARSE:
            sae = head.sparse if head is not None else None
            written += _write_sparse(path / folder, layer, sae, folder)
        else:
            # Normalize has no parameters; sentence-transformers itself saves an empty folder.
            (path / folder).mkdir(exist_ok=True)
    if st.max_seq_length is not None:
        _write_json(
            path / "sentence_bert_config.json",
            {"max_seq_length": int(st.max_seq_length), "do_lower_case": st.do_lower_case},
        )
        written.append("sentence_bert_config.json")
    _write_json(path / "config_sentence_transformers.json", _st_settings(st))
    written.append("config_sentence_transformers.json")
    return written


def _st_settings(st: STConfig) -> dict:
    """``config_sentence_transformers.json``: the model type, prompts, similarity."""
    if st.default_prompt_name is not None and st.default_prompt_name not in st.prompts:
        raise ValueError(
            f"default_prompt_name {st.default_prompt_name!r} is not among the prompts "
            f"{sorted(st.prompts)}"
        )
    return {
        "model_type": st.model_class,
        "prompts": dict(st.prompts),
        "default_prompt_name": st.default_prompt_name,
        "similarity_fn_name": "maxsim" if st.multi_vector else "dot" if st.sparse else "cosine",
    }


def _write_multi_vector(path: Path, st: STConfig, head: Head | None) -> list[str]:
    """A MultiVectorEncoder's files, as sentence-transformers 6 saves them: the Transformer's
    token embeddings (with its query expansion), the Dense layers on them, MultiVectorMask
    (every real token scored) and Normalize; the Dense weights with ``head``."""
    if st.head_dirs != tuple(f"{i + 1}_Dense" for i in range(len(st.head))) or not all(
        x.kind == "dense" for x in st.head
    ):
        raise ValueError(f"a multi-vector head of Dense layers only; got {st.describe_head()}")
    n = len(st.head)
    names = ["", *st.head_dirs, f"{n + 1}_MultiVectorMask", f"{n + 2}_Normalize"]
    types = ["sentence_transformers.base.modules.transformer.Transformer"]
    types += ["sentence_transformers.base.modules.dense.Dense"] * n
    types += [_MASK_TYPE, "sentence_transformers.base.modules.normalize.Normalize"]
    modules = enumerate(zip(names, types, strict=True))
    _write_json(
        path / "modules.json",
        [{"idx": i, "name": str(i), "path": d, "type": t} for i, (d, t) in modules],
    )
    written = ["modules.json"]
    for layer, folder, module in zip(st.head, st.head_dirs, head.dense if head else [None] * n,
                                     strict=True):  # fmt: skip
        written += _write_dense(path / folder, layer, module, folder, _TOKEN)
    mask = {"skiplist_words": [], "skiplist_tasks": ["document"], "keep_only_token_ids": None}
    _write_json(path / names[-2] / "config.json", mask)
    _write_json(path / names[-1] / "config.json", {"module_input_name": _TOKEN,
                                                   "module_output_name": _TOKEN})  # fmt: skip
    expansion = None
    if st.query_expansion:
        expansion = {"strategy": "fixed", "attend": st.query_expansion_attend, "token": None,
                     "length": st.query_expansion}  # fmt: skip
    transformer = {
        "transformer_task": "feature-extraction",
        "modality_config": {"text": {"method": "forward",
                                     "method_output_name": "last_hidden_state"}},
        "module_output_name": _TOKEN,
        "query_expansion": expansion,
        "do_lower_case": st.do_lower_case,
    }  # fmt: skip
    if st.max_seq_length is not None:
        transformer["max_seq_length"] = int(st.max_seq_length)
    _write_json(path / "sentence_bert_config.json", transformer)
    _write_json(path / "config_sentence_transformers.json", _st_settings(st))
    written += [f"{d}/config.json" for d in names[-2:]]
    return [*written, "sentence_bert_config.json", "config_sentence_transformers.json"]


def _write_splade(path: Path, st: STConfig) -> list[str]:
    """A SPLADE model's files, as sentence-transformers 6 saves them: a fill-mask
    Transformer (the MLM logits) and SpladePooling (max of relu)."""
    modules = [
        {"path": "", "type": "sentence_transformers.models.Transformer"},
        {"path": "1_SpladePooling", "type": _SPLADE_TYPE},
    ]
    _write_json(
        path / "modules.json", [{"idx": i, "name": str(i), **m} for i, m in enumerate(modules)]
    )
    splade = {"pooling_strategy": "max", "activation_function": "relu", "embedding_dimension": None}
    _write_json(path / "1_SpladePooling" / "config.json", splade)
    transformer = {"transformer_task": "fill-mask", "do_lower_case": st.do_lower_case}
    if st.max_seq_length is not None:
        transformer["max_seq_length"] = int(st.max_seq_length)
    _write_json(path / "sentence_bert_config.json", transformer)
    _write_json(path / "config_sentence_transformers.json", _st_settings(st))
    return ["modules.json", "1_SpladePooling/config.json", "sentence_bert_config.json",
            "config_sentence_transformers.json"]  # fmt: skip


def _write_dense(folder: Path, layer: HeadLayer, module, name: str, on=_TEXT) -> list[str]:
    """One Dense module's ``config.json`` and ``model.safetensors`` (PyTorch layouts; the
    configuration only without ``module``); ``on`` what it maps (each text's vector, or
    each token's)."""
    cfg = {
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "bias": layer.bias,
        "activation_function": _ACTIVATION_PATHS[layer.activation],
    }
    if on == _TOKEN:  # the default (a text's) is omitted, as sentence-transformers does
        cfg.update(module_input_name=_TOKEN, module_output_name=_TOKEN)
    if layer.residual:  # omitted when False, as sentence-transformers does for old readers
        cfg["use_residual"] = True
    _write_json(folder / "config.json", cfg)
    if module is None:
        return [f"{name}/config.json"]
    tensors = {"linear.weight": np.asarray(module.linear.kernel[...], np.float32).T}
    if module.linear.bias is not None:
        tensors["linear.bias"] = np.asarray(module.linear.bias[...], np.float32)
    if module.residual is not None:
        tensors["residual.weight"] = np.asarray(module.residual.kernel[...], np.float32).T
    write_safetensors(folder / "model.safetensors", tensors)
    return [f"{name}/config.json", f"{name}/model.safetensors"]


# --- prompts ---------------------------------------------------------------------------------

QUERY_PROMPTS = ("query",)
DOC_PROMPTS = ("document", "passage", "corpus")


def pick_prompt(
    prompts: dict[str, str], name: str | None, defaults: Sequence[str], model=""
) -> str:
    """Prompt text: ``prompts[name]``, else the first of ``defaults`` the model defines, else "".

    The defaults are sentence-transformers' ``encode_query`` ("query") and
    ``encode_document`` ("document", "passage", "corpus"), which MTEB calls, so both sides
    read the same prompts. An undefined ``name`` is an error naming the defined ones.
    """
    if name is not None:
        if name not in prompts:
            raise ValueError(
                f"prompt_name {name!r} is not defined by {model or 'the model'}; "
                f"defined prompts: {sorted(prompts) or 'none'}"
            )
        return prompts[name]
    return next((prompts[n] for n in defaults if n in prompts), "")
