"""The embedded demo: a small byte-level Llama and a few adapters shipped with the package (made by scripts/make_demo.py)."""

from pathlib import Path

DEMO_DIR = Path(__file__).parent
MODEL_DIR = DEMO_DIR / "model"
# The four task adapters compressed into one rank-32 JD-Full bank (python -m bdlora_jax.compress, see docs/guides).
COMPRESSED_DIR = DEMO_DIR / "compressed"


def demo_adapters() -> dict[str, Path]:
    """Name -> PEFT directory of every shipped demo adapter."""
    return {p.name: p for p in sorted((DEMO_DIR / "adapters").iterdir()) if p.is_dir()}
