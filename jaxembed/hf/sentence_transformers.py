"""The sentence-transformers files around an HF folder: pooling, prompts, max length.

`read_st_config` reads ``modules.json``, ``1_Pooling/config.json`` (legacy
``pooling_mode_*`` booleans and the newer ``pooling_mode`` key),
``sentence_bert_config.json`` and ``config_sentence_transformers.json``; `write_st_config`
writes them (the exporter, `jaxembed.convert`). A pipeline we cannot reproduce exactly (a
Dense projection, several pooling modes concatenated) is an error, never a silent
difference.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from jaxembed.files import atomic_write_text
from jaxembed.models.pooling import POOLING_MODES

_LEGACY_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclasses.dataclass
class STConfig:
    """What sentence-transformers would do around the backbone; defaults for a bare HF folder."""

    pooling: str | None = None  # None: not specified by the folder
    include_prompt: bool = True
    max_seq_length: int | None = None
    do_lower_case: bool = False
    prompts: dict[str, str] = dataclasses.field(default_factory=dict)
    default_prompt_name: str | None = None
    normalize: bool = False


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
        for module in _read_json(modules_file):
            kind = module["type"].rsplit(".", 1)[-1]
            if kind not in _SUPPORTED_MODULES:
                raise ValueError(
                    f"{modules_file}: module {module['type']!r} is not supported "
                    f"(supported: {', '.join(_SUPPORTED_MODULES)})"
                )
            if kind == "Pooling":
                pool_file = path / module["path"] / "config.json"
                pool_cfg = _read_json(pool_file)
                st.pooling = _pooling_mode(pool_cfg, pool_file)
                st.include_prompt = bool(pool_cfg.get("include_prompt", True))
            elif kind == "Normalize":
                st.normalize = True
    bert_cfg = path / "sentence_bert_config.json"
    if bert_cfg.exists():
        cfg = _read_json(bert_cfg)
        st.max_seq_length = cfg.get("max_seq_length")
        st.do_lower_case = bool(cfg.get("do_lower_case", False))
    st_cfg = path / "config_sentence_transformers.json"
    if st_cfg.exists():
        cfg = _read_json(st_cfg)
        st.prompts = dict(cfg.get("prompts") or {})
        st.default_prompt_name = cfg.get("default_prompt_name")
    return st


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_st_config(path: str | Path, st: STConfig, embedding_dim: int) -> list[str]:
    """Writes the sentence-transformers files of ``st`` around the backbone in ``path``.

    Transformer -> Pooling (-> Normalize): ``modules.json``, ``1_Pooling/config.json``,
    ``sentence_bert_config.json`` and ``config_sentence_transformers.json`` (prompts).
    `read_st_config` reads them back to the same `STConfig`. The pooling file uses the
    legacy ``pooling_mode_*`` booleans, which every sentence-transformers version reads
    (newer ones convert them). Returns the paths written, relative to ``path``.
    """
    path = Path(path)
    if st.pooling not in POOLING_MODES:
        raise ValueError(f"pooling {st.pooling!r}; supported: {list(POOLING_MODES)}")
    modules = [
        ("Transformer", ""),
        ("Pooling", "1_Pooling"),
        *([("Normalize", "2_Normalize")] if st.normalize else []),
    ]
    _write_json(
        path / "modules.json",
        [
            {"idx": i, "name": str(i), "path": p, "type": f"sentence_transformers.models.{kind}"}
            for i, (kind, p) in enumerate(modules)
        ],
    )
    pooling = {"word_embedding_dimension": int(embedding_dim)}
    pooling.update({key: mode == st.pooling for key, mode in _LEGACY_POOLING.items()})
    pooling["include_prompt"] = bool(st.include_prompt)
    _write_json(path / "1_Pooling" / "config.json", pooling)
    written = ["modules.json", "1_Pooling/config.json"]
    if st.normalize:
        # Normalize has no parameters; sentence-transformers itself saves an empty folder.
        (path / "2_Normalize").mkdir(exist_ok=True)
    if st.max_seq_length is not None:
        _write_json(
            path / "sentence_bert_config.json",
            {"max_seq_length": int(st.max_seq_length), "do_lower_case": st.do_lower_case},
        )
        written.append("sentence_bert_config.json")
    if st.default_prompt_name is not None and st.default_prompt_name not in st.prompts:
        raise ValueError(
            f"default_prompt_name {st.default_prompt_name!r} is not among the prompts "
            f"{sorted(st.prompts)}"
        )
    _write_json(
        path / "config_sentence_transformers.json",
        {
            "model_type": "SentenceTransformer",
            "prompts": dict(st.prompts),
            "default_prompt_name": st.default_prompt_name,
            "similarity_fn_name": "cosine",
        },
    )
    written.append("config_sentence_transformers.json")
    return written


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
