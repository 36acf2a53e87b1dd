"""Experiment files: a grid of ``dla train`` overrides over a base config, expanded into runs.

An experiment file (YAML / TOML / JSON, see ``experiments/*.yaml``) holds::

    name: mqar                       # results go to RESULTS/<name>/
    description: ...
    base: {...}                      # a dla train config, as in configs/*.yaml
    grid:                            # the runs: the product of the axes, in this order
      model:                         # a named axis: each choice sets several keys
        mamba2/single: {model.mixer: mamba2, model.policy: single}
      width: {key: model.hidden_size, values: [16, 32, 64]}
      lr: {key: optim.lr, values: [1.0e-3, 3.0e-3]}
      seed: {key: seed, values: [0, 1]}
    eval: {task: mqar, lengths: [256], pairs: [16, 32, 64], examples: 1000}
    report: {rows: model, cols: width, select: lr, average: seed, panels: [mamba2, gated_deltanet]}

Every run is named by its axis labels (``mamba2-single__width16__lr0.001__seed0``).
"""

from __future__ import annotations

import fnmatch
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from dla.errors import ConfigError

TASKS = ("mqar", "needle", "text")


@dataclass
class Run:
    name: str
    labels: dict  # axis -> label of its value
    overrides: list[str]


@dataclass
class Experiment:
    name: str
    path: Path
    base: dict
    axes: dict  # axis -> {label: [overrides]}
    eval: dict
    report: dict
    description: str = ""
    runs: list[Run] = field(default_factory=list)


def _label(value) -> str:
    return str(value).replace("/", "-").replace(" ", "")


def _axis_choices(axis: str, spec) -> dict[str, list[str]]:
    """``label -> overrides`` of one axis: ``{key, values}`` or ``{label: {key: value, ...}}``."""
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"grid.{axis} must be {{key: ..., values: [...]}} or a mapping of named choices")
    if "key" in spec and "values" in spec:
        if not isinstance(spec["values"], list) or not spec["values"]:
            raise ConfigError(f"grid.{axis}.values must be a non-empty list")
        return {f"{axis}{_label(v)}": [f"{spec['key']}={_value(v)}"] for v in spec["values"]}
    choices = {}
    for label, keys in spec.items():
        if not isinstance(keys, dict):
            raise ConfigError(f"grid.{axis}.{label} must be a mapping of config keys to values")
        choices[_label(label)] = [f"{k}={_value(v)}" for k, v in keys.items()]
    return choices


def _value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):  # nested lists (a data mixture) as JSON, which the config reads back
        return json.dumps(v) if any(isinstance(x, list) for x in v) else ",".join(str(x) for x in v)
    return str(v)


def load_experiment(path: str | Path, eval_overrides: list[str] = ()) -> Experiment:
    """Read and expand an experiment file; every run's config is built (and so checked) here.
    ``eval_overrides`` (``key=value``) change the ``eval`` section (e.g. ``examples=4`` for a smoke test)."""
    from dla.train.config import config_from_dict, parse_scalar, read_config_file

    path = Path(path)
    raw = read_config_file(path)
    unknown = set(raw) - {"name", "description", "base", "grid", "eval", "report"}
    if unknown:
        raise ConfigError(f"{path}: unknown experiment keys {sorted(unknown)}")
    for key in ("name", "base", "grid", "eval"):
        if key not in raw:
            raise ConfigError(f"{path}: an experiment needs '{key}'")
    axes = {axis: _axis_choices(axis, spec) for axis, spec in raw["grid"].items()}
    ev = dict(raw["eval"])
    for item in eval_overrides:
        key, _, value = item.partition("=")
        ev[key] = json.loads(value) if value.startswith("[") else parse_scalar(value)
    if ev.get("task") not in TASKS:
        raise ConfigError(f"{path}: eval.task must be one of {TASKS}, got {ev.get('task')!r}")
    report = {
        "rows": next(iter(axes)),
        "cols": None,
        "select": None,
        "average": None,
        "panels": [],
        **raw.get("report", {}),
    }
    exp = Experiment(raw["name"], path, raw["base"], axes, ev, report, raw.get("description", ""))
    checked: set = set()
    for combo in itertools.product(*(choices.items() for choices in axes.values())):
        labels = {axis: label for axis, (label, _) in zip(axes, combo)}
        overrides = [o for _, keys in combo for o in keys]
        run = Run("__".join(labels.values()), labels, overrides)
        check_model(config_from_dict(exp.base, overrides), checked)  # errors show before anything trains
        exp.runs.append(run)
    names = [r.name for r in exp.runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: two runs have the same name; make the axis labels distinct")
    return exp


def check_model(cfg, checked: set) -> None:
    """Build the run's :class:`dla.DLAConfig` (once per distinct model section), so that a wrong
    model key or value is an error when the experiment is read."""
    key = json.dumps(cfg.model, sort_keys=True) + str(cfg.data.seq_len)
    if key in checked:
        return
    from dla.models import DLAConfig

    try:
        config = DLAConfig(**{"vocab_size": 512, **cfg.model})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e} (model section {cfg.model})") from e
    if cfg.data.seq_len > config.max_position_embeddings:
        raise ConfigError(
            f"data.seq_len = {cfg.data.seq_len} > model.max_position_embeddings = {config.max_position_embeddings}"
        )
    checked.add(key)


def run_config(exp: Experiment, run: Run, work_dir: Path, device: str, steps_scale: float = 1.0, extra: list[str] = ()):
    """The :class:`TrainConfig` of one run: base + axis overrides + ``extra``, scaled steps, and
    an out_dir under ``work_dir``."""
    from dla.train.config import config_from_dict

    cfg = config_from_dict(
        exp.base,
        run.overrides
        + list(extra)
        + [f"out_dir={work_dir / run.name}", f"device={device}", "checkpoint_every=0", "keep_checkpoints=1"],
    )
    if steps_scale != 1.0:
        cfg.steps = max(1, round(cfg.steps * steps_scale))
        cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, max(1, cfg.steps // 10))
        cfg.log_every = min(cfg.log_every, cfg.steps)
    cfg.check()
    return cfg


def select_runs(exp: Experiment, only: list[str] | None) -> list[Run]:
    if not only:
        return exp.runs
    return [r for r in exp.runs if any(fnmatch.fnmatch(r.name, p) or p in r.name for p in only)]
