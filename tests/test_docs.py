"""The user guides' commands work as written: every ```bash block of a guide runs, in order, as one script.

Each guide runs in a fresh directory holding links to the checkout's `configs/` and `bdlora_jax/`, so its
relative paths resolve as they do from the repository root and its outputs stay out of the checkout. A
guide that starts a server in the background is cleaned up with its whole process group.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDES = sorted((ROOT / "docs" / "guides").glob("*.md"))
BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.DOTALL | re.MULTILINE)


def bash_blocks(text: str) -> list[str]:
    """The ```bash blocks of a markdown text, in order."""
    return BASH_BLOCK.findall(text)


def test_every_guide_has_commands():
    assert {g.stem for g in GUIDES} >= {"serve-many-adapters", "train-bdlora", "compress-a-collection",
                                        "run-ablation"}
    for guide in GUIDES:
        assert bash_blocks(guide.read_text()), f"{guide.name} has no ```bash block"


@pytest.mark.slow
@pytest.mark.parametrize("guide", GUIDES, ids=lambda g: g.stem)
def test_guide_commands_run(guide: Path, tmp_path: Path):
    for name in ("configs", "bdlora_jax"):
        (tmp_path / name).symlink_to(ROOT / name)
    script = "\n".join(bash_blocks(guide.read_text()))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    process = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=600)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert process.returncode == 0, f"{guide.name} failed (exit {process.returncode}):\n{output[-6000:]}"
