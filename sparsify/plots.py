"""PNG plots of a training run: scheduled vs actual density, ANP over time, degree distributions,
and adjacency heat maps of every sparse layer at the start and the end."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from sparsify.evolution import Evolution
from sparsify.files import atomic_write
from sparsify.topology.metrics import degrees

HEATMAP_PIXELS = 256


def _pyplot():
    # lazy for start-up time: matplotlib loads only when a run writes its plots
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"), binary=True)


def _downsampled(mask: torch.Tensor, pixels: int = HEATMAP_PIXELS) -> torch.Tensor:
    """The share of active links in each block of a ``pixels``-wide grid over the mask."""
    out, inp = mask.shape
    h, w = min(out, pixels), min(inp, pixels)
    dense = mask.float()[None, None]
    return torch.nn.functional.adaptive_avg_pool2d(dense, (h, w))[0, 0]


def write_plots(folder: Path, evolution: Evolution, updates: list[dict], epochs: list[dict],
                start: dict[str, torch.Tensor]) -> list[str]:
    """Write density.png, anp.png, degrees.png and adjacency.png into ``folder``; returns the names."""
    plt = _pyplot()
    for name, draw in PLOTS.items():
        fig = draw(plt, evolution, updates, epochs, start)
        _save(fig, folder / name)
        plt.close(fig)
    return list(PLOTS)


def _density_plot(plt, evolution: Evolution, updates: list[dict], epochs: list[dict], start: dict):
    fig, ax = plt.subplots(figsize=(7, 4))
    top = 0.0
    for name in evolution.names:
        steps = sorted({0, int(evolution.total_steps), *(r["step"] for r in updates)})
        scheduled = [_density_at(evolution, name, s) for s in steps]
        top = max(top, *scheduled)
        line, = ax.step(steps, scheduled, where="post", label=f"{name} scheduled")
        points = [(r["step"], r["layers"][name]["density"]) for r in updates if name in r["layers"]]
        if points:
            ax.plot(*zip(*points), "o", color=line.get_color(), markersize=3, label=f"{name} actual")
    ax.set(xlabel="optimizer step", ylabel="density", title="density: scheduled (line) and after each update (dots)",
           ylim=(0, top * 1.15))
    ax.legend(fontsize=7, ncol=2)
    return fig


def _anp_plot(plt, evolution: Evolution, updates: list[dict], epochs: list[dict], start: dict):
    fig, ax = plt.subplots(figsize=(7, 4))
    points = [(r["step"], r["anp"]) for r in updates + epochs if "anp" in r]
    if points:
        ax.plot(*zip(*sorted(points)), "-o", markersize=3)
    ax.set(xlabel="optimizer step", ylabel="active neurons / all neurons", title="ANP (active neuron rate)",
           ylim=(0, 1.02))
    return fig


def _grid(plt, names: list[str], size: tuple[float, float], title: str, cell: Callable):
    """A figure with one row of two panels per layer; ``cell(ax, name, column)`` draws a panel."""
    fig, axes = plt.subplots(len(names), 2, figsize=(size[0], size[1] * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        for column, ax in enumerate(row):
            cell(ax, name, column)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _degree_plot(plt, evolution: Evolution, updates: list[dict], epochs: list[dict], start: dict):
    sides = ("inputs per output neuron", "outputs per input neuron")

    def cell(ax, name: str, column: int) -> None:
        counts = torch.bincount(degrees(evolution.layer(name).mask.cpu())[column])
        ax.bar(range(len(counts)), counts.tolist(), width=1.0)
        ax.set_title(f"{name}: {sides[column]}", fontsize=8)
        ax.tick_params(labelsize=7)

    return _grid(plt, evolution.names, (8, 2.2), "degree distributions at the end", cell)


def _adjacency_plot(plt, evolution: Evolution, updates: list[dict], epochs: list[dict], start: dict):
    def cell(ax, name: str, column: int) -> None:
        mask = (start[name], evolution.layer(name).mask)[column].cpu()
        ax.imshow(_downsampled(mask).numpy(), cmap="Greys", aspect="auto", interpolation="nearest",
                  extent=(0, mask.shape[1], mask.shape[0], 0))
        ax.set_title(f"{name} at the {('start', 'end')[column]} ({int(mask.sum()):,} links)", fontsize=8)
        ax.set_xlabel("input neuron", fontsize=7)
        ax.set_ylabel("output neuron", fontsize=7)
        ax.tick_params(labelsize=6)

    return _grid(plt, evolution.names, (7, 3.2), "adjacency (share of active links per pixel)", cell)


PLOTS = {"density.png": _density_plot, "anp.png": _anp_plot, "degrees.png": _degree_plot,
         "adjacency.png": _adjacency_plot}


def _density_at(evolution: Evolution, name: str, step: int) -> float:
    """The scheduled density in force after ``step``: the one of the last update at or before it."""
    every, last = evolution.interval(name), evolution.last_update(name)
    if every is None or last is None or step < every:
        return evolution.specs[name].initial_density
    return evolution.scheduled_density(name, min(step // every * every, last))
