"""The sentence-transformers files around an HF folder: pooling, prompts, max length.

Reads ``modules.json``, ``1_Pooling/config.json`` (legacy ``pooling_mode_*`` booleans and the
newer ``pooling_mode`` key), ``sentence_bert_config.json`` and
``config_sentence_transformers.json``. A pipeline we cannot reproduce exactly (a Dense
projection, several pooling modes concatenated) is an error, never a silent difference.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

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
