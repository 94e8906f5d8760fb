"""Configuration files shipped with the package (model shapes, GPU device profiles, ablation grids), and how a
path or name given on a command line finds one from any working directory.

A path that exists is used as is. A relative `configs/<kind>/NAME.yaml` that does not exist from the working
directory (the form the docs use), or a bare `NAME` / `NAME.yaml`, is the shipped file of that name.
"""

from __future__ import annotations

from pathlib import Path

CONFIGS_DIR = Path(__file__).resolve().parent
# The kinds of shipped config (a directory each) and what one file of that kind is called in messages.
KINDS = {"models": "model config", "devices": "device profile", "ablations": "ablation config"}
SUFFIXES = (".yaml", ".yml")


class ConfigNotFound(ValueError):
    """A config path that is neither a file nor the name of a shipped config; the message lists the shipped ones."""


def _check_kind(kind: str) -> Path:
    """The directory of the shipped `kind` configs; an unknown kind is a ValueError naming the known ones."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {', '.join(KINDS)}")
    return CONFIGS_DIR / kind


def shipped_names(kind: str) -> list[str]:
    """The names (file names without .yaml) of the shipped `kind` configs, sorted."""
    return sorted(p.stem for p in _check_kind(kind).glob("*.yaml"))


def _stem(name: str) -> str:
    """A config's name without its .yaml / .yml suffix (names such as llama-3.1-8b hold dots of their own)."""
    suffix = Path(name).suffix
    return name[: -len(suffix)] if suffix in SUFFIXES else name


def find_config(spec: str | Path, kind: str) -> Path:
    """The `kind` config file `spec` names: `spec` itself if it is a file; else, for a bare name or a relative
    configs/<kind>/NAME.yaml path, the shipped config of that name; else ConfigNotFound listing the shipped names."""
    path = Path(spec)
    if path.is_file():
        return path
    if not path.is_absolute() and (path.parent == Path(".") or path.parent.parts[-2:] == ("configs", kind)):
        candidate = _check_kind(kind) / f"{_stem(path.name)}.yaml"
        if candidate.is_file():
            return candidate
    raise ConfigNotFound(f"{KINDS[kind]} {str(spec)!r}: no such file, and not the name of a shipped one "
                         f"(shipped in {_check_kind(kind)}: {', '.join(shipped_names(kind))})")
