"""Training configuration: dataclasses filled from a YAML / TOML / JSON file plus ``key=value``
overrides.

Overrides name nested keys with dots (``optim.lr=3e-4``, ``data.mqar.num_kv_pairs=16``,
``model.policy=fenwick``) and are applied after the file. Values are converted to the type of
the field they set; an unknown key is an error that names it (and suggests the closest known
key). ``model`` is the one free-form section: its keys are the keyword arguments of
:class:`dla.DLAConfig`, checked against that signature when the model is built.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from dla.data import DataConfig
from dla.errors import ConfigError


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``lr * min_lr_ratio`` at the last step."""

    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1  # not applied to norms, biases and parameters flagged _no_weight_decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off

    def check(self) -> None:
        """:class:`ConfigError` naming the key of a value AdamW or the schedule cannot use."""
        def bad(name: str, value, rule: str):
            return ConfigError(f"optim.{name} must be {rule}, got {value!r}")

        if not (math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", self.lr, "a finite number > 0")
        finite = {"min_lr_ratio": self.min_lr_ratio, "weight_decay": self.weight_decay,
                  "eps": self.eps, "grad_clip": self.grad_clip}
        for name, value in finite.items():
            if not math.isfinite(value) or value < 0:
                raise bad(name, value, "a finite number >= 0")
        if self.min_lr_ratio > 1:
            raise bad("min_lr_ratio", self.min_lr_ratio, "in [0, 1] (the final learning rate over optim.lr)")
        if self.warmup_steps < 0:
            raise bad("warmup_steps", self.warmup_steps, ">= 0")
        if len(self.betas) != 2:
            raise bad("betas", self.betas, "two numbers [beta1, beta2]")
        for i, beta in enumerate(self.betas):
            if not 0 <= beta < 1:
                raise ConfigError(f"optim.betas[{i}] must be in [0, 1), got {beta!r}")


@dataclass
class TrainConfig:
    """One training run. ``batch_size`` is per process and micro-batch: the global batch is
    ``batch_size * grad_accum * world_size`` sequences (``text`` with varlen packing: up to
    ``batch_size * data.seq_len`` tokens per micro-batch)."""

    out_dir: str = "runs/dla"
    seed: int = 0
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    log_every: int = 10
    checkpoint_every: int = 500  # and always at the end; 0: only at the end
    keep_checkpoints: int = 2  # the newest N step checkpoints are kept
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    parallel: str = "ddp"  # under torchrun: ddp (replicated) | fsdp (FSDP2 fully_shard)
    activation_checkpointing: bool = False  # recompute each decoder block in the backward pass (less memory)
    deterministic: bool = False  # bitwise-repeatable runs: torch.use_deterministic_algorithms
    model: dict = field(default_factory=dict)  # keyword arguments of dla.DLAConfig
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def check(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        for name, allowed in (("device", ("auto", "cpu", "cuda")), ("precision", ("auto", "bf16", "fp32")),
                              ("parallel", ("ddp", "fsdp"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        self.optim.check()


def read_config_file(path: str | Path) -> dict:
    """The nested dict in a ``.yaml``/``.yml`` (needs PyYAML), ``.toml`` or ``.json`` file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save the config as UTF-8") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as e:
                raise ConfigError(f"{path}: YAML configs need PyYAML (pip install pyyaml), "
                                  "or write the config as TOML") from e
            raw = yaml.safe_load(text)
        elif path.suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        elif path.suffix == ".json":
            raw = json.loads(text)
        else:
            raise ConfigError(f"{path}: a config file must end in .yaml, .yml, .toml or .json")
    except ConfigError:
        raise
    except Exception as e:  # each parser has its own error type; all of them mean "malformed file"
        raise ConfigError(f"{path}: cannot parse the config: {e}") from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values, got {type(raw).__name__}")
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set ``a.b.c=value`` overrides in the nested dict ``raw`` (values stay strings here; they
    are converted by the type of the field they land in)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value (nested keys with dots: optim.lr=1e-3)")
        *parents, leaf = key.strip().split(".")
        node = raw
        for i, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parents[:i + 1])} is a value, not a section")
        node[leaf] = value
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    return config_from_dict(read_config_file(path) if path is not None else {}, overrides)


def config_from_dict(raw: dict, overrides: list[str] = ()) -> TrainConfig:
    """The checked :class:`TrainConfig` of a nested dict (as a config file holds it) plus overrides;
    ``raw`` itself is left unchanged."""
    cfg = build(TrainConfig, apply_overrides(copy.deepcopy(raw), list(overrides)), "")
    cfg.check()
    return cfg


def build(cls, raw: dict, prefix: str):
    """An instance of the dataclass ``cls`` from the nested dict ``raw``; unknown keys are errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.')} must be a section of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"unknown config key {prefix + key!r}{hint}")
        values[key] = convert(value, hints[key], prefix + key)
    # sections not mentioned still get their defaults, as fresh objects
    return cls(**values)


def convert(value, kind, key: str):
    """``value`` (from a file, or a string from an override) as the annotated type ``kind``."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        return build(kind, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return convert(value, inner[0], key)
    if origin is list:
        if isinstance(value, str):
            value = json.loads(value) if value.startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a section of keys, got {value!r}")
        return {k: parse_scalar(v) if isinstance(v, str) else v for k, v in value.items()}
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, bool):
            return value
    elif kind in (int, float):
        accepted = int if kind is int else (int, float)  # an int is a valid float, not the reverse
        if isinstance(value, str):
            try:
                return kind(value)
            except ValueError:
                pass
        elif isinstance(value, accepted) and not isinstance(value, bool):
            return kind(value)
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key} must be {getattr(kind, '__name__', kind)}, got {value!r}")


def parse_scalar(text: str):
    """An override value without a known type (``model.*``): int, float, bool, null or string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none"):
        return None
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return text


def key_names(cls=TrainConfig, prefix: str = "") -> list[str]:
    """Every settable key, dotted (``model.*`` stands for the arguments of ``dla.DLAConfig``)."""
    hints = typing.get_type_hints(cls)
    names = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            names += key_names(hints[f.name], f"{prefix}{f.name}.")
        else:
            names.append(f"{prefix}{f.name}{'.*' if hints[f.name] is dict else ''}")
    return names


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two nested config dicts."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += diff(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes
