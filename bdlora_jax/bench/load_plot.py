"""The plot of a `bench load --sweep-rates` run: p99 TTFT and p99 TPOT against the request rate, as a PNG."""

from __future__ import annotations

import math
from pathlib import Path


def plot_sweep(runs: list[dict], path: Path) -> None:
    """Two panels (p99 TTFT, p99 TPOT, in ms) over the swept request rates (each run's "request_rate", a number
    or "inf"); an infinite rate is drawn at the measured request throughput of its run. Uses matplotlib's Agg
    backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [float(run["request_rate"]) if run["request_rate"] != "inf" else run["request_throughput"] for run in runs]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(axes, ("ttft_ms", "tpot_ms"), ("p99 TTFT", "p99 TPOT")):
        ax.plot(rates, [run[key]["p99"] if run[key]["p99"] is not None else math.nan for run in runs], marker="o")
        ax.set_xlabel("request rate (requests/s)")
        ax.set_ylabel(f"{title} (ms)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)
