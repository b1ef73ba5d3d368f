"""Matplotlib pictures of a running model for the page.

The network, the time series and the two heatmaps, as PNG bytes (the heatmaps also as
a Figure). Figures are built without pyplot, so they are safe to draw from the page's
worker threads.
"""

from __future__ import annotations

import io
import textwrap
from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from matplotlib.collections import LineCollection, PatchCollection
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Circle, Patch, Rectangle

from abm.viz.layout import MAX_DRAWN_EDGES, Drawing, drawing_for

DPI = 100
NETWORK_SIZE = (740, 590)  # pixels; the page shows the image at this size, so clicks map 1:1
_TAB = [colormaps["tab10"](i) for i in range(10)]
_EXTRA = [colormaps["tab20"](i) for i in range(1, 20, 2)] + [
    colormaps["Dark2"](i) for i in range(8)
]
PALETTE = [c[:3] for c in _TAB + _EXTRA]
MATCH_CMAP = LinearSegmentedColormap.from_list("match", ["#c62828", "#ef8f00", "#2e9d44"])
LEGEND_LIMIT = 18


def colour(label_index: int) -> tuple[float, float, float]:
    """The colour of a player label, the same in every picture."""
    return PALETTE[label_index % len(PALETTE)]


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


@dataclass
class Hits:
    """Maps a click on the network image (pixels from its top left) to an agent."""

    nodes: np.ndarray
    xy: np.ndarray  # pixel position of each drawn node
    radius: np.ndarray  # pixel radius of each marker
    grid: tuple[int, int] | None = None
    extent: tuple[float, float, float, float] | None = None  # image box: x0, y0, x1, y1
    loops: np.ndarray | None = None  # nodes drawn with a self-play loop

    def node_at(self, x: float, y: float) -> int | None:
        """The agent at pixel (x, y) of the image, or None where there is none."""
        if self.grid is not None and self.extent is not None:
            x0, y0, x1, y1 = self.extent
            if not (x0 <= x < x1 and y0 <= y < y1):
                return None
            rows, cols = self.grid
            r = int((y - y0) / (y1 - y0) * rows)
            c = int((x - x0) / (x1 - x0) * cols)
            return r * cols + c
        if len(self.nodes) == 0:
            return None
        d = np.hypot(self.xy[:, 0] - x, self.xy[:, 1] - y)
        best = int(np.argmin(d))
        return int(self.nodes[best]) if d[best] <= self.radius[best] + 6 else None


def self_loops(model) -> np.ndarray:
    """Node of each self-play loop (a node meeting an independent copy of itself)."""
    u, v = model.edges[:, 0], model.edges[:, 1]
    return u[u == v]


def _legend(fig: Figure, model, counts: np.ndarray, grid: bool, loops: int = 0) -> None:
    handles = [
        Patch(facecolor=colour(i), edgecolor="black", linewidth=0.5, label=f"{label} ({counts[i]})")
        for i, label in enumerate(model.population.labels)
        if i < len(counts) and counts[i]
    ]
    if len(handles) > LEGEND_LIMIT:
        rest = len(handles) - LEGEND_LIMIT + 1
        handles = handles[: LEGEND_LIMIT - 1] + [Patch(alpha=0, label=f"... {rest} more")]
    blank = Line2D([], [], linestyle="none", label=" ")
    if grid:
        handles += [
            blank,
            Patch(facecolor="0.6", label="last action C"),
            Patch(facecolor="0.3", label="last action D (darker)"),
        ]
        if loops:
            handles.append(Patch(alpha=0, label=f"{loops:,} self-play loops (not drawn)"))
    else:
        handles += [
            blank,
            Line2D(
                [],
                [],
                marker="o",
                linestyle="none",
                color="0.5",
                markeredgecolor="black",
                markersize=8,
                label="last action C",
            ),
            Line2D(
                [],
                [],
                marker="s",
                linestyle="none",
                color="0.5",
                markeredgecolor="black",
                markersize=8,
                label="last action D",
            ),
            Line2D(
                [],
                [],
                marker="o",
                linestyle="none",
                color="0.5",
                alpha=0.35,
                markersize=8,
                label="no match this step",
            ),
            blank,
            Line2D([], [], color=MATCH_CMAP(1.0), linewidth=2.5, label="match: all C"),
            Line2D([], [], color=MATCH_CMAP(0.5), linewidth=2.5, label="match: mixed"),
            Line2D([], [], color=MATCH_CMAP(0.0), linewidth=2.5, label="match: all D"),
            Line2D([], [], color="0.75", linewidth=1, label="link, no match"),
        ]
        if loops:
            handles.append(
                Line2D(
                    [],
                    [],
                    marker="o",
                    linestyle="none",
                    markersize=10,
                    markerfacecolor="none",
                    markeredgecolor="0.45",
                    label=f"self-play loop ({loops:,})",
                )
            )
    fig.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(0.715, 0.93),
        frameon=False,
        fontsize=9,
        title="policy (agents)",
        title_fontsize=9,
        alignment="left",
    )


def network_png(model, selected: int | None = None) -> tuple[bytes, Hits]:
    """The network picture, and how to map a click on it back to an agent.

    Nodes are coloured by policy, sized by score and shaped by their last action, with
    this step's matches highlighted. Past ``MAX_DRAWN_NODES`` agents a lattice is drawn
    one pixel per agent and another graph as a sample (see ``abm.viz.layout``).

    Args:
        model: The page's model (a ``VizModel``).
        selected: The agent to ring and name, if any.

    Returns:
        The PNG bytes and the ``Hits`` of the picture.
    """
    drawing: Drawing = drawing_for(model)
    width, height = NETWORK_SIZE
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    ax = fig.add_axes((0.01, 0.01, 0.70, 0.91))
    ax.set_axis_off()
    labels_now = model.population.label_of_node
    counts = model.population.counts()
    last = model.last_actions()
    fig.text(
        0.01,
        0.975,
        f"{model.scenario.name}: step {model.played_steps} of "
        f"{model.total_steps}, {model.n_nodes:,} agents",
        fontsize=11,
        va="top",
        weight="bold",
    )
    loop_nodes = self_loops(model)
    if model.last_result is not None:
        shown = "one pixel per agent" if drawing.grid is not None else "node size = score so far"
        r = model.last_result
        selfplay = int((r.agent[: r.n_matches] == r.opponent[: r.n_matches]).sum())
        extra = f" ({selfplay:,} of them self-play)" if selfplay else ""
        fig.text(
            0.01,
            0.94,
            f"{r.n_matches:,} matches this step{extra}; {shown}",
            fontsize=9,
            va="top",
            color="0.3",
        )
    _legend(fig, model, counts, drawing.grid is not None, len(loop_nodes))
    if drawing.grid is not None:
        rows, cols = drawing.grid
        rgb = np.array(PALETTE)[labels_now % len(PALETTE)]
        rgb[last == 1] *= 0.55
        ax.imshow(rgb.reshape(rows, cols, 3), interpolation="nearest")
        data = _png(fig)
        (x0, y0), (x1, y1) = ax.transData.transform([(-0.5, -0.5), (cols - 0.5, rows - 0.5)])
        return data, Hits(
            nodes=np.zeros(0, np.int64),
            xy=np.zeros((0, 2)),
            radius=np.zeros(0),
            grid=(rows, cols),
            extent=(x0, height - y0, x1, height - y1),
        )

    nodes, pos, index = drawing.nodes, drawing.pos, drawing.index
    u, v = model.edges[drawing.edges, 0], model.edges[drawing.edges, 1]
    lw = 0.8 if len(u) < 2000 else 0.3
    ax.add_collection(
        LineCollection(
            np.stack([pos[index[u]], pos[index[v]]], axis=1), colors="0.75", linewidths=lw, zorder=1
        )
    )
    edge_ids, share = model.match_cooperation()
    if len(edge_ids):
        a, b = model.edges[edge_ids, 0], model.edges[edge_ids, 1]
        keep = np.flatnonzero((index[a] >= 0) & (index[b] >= 0) & (a != b))[:MAX_DRAWN_EDGES]
        if len(keep):
            segments = np.stack([pos[index[a[keep]]], pos[index[b[keep]]]], axis=1)
            ax.add_collection(
                LineCollection(
                    segments,
                    colors=MATCH_CMAP(share[keep]),
                    linewidths=2.0 if len(keep) < 500 else 0.8,
                    zorder=2,
                )
            )
    loops, loop_reach = _draw_loops(ax, model, drawing, loop_nodes, edge_ids, share)
    score = np.asarray(model.scores)[nodes]
    spread = score.max() - score.min() if len(score) else 0.0
    scaled = (score - score.min()) / spread if spread > 0 else np.full(len(score), 0.5)
    big = float(np.clip(9000 / max(len(nodes), 1), 14, 320))
    sizes = big * (0.22 + 0.78 * scaled)
    face = np.array(PALETTE)[labels_now[nodes] % len(PALETTE)]
    acts = last[nodes]
    for act, marker, alpha in ((0, "o", 1.0), (1, "s", 1.0), (-1, "o", 0.35)):
        m = acts == act
        if m.any():
            ax.scatter(
                pos[m, 0],
                pos[m, 1],
                s=sizes[m],
                c=face[m],
                marker=marker,
                alpha=alpha,
                edgecolors="black",
                linewidths=0.6,
                zorder=3,
            )
    llm = model.llm_nodes()
    llm = llm[index[llm] >= 0][:60]
    for node in llm:
        x, y = pos[index[node]]
        ax.annotate(
            str(node),
            (x, y),
            xytext=(7, 7),
            textcoords="offset points",
            fontsize=8,
            weight="bold",
            zorder=5,
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
        )
    if selected is not None and 0 <= selected < len(index) and index[selected] >= 0:
        x, y = pos[index[selected]]
        ax.scatter(
            [x],
            [y],
            s=sizes[index[selected]] * 2.2 + 120,
            facecolors="none",
            edgecolors="black",
            linewidths=2.2,
            zorder=4,
        )
        ax.annotate(
            f"agent {selected}",
            (x, y),
            xytext=(8, -14),
            textcoords="offset points",
            fontsize=9,
            weight="bold",
            zorder=5,
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "0.5", "alpha": 0.85},
        )
    ax.set_aspect("equal", adjustable="box")
    pad = max(0.06 * max(float(np.ptp(pos[:, 0])) if len(pos) else 1.0, 1e-9), loop_reach)
    ax.set_xlim(pos[:, 0].min() - pad, pos[:, 0].max() + pad)
    ax.set_ylim(pos[:, 1].min() - pad, pos[:, 1].max() + pad)
    data = _png(fig)  # drawing fixes the limits; the transform below is the final one
    xy = ax.transData.transform(pos)
    xy[:, 1] = height - xy[:, 1]
    radius = np.sqrt(sizes) / 2 * DPI / 72
    return data, Hits(nodes=nodes, xy=xy, radius=radius, loops=loops)


def _draw_loops(
    ax, model, drawing: Drawing, loop_nodes: np.ndarray, edge_ids: np.ndarray, share: np.ndarray
) -> tuple[np.ndarray, float]:
    """Draw a small circle beside each drawn node with a self-play loop.

    The circle points away from the middle, coloured like a match when it was played
    this step. Returns the nodes drawn with a loop and how far the loops reach past
    the nodes (data units).
    """
    index, pos = drawing.index, drawing.pos
    drawn = loop_nodes[index[loop_nodes] >= 0]
    if len(drawn) == 0 or len(pos) == 0:
        return drawn, 0.0
    span = max(float(np.ptp(pos[:, 0])), float(np.ptp(pos[:, 1])), 1e-9)
    r = span * float(np.clip(0.35 / np.sqrt(len(pos)), 0.006, 0.04))
    at = pos[index[drawn]]
    out = at - pos.mean(axis=0)
    length = np.hypot(out[:, 0], out[:, 1])
    out = np.where(length[:, None] > 1e-9, out / np.maximum(length, 1e-9)[:, None], [0.0, 1.0])
    centres = at + 0.9 * r * out
    colours = np.tile(np.array([0.75, 0.75, 0.75, 1.0]), (len(drawn), 1))
    widths = np.full(len(drawn), 0.8)
    u = model.edges[edge_ids, 0] if len(edge_ids) else np.zeros(0, np.int64)
    played = u[model.edges[edge_ids, 1] == u] if len(edge_ids) else u
    if len(played):
        last_share = dict(
            zip(played.tolist(), share[model.edges[edge_ids, 1] == u].tolist(), strict=True)
        )
        for i, node in enumerate(drawn.tolist()):
            if node in last_share:
                colours[i] = MATCH_CMAP(last_share[node])
                widths[i] = 2.0 if len(drawn) < 500 else 0.8
    ax.add_collection(
        PatchCollection(
            [Circle(tuple(c), r) for c in centres],
            facecolors="none",
            edgecolors=colours,
            linewidths=widths,
            zorder=2,
        )
    )
    return drawn, 2 * r


def timeseries_png(model) -> bytes:
    """Cooperation rate and mean payoff per step, and policy shares over time, as PNG bytes."""
    fig = Figure(figsize=(5.4, 5.6), dpi=DPI)  # fixed margins: constrained layout costs 2x
    ax1, ax2, ax3 = fig.subplots(3, 1, sharex=True)
    fig.subplots_adjust(left=0.15, right=0.97, top=0.94, bottom=0.09, hspace=0.1)
    steps = model.tally.steps
    x = np.arange(1, len(steps) + 1)
    marker = "o" if len(steps) <= 60 else None
    ax1.plot(
        x, [s["cooperation_rate"] for s in steps], marker=marker, markersize=3, color="tab:green"
    )
    ax1.set_ylim(-0.02, 1.02)
    ax1.set_ylabel("cooperation rate")
    ax1.set_title(
        "Share of C actions and mean payoff per decision, by step", fontsize=10, loc="left"
    )
    ax2.plot(x, [s["mean_payoff"] for s in steps], marker=marker, markersize=3, color="tab:blue")
    ax2.set_ylabel("mean payoff")
    game = model.scenario.game
    low, high = min(game.S, game.P, game.R, game.T), max(game.S, game.P, game.R, game.T)
    ax2.set_ylim(low - 0.03 * (high - low), high + 0.03 * (high - low))
    history = model.share_history
    k = len(model.population.labels)
    shares = np.zeros((len(history), k))
    for i, counts in enumerate(history):
        shares[i, : len(counts)] = counts[:k] / max(counts.sum(), 1)
    colours = [colour(i) for i in range(k)]
    if len(history) >= 2:
        ax3.stackplot(np.arange(len(history)), shares.T, colors=colours)
    else:
        bottom = 0.0
        for i in range(k):
            ax3.bar([0], [shares[0, i]], bottom=bottom, width=0.6, color=colours[i])
            bottom += shares[0, i]
    ax3.set_ylim(0, 1)
    ax3.set_ylabel("policy shares")
    ax3.set_xlabel("step (shares: 0 = at the start)")
    ax3.set_xlim(-0.3, max(len(history) - 1, 1) + 0.3)
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if not steps:
        ax1.text(0.5, 0.5, "no steps played yet", transform=ax1.transAxes, ha="center", color="0.4")
    return _png(fig)


UNREAD_COLOUR = "#ff7f0e"  # the frame of a cell with decisions not read from the model
NO_DATA_COLOUR = "0.73"  # a cell with decisions but no complete match


def heatmap_marks(model) -> tuple[np.ndarray, np.ndarray, int]:
    """What the heatmaps mark, per (player, opponent) cell, and the stopped matches.

    Returns:
        Whether some of the row player's decisions were not read from the model
        (invalid answers or the fallback rule); whether the cell has decisions but no
        complete match ("no data"); and how many matches an unreadable answer stopped
        (they are left out of both tables, as in the run's charts).
    """
    tally = model.tally
    unread = tally.unread_matrix().to_numpy(dtype=float)
    payoff = tally.payoff_matrix().to_numpy(dtype=float)
    marked = np.nan_to_num(unread, nan=0.0) > 0
    no_data = np.isnan(payoff) & ~np.isnan(unread)
    # each match counts once for each of its two sides
    return marked, no_data, int(tally.void_matrix().to_numpy().sum()) // 2


def heatmaps_figure(model) -> Figure:
    """The experiment's two tables so far, side by side.

    Mean payoff and mean (intended) defections per match, row player against column
    opponent. Cells with decisions not read from the model get an orange frame and a
    "*"; cells without a complete match are grey ("no data"), as in the run's heatmaps.
    """
    matrices = [
        (model.tally.payoff_matrix(), "Mean payoff per match", ".1f"),
        (model.tally.defection_matrix(), "Mean defections per match", ".2f"),
    ]
    marked, no_data, void = heatmap_marks(model)
    flagged = bool(marked.any() or no_data.any())
    labels = [str(x) for x in matrices[0][0].columns]
    k = len(labels)
    longest = min(max((len(x) for x in labels), default=1), 24)
    # laid out in pixels (constrained layout would double the drawing time)
    side = int(np.clip(48 * k, 160, 330))
    left, bar = 46 + 6 * longest, 62
    panel = left + side + bar
    width = 2 * panel
    note = ""
    if flagged:
        stopped = (
            f"; {void:,} match{'es' if void != 1 else ''} stopped by an unreadable answer left out"
            if void
            else ""
        )
        note = textwrap.fill(
            "* and orange frame: some of the row player's decisions were not "
            "read from the model (invalid answers or the fallback rule); "
            f"grey: no complete match{stopped}",
            width=max(40, width // 6),
        )
    bottom, top = 44 + 4 * longest + (14 * (note.count("\n") + 1) + 8 if note else 0), 30
    height = bottom + side + top
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    cmap = colormaps["viridis"].with_extremes(bad="0.92")
    for i, (frame, title, fmt) in enumerate(matrices):
        x0 = i * panel + left
        ax = fig.add_axes((x0 / width, bottom / height, side / width, side / height))
        cax = fig.add_axes(((x0 + side + 8) / width, bottom / height, 12 / width, side / height))
        values = frame.to_numpy(dtype=float)
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, aspect="auto")
        ax.set_title(title, fontsize=10)
        ticks = np.arange(k)
        ax.set_xticks(ticks, labels, rotation=40, ha="right", fontsize=8)
        ax.set_yticks(ticks, [str(r) for r in frame.index], fontsize=8)
        ax.set_xlabel("opponent", fontsize=9)
        ax.set_ylabel("player", fontsize=9)
        fig.colorbar(image, cax=cax)
        cax.tick_params(labelsize=8)
        for r, c in zip(*np.nonzero(no_data), strict=True):
            ax.add_patch(
                Rectangle(
                    (c - 0.5, r - 0.5), 1, 1, facecolor=NO_DATA_COLOUR, edgecolor="none", zorder=2
                )
            )
        for r, c in zip(*np.nonzero(marked), strict=True):
            ax.add_patch(
                Rectangle(
                    (c - 0.45, r - 0.45),
                    0.9,
                    0.9,
                    fill=False,
                    edgecolor=UNREAD_COLOUR,
                    linewidth=2.5,
                    zorder=3,
                )
            )
        if k <= 12:
            finite = values[np.isfinite(values)]
            lo, hi = (finite.min(), finite.max()) if len(finite) else (0.0, 0.0)
            for (r, c), val in np.ndenumerate(values):
                star = "*" if marked[r, c] else ""
                if np.isfinite(val):
                    bright = hi > lo and (val - lo) / (hi - lo) > 0.6
                    ax.text(
                        c,
                        r,
                        format(val, fmt) + star,
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="black" if bright else "white",
                        zorder=4,
                    )
                elif no_data[r, c]:
                    ax.text(
                        c,
                        r,
                        "no data",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="black",
                        zorder=4,
                    )
    if note:
        fig.text(0.01, 4 / height, note, fontsize=8, va="bottom", color="0.25", linespacing=1.3)
    if not model.tally.steps:
        fig.text(0.5, 0.5, "no matches played yet", ha="center", fontsize=10, color="0.4")
    return fig


def heatmaps_png(model) -> bytes:
    """``heatmaps_figure`` as PNG bytes."""
    return _png(heatmaps_figure(model))
