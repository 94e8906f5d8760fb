"""Mesh strings ("DxM") to a jax Mesh with axes ("data", "model"), and CPU device emulation for entry points."""

from __future__ import annotations

import logging
import os
import sys

DATA = "data"
MODEL = "model"

log = logging.getLogger(__name__)


def parse_mesh(spec: str) -> tuple[int, int]:
    """Parse "DxM" (e.g. "1x8", "2x4") into (data, model) sizes."""
    parts = str(spec).lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"mesh={spec!r}: expected 'DxM' with positive integers, e.g. '1x8' or '2x4'")
    return int(parts[0]), int(parts[1])


def emulate_host_devices(spec: str) -> None:
    """Ask XLA for enough CPU devices for `spec`; must run before jax is imported (entry points call it first)."""
    data, model = parse_mesh(spec)
    needed = data * model
    if "jax" in sys.modules:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={needed}".strip()


def make_mesh(spec: str):
    """Build a jax Mesh with Auto axes ("data", "model") so GSPMD propagates shardings from annotated inputs."""
    import jax
    from jax.sharding import AxisType

    data, model = parse_mesh(spec)
    devices = jax.devices()
    if len(devices) < data * model:
        raise ValueError(
            f"mesh={spec!r} needs {data * model} devices but jax sees {len(devices)} "
            f"({devices[0].platform}); on a CPU host set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={data * model} before jax is imported"
        )
    if devices[0].platform == "cpu" and data * model > 1:
        log.info("no accelerator found: emulating %d CPU devices for mesh %s", data * model, spec)
    return jax.make_mesh(
        (data, model), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices[: data * model]
    )
