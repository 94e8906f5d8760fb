"""A compressed bank: shared bases per cluster plus a small matrix per adapter, and its directory format.

For every adapted (layer, module) and block j, adapter i's update is approximated as
    D̂_ij = U[c_i, j] · Σ_ij · V[c_i, j]ᵀ          (D = s·B·A in PEFT orientation, d_out × d_in)
with c_i the adapter's cluster (one id for all layers). Σ_ij is a full (r_b × r_b) matrix for method "full"
and a diagonal, stored as its r_b entries, for method "diag"; it carries the adapter's LoRA scale and norm,
so D̂ needs nothing else. Blocks follow BD-LoRA: with `blocks` = nb > 1 a column module (q,k,v,gate,up) is
split along its output (block j = output rows [j·d_out/nb, (j+1)·d_out/nb), all inputs) and a row module
(o,down) along its input, so each device of a model axis dividing nb owns whole blocks and serves them
without communication. The total rank of a module is blocks · rank_b.

Directory: manifest.json (format, method, rank, blocks, clusters, modules, and per adapter its name, cluster,
source and relative reconstruction error ‖D − D̂‖²/‖D‖² per module) and bank.safetensors (per module
"<layer>.<module>.U" (clusters, nb, d_out_b, r_b), ".V" (clusters, nb, d_in_b, r_b), ".sigma").
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import COLUMN_MODULES, LORA_MODULES, ModelConfig
from .adapter import LoraAdapter, ModuleFactors
from .bank import bank_key

FORMAT = "bdlora-compressed-bank"
VERSION = 1
METHODS = ("full", "diag")
MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "bank.safetensors"


class CompressedBankError(ValueError):
    """A compressed-bank directory that cannot be used; the message names the file and field."""


def block_dims(config: ModelConfig, module: str, blocks: int) -> tuple[int, int]:
    """(d_in_b, d_out_b) of one block: column modules split their output, row modules their input."""
    d_in, d_out = config.module_dims(module)
    return (d_in, d_out // blocks) if module in COLUMN_MODULES else (d_in // blocks, d_out)


@dataclass(frozen=True)
class CompressedModule:
    """One (layer, module): bases for every cluster and block, Σ per adapter, and each adapter's error."""

    u: np.ndarray
    v: np.ndarray
    sigma: np.ndarray
    errors: np.ndarray

    def sigma_matrices(self) -> np.ndarray:
        """Σ as full (adapters, blocks, r_b, r_b) matrices (a diagonal Σ expanded)."""
        if self.sigma.ndim == 4:
            return self.sigma
        return self.sigma[..., :, None] * np.eye(self.sigma.shape[-1], dtype=self.sigma.dtype)

    def delta(self, index: int, cluster: int, module: str) -> np.ndarray:
        """Adapter `index`'s reconstructed dense update D̂ (d_out, d_in)."""
        sigma = self.sigma_matrices()[index]
        blocks = [self.u[cluster, j] @ sigma[j] @ self.v[cluster, j].T for j in range(sigma.shape[0])]
        if len(blocks) == 1:
            return blocks[0]
        if module in COLUMN_MODULES:
            return np.concatenate(blocks, axis=0)
        return np.concatenate(blocks, axis=1)


@dataclass(frozen=True)
class CompressedBank:
    """A compressed collection of adapters over one base model (see the module docstring for the math)."""

    names: tuple[str, ...]
    clusters: np.ndarray
    method: str
    rank: int
    blocks: int
    modules: Mapping[tuple[int, str], CompressedModule]
    sources: tuple[str, ...] = ()
    base_model: str | None = None
    fit: Mapping[str, Any] | None = None

    @property
    def num_clusters(self) -> int:
        return next(iter(self.modules.values())).u.shape[0]

    @property
    def rank_per_block(self) -> int:
        return self.rank // self.blocks

    def index(self, name: str) -> int:
        """Position of an adapter by name."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"compressed bank has no adapter {name!r}") from None

    def reconstruct(self, name: str) -> LoraAdapter:
        """The adapter U·Σ·Vᵀ as an ordinary LoRA (BD-LoRA when blocks > 1) of rank `rank` with scale 1."""
        i = self.index(name)
        c = int(self.clusters[i])
        nb = self.blocks
        factors = {}
        for (layer, module), m in self.modules.items():
            sigma = m.sigma_matrices()[i]
            us = [m.u[c, j] @ sigma[j] for j in range(nb)]
            vts = [m.v[c, j].T for j in range(nb)]
            if module in COLUMN_MODULES:
                a, b = np.concatenate(vts, axis=0), np.concatenate(us, axis=0)
                factors[(layer, module)] = ModuleFactors(a, b, a_blocks=1, b_blocks=nb)
            else:
                a, b = np.concatenate(vts, axis=0), np.concatenate(us, axis=1)
                factors[(layer, module)] = ModuleFactors(a, b, a_blocks=nb, b_blocks=1)
        targets = {module for _, module in self.modules}
        return LoraAdapter(
            name=name, rank=self.rank, alpha=float(self.rank), modules=factors, nblocks=nb,
            bd_a_modules=tuple(m for m in LORA_MODULES if m in targets and m not in COLUMN_MODULES) if nb > 1 else (),
            bd_b_modules=tuple(m for m in LORA_MODULES if m in targets and m in COLUMN_MODULES) if nb > 1 else (),
            base_model=self.base_model,
        )

    def manifest(self) -> dict[str, Any]:
        """The manifest.json contents."""
        keys = sorted(self.modules)
        return {
            "format": FORMAT, "version": VERSION, "method": self.method, "rank": self.rank, "blocks": self.blocks,
            "clusters": self.num_clusters, "base_model": self.base_model,
            "modules": [bank_key(layer, module) for layer, module in keys],
            "fit": dict(self.fit or {}),
            "adapters": [
                {"name": name, "cluster": int(self.clusters[i]),
                 "source": self.sources[i] if self.sources else None,
                 "errors": {bank_key(*key): float(self.modules[key].errors[i]) for key in keys}}
                for i, name in enumerate(self.names)
            ],
        }

    def save(self, path: str | Path) -> Path:
        """Write manifest.json and bank.safetensors into a directory (created if needed)."""
        from safetensors.numpy import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for (layer, module), m in self.modules.items():
            key = bank_key(layer, module)
            tensors[f"{key}.U"] = np.ascontiguousarray(m.u, np.float32)
            tensors[f"{key}.V"] = np.ascontiguousarray(m.v, np.float32)
            tensors[f"{key}.sigma"] = np.ascontiguousarray(m.sigma, np.float32)
        save_file(tensors, str(path / TENSORS_FILE))
        (path / MANIFEST_FILE).write_text(json.dumps(self.manifest(), indent=2) + "\n")
        return path


def _field(manifest: dict, name: str, kind, where: Path):
    value = manifest.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise CompressedBankError(f"{where}: field {name!r} is {value!r}; expected {getattr(kind, '__name__', kind)}")
    return value


def _read_manifest(path: Path) -> dict[str, Any]:
    where = path / MANIFEST_FILE
    if not path.is_dir():
        raise CompressedBankError(f"{path}: compressed-bank directory does not exist")
    if not where.is_file():
        raise CompressedBankError(f"{where}: missing; a compressed bank needs {MANIFEST_FILE} and {TENSORS_FILE}")
    try:
        manifest = json.loads(where.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CompressedBankError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CompressedBankError(f"{where}: field 'format' must be {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise CompressedBankError(f"{where}: field 'version' is {manifest.get('version')!r}; expected {VERSION}")
    if manifest.get("method") not in METHODS:
        raise CompressedBankError(f"{where}: field 'method' is {manifest.get('method')!r}; expected one of {METHODS}")
    return manifest


def _parse_key(key: Any, where: Path) -> tuple[int, str]:
    layer, _, module = str(key).partition(".")
    if not layer.isdigit() or module not in LORA_MODULES:
        raise CompressedBankError(f"{where}: module {key!r} is not '<layer>.<one of {LORA_MODULES}>'")
    return int(layer), module


def load_compressed_bank(path: str | Path, config: ModelConfig) -> CompressedBank:
    """Read and validate a compressed-bank directory against a base model; errors name the file and field."""
    from safetensors import safe_open

    path = Path(path)
    manifest = _read_manifest(path)
    where = path / MANIFEST_FILE
    rank, blocks, clusters = (_field(manifest, f, int, where) for f in ("rank", "blocks", "clusters"))
    if blocks < 1 or rank < 1 or clusters < 1 or rank % blocks:
        raise CompressedBankError(f"{where}: rank={rank}, blocks={blocks}, clusters={clusters}: expected positive "
                                  "integers with blocks dividing rank")
    adapters = _field(manifest, "adapters", list, where)
    if not adapters:
        raise CompressedBankError(f"{where}: field 'adapters' is empty")
    names, ids, sources = [], [], []
    for i, entry in enumerate(adapters):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise CompressedBankError(f"{where}: adapters[{i}] needs a non-empty string 'name'")
        cluster = entry.get("cluster")
        if not isinstance(cluster, int) or isinstance(cluster, bool) or not 0 <= cluster < clusters:
            raise CompressedBankError(f"{where}: adapters[{i}] ({entry['name']!r}) has cluster {cluster!r}; "
                                      f"expected an integer in 0..{clusters - 1}")
        names.append(entry["name"])
        ids.append(cluster)
        sources.append(entry.get("source") or "")
    if len(set(names)) != len(names):
        raise CompressedBankError(f"{where}: adapter names are not unique")
    keys = [_parse_key(k, where) for k in _field(manifest, "modules", list, where)]
    tensors_path = path / TENSORS_FILE
    if not tensors_path.is_file():
        raise CompressedBankError(f"{tensors_path}: missing")
    n, rb, method = len(names), rank // blocks, manifest["method"]
    modules = {}
    try:
        with safe_open(str(tensors_path), framework="numpy") as f:
            present = set(f.keys())
            for layer, module in keys:
                if layer >= config.num_layers:
                    raise CompressedBankError(f"{where}: module '{layer}.{module}' is past the model's "
                                              f"{config.num_layers} layers")
                d_in, d_out = config.module_dims(module)
                if (d_out if module in COLUMN_MODULES else d_in) % blocks:
                    raise CompressedBankError(f"{where}: blocks={blocks} does not divide {module}'s "
                                              f"{'output' if module in COLUMN_MODULES else 'input'}")
                d_in_b, d_out_b = block_dims(config, module, blocks)
                sigma_shape = (n, blocks, rb, rb) if method == "full" else (n, blocks, rb)
                expected = {"U": (clusters, blocks, d_out_b, rb), "V": (clusters, blocks, d_in_b, rb),
                            "sigma": sigma_shape}
                arrays = {}
                for part, shape in expected.items():
                    name = f"{bank_key(layer, module)}.{part}"
                    if name not in present:
                        raise CompressedBankError(f"{tensors_path}: tensor {name!r} is missing")
                    arrays[part] = np.asarray(f.get_tensor(name), np.float32)
                    if arrays[part].shape != shape:
                        raise CompressedBankError(f"{tensors_path}: tensor {name!r} has shape {arrays[part].shape}; "
                                                  f"expected {shape} for this model")
                errors = np.array([a.get("errors", {}).get(bank_key(layer, module), np.nan) for a in adapters],
                                  np.float64)
                modules[(layer, module)] = CompressedModule(arrays["U"], arrays["V"], arrays["sigma"], errors)
    except CompressedBankError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises several error types for corrupt files
        raise CompressedBankError(f"{tensors_path}: cannot read safetensors ({e})") from None
    return CompressedBank(tuple(names), np.asarray(ids, np.int32), method, rank, blocks, modules, tuple(sources),
                          manifest.get("base_model"), manifest.get("fit"))
