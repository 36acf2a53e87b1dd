"""``dla inspect``: what the DLA layers of a model did on one text -- per layer and head, which
tokens opened a state, which states merged and when, and the cache over time.

The layers plan their schedule inside ``forward``; for one forward pass each DLA mixer is asked
to keep the schedule and scores it used (``record_schedule``).
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
from pathlib import Path

import torch

from dla.errors import UserError
from dla.layers.common import DLAMixer
from dla.plots import pyplot, save
from dla.schedule import NONE


@contextlib.contextmanager
def recorded_schedules(model):
    """Yields the DLA mixers ``{layer index: mixer}``; during the block each keeps the schedule
    and scores of its last forward pass (``last_schedule``, ``last_scores``)."""
    mixers = {i: block.mixer for i, block in enumerate(model.model.layers) if isinstance(block.mixer, DLAMixer)}
    for mixer in mixers.values():
        mixer.record_schedule = True
    try:
        yield mixers
    finally:
        for mixer in mixers.values():
            mixer.record_schedule = False
            mixer.last_schedule = mixer.last_scores = None


@torch.no_grad()
def layer_schedules(model, input_ids: torch.Tensor) -> dict[int, dict]:
    """For a ``[1, T]`` input: per DLA layer its policy, schedule and scores (``[H, T]`` or None)."""
    with recorded_schedules(model) as mixers:
        if not mixers:
            raise UserError("the model has no DLA layers (mixer = attention): there is no schedule to inspect")
        model(input_ids=input_ids, use_cache=False)
        return {i: {"policy": m.policy, "schedule": m.last_schedule,
                    "scores": None if m.last_scores is None else m.last_scores[0].float().cpu(),
                    "threshold": None if m.threshold is None else m.threshold.detach().float().cpu().tolist()}
                for i, m in sorted(mixers.items())}


@torch.no_grad()
def boundary_stats(model, input_ids: torch.Tensor, regions: dict[str, torch.Tensor] | None = None) -> list[dict]:
    """Where the DLA layers of ``model`` opened states on a ``[B, T]`` batch, one dict per layer
    (empty without DLA layers), counted over all sequences and heads: ``births_per_100_tokens``
    (states opened after position 0), ``merged`` (the share of them merged again within the
    sequence), the ``dynamic`` policy's ``threshold`` τ per head (learned with soft gates) and,
    per named region (``[B, T]`` bool masks), its ``tokens`` and ``births`` shares: births
    concentrated in a region have a births share above its tokens share."""
    regions = regions or {}
    with recorded_schedules(model) as mixers:
        if not mixers:
            return []
        model(input_ids=input_ids, use_cache=False)
        layers = []
        for i, mixer in sorted(mixers.items()):
            death = mixer.last_schedule.death.cpu()  # [B, H, T]
            T = death.shape[-1]
            born = death != NONE
            born[..., 0] = False  # a sequence start is no boundary
            births = int(born.sum())
            entry = {"layer": i, "policy": mixer.policy.policy, "capacity": mixer.policy.capacity,
                     "threshold": None if mixer.threshold is None else mixer.threshold.detach().float().tolist(),
                     "births_per_100_tokens": 100 * births / born.numel(),
                     "merged": int((born & (death < T)).sum()) / births if births else None, "regions": {}}
            for name, mask in regions.items():
                mask = mask.cpu()[:, None, :].expand_as(born)
                entry["regions"][name] = {"tokens": float(mask.float().mean()),
                                          "births": int((born & mask).sum()) / births if births else None}
            layers.append(entry)
    return layers


def head_report(schedule, head: int) -> dict:
    """Births, merges and the cache of one head of a ``[1, H, T]`` schedule."""
    death = schedule.death[0, head].cpu()
    T = death.numel()
    start = schedule.pairwise()["start"][0, head].cpu()  # [t, s]: first position of the segment holding s
    opened = [0] + [p for p in range(T) if death[p] != NONE]
    # at time death[p] the state opened at p merges into the segment that then holds p
    merges = sorted(({"time": int(death[p]), "segment": p, "into": int(start[death[p], p])}
                     for p in opened[1:] if death[p] < T), key=lambda m: (m["time"], m["segment"]))
    states = [len(set(start[t, : t + 1].tolist())) for t in range(T)]
    return {"opened": opened, "merges": merges, "states": states, "segment_start": start}


def final_segments(schedule, head: int) -> list[dict]:
    """The segments cached after the text, newest first: start, length, summed information Ī and its
    density Ī / n (what the ``density`` merge rule compares), for one head of a ``[1, H, T]`` schedule."""
    final = schedule.final
    starts, info = final.starts[0, head].tolist(), final.info[0, head].tolist()
    lengths = final.lengths[0, head].tolist()
    return [{"start": a, "length": n, "information": i, "density": i / n if n else None}
            for a, n, i in zip(starts, lengths, info) if a >= 0]


def synthetic_example(task, seq_len: int, seed: int) -> tuple[list[int], dict[str, list[bool]]]:
    """One example of a synthetic task (``MQAR`` / ``Needle``, with or without its training
    mixture) and its regions, one flag per token: what :func:`inspect_model` marks."""
    from dla.data import SyntheticDataset

    batch = SyntheticDataset(task, seq_len, seed).batch(0, 1)
    return batch.input_ids[0].tolist(), {name: mask[0].tolist() for name, mask in task.regions(batch).items()}


def inspect_model(model, token_ids: list[int], render_token, out: Path, source: str, heads: list[int] | None = None,
                  checkpoint: str = "", regions: dict[str, list[bool]] | None = None) -> dict:
    """Write ``inspect.json``, ``inspect.png`` and ``inspect.html`` into ``out``; returns the JSON.
    ``render_token(id) -> str`` shows one token in the page. ``regions`` (name -> one flag per
    token: a synthetic task's needles, key-value pairs, queries) are marked in the figure and the
    page and listed in the JSON as positions."""
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    layers = layer_schedules(model, torch.tensor([token_ids], device=device))
    num_heads = next(iter(layers.values()))["schedule"].heads
    heads = list(range(num_heads)) if heads is None else heads
    bad = [h for h in heads if not 0 <= h < num_heads]
    if bad:
        raise UserError(f"--heads {bad}: the layers have heads 0..{num_heads - 1}")
    pieces = [render_token(i) for i in token_ids]
    positions = {name: [t for t, inside in enumerate(mask) if inside] for name, mask in (regions or {}).items()}
    report = {"checkpoint": checkpoint, "source": source, "tokens": len(token_ids), "regions": positions, "layers": []}
    for i, layer in layers.items():
        p = layer["policy"]
        entry = {"layer": i, "policy": p.policy, "capacity": p.capacity, "score": p.score, "merge": p.merge,
                 "label_rule": p.label_rule, "heads": []}
        for h in heads:
            r = head_report(layer["schedule"], h)
            tau = p.threshold if layer["threshold"] is None else layer["threshold"][h]
            entry["heads"].append({"head": h, "threshold": tau, "opened": r["opened"], "merges": r["merges"],
                                   "states": r["states"],
                                   "scores": None if layer["scores"] is None else layer["scores"][h].tolist(),
                                   "segments": final_segments(layer["schedule"], h),
                                   "segment_start": r["segment_start"]})
        report["layers"].append(entry)
    png = plot_cache(report, out / "inspect.png")
    (out / "inspect.html").write_text(render_html(report, pieces, png))
    for layer in report["layers"]:
        for head in layer["heads"]:
            del head["segment_start"]
    (out / "inspect.json").write_text(json.dumps(report))
    return report


def plot_cache(report: dict, path: Path) -> Path | None:
    """Rows: layers. Columns: one segment map per head (row t of a map shows, for every
    position s <= t, which state holds s at time t; a merge makes the newer state's colour
    take the older one's), then the number of states over time, then each head's information
    score I_t with its threshold τ (dashed; a state opens where I_t >= τ). The report's regions are
    ticks under each map (at their positions s) and shaded spans behind the states over time."""
    plt = pyplot()
    if plt is None:
        return None
    layers = report["layers"]
    n_heads = len(layers[0]["heads"])
    fig, axes = plt.subplots(len(layers), n_heads + 2, figsize=(2.4 * (n_heads + 2), 2.4 * len(layers)),
                             squeeze=False)
    T, regions = report["tokens"], list(report["regions"].items())
    for row, layer in zip(axes, layers):
        for ax, head in zip(row, layer["heads"]):
            start = head["segment_start"].float()
            image = torch.where(start >= 0, torch.remainder(start * 7.0, 20.0), torch.nan)  # tab20 colours
            ax.imshow(image.numpy(), cmap="tab20", vmin=0, vmax=20, interpolation="nearest")
            for k, (_, positions) in enumerate(regions):  # one row of ticks per region, under the map
                ax.plot(positions, [T + 0.04 * T * (k + 1)] * len(positions), "|", color=REGION_COLOURS[k],
                        markersize=3)
            ax.set_ylim(T * (1 + 0.04 * (len(regions) + 1)) if regions else T - 0.5, -0.5)
            ax.set_title(f"layer {layer['layer']} head {head['head']}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        ax = row[-1]
        for colour, head in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * n_heads, layer["heads"]):
            if head["scores"] is not None:
                ax.plot(head["scores"], linewidth=0.6, color=colour)
                ax.axhline(head["threshold"], color=colour, linestyle="--", linewidth=0.8)
        ax.set_title("information score I_t, τ dashed", fontsize=8)
        ax.tick_params(labelsize=6)
        ax = row[-2]
        for k, (name, positions) in enumerate(regions):
            for first, last in runs_of(positions):
                ax.axvspan(first - 0.5, last + 0.5, color=REGION_COLOURS[k], alpha=0.25, linewidth=0,
                           label=name if first == positions[0] else None)
        for head in layer["heads"]:
            ax.plot(head["states"], linewidth=0.8)
        ax.axhline(layer["capacity"], color="k", linestyle=":", linewidth=0.8)
        ax.set_title(f"states in cache (C={layer['capacity']})", fontsize=8)
        ax.tick_params(labelsize=6)
    if regions:
        axes[0][-2].legend(fontsize=6, loc="center right")
    axes[-1][0].set_xlabel("position s" + ("; ticks: " + ", ".join(name for name, _ in regions) if regions else ""),
                           fontsize=7)
    axes[-1][0].set_ylabel("time t", fontsize=7)
    return save(fig, path)


def runs_of(positions: list[int]) -> list[tuple[int, int]]:
    """``[(first, last), ...]`` of the consecutive runs in sorted ``positions``."""
    runs = []
    for p in positions:
        if runs and p == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], p)
        else:
            runs.append((p, p))
    return runs


def render_html(report: dict, pieces: list[str], png: Path | None) -> str:
    """A self-contained page: summary table, the figure, and per layer and head the text with
    the tokens that opened a state marked (hover for when it merged) and the merges."""
    e = html.escape
    parts = [f"<!doctype html><meta charset='utf-8'><title>dla inspect</title><style>{CSS}</style>",
             f"<h1>DLA schedules</h1><p>checkpoint <code>{e(report['checkpoint'])}</code>, text "
             f"<code>{e(report['source'])}</code>, {report['tokens']} tokens. A marked token "
             "<span class='b'>opened</span> a new state; hover it for when that state merged into the older one."
             + "".join(f" Underlined: <span class='g{k}'>{e(name)}</span>." for k, name in enumerate(report["regions"]))
             + "</p>",
             "<table><tr><th>layer</th><th>head</th><th>policy</th><th>τ</th><th>mean I</th><th>states opened</th>"
             "<th>merges</th><th>max states</th><th>mean states</th><th>densities Ī/n of the cached segments, "
             "newest first</th></tr>"]
    for layer in report["layers"]:
        for head in layer["heads"]:
            states = head["states"]
            scores = head["scores"]
            mean_score = f"{sum(scores) / len(scores):.3f}" if scores else "&ndash;"
            tau = "&ndash;" if head["threshold"] is None else f"{head['threshold']:.3f}"
            densities = " ".join(f"{s['density']:.2f}" for s in head["segments"] if s["density"] is not None)
            parts.append(f"<tr><td>{layer['layer']}</td><td>{head['head']}</td><td>{e(layer['policy'])} "
                         f"(C={layer['capacity']})</td><td>{tau}</td><td>{mean_score}</td><td>{len(head['opened'])}</td>"
                         f"<td>{len(head['merges'])}</td><td>{max(states)}</td><td>{sum(states) / len(states):.2f}</td>"
                         f"<td>{densities or '&ndash;'}</td></tr>")
    parts.append("</table>")
    if png is not None:
        parts.append(f"<img alt='segment maps' src='data:image/png;base64,"
                     f"{base64.b64encode(png.read_bytes()).decode()}'>")
    region_of = {t: k for k, positions in enumerate(report["regions"].values()) for t in positions}
    for layer in report["layers"]:
        for head in layer["heads"]:
            merged_at = {m["segment"]: m for m in head["merges"]}
            opened = set(head["opened"])
            spans = []
            for t, piece in enumerate(pieces):
                if t in opened:
                    m = merged_at.get(t)
                    note = (f"opened a state at {t}; merged into the state opened at {m['into']} at time {m['time']}"
                            if m else f"opened a state at {t}; never merged")
                    span = f"<span class='b' title='{e(note)}'>{e(piece)}</span>"
                else:
                    span = e(piece)
                spans.append(f"<span class='g{region_of[t]}'>{span}</span>" if t in region_of else span)
            merges = ", ".join(f"t={m['time']}: {m['segment']}&rarr;{m['into']}" for m in head["merges"]) or "none"
            parts.append(f"<h2>layer {layer['layer']}, head {head['head']}</h2><pre>{''.join(spans)}</pre>"
                         f"<p class='m'>merges (time: state opened at &rarr; merged into the one opened at): "
                         f"{merges}</p>")
    return "".join(parts)


CSS = """body{font-family:sans-serif;margin:2em;max-width:80em}pre{white-space:pre-wrap;background:#f7f7f7;
padding:.5em;line-height:1.6}.b{border-left:2px solid #d33;background:#fde2e2}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%}.m{font-size:small;color:#555}"""
REGION_COLOURS = ("#1b9e77", "#d95f02", "#7570b3")  # a synthetic task's parts (dark2: apart from tab20's maps)
CSS += "".join(f".g{k}{{border-bottom:3px solid {colour}}}" for k, colour in enumerate(REGION_COLOURS))


def boundary_probe(spec: dict, cfg, model, device: str, examples: int = 8) -> list[dict] | None:
    """Where a trained model's DLA layers open states (:func:`boundary_stats`) on ``examples``
    held-out examples of its synthetic task, at the longest length of the evaluation ``spec``
    (``{"task": "mqar" | "needle" | "text", "lengths": [...], "pairs": [...]}``; MQAR: the most
    pairs that fit), with the task's regions; ``None`` for text or a model without DLA layers.
    ``cfg`` is the run's :class:`dla.train.TrainConfig`."""
    from dla.data import SyntheticDataset
    from dla.eval.recall import EVAL_STREAM

    if spec["task"] == "text":
        return None
    length = max(spec.get("lengths", [cfg.data.seq_len]))
    if spec["task"] == "mqar":
        pairs = max(p for p in spec.get("pairs", [cfg.data.mqar.num_kv_pairs]) if 4 * p <= length)
        task = cfg.data.mqar.evaluation_task(num_kv_pairs=pairs)
    else:
        task = cfg.data.needle.evaluation_task(depth=None)
    batch = SyntheticDataset(task, length, cfg.seed, stream=EVAL_STREAM).batch(0, examples)
    return boundary_stats(model, batch.input_ids.to(device), task.regions(batch)) or None
