"""The report's figures, drawn from plain (x, y) series.

matplotlib's object API (``Figure`` without pyplot) renders through Agg with no global state, so a
report can be built on a headless node or inside a test without picking a GUI backend. Each
function returns the Figure so callers (and tests) can read back exactly what was drawn.
"""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure

Series = tuple[Sequence[float], Sequence[float]]


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_yticks([])


def loss_figure(train: Series, val: Series, x_label: str) -> Figure:
    """Training and validation loss against tokens seen (or steps when tokens are unknown)."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(*train, label="train/loss", linewidth=1)
    if val[0]:
        ax.plot(*val, label="val/loss", marker="o")
    ax.set_xlabel(x_label)
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def throughput_figure(tokens_per_s: Series, mfu: Series, hfu: Series) -> Figure:
    """Global tokens/s and MFU/HFU (in %) against optimizer step."""
    fig = Figure(figsize=(7, 6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(*tokens_per_s, label="perf/tokens_per_s")
    top.set_ylabel("tokens/s (all devices)")
    top.set_title("Throughput")
    top.grid(alpha=0.3)
    if mfu[0]:
        bottom.plot(mfu[0], [100 * v for v in mfu[1]], label="perf/mfu")
        if hfu[0]:
            bottom.plot(hfu[0], [100 * v for v in hfu[1]], label="perf/hfu", linestyle="--")
        bottom.legend()
    else:
        _empty(bottom, "MFU not reported: no peak FLOP/s for this device\n(set trainer.peak_flops)")
    bottom.set_ylabel("utilization (%)")
    bottom.set_xlabel("optimizer step")
    bottom.grid(alpha=0.3)
    return fig


def energy_figure(power_w: Series, kwh: Series) -> Figure:
    """Power drawn by all nodes (PUE included) and cumulative energy against wall time (minutes)."""
    fig = Figure(figsize=(7, 6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(*power_w, label="energy/power_w", drawstyle="steps-pre")
    top.set_ylabel("power (W, all nodes)")
    top.set_title("Energy")
    top.grid(alpha=0.3)
    bottom.plot(*kwh, label="energy/kwh")
    bottom.set_ylabel("cumulative energy (kWh)")
    bottom.set_xlabel("wall time (min)")
    bottom.grid(alpha=0.3)
    return fig


def eval_figure(series: dict[str, Series]) -> Figure:
    """Each metric the in-training evaluation logged (``eval/<task>/<metric>``) against optimizer step.

    One panel per metric, as their scales differ (accuracy in [0, 1], perplexity in the hundreds);
    each line is labelled with its metrics.csv column.
    """
    names = list(series)
    ncols = 1 if len(names) <= 3 else 2
    nrows = max(1, -(-len(names) // ncols))
    fig = Figure(figsize=(7 if ncols == 1 else 10, 0.6 + 2.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    fig.suptitle("Evaluation during training")
    for i, ax in enumerate(axes.flat):
        if i >= len(names):
            ax.set_axis_off()
            continue
        name = names[i]
        ax.plot(*series[name], label=name, marker="o", markersize=3)
        ax.set_title(name, fontsize="medium")
        ax.grid(alpha=0.3)
        if i >= len(names) - ncols:  # the bottom panel of each column
            ax.set_xlabel("optimizer step")
    return fig


def data_figure(dropped: dict[str, int], stages: Sequence[tuple[str, int, int]]) -> Figure:
    """What data preparation removed: documents per drop reason, and documents into and out of each stage.

    ``dropped`` maps ``<stage>:<reason>`` to documents; ``stages`` is (stage, documents in, out).
    """
    fig = Figure(figsize=(8, 2.2 + 0.32 * (len(dropped) + len(stages))), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[max(1, len(dropped)), max(1, len(stages))])
    if dropped:
        reasons = sorted(dropped, key=lambda k: dropped[k])
        top.barh(reasons, [dropped[r] for r in reasons], color="tab:red")
        top.set_xlabel("documents removed")
        top.grid(alpha=0.3, axis="x")
    else:
        _empty(top, "nothing was removed")
    top.set_title("Data preparation: what was removed, and why")
    if stages:
        names = [s[0] for s in stages][::-1]
        ins = [s[1] for s in stages][::-1]
        outs = [s[2] for s in stages][::-1]
        y = list(range(len(names)))
        bottom.barh([v + 0.2 for v in y], ins, height=0.4, label="documents in", color="tab:gray")
        bottom.barh([v - 0.2 for v in y], outs, height=0.4, label="documents out", color="tab:blue")
        bottom.set_yticks(y, names)
        bottom.legend(loc="lower right")
        bottom.grid(alpha=0.3, axis="x")
    else:
        _empty(bottom, "no stage statistics recorded")
    bottom.set_xlabel("documents")
    return fig
