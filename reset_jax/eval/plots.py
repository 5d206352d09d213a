"""Token-entropy figures: BF16 vs NVFP4 distributions, and one output's trace.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never
through ``pyplot``'s global state, so they render headless (CI, the CLI) and do
not change the backend of a notebook that calls them; pass ``ax=`` to draw
into a ``pyplot`` axes instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "LOW_ENTROPY",
    "entropy_summary",
    "format_summaries",
    "plot_entropy_distributions",
    "plot_token_trace",
    "step_starts",
]

# "Near-deterministic" token: below 0.1 nats the top token holds about 98% or
# more of the mass, the regime the paper says NVFP4 inflates.
LOW_ENTROPY = 0.1
# Entropies are clipped here for log axes: exact zeros (one-hot logits) exist.
_LOG_FLOOR = 1e-6


def entropy_summary(entropies: np.ndarray, *, low: float = LOW_ENTROPY) -> dict:
    """Summary numbers of one token-entropy distribution.

    Args:
      entropies: ``[N]`` entropies in nats.
      low: threshold of a "low-entropy" token.

    Returns:
      ``n``, ``mean``, ``std``, ``p10`` ... ``p99`` (10/25/50/75/80/90/95/99),
      ``share_low`` (fraction with H < low) and ``share_below_0.01``.
    """
    e = np.asarray(entropies, dtype=np.float64).ravel()
    if e.size == 0:
        raise ValueError("empty entropy array")
    out = {"n": int(e.size), "mean": float(e.mean()), "std": float(e.std())}
    for q in (10, 25, 50, 75, 80, 90, 95, 99):
        out[f"p{q}"] = float(np.percentile(e, q))
    out["low_threshold"] = float(low)
    out["share_low"] = float(np.mean(e < low))
    out["share_below_0.01"] = float(np.mean(e < 0.01))
    return out


def format_summaries(summaries: Mapping[str, dict]) -> str:
    """Summaries side by side as a plain-text table.

    Args:
      summaries: ``{label: entropy_summary(...)}``.

    Returns:
      The table.
    """
    labels = list(summaries)
    first = next(iter(summaries.values()))
    rows = [("tokens", "n", "{:.0f}"), ("mean (nats)", "mean", "{:.4f}")]
    rows += [(f"p{q}", f"p{q}", "{:.4f}") for q in (10, 25, 50, 75, 80, 90, 95, 99)]
    rows += [
        (f"share H < {first['low_threshold']:g}", "share_low", "{:.1%}"),
        ("share H < 0.01", "share_below_0.01", "{:.1%}"),
    ]
    width = max(len(r[0]) for r in rows)
    head = " " * width + "".join(f"  {label:>12}" for label in labels)
    lines = [head]
    for name, key, fmt in rows:
        lines.append(
            name.ljust(width) + "".join(f"  {fmt.format(summaries[lb][key]):>12}" for lb in labels)
        )
    return "\n".join(lines)


def _new_figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_entropy_distributions(
    series: Mapping[str, np.ndarray],
    path: str | os.PathLike | None = None,
    *,
    low: float = LOW_ENTROPY,
    tau0: float | None = None,
    title: str | None = None,
) -> tuple[Figure, dict[str, dict]]:
    """The Section 3 view: token-entropy distributions of several models.

    Three panels share the data: a histogram on a linear entropy axis with a
    log count axis (the spike at zero and the tail both visible), a histogram
    on a log entropy axis (how the low-entropy mass is spread), and the CDF on
    a log entropy axis with the low-entropy threshold (and τ₀) marked. A table
    of summary numbers sits beneath.

    Args:
      series: ``{label: [N] entropies}``, e.g. ``{"BF16": a, "NVFP4": b}``.
      path: where to save the figure (PNG/PDF/SVG by extension); None to skip.
      low: the low-entropy threshold (nats).
      tau0: a τ₀ to mark, if any.
      title: figure title.

    Returns:
      ``(figure, {label: entropy_summary})``.
    """
    if not series:
        raise ValueError("no series to plot")
    data = {k: np.asarray(v, dtype=np.float64).ravel() for k, v in series.items()}
    summaries = {k: entropy_summary(v, low=low) for k, v in data.items()}
    hi = max(float(v.max()) for v in data.values())
    hi = max(hi, low * 2, 1e-3)

    fig = _new_figure((15, 8.5))
    grid = fig.add_gridspec(2, 3, height_ratios=[3, 1.6])
    ax_lin, ax_log, ax_cdf = (fig.add_subplot(grid[0, i]) for i in range(3))
    ax_tab = fig.add_subplot(grid[1, :])

    lin_bins = np.linspace(0.0, hi, 61)
    log_bins = np.logspace(np.log10(_LOG_FLOOR), np.log10(hi), 61)
    for label, e in data.items():
        weights = np.full(e.shape, 1.0 / e.size)
        ax_lin.hist(e, bins=lin_bins, weights=weights, histtype="step", linewidth=1.5, label=label)
        clipped = np.clip(e, _LOG_FLOOR, None)
        ax_log.hist(
            clipped, bins=log_bins, weights=weights, histtype="step", linewidth=1.5, label=label
        )
        xs = np.sort(clipped)
        ax_cdf.plot(xs, np.arange(1, xs.size + 1) / xs.size, linewidth=1.5, label=label)

    ax_lin.set_yscale("log")
    ax_lin.set_xlabel("token entropy H (nats)")
    ax_lin.set_ylabel("share of tokens (log)")
    ax_lin.set_title("histogram")
    ax_log.set_xscale("log")
    ax_log.set_xlabel(f"token entropy H (nats, log; clipped at {_LOG_FLOOR:g})")
    ax_log.set_ylabel("share of tokens")
    ax_log.set_title("histogram, log entropy")
    ax_cdf.set_xscale("log")
    ax_cdf.set_xlabel("token entropy H (nats, log)")
    ax_cdf.set_ylabel("share of tokens with entropy ≤ H")
    ax_cdf.set_title("CDF")
    for ax in (ax_lin, ax_log, ax_cdf):
        ax.axvline(low, color="grey", linestyle=":", linewidth=1, label=f"H = {low:g}")
        if tau0 is not None:
            ax.axvline(tau0, color="black", linestyle="--", linewidth=1, label=f"τ₀ = {tau0:.3f}")
        ax.grid(alpha=0.3)
    ax_cdf.legend(loc="upper left")

    labels = list(data)
    rows = [
        ("tokens", lambda s: f"{s['n']}"),
        ("mean H", lambda s: f"{s['mean']:.3f}"),
        ("median H", lambda s: f"{s['p50']:.3g}"),
        ("p80 H (τ₀ rule)", lambda s: f"{s['p80']:.3f}"),
        ("p90 / p99 H", lambda s: f"{s['p90']:.3f} / {s['p99']:.3f}"),
        (f"share H < {low:g}", lambda s: f"{s['share_low']:.1%}"),
        ("share H < 0.01", lambda s: f"{s['share_below_0.01']:.1%}"),
    ]
    ax_tab.axis("off")
    table = ax_tab.table(
        cellText=[[fmt(summaries[lb]) for lb in labels] for _, fmt in rows],
        rowLabels=[name for name, _ in rows],
        colLabels=labels,
        loc="center",
        cellLoc="center",
    )
    table.scale(1, 1.3)
    fig.suptitle(title or "Token entropy: " + " vs ".join(labels))
    if path is not None:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig, summaries


def step_starts(
    token_ids: Sequence[int], nl_ids: Sequence[int], dnl_ids: Sequence[int]
) -> list[int]:
    """Positions where a new reasoning step starts (docs/reset-algorithm.md).

    Position ``t`` starts a step when the generated tokens before it end in a
    ``dnl`` id (text containing a blank line) or in two ``nl`` ids.

    Args:
      token_ids: ``[T]`` generated ids.
      nl_ids: ids whose text is exactly ``"\\n"``.
      dnl_ids: ids whose text contains ``"\\n\\n"``.

    Returns:
      Sorted positions in ``[1, T)``.
    """
    nl, dnl = {int(i) for i in nl_ids}, {int(i) for i in dnl_ids}
    ids = [int(t) for t in token_ids]
    out = []
    for t in range(1, len(ids)):
        if ids[t - 1] in dnl or (t >= 2 and ids[t - 1] in nl and ids[t - 2] in nl):
            out.append(t)
    return out


def plot_token_trace(
    entropies: np.ndarray,
    temperatures: np.ndarray,
    *,
    starts: Sequence[int] = (),
    tau0: float | None = None,
    t_high: float = 1.0,
    ax=None,
    path: str | os.PathLike | None = None,
    title: str | None = None,
):
    """Per-token entropy along one output, coloured by the temperature chosen.

    Tokens decoded at ``T_high`` are drawn in one colour, the rest in another;
    a faint line links the entropies; dashed verticals mark step starts, a
    horizontal line marks τ₀; the temperature is drawn as a step curve on a
    second axis.

    Args:
      entropies: ``[T]`` nats.
      temperatures: ``[T]`` the temperature used for each token.
      starts: step-start positions (see :func:`step_starts`).
      tau0: τ₀ to mark.
      t_high: the high temperature (which colour a token gets).
      ax: axes to draw into (e.g. from ``pyplot``); None makes a new Agg figure.
      path: save the figure here when given.
      title: axes title.

    Returns:
      The figure drawn into.
    """
    h = np.asarray(entropies, dtype=np.float64).ravel()
    temp = np.asarray(temperatures, dtype=np.float64).ravel()
    if h.shape != temp.shape:
        raise ValueError(f"entropies {h.shape} and temperatures {temp.shape} differ in length")
    if ax is None:
        fig = _new_figure((14, 4.5))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    pos = np.arange(h.size)
    high = temp >= t_high - 1e-6
    ax.plot(pos, h, color="0.75", linewidth=0.8, zorder=1)
    ax.scatter(
        pos[high], h[high], s=10, color="tab:red", label=f"T = T_high ({t_high:g})", zorder=3
    )
    ax.scatter(pos[~high], h[~high], s=10, color="tab:blue", label="T < T_high", zorder=2)
    for i, s in enumerate(starts):
        ax.axvline(
            s,
            color="tab:green",
            linestyle="--",
            linewidth=0.8,
            alpha=0.6,
            label="step start" if i == 0 else None,
        )
    if tau0 is not None:
        ax.axhline(tau0, color="black", linestyle=":", linewidth=1, label=f"τ₀ = {tau0:.3f}")
    ax.set_xlabel("generated token")
    ax.set_ylabel("entropy (nats)")
    ax.set_xlim(-0.5, max(h.size - 0.5, 0.5))
    ax2 = ax.twinx()
    # Faint: the point colours already say which temperature each token got.
    ax2.step(pos, temp, where="mid", color="tab:orange", linewidth=0.8, alpha=0.35)
    ax2.set_ylabel("temperature", color="tab:orange")
    ax2.set_ylim(0, max(1.05 * float(temp.max()) if temp.size else 1.0, 1.05))
    ax.legend(loc="upper right", fontsize="small")
    if title:
        ax.set_title(title)
    if path is not None:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig
