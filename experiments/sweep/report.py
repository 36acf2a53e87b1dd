"""Aggregating an experiment's run JSONs: per table cell the best ``select`` value (the learning
rate) by its mean over the ``average`` axis (the seeds), that mean, its spread and the runs; then
``results.json``, ``table.md``, the figures, and the experiment's generated block in the results
page (``docs/results.md``), whose other text (setup, conclusions) is left alone.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
from pathlib import Path

from experiments.sweep.grid import Experiment

RESULTS_MD_TITLE = "# Results"


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def finished_runs(results_dir: Path) -> dict[str, dict]:
    found = {}
    for path in sorted((results_dir / "runs").glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("status") in ("done", "diverged"):
            found[data["run"]] = data
    return found


def aggregate(exp: Experiment, results_dir: Path, docs: Path | None = None) -> dict:
    """Best ``select`` value per group, mean and spread over ``average``; writes results.json,
    table.md and the PNGs into ``results_dir`` and, given ``docs`` (the results page), rewrites
    the experiment's generated block there."""
    rep = exp.report
    lower_is_better = exp.eval["task"] == "text"
    finished = finished_runs(results_dir)
    runs = [finished[r.name] for r in exp.runs if r.name in finished]
    group_axes = [a for a in exp.axes if a not in (rep["select"], rep["average"])]
    groups: dict[tuple, dict] = {}
    for r in runs:
        key = tuple(r["labels"][a] for a in group_axes)
        sel = r["labels"].get(rep["select"], "-")
        groups.setdefault(key, {}).setdefault(sel, []).append(r)
    entries = []
    for key, by_select in groups.items():
        means = {}
        for sel, rs in by_select.items():
            values = [r["metric"] for r in rs if r["metric"] is not None]
            if values and len(values) == len(rs):
                means[sel] = statistics.fmean(values)
        if not means:
            continue
        best = (min if lower_is_better else max)(means, key=means.get)
        chosen = by_select[best]
        values = [r["metric"] for r in chosen]
        entry = {
            **dict(zip(group_axes, key)),
            "best_" + (rep["select"] or "choice"): best,
            "mean": means[best],
            "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "n": len(values),
            "by_" + (rep["select"] or "choice"): means,
            "runs": [r["run"] for r in chosen],
            "params": chosen[0].get("params"),
            "train_seconds": statistics.fmean(r.get("train_seconds", 0) for r in chosen),
        }
        if exp.eval["task"] == "text":
            entry["perplexity"] = math.exp(entry["mean"])
        entry["detail"] = mean_detail(exp.eval["task"], chosen)
        entry["boundaries"] = mean_boundaries(chosen)
        entries.append(entry)
    order = {a: list(exp.axes[a]) for a in group_axes}
    entries.sort(key=lambda e: [order[a].index(e[a]) for a in group_axes])
    summary = {
        "experiment": exp.name,
        "description": exp.description,
        "task": exp.eval["task"],
        "metric": "mean validation loss (nats/token), lower is better"
        if lower_is_better
        else "accuracy (mean over the eval cells), higher is better",
        "grid_runs": len(exp.runs),
        "finished_runs": len(runs),
        "entries": entries,
        "commits": sorted({r.get("commit", "unknown") for r in runs}),
        "devices": sorted({r.get("device", "?") for r in runs}),
        "run_seconds": sum(r.get("seconds", 0) for r in runs),
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    write_json(results_dir / "results.json", summary)
    tables = (markdown_tables(exp, entries, group_axes), boundary_table(exp, entries, group_axes))
    table = "\n\n".join(t for t in tables if t)
    (results_dir / "table.md").write_text(table + "\n")
    pngs = (
        [
            plot(exp, entries, group_axes, results_dir / f"{exp.name}.png"),
            plot_curves(exp, entries, finished, results_dir / f"{exp.name}_curves.png"),
        ]
        if entries
        else []
    )
    if docs is not None:
        update_results_md(docs, exp, summary, table, [p for p in pngs if p is not None], results_dir)
    print(table)
    return summary


def mean_detail(task: str, runs: list[dict]):
    """The evaluation detail averaged over ``runs`` (seeds): accuracy per cell, or the loss curve."""
    done = [r for r in runs if r["status"] == "done"]
    if not done:
        return None
    if task == "text":
        curves = [r["eval"]["mean_loss_upto"] for r in done]
        return [(pos, statistics.fmean(c[i][1] for c in curves)) for i, (pos, _) in enumerate(curves[0])]
    from dla.eval.recall import mean_per_token

    keys = [k for k in done[0]["eval"][0] if k not in ("accuracy", "token_accuracy", "examples")]
    cells, tokens = {}, {}
    for r in runs:  # a diverged seed counts as 0 in every cell
        for i, row in enumerate(done[0]["eval"]):
            acc = r["eval"][i]["accuracy"] if r["status"] == "done" else 0.0
            if acc is not None:
                cells.setdefault(i, []).append(acc)
            if "token_accuracy" in row:  # needle: per value token
                per_token = (
                    r["eval"][i]["token_accuracy"] if r["status"] == "done" else [0.0] * len(row["token_accuracy"])
                )
                tokens.setdefault(i, []).append(per_token)
    return [
        {
            **{k: row[k] for k in keys},
            "accuracy": statistics.fmean(cells[i]) if i in cells else None,
            **({"token_accuracy": mean_per_token(tokens[i])} if i in tokens else {}),
        }
        for i, row in enumerate(done[0]["eval"])
    ]


def mean_boundaries(runs: list[dict]) -> list[dict] | None:
    """Per layer, the runs' (seeds') mean ``births_per_100_tokens``, share of births in the task's
    first region (``region``, with its share of the tokens) and ``threshold`` (τ, the mean over heads
    and runs; None where the layer has none); None without boundary data."""
    probes = [r["boundaries"] for r in runs if r.get("boundaries")]
    if not probes:
        return None
    layers = []
    for i, first in enumerate(probes[0]):
        region = next(iter(first["regions"]), None)
        shares = [p[i]["regions"][region]["births"] for p in probes] if region else []
        shares = [v for v in shares if v is not None]
        taus = [tau for p in probes for tau in (p[i].get("threshold") or [])]
        layers.append(
            {
                "births_per_100_tokens": statistics.fmean(p[i]["births_per_100_tokens"] for p in probes),
                "region": region,
                "region_tokens": first["regions"][region]["tokens"] if region else None,
                "region_births": statistics.fmean(shares) if shares else None,
                "threshold": statistics.fmean(taus) if taus else None,
            }
        )
    return layers


def boundary_table(exp: Experiment, entries: list[dict], group_axes: list[str]) -> str:
    """Where the chosen runs' DLA layers opened states (``boundary_probe``): one row per model,
    a column per ``cols`` value, each cell the layers' births per 100 tokens and the share of
    them in the task's first region. Empty without boundary data."""
    probed = [e for e in entries if e.get("boundaries")]
    if not probed:
        return ""
    rows, cols = exp.report["rows"], exp.report["cols"]
    col_values = list(exp.axes[cols]) if cols else [None]
    blocks = []
    for label, part in table_parts(exp, probed, group_axes):
        if not part:
            continue
        first = part[0]["boundaries"][0]  # the region's share of the tokens is the task's (per table)
        lines = [
            f"**{exp.name}: where the DLA layers open states** {label} (held-out examples, best "
            f"{exp.report['select'] or 'run'} per cell; per layer, first to last: states opened per 100 tokens"
            + (
                f", and in parentheses the share of them inside the {first['region']} region, which holds "
                f"{_percent(first['region_tokens'])} of the tokens"
                if first["region"]
                else ""
            )
            + ("; τ: the layer's threshold, mean over heads and seeds)" if any(
                layer.get("threshold") is not None for e in part for layer in e["boundaries"]) else ")"),
            "",
            f"| {rows} | " + " | ".join(str(c or "result") for c in col_values) + " |",
            "|---" * (len(col_values) + 1) + "|",
        ]
        for rv in exp.axes[rows]:
            cells = []
            for cv in col_values:
                entry = cell_entry(part, rows, rv, cols, cv)
                cells.append(
                    " / ".join(
                        f"{layer['births_per_100_tokens']:.1f}"
                        + (f" ({_percent(layer['region_births'])})" if layer["region_births"] is not None else "")
                        + (f" τ {layer['threshold']:.2f}" if layer.get("threshold") is not None else "")
                        for layer in entry["boundaries"]
                    )
                    if entry
                    else "–"
                )
            if any(c != "–" for c in cells):
                lines.append(f"| {rv} | " + " | ".join(cells) + " |")
        if len(lines) > 4:
            blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _percent(share: float) -> str:
    """A share as a percentage, with two significant digits below 1% (the needles are 0.043-0.085%
    of a 16K-token row, which ``:.0f`` would print as 0%)."""
    return f"{100 * share:.2g}%" if 0 < share < 0.01 else f"{100 * share:.0f}%"


def _fmt(entry: dict, task: str) -> str:
    if task == "text":
        return f"{entry['mean']:.3f} (ppl {entry['perplexity']:.2f})" + (
            f" ±{entry['std']:.3f}" if entry["n"] > 1 else ""
        )
    return (
        f"{100 * entry['mean']:.1f}" + (f" ±{100 * entry['std']:.1f}" if entry["n"] > 1 else "") + f" (n={entry['n']})"
    )


def cell_entry(entries: list[dict], rows: str, row_value, cols: str | None, col_value) -> dict | None:
    """The entry of one table cell (row value, column value; any column without ``cols``)."""
    return next((e for e in entries if e[rows] == row_value and (cols is None or e[cols] == col_value)), None)


def table_parts(exp: Experiment, entries: list[dict], group_axes: list[str]):
    """``(label, entries)`` per combination of the axes that are neither rows nor columns: one
    table each."""
    rest = [a for a in group_axes if a not in (exp.report["rows"], exp.report["cols"])]
    for combo in itertools.product(*(list(exp.axes[a]) for a in rest)):
        yield (
            " ".join(f"{a}={v}" for a, v in zip(rest, combo)),
            [e for e in entries if all(e[a] == v for a, v in zip(rest, combo))],
        )


def markdown_tables(exp: Experiment, entries: list[dict], group_axes: list[str]) -> str:
    """One table (rows x cols) per combination of the remaining axes."""
    from dla.eval.recall import mean_per_token

    rep, task = exp.report, exp.eval["task"]
    rows, cols = rep["rows"], rep["cols"]
    what = "validation loss, nats/token (perplexity)" if task == "text" else "accuracy %, mean ±std over seeds"
    sel = f", best {rep['select']} per cell" if rep["select"] else ""
    blocks = []
    for label, part in table_parts(exp, entries, group_axes):
        title = f"**{exp.name}** " + label + f" ({what}{sel})"
        col_values = list(exp.axes[cols]) if cols else ["result"]
        lengths = [] if task != "needle" or cols else sorted({n for n in exp.eval.get("lengths", [])})
        per_token = bool(lengths) and any("token_accuracy" in c for e in part if e["detail"] for c in e["detail"])
        header = col_values + [f"len {n}" for n in lengths] + (["per value token"] if per_token else [])
        lines = [
            title
            + (" -- the len columns: mean over depths" if lengths else "")
            + ("; per value token: % of each token right, first to last, mean over all cells" if per_token else ""),
            "",
            f"| {rows} | " + " | ".join(header) + " |",
            "|---" * (len(header) + 1) + "|",
        ]
        for rv in exp.axes[rows]:
            match = [e for e in part if e[rows] == rv and e["detail"]]
            by_length = [
                [c["accuracy"] for c in match[0]["detail"] if c["seq_len"] == n] if match else [] for n in lengths
            ]
            extra = [f"{100 * statistics.fmean(v):.1f}" if v else "–" for v in by_length]
            if per_token:
                token_rows = [c["token_accuracy"] for c in match[0]["detail"] if "token_accuracy" in c] if match else []
                extra.append(" / ".join(f"{100 * t:.0f}" for t in mean_per_token(token_rows)) or "–")
            cells = []
            for cv in col_values:
                entry = cell_entry(part, rows, rv, cols, cv)
                if entry:
                    best = entry.get("best_" + rep["select"]) if rep["select"] else None
                    cells.append(_fmt(entry, task) + (f" @{best}" if best else ""))
                else:
                    cells.append("–")
            lines.append(f"| {rv} | " + " | ".join(cells + extra) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _number(label: str, axis: str):
    text = label.removeprefix(axis)
    try:
        return float(text)
    except ValueError:
        return None


def plot(exp: Experiment, entries: list[dict], group_axes: list[str], path: Path) -> Path | None:
    """``lines``: the metric against the ``cols`` axis, one line per ``rows`` value, a panel per
    base (``panels``: row labels starting with ``PANEL-``; the others are drawn in every panel).
    Needle runs: a grid of depth x length heatmaps (:func:`heatmap_layout`). Text runs: loss against
    context."""
    from dla.plots import draw_heatmap, pyplot, save

    plt = pyplot()
    if plt is None:
        return None
    rep, task = exp.report, exp.eval["task"]
    rows, cols = rep["rows"], rep["cols"]
    if task == "needle":
        layout = heatmap_layout(exp, entries, group_axes)
        nrows, ncols = len(layout), len(layout[0]) if layout else 0
        if not ncols:
            return None
        fig, axes = plt.subplots(nrows, ncols, figsize=(2.9 * ncols + 1, 2.5 * nrows + 0.4), squeeze=False)
        others = [a for a in group_axes if a != rows]
        for i, j in itertools.product(range(nrows), range(ncols)):
            ax, e = axes[i, j], layout[i][j]
            if e is None:
                ax.set_axis_off()
                continue
            lengths = sorted({c["seq_len"] for c in e["detail"]})
            depths = sorted({c["depth"] for c in e["detail"]})
            grid = [
                [next(c["accuracy"] for c in e["detail"] if c["depth"] == d and c["seq_len"] == n) for n in lengths]
                for d in depths
            ]
            figure_row = " ".join(str(e[a]) for a in others)
            ylabel = ((f"{figure_row}\n" if figure_row else "") + "depth") if j == 0 else ""
            image = draw_heatmap(
                ax,
                grid,
                depths,
                [f"{n // 1024}K" if n % 1024 == 0 else n for n in lengths],
                str(e[rows]),
                "length" if i == nrows - 1 else "",
                ylabel,
                fontsize=7,
            )
            ax.tick_params(labelleft=j == 0)  # the depths are the same in every panel of a row
        fig.colorbar(image, ax=axes, label="accuracy", shrink=0.8)
        return save(fig, path, tight=False)
    numeric_cols = _numeric_axis(exp, cols)
    if task != "text" and not numeric_cols:
        return bar_plot(plt, exp, entries, group_axes, path)
    panels = rep.get("panels") or [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for rv in exp.axes[rows]:
            if not _in_panel(rv, panel):
                continue
            mine = [e for e in entries if e[rows] == rv]
            if task == "text":
                for e in mine:
                    if e["detail"]:
                        ax.plot(
                            *zip(*e["detail"]), label=" ".join(str(e[a]) for a in group_axes if a != rows) + f" {rv}"
                        )
                continue
            by_rest: dict[tuple, list] = {}
            for e in mine:
                by_rest.setdefault(tuple(e[a] for a in group_axes if a not in (rows, cols)), []).append(e)
            for rest, es in by_rest.items():
                points = sorted((_number(e[cols], cols), e["mean"], e["std"]) for e in es)
                xs, ys, ss = zip(*points)
                ax.errorbar(xs, ys, yerr=ss, marker="o", capsize=3, label=" ".join([rv, *rest]))
        if task == "text":
            ax.set(xscale="log", xlabel="context (tokens)", ylabel="mean loss up to this position")
        else:
            ticks = [_number(c, cols) for c in exp.axes[cols]]
            ax.set(xlabel=cols, ylabel="accuracy", ylim=(0, 1.02))
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_title(f"{exp.name}" + (f": {panel}" if panel else ""))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return save(fig, path)


def heatmap_layout(exp: Experiment, entries: list[dict], group_axes: list[str]) -> list[list[dict | None]]:
    """The needle heatmaps' panels: a figure row per value of the other grouping axes (the
    task), a column per ``rows`` value (the model) that has a heatmap in some figure row."""
    rows = exp.report["rows"]
    others = [a for a in group_axes if a != rows]
    by_figure_row: dict[tuple, dict] = {}
    for e in entries:
        if e["detail"]:
            by_figure_row.setdefault(tuple(e[a] for a in others), {})[e[rows]] = e
    columns = [rv for rv in exp.axes[rows] if any(rv in cells for cells in by_figure_row.values())]
    return [[cells.get(rv) for rv in columns] for cells in by_figure_row.values()]


def _numeric_axis(exp: Experiment, axis: str | None) -> bool:
    return axis is not None and all(_number(v, axis) is not None for v in exp.axes[axis])


def _in_panel(row_label: str, panel: str | None) -> bool:
    """Row labels ``BASE-...`` belong to the panel of that base; the others (attention) to every panel."""
    return panel is None or "-" not in row_label or row_label.startswith(panel + "-")


def plot_curves(exp: Experiment, entries: list[dict], finished: dict[str, dict], path: Path) -> Path | None:
    """Training loss against sequences seen for the first run of each table cell (its chosen
    ``select`` value), at the largest ``cols`` value when that axis is numeric, a panel per base."""
    from dla.plots import pyplot, save

    plt = pyplot()
    if plt is None:
        return None
    rep = exp.report
    rows, cols, select = rep["rows"], rep["cols"], rep["select"]
    if _numeric_axis(exp, cols):
        widest = max(exp.axes[cols], key=lambda c: _number(c, cols))
        entries = [e for e in entries if e[cols] == widest]
    panels = rep.get("panels") or [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for e in entries:
            run = finished[e["runs"][0]]
            if not run.get("curve") or not _in_panel(e[rows], panel):
                continue
            batch = run["config"]["batch_size"]
            steps, losses = zip(*run["curve"])
            ax.plot(
                [s * batch for s in steps],
                losses,
                label=" ".join(
                    [str(e[a]) for a in e if a in exp.axes and a not in (select, rep["average"])]
                    + ([str(e["best_" + select])] if select else [])
                ),
            )
        ax.set(xlabel="sequences seen", ylabel="training loss", title=f"{exp.name}" + (f": {panel}" if panel else ""))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return save(fig, path)


def bar_plot(plt, exp: Experiment, entries: list[dict], group_axes: list[str], path: Path) -> Path:
    """Mean ± spread per ``rows`` value, one bar per value of the other axes (``cols`` first)."""
    from dla.plots import save

    rows = exp.report["rows"]
    others = [a for a in group_axes if a != rows]
    series: dict[str, dict] = {}
    for e in entries:
        series.setdefault(" ".join(str(e[a]) for a in others) or "mean", {})[e[rows]] = e
    labels = [r for r in exp.axes[rows] if any(r in s for s in series.values())]
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(labels) * max(1, len(series))), 4.2))
    for i, (name, by_row) in enumerate(series.items()):
        xs = [j + i * width for j, r in enumerate(labels) if r in by_row]
        ax.bar(
            xs,
            [by_row[r]["mean"] for r in labels if r in by_row],
            width,
            yerr=[by_row[r]["std"] for r in labels if r in by_row],
            capsize=2,
            label=name,
        )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=45, ha="right", fontsize=8)
    ax.set(ylabel="accuracy", ylim=(0, 1.02), title=exp.name)
    ax.grid(True, axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return save(fig, path)


def update_results_md(
    path: Path, exp: Experiment, summary: dict, table: str, pngs: list[Path], results_dir: Path
) -> None:
    """Replace (or add) this experiment's generated block in the results page; text outside the
    blocks (setup, conclusions) is left alone. Paths in the block are relative to the page."""
    from dla.train.metrics import format_duration

    begin, end = f"<!-- begin generated: {exp.name} -->", f"<!-- end generated: {exp.name} -->"

    def rel(p: Path) -> str:
        return Path(os.path.relpath(p.resolve(), path.resolve().parent)).as_posix()

    try:
        exp_file = exp.path.resolve().relative_to(path.resolve().parent.parent).as_posix()
    except ValueError:
        exp_file = exp.path.name
    lines = [
        begin,
        f"_{exp.description.strip()}_" if exp.description else "",
        "",
        (
            f"- reproduce: `python experiments/run.py {exp_file} --device cuda --workers W` (repeat until no run "
            "is left; `--aggregate-only` rebuilds this block from the run files)"
        ),
        f"- runs finished: {summary['finished_runs']} of {summary['grid_runs']}; "
        f"device(s): {', '.join(summary['devices']) or '–'}; "
        f"training and evaluation: {format_duration(summary['run_seconds'])} summed over runs",
        f"- metric: {summary['metric']}; data: `{rel(results_dir)}/`",
        "",
        table or "(no finished runs yet)",
        "",
    ]
    for png in pngs:
        lines += [f"![{png.stem}]({rel(png)})", ""]
    lines.append(end)
    block = "\n".join(lines)
    text = path.read_text() if path.exists() else RESULTS_MD_TITLE + "\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = (
            text.rstrip("\n") + f"\n\n## {exp.name}\n\n" + block + "\n\n**Conclusion:** (to be written from the data)\n"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
