"""The embedded demo: a small byte-level Llama and a few adapters shipped with the package (made by scripts/make_demo.py)."""

from pathlib import Path

DEMO_DIR = Path(__file__).parent
MODEL_DIR = DEMO_DIR / "model"
# The four task adapters compressed into one rank-32 JD-Full bank (python -m bdlora_jax.compress, see docs/guides).
COMPRESSED_DIR = DEMO_DIR / "compressed"
DEMO_MODEL = "demo"  # the model name that stands for MODEL_DIR wherever a model directory is asked for


def is_demo_model(model: object) -> bool:
    """Whether a model given by name or path (flag, config field, Engine.from_pretrained) is the shipped demo."""
    return isinstance(model, (str, Path)) and str(model) == DEMO_MODEL


def resolve_model_path(model: str | Path) -> Path:
    """The directory of a model given by name or path: MODEL_DIR for "demo", else the path itself."""
    return MODEL_DIR if is_demo_model(model) else Path(model)


def demo_adapters() -> dict[str, Path]:
    """Name -> PEFT directory of every shipped demo adapter."""
    return {p.name: p for p in sorted((DEMO_DIR / "adapters").iterdir()) if p.is_dir()}
