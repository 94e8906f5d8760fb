"""adapter_config.json: read within size and nesting limits, and every field PEFT defines type-checked.

A field of the wrong type (a number where module names belong, a list where a regex belongs) raises an
AdapterError naming the file and the field, so nothing later trips over it. Fields PEFT does not define are
ignored, as PEFT ignores them; the values shown in messages are shortened.
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import AdapterError

MAX_CONFIG_BYTES = 1 << 20

Check = Callable[[Any], bool]
_shortened = reprlib.Repr()
_shortened.maxstring = _shortened.maxother = _shortened.maxlong = 60
_shortened.maxlist = _shortened.maxdict = 6
_shortened.maxlevel = 3


def show(value: Any) -> str:
    """A short repr of a config value for messages (long strings, numbers and deep lists are cut)."""
    return _shortened.repr(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_object(v: Any) -> bool:
    return isinstance(v, dict)


def _list_of(check: Check) -> Check:
    return lambda v: isinstance(v, list) and all(check(x) for x in v)


def _any_of(*checks: Check) -> Check:
    return lambda v: any(check(v) for check in checks)


def _or_null(check: Check) -> Check:
    return lambda v: v is None or check(v)


_NAMES = _or_null(_any_of(_is_str, _list_of(_is_str)))
_OBJECT = (_or_null(_is_object), "an object or null")
_STRING = (_or_null(_is_str), "a string or null")
_FLAG = (_or_null(_is_bool), "true or false")

# PEFT's LoraConfig fields (peft 0.21) and BD-LoRA's use_bdlora block: (check, what is expected)
FIELD_TYPES: dict[str, tuple[Check, str]] = {
    "peft_type": (_is_str, "a string"),
    "task_type": _STRING,
    "auto_mapping": _OBJECT,
    "peft_version": _STRING,
    "base_model_name_or_path": _STRING,
    "revision": _STRING,
    "inference_mode": _FLAG,
    "r": (_is_int, "a positive integer"),
    "target_modules": (_NAMES, "a list of module names, a regular expression or null"),
    "exclude_modules": (_NAMES, "a list of module names, a regular expression or null"),
    "lora_alpha": (_is_number, "a number"),
    "lora_dropout": (_or_null(_is_number), "a number"),
    "fan_in_fan_out": _FLAG,
    "bias": _STRING,
    "use_rslora": _FLAG,
    "modules_to_save": (_or_null(_list_of(_is_str)), "a list of module names or null"),
    "init_lora_weights": (_or_null(_any_of(_is_bool, _is_str)), "true, false or a method name"),
    "layers_to_transform": (_or_null(_any_of(_is_int, _list_of(_is_int))), "a layer index, a list of them or null"),
    "layers_pattern": (_NAMES, "a string, a list of strings or null"),
    "rank_pattern": _OBJECT,
    "alpha_pattern": _OBJECT,
    "megatron_config": _OBJECT,
    "megatron_core": _STRING,
    "trainable_token_indices": (_or_null(_any_of(_list_of(_is_int), _is_object)), "token ids, an object or null"),
    "loftq_config": _OBJECT,
    "eva_config": _OBJECT,
    "corda_config": _OBJECT,
    "lora_ga_config": _OBJECT,
    "velora_config": _OBJECT,
    "monteclora_config": _OBJECT,
    "arrow_config": _OBJECT,
    "kasa_config": _OBJECT,
    "alora_invocation_tokens": (_or_null(_list_of(_is_int)), "a list of token ids or null"),
    "use_dora": _FLAG,
    "use_qalora": _FLAG,
    "qalora_group_size": (_or_null(_is_int), "an integer"),
    "layer_replication": (_or_null(_list_of(_list_of(_is_int))), "a list of [start, end] layer ranges or null"),
    "runtime_config": _OBJECT,
    "lora_bias": _FLAG,
    "target_parameters": (_or_null(_list_of(_is_str)), "a list of parameter names or null"),
    "ensure_weight_tying": _FLAG,
    "use_bdlora": _OBJECT,
}
BDLORA_FIELD_TYPES: dict[str, tuple[Check, str]] = {
    "nblocks": (_is_int, "a positive integer"),
    "target_modules_bd_a": (_or_null(_list_of(_is_str)), "a list of module names"),
    "target_modules_bd_b": (_or_null(_list_of(_is_str)), "a list of module names"),
    "match_strict": _FLAG,
}


def read_config_file(config_path: Path, shown: Path) -> dict[str, Any]:
    """The JSON object in config_path (at most 1 MiB of UTF-8, any nesting the parser survives); errors name `shown`."""
    try:
        with open(config_path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise AdapterError(f"{shown}: cannot read ({e.strerror or e})", path=shown) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{shown}: larger than {MAX_CONFIG_BYTES} bytes; an adapter config is a small JSON "
                           "object", path=shown)
    try:
        config = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise AdapterError(f"{shown}: not valid JSON (nested too deeply)", path=shown) from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, or an integer of more digits than Python parses
        raise AdapterError(f"{shown}: not valid JSON ({e})", path=shown) from None
    if not isinstance(config, dict):
        raise AdapterError(f"{shown}: expected a JSON object", path=shown)
    return config


def check_field_types(config: dict[str, Any], where: Path) -> None:
    """Raise AdapterError naming the first field (or use_bdlora sub-field) whose value has the wrong type."""
    _check_types(config, FIELD_TYPES, "", where)
    if isinstance(config.get("use_bdlora"), dict):
        _check_types(config["use_bdlora"], BDLORA_FIELD_TYPES, "use_bdlora.", where)


def _check_types(config: dict[str, Any], types: dict[str, tuple[Check, str]], prefix: str, where: Path) -> None:
    for field, (check, expected) in types.items():
        if field in config and not check(config[field]):
            raise AdapterError(f"{where}: field '{prefix}{field}'={show(config[field])}; expected {expected}",
                               path=where)
