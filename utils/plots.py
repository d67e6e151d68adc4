"""Training plots. matplotlib's object API with the Agg canvas: no pyplot, no global backend, no GUI."""
import csv
import math
from pathlib import Path

from utils.general import LOGGER


def read_results_csv(file):
    """results.csv (upstream layout: space-padded columns) -> (column names, list of float rows)."""
    with open(file, newline="") as f:
        rows = [[c.strip() for c in r] for r in csv.reader(f) if r]
    if not rows:
        return [], []
    head, body = rows[0], []
    for r in rows[1:]:
        try:
            body.append([float(x) for x in r])
        except ValueError:
            continue  # a torn or hand-edited line: plot the rest
    return head, body


def plot_results(file="results.csv", out=None):
    """One panel per results.csv column (losses, metrics, learning rates) against the epoch.
    Writes results.png beside the csv (or to `out`) and returns its path; None if nothing to plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    file = Path(file)
    head, rows = read_results_csv(file)
    if not rows or len(head) < 2:
        LOGGER.warning(f"WARNING: nothing to plot in {file}")
        return None
    cols = [k for k in head[1:] if not k.startswith("x/")] or head[1:]  # learning rates only if alone
    n = len(cols)
    ncol = min(5, n)
    nrow = math.ceil(n / ncol)
    fig = Figure(figsize=(3.0 * ncol, 2.6 * nrow), tight_layout=True)
    FigureCanvasAgg(fig)
    x = [r[0] for r in rows]
    for k, name in enumerate(cols):
        ax = fig.add_subplot(nrow, ncol, k + 1)
        y = [r[head.index(name)] for r in rows]
        ax.plot(x, y, marker=".", linewidth=2, markersize=6)
        ax.set_title(name, fontsize=11)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=8)
    out = Path(out) if out else file.with_suffix(".png")
    fig.savefig(out, dpi=120)
    return out
