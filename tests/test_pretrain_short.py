"""The short pre-training comparison (experiments/pretrain_short/): the three configs differ only in
their policy, and the whole path runs on a CPU at a tiny size -- the three train on the same text
(the DLA run stopped by --stop-after and resumed, with the curve of a run without the stop), the
plot draws their loss curves, and ``dla eval --suite paper`` scores the DLA checkpoint, skipping
the tasks whose data is not here with the reason."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from mixer_helpers import one_thread  # noqa: F401 (autouse: tiny models run fastest on one thread)

from dla.cli import main
from dla.eval.suite import suite_tasks
from dla.train import load_config
from dla.train.config import read_config_file
from dla.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # experiments/ is not part of the package: it uses it

from experiments.paper.recipe import load as load_paper_config  # noqa: E402
from experiments.paper.recipe import model_config, parameters_of  # noqa: E402
from experiments.pretrain_short import plot  # noqa: E402

CONFIG_DIR = ROOT / "experiments" / "pretrain_short"
POLICIES = {"dla_mamba2": "dynamic", "fenwick_mamba2": "fenwick", "single_mamba2": "single"}
# the configs' structure at a tiny width and a short sequence, a few steps
TINY = ["model.hidden_size=32", "model.num_hidden_layers=2", "model.head_dim=16", "model.state_size=8",
        "model.chunk_size=16", "data.seq_len=64", "steps=4", "optim.warmup_steps=1"]


def without_run_identity(raw: dict) -> dict:
    """A config's content apart from what tells the three runs apart: out_dir and the policy."""
    rest = {k: v for k, v in raw.items() if k != "out_dir"}
    rest["model"] = {k: v for k, v in raw["model"].items() if k not in ("policy", "capacity")}
    return rest


def test_the_three_configs_differ_only_in_their_policy_and_scale_down_the_780m_recipe():
    raws = {name: read_config_file(CONFIG_DIR / f"{name}.yaml") for name in POLICIES}
    assert {name: raw["model"]["policy"] for name, raw in raws.items()} == POLICIES
    assert raws["dla_mamba2"]["model"]["capacity"] == 30
    common = [without_run_identity(raw) for raw in raws.values()]
    assert common[0] == common[1] == common[2]
    assert len({raw["out_dir"] for raw in raws.values()}) == 3

    recipe = load_paper_config("dla_mamba2_780m")
    for name in POLICIES:
        cfg = load_config(CONFIG_DIR / f"{name}.yaml")
        assert cfg.data.seq_len == recipe.data.seq_len == 16384 and cfg.data.text.tokenizer == "byte"
        assert not cfg.deterministic  # the GPU runs the Triton kernels, not the PyTorch path
        for key in ("mixer", "head_dim", "state_size", "expand", "chunk_size", "max_position_embeddings"):
            assert cfg.model[key] == recipe.model[key], key
        assert 115e6 < parameters_of(model_config(cfg)) < 130e6  # byte vocabulary: no 32K-token embedding


@pytest.fixture
def corpus(tmp_path):
    """A few kilobytes of text in place of experiments/data/shakespeare/train.txt (no download)."""
    words = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()
    gen = torch.Generator().manual_seed(0)
    path = tmp_path / "train.txt"
    path.write_text(" ".join(words[i] for i in torch.randint(len(words), (2000,), generator=gen)))
    return path


def train(name: str, out: Path, corpus: Path, *flags: str) -> int:
    return main(["train", str(CONFIG_DIR / f"{name}.yaml"), *TINY, f"out_dir={out}", f"data.text.paths={corpus}",
                 *flags, "--quiet"])


def test_train_stop_resume_plot_and_suite_end_to_end(corpus, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (pip install matplotlib)")
    pytest.importorskip("lm_eval", reason="the suite needs lm-evaluation-harness (pip install 'lm-eval[hf]')")
    runs = {name: tmp_path / "runs" / name for name in POLICIES}

    # DLA: --stop-after 0 stops after the first step with a checkpoint; --resume trains the other three
    assert train("dla_mamba2", runs["dla_mamba2"], corpus, "--stop-after", "0") == 130
    assert (runs["dla_mamba2"] / "checkpoints" / "latest").read_text().strip() == "step_0000001"
    capsys.readouterr()
    assert train("dla_mamba2", runs["dla_mamba2"], corpus, "--resume") == 0
    assert "resuming at step 1:" in capsys.readouterr().out
    for name in ("fenwick_mamba2", "single_mamba2"):
        assert train(name, runs[name], corpus) == 0
    whole = tmp_path / "dla_mamba2_whole"  # the same run without the stop: the same batches, the same curve
    assert train("dla_mamba2", whole, corpus) == 0
    for a, b in zip(read_metrics(whole / "metrics.jsonl"), read_metrics(runs["dla_mamba2"] / "metrics.jsonl"),
                    strict=True):
        assert a["lr"] == b["lr"] and math.isclose(a["loss"], b["loss"], rel_tol=1e-5)

    configs = {}
    for name, run in runs.items():
        rows = read_metrics(run / "metrics.jsonl")
        assert [r["step"] for r in rows] == [1, 2, 3, 4]  # each step once, across the stop
        assert all(math.isfinite(r["loss"]) and 0 < r["loss"] < 10 for r in rows)
        assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000004"
        configs[name] = json.loads((run / "train_config.json").read_text())
        assert configs[name]["model"]["policy"] == POLICIES[name]
    # the same data, seed, steps and optimizer: only out_dir and the policy differ
    common = [without_run_identity(c) for c in configs.values()]
    assert common[0] == common[1] == common[2] and common[0]["data"]["text"]["paths"] == [str(corpus)]

    png = tmp_path / "loss.png"
    assert plot.main([*map(str, runs.values()), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = plot.loss_curves(list(runs.values()))
    assert list(curves) == list(POLICIES)
    for name, (steps, losses) in curves.items():
        assert steps == [1, 2, 3, 4] and losses == [r["loss"] for r in read_metrics(runs[name] / "metrics.jsonl")]
    assert "dla_mamba2: 4 steps logged, last step 4" in capsys.readouterr().out
    assert plot.main([str(tmp_path / "missing"), "--out", str(png)]) == 2

    # the suite on the DLA run's last checkpoint: piqa from a local stand-in, the rest absent here
    stand_ins = tmp_path / "standins"
    (stand_ins / "baber" / "piqa").mkdir(parents=True)
    piqa = [{"goal": f"to open a jar {i}", "sol1": "twist the lid", "sol2": "eat the jar", "label": 0}
            for i in range(2)]
    for split in ("train", "validation"):
        (stand_ins / "baber" / "piqa" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in piqa))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))  # no datasets cache
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "suite"
    assert main(["eval", str(runs["dla_mamba2"]), "--suite", "paper", "--suite-data", str(stand_ins),
                 "--lm-eval-limit", "2", "--batch-size", "2", "--device", "cpu", "--out", str(out)]) == 0
    summary = json.loads((out / "suite.json").read_text())
    assert summary["checkpoint"].endswith("step_0000004")
    rows = {r["task"]: r for r in summary["rows"]}
    assert set(rows) == set(suite_tasks())
    assert rows["piqa"]["metric"] == "acc_norm" and 0 <= rows["piqa"]["value"] <= 1 and "skipped" not in rows["piqa"]
    skipped = {task: row["skipped"] for task, row in rows.items() if task != "piqa"}
    assert all(reason and rows[task]["value"] is None for task, reason in skipped.items())
    assert skipped == summary["skipped"]
    assert "allenai/ai2_arc" in skipped["arc_easy"] and "Xnhyacinth/LongBench" in skipped["longbench_qasper"]
    table = (out / "suite.md").read_text()
    assert "| language modelling and commonsense | piqa | acc_norm |" in table
    assert table.count("skipped: ") == len(skipped)
