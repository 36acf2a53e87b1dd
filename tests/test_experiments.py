"""Experiment sweeps (experiments/sweep, experiments/run.py): a 2-run sweep end to end on CPU,
resumption of finished and paused runs, the time budget, and every experiment file under
experiments/ parses and expands to its grid."""

import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from mixer_helpers import one_thread  # noqa: F401 (autouse: tiny models run fastest on one thread)

from dla.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # experiments/ is not part of the package: it uses it

from experiments.sweep import (  # noqa: E402
    aggregate,
    boundary_table,
    heatmap_layout,
    load_experiment,
    run_config,
    run_sweep,
    select_runs,
)
from experiments.sweep import runner as sweep_runner  # noqa: E402
from experiments.sweep.report import mean_boundaries  # noqa: E402

TINY = """
name: tiny
description: two tiny MQAR runs
base:
  steps: 3
  batch_size: 4
  log_every: 1
  data: {task: mqar, seq_len: 32, mqar: {vocab_size: 32, num_kv_pairs: 4}}
  optim: {warmup_steps: 1}
  model: {hidden_size: 32, num_hidden_layers: 1, head_dim: 16, state_size: 8, max_position_embeddings: 32,
          chunk_size: 16, policy: dynamic, capacity: 4}
grid:
  model:
    mamba2/dynamic-C4: {model.mixer: mamba2}
  lr: {key: optim.lr, values: [1.0e-3, 3.0e-3]}
eval: {task: mqar, pairs: [2, 4], examples: 8}
report: {rows: model, cols: null, select: lr, panels: [mamba2]}
"""

GRID_SIZES = {"mqar": 13 * 3 * 3 * 2, "mqar_long": 7, "mqar_paper": 13 * 2,
              "recall": 3 * 9 * 2 * 2 * 2, "needle": 2 * 7 * 2 * 2, "text": 7,
              "ablations": 2 * 18 * 2, "ablations_paper": 2 * 14 * 2}


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def sweep(path, tmp_path, **kwargs):
    return run_sweep(path, tmp_path / "results", tmp_path / "work", device="cpu", workers=1,
                     docs=tmp_path / "results.md", **kwargs)


def test_sweep_end_to_end_and_resumes(tiny, tmp_path, capsys):
    summary = sweep(tiny, tmp_path)
    runs = sorted((tmp_path / "results" / "tiny" / "runs").glob("*.json"))
    assert [r.stem for r in runs] == ["mamba2-dynamic-C4__lr0.001", "mamba2-dynamic-C4__lr0.003"]
    for path in runs:
        data = json.loads(path.read_text())
        assert data["status"] == "done" and data["steps"] == 3 and 0 <= data["metric"] <= 1
        assert [r["num_kv_pairs"] for r in data["eval"]] == [2, 4]
        assert all(0 <= r["accuracy"] <= 1 for r in data["eval"])
        assert data["params"] > 0 and data["seconds"] > 0 and data["config"]["optim"]["lr"] in (1e-3, 3e-3)
        (layer,) = data["boundaries"]  # where its one DLA layer opened states on held-out examples
        assert layer["policy"] == "dynamic" and layer["regions"]["kv_pairs"]["tokens"] == pytest.approx(8 / 32)
    assert not list((tmp_path / "work" / "tiny").glob("*/checkpoints"))  # checkpoints are deleted
    (entry,) = summary["entries"]
    assert entry["best_lr"] in ("lr0.001", "lr0.003") and entry["n"] == 1 and 0 <= entry["mean"] <= 1
    assert set(entry["by_lr"]) == {"lr0.001", "lr0.003"} and summary["finished_runs"] == 2
    results = tmp_path / "results" / "tiny"
    assert json.loads((results / "results.json").read_text())["entries"][0]["mean"] == entry["mean"]
    table = (results / "table.md").read_text()
    assert "| mamba2-dynamic-C4 |" in table and "where the DLA layers open states" in table
    births = entry["boundaries"][0]["births_per_100_tokens"]
    assert table.count(f"| mamba2-dynamic-C4 | {births:.1f}") == 1
    doc = (tmp_path / "results.md").read_text()
    assert "<!-- begin generated: tiny -->" in doc and "runs finished: 2 of 2" in doc
    assert str(tmp_path) not in doc  # the page's paths are relative to it
    if importlib.util.find_spec("matplotlib"):  # the accuracy plot and the training curves, both linked
        assert (results / "tiny.png").exists() and (results / "tiny_curves.png").exists()
        assert "results/tiny/tiny.png)" in doc and "results/tiny/tiny_curves.png)" in doc

    # a second sweep trains nothing; removing one result redoes exactly that run
    mtimes = {p.name: p.stat().st_mtime_ns for p in runs}
    capsys.readouterr()
    sweep(tiny, tmp_path)
    assert "2 already finished, 0 to run" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in runs} == mtimes
    runs[1].unlink()
    sweep(tiny, tmp_path)
    assert "1 already finished, 1 to run" in capsys.readouterr().out
    assert runs[1].exists() and runs[0].stat().st_mtime_ns == mtimes[runs[0].name]
    assert doc.count("begin generated: tiny") == (tmp_path / "results.md").read_text().count("begin generated: tiny")


def test_time_budget_starts_nothing_past_it(tiny, tmp_path, capsys):
    sweep(tiny, tmp_path, time_budget=0)
    assert not (tmp_path / "results" / "tiny" / "runs").exists()
    assert "2 not started" in capsys.readouterr().out


def test_only_and_errors(tiny, tmp_path):
    exp = load_experiment(tiny)
    assert [r.name for r in select_runs(exp, ["*lr0.003"])] == ["mamba2-dynamic-C4__lr0.003"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.replace("{model.mixer: mamba2}", "{model.mixer: mamba3}"))
    with pytest.raises(ConfigError, match="mixer"):
        load_experiment(bad)
    aggregate(exp, tmp_path / "empty", tmp_path / "results.md")  # nothing finished: still a valid page
    assert "runs finished: 0 of 2" in (tmp_path / "results.md").read_text()


def test_needle_sweep_reports_each_value_token(tmp_path):
    """A needle sweep's table has the len columns and the per-token accuracy, averaged over the
    seeds from each run's ``token_accuracy``."""
    path = tmp_path / "needle.yaml"
    path.write_text(TINY.replace("name: tiny", "name: tinyneedle")
                    .replace("data: {task: mqar, seq_len: 32, mqar: {vocab_size: 32, num_kv_pairs: 4}}",
                             "data: {task: needle, seq_len: 32, needle: {vocab_size: 64, value_len: 3}}")
                    .replace("lr: {key: optim.lr, values: [1.0e-3, 3.0e-3]}", "seed: {key: seed, values: [0, 1]}")
                    .replace("eval: {task: mqar, pairs: [2, 4], examples: 8}",
                             "eval: {task: needle, lengths: [32], depths: [0.0, 1.0], examples: 4}")
                    .replace("select: lr,", "select: null, average: seed,"))
    summary = sweep(path, tmp_path)
    runs = [json.loads(p.read_text()) for p in sorted((tmp_path / "results" / "tinyneedle" / "runs").glob("*.json"))]
    assert len(runs) == 2 and all(len(row["token_accuracy"]) == 3 for r in runs for row in r["eval"])
    (entry,) = summary["entries"]
    for i, cell in enumerate(entry["detail"]):
        assert cell["token_accuracy"] == pytest.approx([(a + b) / 2 for a, b in zip(
            runs[0]["eval"][i]["token_accuracy"], runs[1]["eval"][i]["token_accuracy"])])
    table = (tmp_path / "results" / "tinyneedle" / "table.md").read_text()
    assert "| model | result | len 32 | per value token |" in table
    cells = [c.strip() for c in table.split("| mamba2-dynamic-C4 |")[1].splitlines()[0].split("|")]
    means = [100 * sum(c["token_accuracy"][j] for c in entry["detail"]) / 2 for j in range(3)]
    assert cells[2] == " / ".join(f"{m:.0f}" for m in means)


def test_needle_report_lays_out_one_figure_row_and_one_region_share_per_task():
    """The heatmaps: a figure row per task, a column per model that has a heatmap in some row. The
    boundary tables: each task's own share of needle tokens (here 7 and 28 of 16,384), printed
    with two significant digits below 1%."""
    exp = SimpleNamespace(name="needle", report={"rows": "model", "cols": None, "select": None}, axes={
        "task": ["passkey", "multikey"], "model": ["a", "b", "c"]})

    def entry(task, model, detail, region_tokens):
        layer = {"births_per_100_tokens": 0.5, "region": "needles", "region_tokens": region_tokens,
                 "region_births": 0.41}
        return {"task": task, "model": model, "detail": detail, "boundaries": [layer]}

    pa, pb = entry("passkey", "a", [1], 7 / 16384), entry("passkey", "b", [1], 7 / 16384)
    ma, mc = entry("multikey", "a", [1], 28 / 16384), entry("multikey", "c", [], 28 / 16384)
    assert heatmap_layout(exp, [pa, pb, ma, mc], ["task", "model"]) == [[pa, pb], [ma, None]]
    _, passkey, multikey = boundary_table(exp, [pa, pb, ma, mc], ["task", "model"]).split("**needle: where")
    assert "task=passkey" in passkey and "which holds 0.043% of the tokens" in passkey
    assert "task=multikey" in multikey and "which holds 0.17% of the tokens" in multikey
    assert "| a | 0.5 (41%) |" in passkey


def test_boundary_table_gives_each_layers_learned_threshold_averaged_over_heads_and_seeds():
    """τ per layer: the mean over the heads of every seed's probe, beside the births; a layer
    without a threshold (not the dynamic policy) shows none."""
    def probe(births, taus):
        return [{"births_per_100_tokens": births, "threshold": taus, "regions": {}},
                {"births_per_100_tokens": 1.0, "threshold": None, "regions": {}}]

    layers = mean_boundaries([{"boundaries": probe(2.0, [0.5, 0.7])}, {"boundaries": probe(4.0, [0.9, 1.3])}])
    assert layers[0]["threshold"] == pytest.approx(0.85) and layers[0]["births_per_100_tokens"] == 3.0
    assert layers[1]["threshold"] is None
    exp = SimpleNamespace(name="mqar", report={"rows": "model", "cols": None, "select": None}, axes={"model": ["a"]})
    table = boundary_table(exp, [{"model": "a", "detail": [1], "boundaries": layers}], ["model"])
    assert "| a | 3.0 τ 0.85 / 1.0 |" in table and "τ: the layer's threshold" in table


def test_runs_pause_at_the_pause_time_and_continue(tiny, tmp_path, monkeypatch, capsys):
    """--pause-after: a run still training then keeps a checkpoint and writes no result; the next
    sweep resumes it from that step, and a sweep without a pause finishes it."""
    monkeypatch.setattr(sweep_runner, "MIN_TRAIN_S", 0)  # start at once although the pause is near
    long = tmp_path / "long.yaml"
    long.write_text(TINY.replace("steps: 3", "steps: 600"))  # ~5 s on one CPU thread
    work = tmp_path / "work" / "tiny" / "mamba2-dynamic-C4__lr0.001"
    result = tmp_path / "results" / "tiny" / "runs" / "mamba2-dynamic-C4__lr0.001.json"
    pauses = []
    for _ in range(2):
        sweep(long, tmp_path, only=["*lr0.001"], pause_after=0.5)
        assert not result.exists()
        pauses.append(json.loads((work / "paused.json").read_text())["step"])
    assert 1 <= pauses[0] < pauses[1] < 600
    assert f"resuming at step {pauses[0]}:" in capsys.readouterr().out
    sweep(long, tmp_path, only=["*lr0.001"])
    assert f"resuming at step {pauses[1]}:" in capsys.readouterr().out
    done = json.loads(result.read_text())
    assert done["status"] == "done" and done["steps"] == 600 and not work.exists()
    steps = [step for step, _ in done["curve"]]
    assert steps == list(range(601 - len(steps), 601))  # logged once per step across the three sweeps


def test_a_run_paused_at_its_last_step_keeps_its_loss_and_both_devices(tiny, tmp_path):
    """A run paused after its last step (on a GPU, say) and continued elsewhere trains no step
    there: its result takes the last logged loss, and names both devices."""
    from dla.train import train

    exp = load_experiment(tiny)
    run = exp.runs[0]
    cfg = run_config(exp, run, tmp_path / "work" / "tiny", "cpu")
    train(cfg, show_progress=False)  # all 3 steps, with a checkpoint at the last
    (Path(cfg.out_dir) / "paused.json").write_text(json.dumps({"train_seconds": 1.0, "step": 3, "device": "GPU X"}))
    sweep(tiny, tmp_path, only=[run.name])
    done = json.loads((tmp_path / "results" / "tiny" / "runs" / f"{run.name}.json").read_text())
    assert done["status"] == "done" and done["final_loss"] == done["curve"][-1][1] and math.isfinite(done["final_loss"])
    assert done["device"] == "GPU X, then cpu" and done["train_seconds"] >= 1.0


def test_workers_spread_over_the_visible_gpus(monkeypatch):
    """Each pool worker sees one GPU, taken round robin from CUDA_VISIBLE_DEVICES (no GPU needed:
    the workers only report what they were given)."""
    import multiprocessing

    from dla.train.workers import pin_gpu, run_parallel

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    counter = multiprocessing.Value("i", 0)
    seen = []
    for _ in range(3):
        pin_gpu(counter, ["3", "5"])
        seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
    assert seen == ["3", "5", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # pin_gpu above set it in this process too
    # os.getenv(name, threads) runs in the worker: it returns that worker's device list
    results = [r for _, r in run_parallel(os.getenv, [("CUDA_VISIBLE_DEVICES",)] * 4, workers=2, threads=1)]
    assert len(results) == 4 and set(results) <= {"3", "5"}


@pytest.mark.parametrize("name", sorted(GRID_SIZES))
def test_experiment_files_expand(name):
    exp = load_experiment(ROOT / "experiments" / f"{name}.yaml")
    assert exp.name == name and len(exp.runs) == GRID_SIZES[name]
    assert len({r.name for r in exp.runs}) == len(exp.runs)
    for axis in ("rows", "cols", "select", "average"):
        assert exp.report[axis] is None or exp.report[axis] in exp.axes


def test_the_library_depends_on_neither_its_command_line_nor_the_experiments():
    """Experiments use the library, never the reverse; no module of the package imports ``dla.cli``
    (the command line sits on top) or reaches into the source checkout around it."""
    package = ROOT / "dla"
    for path in package.rglob("*.py"):
        text = path.read_text()
        where = path.relative_to(ROOT)
        assert "experiments" not in [w.strip(".,:;()`'\"") for w in text.split() if w.startswith(("import", "from"))]
        assert "from experiments" not in text and "import experiments" not in text, where
        if path.name not in ("cli.py", "__main__.py"):
            assert "from dla.cli" not in text and "import dla.cli" not in text, where
        assert "parent.parent" not in text, f"{where} reaches outside the package"


def test_the_command_line_trains_lists_and_re_aggregates(tiny, tmp_path, capsys):
    """experiments/run.py: --list, a sweep on the CPU, then --aggregate-only rebuilds the same
    table and page from the run files alone."""
    run_py = importlib.util.spec_from_file_location("run_py", ROOT / "experiments" / "run.py")
    module = importlib.util.module_from_spec(run_py)
    run_py.loader.exec_module(module)
    common = ["--results", str(tmp_path / "results"), "--work-dir", str(tmp_path / "work"),
              "--docs", str(tmp_path / "results.md")]
    assert module.main([str(tiny), "--list"]) == 0
    assert "tiny: 2 of 2 runs" in capsys.readouterr().out
    assert module.main([str(tiny), "--device", "cpu", *common]) == 0
    table, page = (tmp_path / "results" / "tiny" / "table.md").read_text(), (tmp_path / "results.md").read_text()
    assert module.main([str(tiny), "--aggregate-only", *common]) == 0
    assert (tmp_path / "results" / "tiny" / "table.md").read_text() == table
    assert (tmp_path / "results.md").read_text() == page
    assert module.main([str(tmp_path / "missing.yaml"), "--list"]) == 2
