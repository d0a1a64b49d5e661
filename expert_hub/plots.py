"""The PNG figures of `expert-hub analyze`, drawn from `analysis.py`'s numbers.

matplotlib is imported when a figure is drawn, not with the package, and only through its object API
(`matplotlib.figure.Figure`, rendered by Agg): no pyplot, so no display, no global backend and no figure left open.
Each file is written atomically: a reader sees the old figure or the new one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from .analysis import Concentration
from .io import write_atomic

_DPI = 150


def routing_heatmaps(shares: Mapping[str, dict[int, list[float]]], by: str, path: Path) -> Path:
    """One panel per task, layers down and experts across, on one colour scale (the paper's Fig. 2 layout).

    One scale for every panel, so a bright cell means the same share in each task.
    """
    names = list(shares)
    columns = min(2, len(names))
    rows = math.ceil(len(names) / columns)
    brightest = max(max(row) for task in shares.values() for row in task.values())
    figure = _figure(6.5 * columns + 1, 3.4 * rows + 0.6)
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax, name in zip(axes.flat, names):
        layers = sorted(shares[name])
        width = max(len(shares[name][layer]) for layer in layers)
        matrix = [shares[name][layer] + [0.0] * (width - len(shares[name][layer])) for layer in layers]
        image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0, vmax=brightest, interpolation="nearest")
        ax.set_title(name)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        step = max(1, math.ceil(len(layers) / 13))
        ax.set_yticks(range(0, len(layers), step), [str(layer) for layer in layers[::step]])
    for ax in axes.flat[len(names) :]:
        ax.set_axis_off()
    figure.colorbar(image, ax=axes, label="share of the layer's routing", shrink=0.9)
    figure.suptitle(f"Routing per expert and layer ({by} scores)")
    return save(figure, path)


def concentration_curves(concentrations: Mapping[str, Concentration], by: str, path: Path) -> Path:
    """Per level, the experts each layer needs to cover it, per task, against uniform routing (dashed)."""
    levels = next(iter(concentrations.values())).levels
    figure = _figure(4.5 * len(levels), 3.8)
    axes = figure.subplots(1, len(levels), squeeze=False)[0]
    for i, (ax, level) in enumerate(zip(axes, levels)):
        uniform_drawn = set()
        for name, result in concentrations.items():
            layers = sorted(result.experts)
            ax.plot(layers, [result.experts[layer][i] for layer in layers], marker=".", label=name)
            uniform = tuple(result.uniform[layer][i] for layer in layers)
            if (tuple(layers), uniform) not in uniform_drawn:
                uniform_drawn.add((tuple(layers), uniform))
                ax.plot(layers, uniform, linestyle="--", color="grey", label="uniform" if not i else None)
        ax.set_title(f"{level:.0%} of the routing")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.set_ylim(bottom=0)
    axes[0].set_ylabel("experts needed")
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside right center")
    figure.suptitle(f"Experts covering each share of a layer's routing ({by} scores)")
    return save(figure, path)


def overlap_matrix(names: list[str], matrix: list[list[float]], path: Path) -> Path:
    """The tasks' Jaccard similarities of selected experts, each cell labelled with its value."""
    size = 1.2 + 0.9 * len(names)
    figure = _figure(size + 1.2, size)
    ax = figure.subplots()
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for row, values in enumerate(matrix):
        for column, value in enumerate(values):
            ax.text(column, row, f"{value:.2f}", ha="center", va="center", color="white" if value > 0.5 else "black")
    figure.colorbar(image, ax=ax, label="Jaccard similarity of selected experts")
    ax.set_title("Overlap of the selected experts")
    return save(figure, path)


def weight_changes(changes: Mapping[str, dict[int, dict[int, float]]], path: Path) -> Path:
    """Every trained expert's relative weight change by layer, one colour per adapter."""
    figure = _figure(8, 4)
    ax = figure.subplots()
    for offset, (name, layers) in enumerate(changes.items()):
        shift = (offset - (len(changes) - 1) / 2) * 0.15  # side by side when several adapters share a layer
        points = [(layer + shift, value) for layer, experts in sorted(layers.items()) for value in experts.values()]
        ax.scatter([x for x, _ in points], [y for _, y in points], s=14, label=name)
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_ylabel("‖W_trained − W_base‖ / ‖W_base‖")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title("How far training moved each trained expert")
    return save(figure, path)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _integer_ticks():
    """Layer axes: whole numbers only."""
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def save(figure, path: Path) -> Path:
    """Write the figure as a PNG atomically (readers see no file or a whole one)."""
    write_atomic(path, lambda handle: figure.savefig(handle, format="png", dpi=_DPI), binary=True)
    return Path(path)
