"""Sweeps (dla.sweep, experiments/run.py): a 2-run sweep end to end on CPU, resumption, the time
budget, and every experiment file under experiments/ parses and expands to its grid."""

import importlib.util
import json
import math
import os
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from dla.errors import ConfigError
from dla.sweep import aggregate, boundary_table, heatmap_layout, load_experiment, probe_sweep, run_sweep

ROOT = Path(__file__).resolve().parent.parent
from mixer_helpers import one_thread  # noqa: F401 (autouse: tiny models run fastest on one thread)

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

GRID_SIZES = {"mqar": 13 * 3 * 3 * 2, "mqar_long": 7, "recall": 3 * 9 * 2 * 2 * 2, "needle": 2 * 7 * 2 * 2, "text": 7,
              "ablations": 2 * 18 * 2}


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
        assert [r["num_kv_pairs"] for r in data["eval"]] == [2, 4] and all(0 <= r["accuracy"] <= 1 for r in data["eval"])
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
    if importlib.util.find_spec("matplotlib"):  # the accuracy plot and the training curves, both linked
        assert (results / "tiny.png").exists() and (results / "tiny_curves.png").exists()
        assert "results/tiny/tiny.png)" in doc and "results/tiny/tiny_curves.png)" in doc

    # a second call trains nothing; removing one result redoes exactly that run
    mtimes = {p.name: p.stat().st_mtime_ns for p in runs}
    capsys.readouterr()
    sweep(tiny, tmp_path, export=tmp_path / "out")
    assert "2 already finished, 0 to run" in capsys.readouterr().out
    with tarfile.open(tmp_path / "out" / "tiny.tar.gz") as tar:  # the export: one archive of the results
        assert {f"tiny/runs/{p.name}" for p in runs} <= set(tar.getnames())
    assert {p.name: p.stat().st_mtime_ns for p in runs} == mtimes
    runs[1].unlink()
    sweep(tiny, tmp_path)
    assert "1 already finished, 1 to run" in capsys.readouterr().out
    assert runs[1].exists() and runs[0].stat().st_mtime_ns == mtimes[runs[0].name]
    assert doc.count("begin generated: tiny") == (tmp_path / "results.md").read_text().count("begin generated: tiny")


def test_probe_times_one_run_per_cell_and_writes_nothing(tiny, tmp_path, capsys):
    """--probe: one run per table cell (here one model; the lr axis is the selected one), a few
    steps, the second half timed and scaled to the run's full length."""
    rows = probe_sweep(tiny, tmp_path / "work", device="cpu", workers=1, steps=4)
    (row,) = rows
    assert row["status"] == "done" and row["run"] == "mamba2-dynamic-C4__lr0.001"
    assert row["full_steps"] == 3 and row["step_s"] > 0 and row["train_s"] == pytest.approx(3 * row["step_s"])
    assert "s/step" in capsys.readouterr().out
    assert not (tmp_path / "results").exists() and not list((tmp_path / "work").rglob("*.jsonl"))


def test_time_budget_starts_nothing_past_it(tiny, tmp_path, capsys):
    sweep(tiny, tmp_path, time_budget=0)
    assert not (tmp_path / "results" / "tiny" / "runs").exists()
    assert "2 not started" in capsys.readouterr().out


def test_a_call_killed_mid_sweep_still_records_itself(tiny, tmp_path, monkeypatch):
    """A GPU call's guard kills a sweep from outside. Its line in calls.jsonl, rewritten as each run
    ends, still holds the command and the run it finished, marked as not ended; the report counts
    the call as cut off, and the next call adds its own line."""
    import dla.sweep as sweep_module

    finish_one_run = sweep_module.execute

    def killed_after_the_first_run(*args):
        if (tmp_path / "results" / "tiny" / "runs").exists():
            raise SystemExit("killed")  # stands in for SIGKILL: the sweep runs no more of its code
        return finish_one_run(*args)

    monkeypatch.setattr(sweep_module, "execute", killed_after_the_first_run)
    with pytest.raises(SystemExit):
        sweep(tiny, tmp_path)
    calls_file = tmp_path / "results" / "tiny" / "calls.jsonl"
    (cut,) = [json.loads(line) for line in calls_file.read_text().splitlines()]
    assert not cut["ended"] and (cut["runs"], cut["left"]) == (1, 1) and cut["wall_s"] > 0 and cut["commit"]
    monkeypatch.setattr(sweep_module, "execute", finish_one_run)
    summary = sweep(tiny, tmp_path)
    calls = [json.loads(line) for line in calls_file.read_text().splitlines()]
    assert calls[0] == cut and calls[1]["ended"] and (calls[1]["runs"], calls[1]["left"]) == (1, 0)
    assert summary["cut_off_calls"] == 1 and summary["finished_runs"] == 2
    assert "1 call(s) cut off" in (tmp_path / "results.md").read_text()


def test_only_and_errors(tiny, tmp_path):
    exp = load_experiment(tiny)
    from dla.sweep import select_runs

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


def test_runs_pause_at_the_pause_time_and_continue(tiny, tmp_path, monkeypatch, capsys):
    """--pause-after: a run still training then keeps a checkpoint and writes no result; the next
    call continues it from that step, and a call without a pause finishes it."""
    monkeypatch.setattr("dla.sweep.MIN_TRAIN_S", 0)  # start at once although the pause is near
    long = tmp_path / "long.yaml"
    long.write_text(TINY.replace("steps: 3", "steps: 600"))  # ~5 s on one CPU thread
    work = tmp_path / "work" / "tiny" / "mamba2-dynamic-C4__lr0.001"
    result = tmp_path / "results" / "tiny" / "runs" / "mamba2-dynamic-C4__lr0.001.json"
    pauses = []
    for call in range(2):
        sweep(long, tmp_path, only=["*lr0.001"], pause_after=0.5, export=tmp_path / f"out{call}")
        assert not result.exists()
        pauses.append(json.loads((work / "paused.json").read_text())["step"])
        with tarfile.open(tmp_path / f"out{call}" / "tiny-paused-01.tar.gz") as tar:
            assert "tiny/mamba2-dynamic-C4__lr0.001/paused.json" in tar.getnames()
    assert 1 <= pauses[0] < pauses[1] < 600
    assert f"resuming at step {pauses[0]}:" in capsys.readouterr().out
    sweep(long, tmp_path, only=["*lr0.001"])
    assert f"resuming at step {pauses[1]}:" in capsys.readouterr().out
    done = json.loads(result.read_text())
    assert done["status"] == "done" and done["steps"] == 600 and not work.exists()
    steps = [step for step, _ in done["curve"]]
    assert steps == list(range(601 - len(steps), 601))  # logged once per step across the three calls
    calls = [json.loads(line) for line in (tmp_path / "results" / "tiny" / "calls.jsonl").read_text().splitlines()]
    assert [(c["paused"], c["runs"]) for c in calls] == [(1, 0), (1, 0), (0, 1)]


def test_a_run_paused_at_its_last_step_keeps_its_loss_and_both_devices(tiny, tmp_path):
    """A run paused after its last step (on a GPU, say) and continued elsewhere trains no step
    there: its result takes the last logged loss, and names both devices."""
    from dla.sweep import run_config
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


def test_pack_keeps_order_and_size_limits():
    from dla.sweep import pack

    assert pack([5, 5, 5, 20, 3, 3], lambda x: x, 10) == [[5, 5], [5], [20], [3, 3]]  # 20 alone: over the limit
    assert pack([], lambda x: x, 10) == []


def test_paused_export_keeps_the_most_advanced_runs_that_fit_a_call():
    """What a GPU call cannot return is lost: the plan takes the paused runs closest to their end
    first, stops at the room's files and bytes, and names the rest."""
    from dla.sweep import EXPORT_FILE_BYTES, ExportRoom, plan_paused_export

    mib = 2**20
    paused = [{"run": "a", "step": 100, "steps": 1000}, {"run": "b", "step": 950, "steps": 1000},
              {"run": "c", "step": 500, "steps": 1000}, {"run": "d", "step": 10, "steps": 20}]
    size = {"a": 9 * mib, "b": 9 * mib, "c": 9 * mib, "d": 2 * mib}.get
    room = ExportRoom(files=2, bytes=60 * mib)
    assert plan_paused_export(paused, size, room) == ([["b"], ["c", "d"]], ["a"])  # b: 95%, c: 50% + d: 50%
    assert room.files == 0 and room.bytes == 60 * mib - 20 * mib
    room = ExportRoom(files=8, bytes=15 * mib)  # bytes bind before files
    assert plan_paused_export(paused, size, room) == ([["b"]], ["c", "d", "a"])
    assert 9 * mib + 2 * mib <= EXPORT_FILE_BYTES  # (the grouping above assumes c and d share an archive)


def test_paused_run_bytes_estimates_a_checkpoint_and_measures_a_paused_one(tiny, tmp_path):
    """Before a run starts, its paused work dir is estimated from the model (built on the meta
    device): an upper bound, over by less than the estimate's allowance for logs; once paused, it
    is measured."""
    from dla.sweep import PAUSED_FILE, dir_bytes, paused_run_bytes, run_config
    from dla.train import train

    exp = load_experiment(tiny)
    run, work = exp.runs[0], tmp_path / "work" / "tiny"
    estimate = paused_run_bytes(exp, run, work)
    cfg = run_config(exp, run, work, "cpu")
    train(cfg, show_progress=False)  # a checkpoint at the last step, as a paused run keeps
    (Path(cfg.out_dir) / PAUSED_FILE).write_text(json.dumps({"train_seconds": 1.0, "step": 3}))
    measured = dir_bytes(Path(cfg.out_dir))
    assert measured <= estimate < measured + 2**18, (estimate, measured)
    assert paused_run_bytes(exp, run, work) == measured


def test_exportable_runs_counts_the_paused_runs_a_call_returns():
    from dla.sweep import EXPORT_FILE_BYTES, ExportRoom, exportable_runs

    mib = 2**20
    room = ExportRoom(files=8, bytes=60 * mib)
    assert exportable_runs(room, mib, int(8.2 * mib), 64) == 7  # one per archive: 7 files and 58.4 MiB
    assert exportable_runs(room, mib, 7 * mib, 64) == 8  # two per archive; 9 would be 64 MiB
    assert exportable_runs(room, mib, 7 * mib, 5) == 5
    assert exportable_runs(room, mib, 400 * mib, 64) == 0 and exportable_runs(room, 61 * mib, mib, 64) == 0
    assert (room.files, room.bytes) == (8, 60 * mib)  # counted on a copy
    assert 2 * 7 * mib <= EXPORT_FILE_BYTES < 2 * int(8.2 * mib)


def test_a_pausing_sweep_trains_no_more_runs_at_once_than_a_call_returns(tiny, tmp_path, capsys):
    """Every run training at the pause time is paused, and one the call cannot return is lost: so
    --workers is capped at the paused runs that fit the export room."""
    from dla.sweep import ExportRoom

    room = ExportRoom(files=2, bytes=int(1.5 * 2**20))  # the results archive and one paused tiny run (~0.5 MiB)
    run_sweep(tiny, tmp_path / "results", tmp_path / "work", device="cpu", workers=2, docs=tmp_path / "results.md",
              pause_after=600, export=tmp_path / "out", export_room=room)
    assert "tiny: 1 run(s) at once instead of 2" in capsys.readouterr().out
    calls = [json.loads(line) for line in (tmp_path / "results" / "tiny" / "calls.jsonl").read_text().splitlines()]
    assert [(c["workers"], c["runs"], c["paused"]) for c in calls] == [(1, 2, 0)]


def test_workers_spread_over_the_visible_gpus(monkeypatch):
    """Each pool worker sees one GPU, taken round robin from CUDA_VISIBLE_DEVICES (no GPU needed:
    the workers only report what they were given)."""
    import multiprocessing

    from dla.sweep import _pin_gpu, run_parallel

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    counter = multiprocessing.Value("i", 0)
    seen = []
    for _ in range(3):
        _pin_gpu(counter, ["3", "5"])
        seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
    assert seen == ["3", "5", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # the calls above set it here too
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


def test_without_exporting_paused_runs_the_workers_are_not_capped(tiny, tmp_path, capsys, monkeypatch):
    """--no-export-paused: paused runs stay in the work dir (a warm machine keeps it), so the sweep
    trains all its workers at once, exports only the results, and says which runs stayed behind."""
    from dla.sweep import ExportRoom

    room = ExportRoom(files=2, bytes=int(1.5 * 2**20))  # as above: room for one paused run
    run_sweep(tiny, tmp_path / "results", tmp_path / "work", device="cpu", workers=2, docs=tmp_path / "results.md",
              pause_after=600, export=tmp_path / "out", export_room=room, export_paused=False)
    assert "at once instead of" not in capsys.readouterr().out
    calls = [json.loads(line) for line in (tmp_path / "results" / "tiny" / "calls.jsonl").read_text().splitlines()]
    assert [(c["workers"], c["runs"]) for c in calls] == [(2, 2)]

    monkeypatch.setattr("dla.sweep.MIN_TRAIN_S", 0)
    long = tmp_path / "long.yaml"
    long.write_text(TINY.replace("name: tiny", "name: long").replace("steps: 3", "steps: 600"))
    sweep(long, tmp_path, only=["*lr0.001"], pause_after=0.5, export=tmp_path / "out", export_paused=False)
    assert "1 paused run(s) were not exported" in capsys.readouterr().err
    assert (tmp_path / "work" / "long" / "mamba2-dynamic-C4__lr0.001" / "paused.json").is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["long.tar.gz", "tiny.tar.gz"]
