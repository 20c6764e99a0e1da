"""LoRA adapters in PEFT's format: ``adapter_config.json`` and ``adapter_model.safetensors``.

``PeftModel.from_pretrained(AutoModel.from_pretrained(BASE), DIR)`` then computes what the
merged export computes. PEFT names a tensor by the wrapped model's module path
(``base_model.model.<HF module>.lora_A.weight``, (r, in); ``lora_B``, (out, r)), which the
family's mapping table gives for every adapted kernel, per layer when stacked.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import nnx

from jaxembed.files import atomic_write_text
from jaxembed.hf import lora_rows
from jaxembed.hf.io import write_safetensors
from jaxembed.hf.mapping import get_variable
from jaxembed.models.lora import LoRASpec

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def adapter_tensors(model: nnx.Module, spec: LoRASpec, fetch=np.asarray) -> dict[str, np.ndarray]:
    """PEFT's state dict of ``model``'s adapters (fp32)."""
    out = {}
    for row in lora_rows(model, spec.targets):
        kernel_path = row.flax.removesuffix(".kernel")
        a = fetch(get_variable(model, f"{kernel_path}.lora.a").get_value())
        b = fetch(get_variable(model, f"{kernel_path}.lora.b").get_value())
        name = row.hf.removesuffix(".weight")
        layers = range(row.stacked) if row.stacked else [None]
        for i in layers:
            key = f"base_model.model.{name.format(i=i) if i is not None else name}"
            pick = (lambda x, i=i: x[i]) if i is not None else (lambda x: x)
            out[f"{key}.lora_A.weight"] = np.ascontiguousarray(pick(a).T, np.float32)
            out[f"{key}.lora_B.weight"] = np.ascontiguousarray(pick(b).T, np.float32)
    return out


def write_adapters(
    model: nnx.Module, out: str | Path, spec: LoRASpec, base_model: str, fetch=np.asarray
) -> list[str]:
    """Writes ``model``'s adapters to ``out`` as PEFT does; returns the file names."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "adapter_model.safetensors", adapter_tensors(model, spec, fetch))
    config = {
        "peft_type": "LORA",
        "task_type": "FEATURE_EXTRACTION",
        "base_model_name_or_path": str(base_model),
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": list(spec.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    atomic_write_text(out / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    return list(ADAPTER_FILES)
