"""PNG plots of a `balora compare` summary (matplotlib's Agg canvas, no pyplot: no global backend state).

* ``metrics.png``: one panel per metric column, a bar per group (mean) with the seed std as error bar;
* ``curves.png``: the task loss, the validation loss when the cells evaluated during training
  (``eval_loss``: whether a method has stopped improving at the budget) and each regulariser
  (``balora/consistency``, ``balora/diversity``, ``balora/svd``) against the optimiser step, mean over each
  group's seeds;
* ``cost.png``: train time and peak memory per group, mean ± std.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

CURVE_KEYS = ("task_loss", "eval_loss", "balora/consistency", "balora/diversity", "balora/svd")
TITLES = {"task_loss": "task loss (training)", "eval_loss": "validation loss"}

Curve = tuple[list[int], list[float]]


def mean_curves(histories: list[list[dict[str, Any]]], keys: tuple[str, ...] = CURVE_KEYS) -> dict[str, Curve]:
    """Per key: the steps where any seed logged it, and the mean over the seeds that did."""
    out: dict[str, Curve] = {}
    for key in keys:
        by_step: dict[int, list[float]] = {}
        for history in histories:
            for row in history:
                value = row.get(key)
                if isinstance(value, (int, float)) and "step" in row:
                    by_step.setdefault(int(row["step"]), []).append(float(value))
        if by_step:
            steps = sorted(by_step)
            out[key] = (steps, [sum(by_step[s]) / len(by_step[s]) for s in steps])
    return out


def _figure(panels: int, width: float = 4.5, height: float = 3.4) -> tuple[Figure, list[Any]]:
    fig = Figure(figsize=(width * panels, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    return fig, list(axes)


def _bars(ax: Any, labels: list[str], stats: list[dict[str, Any]], title: str, scale: float = 1.0) -> None:
    xs = list(range(len(labels)))
    means = [s["mean"] / scale if s["n"] else 0.0 for s in stats]
    errs = [(s["std"] or 0.0) / scale if s["n"] else 0.0 for s in stats]
    bars = ax.bar(xs, means, yerr=errs, capsize=4, color="tab:blue", alpha=0.8)
    for bar, s in zip(bars, stats):  # n at each bar's foot: a mean of 1 seed has no error bar, say so
        ax.annotate(f"n={s['n']}", (bar.get_x() + bar.get_width() / 2, 0), ha="center",
                    va="bottom" if bar.get_height() >= 0 else "top", fontsize=7, color="white",
                    xytext=(0, 2 if bar.get_height() >= 0 else -2), textcoords="offset points")
    ax.set_xticks(xs, labels, rotation=30, ha="right", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def plot_metric_bars(summary: dict[str, Any], path: Path) -> Path | None:
    """Bars of each metric column per group, with the seed std as error bars."""
    metrics = summary["metrics"]
    if not metrics:
        return None
    groups = summary["groups"]
    labels = [g["label"] for g in groups]
    fig, axes = _figure(len(metrics))
    for ax, metric in zip(axes, metrics):
        arrow = "↓" if metric in summary["lower_is_better"] else "↑"
        _bars(ax, labels, [g["metrics"][metric] for g in groups], f"{metric} {arrow}")
    fig.suptitle(f"{summary['name']}: mean ± std over seeds")
    fig.savefig(path, dpi=110)
    return path


def plot_training_curves(curves: dict[str, dict[str, Curve]], path: Path, title: str = "") -> Path | None:
    """One panel per logged term, a line per group (``curves``: group -> key -> (steps, means))."""
    keys = [k for k in CURVE_KEYS if any(k in c for c in curves.values())]
    if not keys:
        return None
    fig, axes = _figure(len(keys), width=4.0)
    # one colour per group in every panel: the baselines log no regulariser, so panels hold different groups
    colours = {group: f"C{i % 10}" for i, group in enumerate(curves)}
    for ax, key in zip(axes, keys):
        for group, by_key in curves.items():
            if key in by_key:
                steps, values = by_key[key]
                ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=group, color=colours[group])
        ax.set_title(TITLES.get(key, key), fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(handles=[Line2D([], [], color=c, label=g) for g, c in colours.items()], fontsize=7)
    fig.suptitle(f"{title}: training curves, mean over seeds" if title else "training curves, mean over seeds")
    fig.savefig(path, dpi=110)
    return path


def plot_cost(summary: dict[str, Any], path: Path) -> Path:
    """Train time and peak memory per group."""
    groups = summary["groups"]
    labels = [g["label"] for g in groups]
    fig, axes = _figure(2)
    _bars(axes[0], labels, [g["cost"]["train_seconds"] for g in groups], "train time (s)")
    _bars(axes[1], labels, [g["cost"]["memory_mb"] for g in groups], "peak RSS (MB)")
    fig.suptitle(f"{summary['name']}: cost per cell, mean ± std over seeds")
    fig.savefig(path, dpi=110)
    return path


def make_plots(summary: dict[str, Any], histories: dict[str, list[list[dict[str, Any]]]], out_dir: Path) -> list[Path]:
    """Write the plots of a compare summary; ``histories``: group -> each cell's log_history.json."""
    if not summary["cells"]["ok"]:  # empty bars would read as zeros
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = {group: mean_curves(hs) for group, hs in histories.items()}
    written = [plot_metric_bars(summary, out_dir / "metrics.png"),
               plot_training_curves(curves, out_dir / "curves.png", summary["name"]),
               plot_cost(summary, out_dir / "cost.png")]
    return [p for p in written if p is not None]
