"""The paper recipe's configurations (the ``*.yaml`` files next to this module): what size each
should have, and the same models at a tiny width (for CPU smoke tests and ``--tiny`` benchmarks).

The configs are plain ``dla train`` files; this module only reads them. It is part of the
experiments, not of the ``dla`` package: import it as ``experiments.paper.recipe`` with the
repository root on ``sys.path``.
"""

from __future__ import annotations

from pathlib import Path

PAPER_DIR = Path(__file__).resolve().parent

# name -> target parameter count (the paper's stated sizes; the Transformers match each base)
TARGETS = {
    "dla_mamba2_780m": 780e6, "loglinear_mamba2_780m": 780e6, "mamba2_780m": 780e6, "transformer_780m": 780e6,
    "dla_gdn_1.3b": 1.3e9, "loglinear_gdn_1.3b": 1.3e9, "gdn_1.3b": 1.3e9, "transformer_1.3b": 1.3e9,
}

# a tiny width with the same structure: mixer, policy, capacity, head layout (GDN's head count)
TINY = dict(hidden_size=64, num_hidden_layers=2, head_dim=16, state_size=16, intermediate_size=128, vocab_size=512,
            max_position_embeddings=256, chunk_size=16)


def config_path(name: str, directory: str | Path | None = None) -> Path:
    """``PAPER_DIR/NAME.yaml`` (or a path given as is)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    return Path(directory or PAPER_DIR) / f"{name}.yaml"


def paper_configs(directory: str | Path | None = None) -> list[str]:
    """The names of the paper configs, in the order of :data:`TARGETS`."""
    directory = Path(directory or PAPER_DIR)
    present = {p.stem for p in directory.glob("*.yaml")}
    return [n for n in TARGETS if n in present] + sorted(present - set(TARGETS))


def load(name: str, overrides: list[str] = (), directory: str | Path | None = None):
    """The :class:`dla.train.TrainConfig` of a paper config (plus ``key=value`` overrides)."""
    from dla.train import load_config

    return load_config(config_path(name, directory), list(overrides))


def model_config(train_config, tiny: bool = False):
    """The :class:`dla.DLAConfig` of a training config's ``model`` section (``vocab_size`` must be
    in it: the paper configs name it, so no tokenizer is needed). ``tiny`` shrinks the width,
    depth, vocabulary and maximum length, keeping the mixer, policy, capacity and head count."""
    from dla.models import DLAConfig

    kwargs = dict(train_config.model)
    if tiny:
        kwargs.update(TINY)
        if kwargs.get("num_heads") is not None and kwargs["mixer"] != "mamba2":
            kwargs["hidden_size"] = max(TINY["hidden_size"], kwargs["num_heads"] * TINY["head_dim"])
    return DLAConfig(**kwargs)


def parameters_of(config) -> int:
    """The parameter count of ``DLAForCausalLM(config)``, built on the meta device (no memory)."""
    import torch

    import dla

    with torch.device("meta"):
        model = dla.DLAForCausalLM(config)
    return dla.count_parameters(model)


def parameter_table(directory: str | Path | None = None) -> list[dict]:
    """One row per paper config: name, mixer, policy, capacity, layers, width, parameters, target."""
    rows = []
    for name in paper_configs(directory):
        config = model_config(load(name, directory=directory))
        rows.append({"config": name, "mixer": config.mixer, "policy": config.policy,
                     "capacity": config.policy_config().capacity if config.mixer != "attention" else None,
                     "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
                     "heads": config.num_heads, "parameters": parameters_of(config),
                     "target": TARGETS.get(name)})
    return rows
