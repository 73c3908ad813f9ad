"""PNG figures of the quality benchmark (matplotlib, Agg backend; no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from . import summary


def niah_heatmap(results, policy: str, budgets, path: Path) -> Path | None:
    """One panel per budget (one for full KV): NIAH accuracy over length (rows) x depth (columns)."""
    panels = [(b, summary.niah_grid(results, policy, b)) for b in budgets]
    panels = [(b, g) for b, g in panels if g]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1, 3.2), squeeze=False, sharey=True)
    for ax, (budget, cells) in zip(axes[0], panels):
        lengths = sorted({k[0] for k in cells})
        depths = sorted({k[1] for k in cells})
        data = [[cells.get((n, d), float("nan")) for d in depths] for n in lengths]
        im = ax.imshow(data, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        for i, row in enumerate(data):
            for j, acc in enumerate(row):
                ax.text(j, i, f"{acc:.0%}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(depths)), [f"{round(100 * d)}%" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_xlabel("needle depth")
        ax.set_title("full KV" if budget is None else f"budget {budget}")
    axes[0][0].set_ylabel("prompt tokens")
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy")
    fig.suptitle(f"needle in a haystack: {policy}", y=1.04)
    return _save(fig, path)


def layer_budgets(results, budgets, path: Path, policy: str = "dynamickv") -> Path | None:
    """One panel per budget: the rows each layer kept (over the budget), averaged per task."""
    panels = [(b, summary.mean_layer_budget(results, policy, b)) for b in budgets]
    panels = [(b, m) for b, m in panels if m]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False, sharey=True)
    for ax, (budget, per_task) in zip(axes[0], panels):
        for task, shape in per_task.items():
            ax.plot(range(len(shape)), shape, label=task, marker=".")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("layer")
        ax.set_title(f"budget {budget}")
    axes[0][0].set_ylabel("kept rows / budget")
    axes[0][-1].legend()
    fig.suptitle(f"{policy}: per-layer budget, averaged per task", y=1.04)
    return _save(fig, path)


def allocation_shapes(results, budgets, labels, path: Path) -> Path | None:
    """One panel per budget: each policy label's kept rows per layer (over the budget), averaged
    over every compressed request of every task: the layer shapes the allocations pick."""
    labels = [p for p in labels if p != summary.FULL]
    panels = []
    for b in budgets:
        shapes = {p: summary.mean_layer_budget(results, p, b, by_task=False).get("all") for p in labels}
        shapes = {p: s for p, s in shapes.items() if s}
        if shapes:
            panels.append((b, shapes))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.2), squeeze=False, sharey=True)
    for ax, (budget, shapes) in zip(axes[0], panels):
        for label, shape in shapes.items():
            ax.plot(range(len(shape)), shape, label=label, marker=".", lw=1)
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("layer")
        ax.set_title(f"budget {budget}")
    axes[0][0].set_ylabel("kept rows / budget")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("per-layer budget each allocation picks (mean over all requests)", y=1.04)
    return _save(fig, path)


def head_shapes(results, budgets, labels, path: Path) -> Path | None:
    """One panel per (adaptive label, budget): each KV head's kept rows per layer (over the
    budget), averaged over every compressed request: how unequal adaptive head budgets are."""
    panels = [(p, b, summary.mean_head_budget(results, p, b)) for p in labels if "+adaptive" in p for b in budgets]
    panels = [(p, b, m) for p, b, m in panels if m]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False, sharey=True)
    for ax, (label, budget, heads) in zip(axes[0], panels):
        for h, shape in enumerate(heads):
            ax.plot(range(len(shape)), shape, label=f"KV head {h}", marker=".", lw=1)
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("layer")
        ax.set_title(f"{label} @ {budget}", fontsize=9)
    axes[0][0].set_ylabel("kept rows / budget")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("rows per KV head with adaptive head budgets (mean over all requests)", y=1.04)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
