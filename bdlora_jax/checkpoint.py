"""Hugging Face Llama checkpoints (config.json + safetensors, single or sharded) into sharded parameters.

Each parameter is built with jax.make_array_from_callback, so every device reads only its own slice of the
file, already transposed to our (d_in, d_out) layout. Tokenizers come from tokenizer.json via `tokenizers`.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import ATTENTION_MODULES, ModelConfig, model_config_from_dict
from .model.llama import abstract_model
from .sharding import ShardingPlan

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A base-model checkpoint that cannot be loaded; the message names the file and tensor."""


def load_model_config(path: str | Path) -> ModelConfig:
    """ModelConfig from a checkpoint directory's config.json (rope_theta + rope_scaling, or rope_parameters)."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: missing; a Hugging Face model directory needs config.json")
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    model_type = data.get("model_type", "llama")
    if model_type != "llama":
        raise CheckpointError(f"{config_path}: model_type={model_type!r}; expected 'llama'")
    data.setdefault("name", Path(path).resolve().name)
    return model_config_from_dict(data, str(config_path))



def resolve_model_config(spec: str | Path) -> ModelConfig:
    """ModelConfig of "demo" (the shipped model), a Hugging Face model directory, or a model config: a *.yaml
    file, or the name of one shipped in bdlora_jax/configs/models (bare, or as configs/models/NAME.yaml)."""
    import dataclasses

    from .config import load_model_config_yaml
    from .configs import SUFFIXES, ConfigNotFound, find_config, shipped_names
    from .demo import DEMO_MODEL, is_demo_model, resolve_model_path

    if is_demo_model(spec):
        return dataclasses.replace(load_model_config(resolve_model_path(spec)), name=DEMO_MODEL)
    if Path(spec).is_dir():
        return load_model_config(Path(spec))
    try:
        path = find_config(spec, "models")
    except ConfigNotFound:
        path = None
    if path is None or path.suffix not in SUFFIXES:
        raise CheckpointError(f"model {str(spec)!r}: expected 'demo', a Hugging Face model directory, a model config "
                              f"*.yaml file or the name of a shipped one ({', '.join(shipped_names('models'))})")
    return load_model_config_yaml(path)


def _weight_files(path: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: missing 'weight_map'")
        return {key: path / file for key, file in weight_map.items()}
    single = path / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    from safetensors import safe_open

    with safe_open(str(single), framework="flax") as f:
        return {key: single for key in f.keys()}  # noqa: SIM118 - safe_open is not iterable


def _hf_name(path: tuple, config: ModelConfig) -> tuple[str, bool]:
    """HF tensor name of one of our parameters and whether it is stored transposed ((out, in))."""
    names = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    if names == ["embed"]:
        return "model.embed_tokens.weight", False
    if names == ["lm_head"]:
        return "lm_head.weight", True
    if names == ["norm", "weight"]:
        return "model.norm.weight", False
    _, layer, group, name = names[:4]
    if group == "input_norm":
        return f"model.layers.{layer}.input_layernorm.weight", False
    if group == "post_attention_norm":
        return f"model.layers.{layer}.post_attention_layernorm.weight", False
    parent = "self_attn" if name in ATTENTION_MODULES else "mlp"
    return f"model.layers.{layer}.{parent}.{name}.weight", True


def load_hf_params(path: str | Path, config: ModelConfig, plan: ShardingPlan, dtype=jnp.float32, lora_impl: str = "xla"):
    """(graphdef, state) of a Llama with weights read from a HF checkpoint straight into their shardings."""
    from safetensors import safe_open

    path = Path(path)
    files = _weight_files(path)
    graphdef, abstract_state = abstract_model(config, plan, dtype, lora_impl=lora_impl)
    handles: dict[Path, object] = {}

    def open_file(file: Path):
        if file not in handles:
            if not file.is_file():
                raise CheckpointError(f"{file}: listed in {INDEX_FILE} but missing")
            handles[file] = safe_open(str(file), framework="flax")
        return handles[file]

    def load(key_path, variable):
        name, transposed = _hf_name(key_path, config)
        if name not in files:
            if name == "lm_head.weight" and "model.embed_tokens.weight" in files:
                raise CheckpointError(f"{path}: no 'lm_head.weight' but config says tie_word_embeddings=false")
            raise CheckpointError(f"{path}: tensor {name!r} is missing")
        tensor = open_file(files[name]).get_slice(name)
        stored = tuple(tensor.get_shape())
        expected = tuple(reversed(variable.shape)) if transposed else tuple(variable.shape)
        if stored != expected:
            raise CheckpointError(f"{files[name]}: tensor {name!r} has shape {stored}; expected {expected}")
        sharding = plan.sharding(variable.get_metadata()["logical_axes"])

        def read(index):
            block = tensor[tuple(reversed(index))] if transposed else tensor[index]
            block = np.asarray(block)
            return (block.T if transposed else block).astype(jnp.dtype(dtype))

        return variable.replace(jax.make_array_from_callback(variable.shape, sharding, read))

    state = jax.tree_util.tree_map_with_path(load, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return graphdef, state


def hf_config_dict(config: ModelConfig) -> dict:
    """config.json of a HF LlamaForCausalLM with this shape (rope in the rope_theta + rope_scaling form)."""
    rope = config.rope_scaling
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None if rope is None else {
            "rope_type": "llama3", "factor": rope.factor, "low_freq_factor": rope.low_freq_factor,
            "high_freq_factor": rope.high_freq_factor,
            "original_max_position_embeddings": rope.original_max_position_embeddings,
        },
        "tie_word_embeddings": config.tie_word_embeddings,
        "max_position_embeddings": config.max_position_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_ids) if len(config.eos_token_ids) != 1 else config.eos_token_ids[0],
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }


def save_hf_checkpoint(config: ModelConfig, state: nnx.State, path: str | Path) -> Path:
    """Write parameters as a HF Llama directory (config.json + model.safetensors) that transformers loads."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key_path, variable in jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]:
        name, transposed = _hf_name(key_path, config)
        value = np.asarray(jax.device_get(variable[...]), dtype=np.float32)
        tensors[name] = np.ascontiguousarray(value.T if transposed else value)
    save_file(tensors, str(path / SINGLE_FILE), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config_dict(config), indent=2) + "\n")
    return path


def load_tokenizer(path: str | Path):
    """The `tokenizers` Tokenizer of a model directory, or None if it has no tokenizer.json."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(file))
