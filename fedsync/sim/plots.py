"""PNG plots of simulation reports (the `plots` extra: matplotlib)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from fedsync.sim.runner import SimulationReport


def plot_accuracy(reports: Mapping[str, SimulationReport], path: Path, title: str = "") -> Path:
    """Held-out accuracy against the fleet's simulated time, the simulation's wall time and the
    version, one line per configuration."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - depends on the environment
        raise RuntimeError("plots need matplotlib: pip install 'fedsync[plots]'") from None
    figure, (by_sim_time, by_time, by_version) = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    for name, report in reports.items():
        points = report.accuracy_over_time
        by_sim_time.step(
            [p["sim_s"] / 60 for p in points],
            [p["accuracy"] for p in points],
            where="post",
            label=name,
            linewidth=2,
        )
        by_time.step(
            [p["wall_s"] for p in points], [p["accuracy"] for p in points], where="post", label=name, linewidth=2
        )
        by_version.plot([p["version"] for p in points], [p["accuracy"] for p in points], marker="o", label=name)
    from matplotlib.ticker import MaxNLocator

    by_version.xaxis.set_major_locator(MaxNLocator(integer=True))
    panels = (
        (by_sim_time, "simulated time (min): the fleet's clock"),
        (by_time, "wall time of the simulation (s)"),
        (by_version, "global model version"),
    )
    for axes, xlabel in panels:
        axes.set_xlabel(xlabel)
        axes.set_ylabel("accuracy on the held-out digits split")
        axes.set_ylim(0, 1)
        axes.grid(alpha=0.3)
        axes.legend(loc="lower right")
    figure.suptitle(title or "fedsync simulate")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
