"""PEFT adapter directories (adapter_config.json + adapter_model.safetensors) in and out, LoRA and BD-LoRA.

Reading validates everything against the base model before anything is returned, so a bad adapter raises
an AdapterError naming the file, tensor or field and what was expected, and nothing is half-loaded. Given a
root, every file read must lie under it once its symlinks are resolved (ForbiddenPathError otherwise).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ATTENTION_MODULES, LORA_MODULES, ModelConfig
from ..errors import AdapterError
from .adapter import LoraAdapter, ModuleFactors
from .peft_config import check_field_types, read_config_file, show
from .sources import confine

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.([A-Za-z0-9_]+)\.lora_([AB])\.weight$")
_UNSUPPORTED = {
    "use_dora": (False, None),
    "bias": ("none", None),
    "modules_to_save": (None, []),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layers_to_transform": (None, []),
    "fan_in_fan_out": (False, None),
    "layer_replication": (None, []),
}
PEFT_DEFAULT_ALPHA = 8
# safetensors dtypes of the factors served (others, e.g. I8, would be silently rounded to other math)
FLOAT_DTYPES = ("F32", "F16", "BF16")


def _parent(module: str) -> str:
    return "self_attn" if module in ATTENTION_MODULES else "mlp"


def tensor_key(layer: int, module: str, factor: str) -> str:
    """PEFT's saved key of a factor ('A' or 'B') of a module, e.g. base_model.model.model.layers.0.mlp.up_proj.lora_A.weight."""
    return f"base_model.model.model.layers.{layer}.{_parent(module)}.{module}.lora_{factor}.weight"


def _read_config(path: Path, root: Path | None) -> dict[str, Any]:
    config_path = path / CONFIG_FILE
    if not confine(path, root).is_dir():
        raise AdapterError(f"{path}: adapter directory does not exist", path=path)
    target = confine(config_path, root)
    if not target.is_file():
        raise AdapterError(f"{config_path}: missing; a PEFT adapter directory needs {CONFIG_FILE}", path=config_path)
    return read_config_file(target, config_path)


def _check_config(config: dict[str, Any], where: Path) -> tuple[int, float, dict[str, Any] | None]:
    """Validate every field; return (r, lora_alpha, use_bdlora block or None)."""
    check_field_types(config, where)
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: peft_type={show(config.get('peft_type'))}; expected 'LORA'", path=where)
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterError(f"{where}: field 'r'={r!r}; expected a positive integer", path=where)
    alpha = config.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise AdapterError(f"{where}: field 'lora_alpha'={show(alpha)}; expected a number", path=where)
    _check_scale(alpha, r, bool(config.get("use_rslora")), where)
    for field, allowed in _UNSUPPORTED.items():
        if field in config and config[field] not in allowed:
            raise AdapterError(f"{where}: field {field!r}={show(config[field])} is not supported "
                               f"(expected {allowed[0]!r})", path=where)
    targets = config.get("target_modules")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except (re.error, RecursionError) as e:
            raise AdapterError(f"{where}: field 'target_modules'={show(targets)} is not a valid regular expression "
                               f"({e})", path=where) from None
    if isinstance(targets, (list, tuple)):
        unknown = [t for t in targets if t not in LORA_MODULES and t != "all-linear"]
        if unknown:
            raise AdapterError(f"{where}: unknown target module(s) {unknown}; expected some of {list(LORA_MODULES)}",
                               path=where)
    bd = config.get("use_bdlora")
    if bd is None:
        return r, float(alpha), None
    if not isinstance(bd, dict):
        raise AdapterError(f"{where}: field 'use_bdlora' must be an object, got {bd!r}", path=where)
    nblocks = bd.get("nblocks", 1)
    if not isinstance(nblocks, int) or isinstance(nblocks, bool) or nblocks < 1:
        raise AdapterError(f"{where}: field 'use_bdlora.nblocks'={nblocks!r}; expected a positive integer", path=where)
    if r % nblocks:
        raise AdapterError(f"{where}: r={r} is not divisible by use_bdlora.nblocks={nblocks}", path=where)
    return r, float(alpha), bd


def _check_scale(alpha: float, r: int, use_rslora: bool, where: Path) -> None:
    """Refuse a lora_alpha whose scale (alpha / r, or alpha / sqrt(r) with rsLoRA) is not a finite float32;
    a negative one is allowed, as PEFT allows it."""
    formula = "lora_alpha/sqrt(r)" if use_rslora else "lora_alpha/r"
    try:
        scale = float(alpha) / (math.sqrt(r) if use_rslora else r)
    except OverflowError:
        scale = math.inf
    if not math.isfinite(scale) or abs(scale) > float(np.finfo(np.float32).max):
        raise AdapterError(f"{where}: field 'lora_alpha'={show(alpha)} gives the scale {formula}={show(scale)}; "
                           "expected a finite number within float32 range", path=where)


def _block_counts(module: str, bd: dict[str, Any] | None, where: Path) -> tuple[int, int]:
    """(a_blocks, b_blocks) of a module under PEFT's substring matching of the use_bdlora patterns."""
    if bd is None:
        return 1, 1
    nblocks = bd.get("nblocks", 1)
    in_a = any(p in module for p in bd.get("target_modules_bd_a") or [])
    in_b = any(p in module for p in bd.get("target_modules_bd_b") or [])
    if in_a and in_b:
        raise AdapterError(f"{where}: module {module!r} matches both use_bdlora.target_modules_bd_a and _bd_b",
                           path=where)
    if not (in_a or in_b) and bd.get("match_strict", True):
        raise AdapterError(
            f"{where}: module {module!r} matches neither use_bdlora.target_modules_bd_a nor _bd_b "
            "(match_strict is true)", path=where
        )
    return (nblocks if in_a else 1), (nblocks if in_b else 1)


def _targets(config: dict[str, Any], layer: int, parent: str, module: str) -> bool:
    """Whether PEFT would adapt this module: a name list (suffix match) or a regex fullmatch on the module path."""
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear" or (isinstance(targets, list) and "all-linear" in targets):
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, f"model.layers.{layer}.{parent}.{module}") is not None
    return module in targets


def _load_tensors(path: Path, root: Path | None) -> dict[str, np.ndarray]:
    """Every tensor as float32 on the host (numpy: reading compiles nothing); only float dtypes are accepted."""
    weights = path / WEIGHTS_FILE
    target = confine(weights, root)
    if not target.is_file():
        other = "adapter_model.bin exists, but only safetensors are read" if (path / "adapter_model.bin").exists() else "missing"
        raise AdapterError(f"{weights}: {other}", path=weights)
    from safetensors import safe_open

    try:
        with safe_open(str(target), framework="numpy") as f:
            keys = list(f.keys())
            for key in keys:
                dtype = f.get_slice(key).get_dtype()
                if dtype not in FLOAT_DTYPES:
                    raise AdapterError(f"{weights}: tensor {key!r} has dtype {dtype}; expected a floating-point "
                                       f"tensor ({', '.join(FLOAT_DTYPES)})", path=weights)
            return {key: np.asarray(f.get_tensor(key), dtype=np.float32) for key in keys}
    except AdapterError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises several error types for corrupt files
        raise AdapterError(f"{weights}: cannot read safetensors ({e})", path=weights) from None


def read_adapter(path: str | Path, config: ModelConfig, name: str | None = None,
                 root: str | Path | None = None) -> LoraAdapter:
    """Read and validate a PEFT LoRA / BD-LoRA adapter directory against a base model config.

    root: when given, every file read must lie under it once symlinks are resolved (else ForbiddenPathError).
    """
    path = Path(path)
    root = Path(root) if root is not None else None
    adapter_config = _read_config(path, root)
    config_path = path / CONFIG_FILE
    r, alpha, bd = _check_config(adapter_config, config_path)
    tensors = _load_tensors(path, root)
    weights = path / WEIGHTS_FILE
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if not match:
            raise AdapterError(f"{weights}: tensor {key!r} is not a LoRA factor of a Llama layer module", path=weights)
        layer, parent, module, factor = int(match[1]), match[2], match[3], match[4]
        if module not in LORA_MODULES or _parent(module) != parent:
            raise AdapterError(f"{weights}: tensor {key!r}: unknown target module {parent}.{module}; "
                               f"expected one of {list(LORA_MODULES)}", path=weights)
        if not _targets(adapter_config, layer, parent, module):
            raise AdapterError(
                f"{weights}: tensor {key!r} is for {module}, which "
                f"target_modules={adapter_config.get('target_modules')!r} "
                f"in {config_path.name} does not name; PEFT would ignore it", path=weights
            )
        if layer >= config.num_layers:
            raise AdapterError(f"{weights}: tensor {key!r}: layer {layer} but the base model has "
                               f"{config.num_layers} layers", path=weights)
        if not np.all(np.isfinite(value)):
            raise AdapterError(f"{weights}: tensor {key!r} contains NaN or Inf values", path=weights)
        entry = pairs.setdefault((layer, module), {})
        if factor in entry:
            raise AdapterError(f"{weights}: tensor {key!r} appears twice "
                               "(with and without the base_model.model. prefix)", path=weights)
        entry[factor] = value
    if not pairs:
        raise AdapterError(f"{weights}: no LoRA tensors found", path=weights)
    modules: dict[tuple[int, str], ModuleFactors] = {}
    for (layer, module), factors in sorted(pairs.items()):
        missing = {"A", "B"} - set(factors)
        if missing:
            raise AdapterError(f"{weights}: tensor {tensor_key(layer, module, missing.pop())!r} is missing",
                               path=weights)
        a_blocks, b_blocks = _block_counts(module, bd, config_path)
        d_in, d_out = config.module_dims(module)
        for blocks, dim in ((a_blocks, d_in), (b_blocks, d_out)):
            if dim % blocks:
                raise AdapterError(f"{config_path}: nblocks={blocks} does not divide {module}'s dimension {dim}",
                                   path=config_path)
        expected = {"A": (r, d_in // a_blocks), "B": (d_out, r // b_blocks)}
        for factor in ("A", "B"):
            if factors[factor].shape != expected[factor]:
                raise AdapterError(
                    f"{weights}: tensor {tensor_key(layer, module, factor)!r} has shape {factors[factor].shape}; "
                    f"expected {expected[factor]} for r={r} on this base model", path=weights
                )
        modules[(layer, module)] = ModuleFactors(factors["A"], factors["B"], a_blocks, b_blocks)
    return LoraAdapter(
        name=name or path.name,
        rank=r,
        alpha=alpha,
        modules=modules,
        use_rslora=bool(adapter_config.get("use_rslora", False)),
        nblocks=int(bd.get("nblocks", 1)) if bd else 1,
        bd_a_modules=tuple(bd.get("target_modules_bd_a") or ()) if bd else (),
        bd_b_modules=tuple(bd.get("target_modules_bd_b") or ()) if bd else (),
        base_model=adapter_config.get("base_model_name_or_path"),
    )


def adapter_config_dict(adapter: LoraAdapter) -> dict[str, Any]:
    """The adapter_config.json that PEFT needs to rebuild this adapter."""
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapter.base_model,
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "use_rslora": adapter.use_rslora,
        "target_modules": list(adapter.target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    if adapter.nblocks > 1:
        config["use_bdlora"] = {
            "target_modules_bd_a": list(adapter.bd_a_modules),
            "target_modules_bd_b": list(adapter.bd_b_modules),
            "nblocks": adapter.nblocks,
            "match_strict": True,
        }
    return config


def write_adapter(adapter: LoraAdapter, path: str | Path) -> Path:
    """Write an adapter as a PEFT directory that PEFT's PeftModel.from_pretrained (and we) load."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for (layer, module), factors in sorted(adapter.modules.items()):
        tensors[tensor_key(layer, module, "A")] = np.ascontiguousarray(factors.a, dtype=np.float32)
        tensors[tensor_key(layer, module, "B")] = np.ascontiguousarray(factors.b, dtype=np.float32)
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(adapter_config_dict(adapter), indent=2) + "\n")
    return path
