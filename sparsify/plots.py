"""PNG plots of a training run: scheduled vs actual density, ANP over time, degree distributions,
and adjacency heat maps of every sparse layer at the start and the end."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from sparsify.evolution import Evolution
from sparsify.topology.metrics import degrees

HEATMAP_PIXELS = 256


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, write: Callable) -> None:
    write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"), binary=True)


def _downsampled(mask: torch.Tensor, pixels: int = HEATMAP_PIXELS) -> torch.Tensor:
    """The share of active links in each block of a ``pixels``-wide grid over the mask."""
    out, inp = mask.shape
    h, w = min(out, pixels), min(inp, pixels)
    dense = mask.float()[None, None]
    return torch.nn.functional.adaptive_avg_pool2d(dense, (h, w))[0, 0]


def write_plots(folder: Path, evolution: Evolution, updates: list[dict], epochs: list[dict],
                start: dict[str, torch.Tensor], write: Callable) -> list[str]:
    """Write density.png, anp.png, degrees.png and adjacency.png into ``folder``; returns the names."""
    plt = _pyplot()
    names = evolution.names
    total = int(evolution.total_steps)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    top = 0.0
    for name in names:
        steps = sorted({0, total, *(r["step"] for r in updates)})
        scheduled = [_density_at(evolution, name, s) for s in steps]
        top = max(top, *scheduled)
        line, = ax.step(steps, scheduled, where="post", label=f"{name} scheduled")
        points = [(r["step"], r["layers"][name]["density"]) for r in updates if name in r["layers"]]
        if points:
            ax.plot(*zip(*points), "o", color=line.get_color(), markersize=3, label=f"{name} actual")
    ax.set(xlabel="optimizer step", ylabel="density", title="density: scheduled (line) and after each update (dots)",
           ylim=(0, top * 1.15))
    ax.legend(fontsize=7, ncol=2)
    _save(fig, folder / "density.png", write)
    plt.close(fig)
    written.append("density.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    points = [(r["step"], r["anp"]) for r in updates] + [(r["step"], r["anp"]) for r in epochs if "anp" in r]
    if points:
        ax.plot(*zip(*sorted(points)), "-o", markersize=3)
    ax.set(xlabel="optimizer step", ylabel="active neurons / all neurons", title="ANP (active neuron rate)",
           ylim=(0, 1.02))
    _save(fig, folder / "anp.png", write)
    plt.close(fig)
    written.append("anp.png")

    fig, axes = plt.subplots(len(names), 2, figsize=(8, 2.2 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        for ax, degree, side in zip(row, degrees(evolution.layer(name).mask.cpu()), ("inputs per output neuron",
                                                                                    "outputs per input neuron")):
            counts = torch.bincount(degree)
            ax.bar(range(len(counts)), counts.tolist(), width=1.0)
            ax.set_title(f"{name}: {side}", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.suptitle("degree distributions at the end")
    fig.tight_layout()
    _save(fig, folder / "degrees.png", write)
    plt.close(fig)
    written.append("degrees.png")

    fig, axes = plt.subplots(len(names), 2, figsize=(7, 3.2 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        for ax, mask, when in zip(row, (start[name], evolution.layer(name).mask), ("start", "end")):
            ax.imshow(_downsampled(mask.cpu()).numpy(), cmap="Greys", aspect="auto", interpolation="nearest",
                      extent=(0, mask.shape[1], mask.shape[0], 0))
            ax.set_title(f"{name} at the {when} ({int(mask.sum()):,} links)", fontsize=8)
            ax.set_xlabel("input neuron", fontsize=7)
            ax.set_ylabel("output neuron", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.suptitle("adjacency (share of active links per pixel)")
    fig.tight_layout()
    _save(fig, folder / "adjacency.png", write)
    plt.close(fig)
    written.append("adjacency.png")
    return written


def _density_at(evolution: Evolution, name: str, step: int) -> float:
    """The scheduled density in force after ``step``: the one of the last update at or before it."""
    every, last = evolution.interval(name), evolution.last_update(name)
    if every is None or last is None or step < every:
        return evolution.specs[name].initial_density
    return evolution.scheduled_density(name, min(step // every * every, last))
