"""Figures of the benchmarks' JSON: the per-projection kernel table and the decode table.

``kernels.py`` and ``decode.py`` write JSON; this draws what their tables say, so a
run's result can be read at a glance (and a saved run re-drawn later):

* ``plot_kernels``: at M = 1, each backend's speedup over bf16 per projection, with
  the issue's targets (CUDA 3.2×, Pallas 1.5×) as lines; and the CUDA kernel's time
  over M relative to M = 1, with the 1.3× line.
* ``plot_decode``: decode tokens/s per model, variant and batch size, each bar
  labelled with its speedup over the BF16 row of the same model and batch.
* ``plot_layer_positions``: the layer chain's time (``layer_check bench``, saved as JSON
  rows) over the cache position, one line per batch rows and build.

Usage:
  python benchmarks/plots.py --kernels kernels.json --decode decode.json --out figures/
  python benchmarks/plots.py --layers benchmarks/data/layer_attention_AA4_h200.json --out figures/

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas (headless).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["layer_series", "plot_decode", "plot_kernels", "plot_layer_positions"]

# The per-projection targets at M = 1 (CUDA and Pallas over bf16) and over M.
CUDA_TARGET = 3.2
PALLAS_TARGET = 1.5
M8_TARGET = 1.3
_IMPL_ORDER = ("cuda", "cuda-w4a4", "pallas", "xla")


def _save(fig: Figure, path: str | os.PathLike) -> str:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return os.fspath(path)


def plot_kernels(data: Mapping, path: str | os.PathLike) -> str:
    """Draws ``kernels.py``'s JSON (its ``rows``) into one PNG with two panels.

    Left: speedup over bf16 at M = 1 per projection (``rows[i]["shape"]``) and backend
    (``impl``), from each row's ``speedup_vs_bf16``; L2-resident shapes are marked. Where
    rows carry several ``timing`` modes, the first is drawn.
    Right: CUDA time at every M divided by its M = 1 time, one line per projection
    whose weights stream from DRAM (L2-resident shapes are left out).

    Args:
      data: the JSON object ``kernels.py`` writes (``rows``: dicts with ``shape``, ``M``,
        ``impl``, ``us`` and, where a bf16 row exists, ``speedup_vs_bf16``; ``device``).
      path: the PNG to write.

    Returns:
      the path written.

    Raises:
      ValueError: no M = 1 row has a speedup to draw.
    """
    rows = [r for r in data.get("rows", []) if "us" in r]
    # kernels.py --timing may hold several timings of each row: draw the first.
    timings = list(dict.fromkeys(r.get("timing") for r in rows))
    rows = [r for r in rows if r.get("timing") == timings[0]] if timings else rows
    m1 = [r for r in rows if r["M"] == 1 and r["impl"] != "bf16" and "speedup_vs_bf16" in r]
    if not m1:
        raise ValueError("no M = 1 rows with a speedup over bf16 in the kernel JSON")
    shapes = list(dict.fromkeys(r["shape"] for r in m1))
    impls = [i for i in _IMPL_ORDER if any(r["impl"] == i for r in m1)]
    impls += sorted({r["impl"] for r in m1} - set(impls))
    speed = {(r["shape"], r["impl"]): r["speedup_vs_bf16"] for r in m1}
    l2 = {r["shape"] for r in m1 if r.get("l2_resident")}

    fig = Figure(figsize=(13, 4.8))
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(shapes))]
        ys = [speed.get((s, impl), 0.0) for s in shapes]
        ax.bar(xs, ys, width, label=impl)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(CUDA_TARGET, color="tab:blue", ls="--", lw=0.9, label=f"CUDA target {CUDA_TARGET}×")
    ax.axhline(
        PALLAS_TARGET, color="tab:green", ls=":", lw=0.9, label=f"Pallas target {PALLAS_TARGET}×"
    )
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels([s + (" (L2)" if s in l2 else "") for s in shapes], rotation=35, ha="right")
    ax.set_ylabel("speedup over bf16 x @ W.T (M = 1)")
    title = f"NVFP4 backends per projection, {data.get('device', '')}"
    ax.set_title(title + (f" [{timings[0]}]" if timings and timings[0] else ""))
    ax.legend(fontsize=8, ncol=2)

    # The M target is about streaming weights from DRAM: L2-resident shapes are left out.
    cuda = {(r["shape"], r["M"]): r["us"] for r in rows if r["impl"] == "cuda"}
    streamed = [s for s in shapes if s not in l2]
    ms_all = sorted({m for (_, m) in cuda})
    for i, s in enumerate(streamed):
        ms = sorted(m for (sh, m) in cuda if sh == s)
        if (s, 1) in cuda and len(ms) > 1:
            ys = [cuda[(s, m)] / cuda[(s, 1)] for m in ms]
            style = "-" if i < 10 else "--"  # the colour cycle has 10 colours
            ax2.plot(ms, ys, style, marker="o", label=s)
    ax2.axhline(M8_TARGET, color="black", ls="--", lw=0.9, label=f"target at M = 8: {M8_TARGET}×")
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(ms_all)
    ax2.set_xticklabels([str(m) for m in ms_all])
    ax2.set_xlabel("M (rows)")
    ax2.set_ylabel("CUDA time / time at M = 1")
    ax2.set_title("CUDA kernel over M")
    ax2.legend(fontsize=7)
    return _save(fig, path)


def cards(records: Sequence[Mapping]) -> str:
    """The GPUs ``records`` (``decode.py``'s) ran on, as one title string ("" if none says).

    Records of several cards (runs on different machines drawn together) list each once,
    in order of appearance, joined by " / ".
    """
    return " / ".join(dict.fromkeys(r["device"] for r in records if r.get("device")))


def plot_decode(
    records: Sequence[Mapping],
    path: str | os.PathLike,
    baselines: Sequence[str] = ("bf16", "bf16-fattn"),
) -> str:
    """Draws ``decode.py``'s JSON (a list of records) into one PNG: tokens/s per bar.

    One panel per model; bars grouped by batch size, one per variant, each labelled
    with its speedup over the model's faster ``baselines`` variant at the same batch size
    (where a model has one). One sampler is drawn (``reset`` where present) and one
    ``sync_every`` (the first a result of that sampler has); the plain anchor's greedy
    rows (``decode.py``'s anchor variants) are drawn beside it. The title names the
    card(s) the records ran on (``cards``).

    Args:
      records: ``decode.py``'s records (``model``, ``variant``, ``results``: dicts with
        ``batch``, ``sampler``, ``decode_ms_per_token``, ``tokens_per_s``).
      path: the PNG to write.
      baselines: the dense variants the labels divide by (the faster at each batch).

    Returns:
      the path written.

    Raises:
      ValueError: no record has results.
    """
    recs = [r for r in records if r.get("results")]
    if not recs:
        raise ValueError("no decode records with results")
    models = list(dict.fromkeys(r["model"] for r in recs))
    fig = Figure(figsize=(6.5 * len(models), 4.6))
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, model in zip(axes, models, strict=True):
        mine = [r for r in recs if r["model"] == model]
        variants = list(dict.fromkeys(r["variant"] for r in mine))
        results = [(r["variant"], x) for r in mine for x in r["results"]]
        samplers = [x["sampler"] for _, x in results if x["sampler"] != "greedy"]
        sampler = "reset" if "reset" in samplers else (samplers or ["greedy"])[0]
        # "greedy": the plain anchor step (decode.py's anchor variants), drawn beside any sampler
        results = [(v, x) for v, x in results if x["sampler"] in (sampler, "greedy")]
        sync = next((x.get("sync_every") for _, x in results if x["sampler"] == sampler), None)
        cell = {}
        for v, x in results:
            if x.get("sync_every") == sync or x["sampler"] == "greedy":
                cell.setdefault((v, x["batch"]), x)
        batches = sorted({b for (_, b) in cell})
        width = 0.8 / len(variants)
        # × bf16 labels: against the faster dense variant at each batch size
        bases, used = {}, {}
        for (v, b), x in cell.items():
            if v in baselines and (b not in bases or x["decode_ms_per_token"] < bases[b]):
                bases[b], used[b] = x["decode_ms_per_token"], v
        for j, v in enumerate(variants):
            labelled = False
            for i, b in enumerate(batches):
                x = cell.get((v, b))
                if x is None:
                    continue
                pos = i + (j - (len(variants) - 1) / 2) * width
                label = None if labelled else v + (" (greedy)" if x["sampler"] == "greedy" else "")
                ax.bar(pos, x["tokens_per_s"], width, color=f"C{j}", label=label)
                labelled = True
                if b in bases:
                    ratio = bases[b] / x["decode_ms_per_token"]
                    y = x["tokens_per_s"]
                    ax.text(pos, y, f"{ratio:.2f}×", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(batches)))
        ax.set_xticklabels([f"batch {b}" for b in batches])
        ax.set_ylabel("decode tokens/s")
        what = sampler + (f", sync every {sync}" if sync is not None else "")
        over = "/".join(sorted(set(used.values())))
        on = cards(mine)
        ax.set_title(
            f"{model}{f' on {on}' if on else ''} ({what}{f'; labels: × {over}' if over else ''})",
            fontsize=9,
        )
        ax.legend(fontsize=7)
    return _save(fig, path)


def layer_series(data: Mapping) -> dict[tuple[str, int, str], list[tuple[int, float]]]:
    """The lines ``plot_layer_positions`` draws: (model, M, build) -> [(position, us)].

    At each position the row with the fewest cache slots is taken (a bench may time a
    position with a cache of just its length and with a longer one); positions ascend.

    Args:
      data: a JSON object with ``rows``: dicts with ``build``, ``position``,
        ``cache_slots``, ``model``, ``M`` and ``us`` (µs a layer).
    """
    best: dict[tuple[str, int, str, int], Mapping] = {}
    for r in data["rows"]:
        key = (r["model"], int(r["M"]), r["build"], int(r["position"]))
        if key not in best or r["cache_slots"] < best[key]["cache_slots"]:
            best[key] = r
    series: dict[tuple[str, int, str], list[tuple[int, float]]] = {}
    for (model, m, build, pos), r in sorted(best.items()):
        series.setdefault((model, m, build), []).append((pos, float(r["us"])))
    return series


def plot_layer_positions(data: Mapping, path: str | os.PathLike) -> str:
    """Draws a layer bench over positions (``layer_series``) into one PNG.

    One panel per model: µs a layer over the cache position (log axis), a colour per M
    (rows of the batch) and a line style per build (the first build in ``data["builds"]``,
    or in the rows, dashed; the others solid).

    Args:
      data: ``rows`` as ``layer_series`` reads them; optional ``builds`` (name -> what it
        is, in drawing order), ``device`` and ``run`` for the title.
      path: the PNG to write.

    Returns:
      the path written.

    Raises:
      ValueError: no rows.
    """
    series = layer_series(data)
    if not series:
        raise ValueError("no layer bench rows")
    models = list(dict.fromkeys(k[0] for k in series))
    builds = list(data.get("builds") or dict.fromkeys(k[2] for k in series))
    ms = sorted({k[1] for k in series})
    fig = Figure(figsize=(6.0 * len(models), 4.4))
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, model in zip(axes, models, strict=True):
        for i, m in enumerate(ms):
            for j, build in enumerate(builds):
                pts = series.get((model, m, build))
                if not pts:
                    continue
                x, y = zip(*pts, strict=True)
                style = "--" if j == 0 else "-"
                ax.plot(x, y, style, marker="o", ms=3, color=f"C{i}", label=f"M = {m}, {build}")
        ax.set_xscale("log")
        ax.set_xlabel("position (cache slots just above it, or 32768 past 16000)")
        ax.set_ylabel("µs a layer")
        where = " on ".join(x for x in (data.get("run"), data.get("device")) if x)
        ax.set_title(f"{model} layer chain{f' ({where})' if where else ''}", fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", help="kernels.py JSON")
    p.add_argument("--decode", help="decode.py JSON")
    p.add_argument("--layers", help="layer bench JSON (rows: build, position, model, M, us)")
    p.add_argument("--out", default=".", help="folder for kernels.png / decode.png / layers.png")
    args = p.parse_args(argv)
    if not (args.kernels or args.decode or args.layers):
        p.error("give --kernels, --decode and/or --layers")
    os.makedirs(args.out, exist_ok=True)
    if args.kernels:
        with open(args.kernels) as fh:
            print(plot_kernels(json.load(fh), os.path.join(args.out, "kernels.png")))
    if args.decode:
        with open(args.decode) as fh:
            print(plot_decode(json.load(fh), os.path.join(args.out, "decode.png")))
    if args.layers:
        with open(args.layers) as fh:
            print(plot_layer_positions(json.load(fh), os.path.join(args.out, "layers.png")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
