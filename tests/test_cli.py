"""The ``dla`` command end to end on tiny models: train (MQAR and text), resume, eval, inspect,
bench, demo, lm-evaluation-harness, and the errors a user can cause."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dla.cli import main
from dla.train.checkpoint import load_model
from dla.train.metrics import MetricsLog, read_metrics

TINY = ["batch_size=4", "log_every=5", "checkpoint_every=10", "optim.warmup_steps=5", "data.seq_len=32",
        "data.mqar.vocab_size=32", "data.mqar.num_kv_pairs=4", "model.hidden_size=32", "model.num_hidden_layers=1",
        "model.head_dim=16", "model.state_size=8", "model.capacity=4", "model.threshold=0.05",
        "model.max_position_embeddings=128", "model.chunk_size=16"]


from mixer_helpers import one_thread  # noqa: E402, F401 (an autouse fixture: tiny models run fastest on one thread)


def train(*items, expect=0):
    assert main(["train", *items, "--quiet"]) == expect


@pytest.fixture(scope="module")
def mqar_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mqar")
    train(*TINY, f"out_dir={out}", "steps=20")
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    words = "the cat sat on a mat while the dog ran to the red house under a blue sky".split()
    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(len(words), (40,), generator=gen)) for _ in range(30)]
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("text")
    train(*TINY, f"out_dir={out}", "steps=20", "data.task=text", f"data.text.paths={corpus}")
    return out


def test_train_mqar(mqar_run):
    rows = read_metrics(mqar_run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in rows)
    checkpoints = mqar_run / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_0000020"
    for name in ("config.json", "model.safetensors", "modeling_dla.py", "trainer_state.pt", "train_config.json"):
        assert (checkpoints / "step_0000020" / name).is_file()
    assert not list(checkpoints.glob(".tmp-*"))
    from safetensors import safe_open

    with safe_open(checkpoints / "step_0000020" / "model.safetensors", "pt") as saved:  # the tied head once
        assert "model.embed_tokens.weight" in saved.keys() and "lm_head.weight" not in saved.keys()
        embeddings = saved.get_tensor("model.embed_tokens.weight")
    model, _, _ = load_model(checkpoints / "step_0000020")
    assert torch.equal(model.lm_head.weight, embeddings) and model.lm_head.weight is model.model.embed_tokens.weight
    assert (mqar_run / "metrics.csv").read_text().splitlines()[0].startswith("step,loss,lr")


def test_train_text_varlen(tmp_path, corpus):
    train(*TINY, f"out_dir={tmp_path}", "steps=20", "data.task=text", f"data.text.paths={corpus}",
          "data.text.packing=varlen", "data.seq_len=256", "model.max_position_embeddings=256")
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 4
    saved = tmp_path / "checkpoints" / "step_0000020"
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(saved).encode("hi") == [104, 105]  # the byte tokenizer, reloadable
    config = json.loads((saved / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"], config["bos_token_id"]) == (256, 256, None)


def test_interrupted_run_resumes_at_the_same_step_with_the_same_data(tmp_path, monkeypatch):
    common = [*TINY, "steps=20", "log_every=1", "checkpoint_every=0"]
    train(*common, f"out_dir={tmp_path / 'whole'}")
    log = MetricsLog.log

    def log_then_interrupt(self, row):  # Ctrl-C right after step 7 is logged
        log(self, row)
        if row["step"] == 7:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(MetricsLog, "log", log_then_interrupt)
    train(*common, f"out_dir={tmp_path / 'split'}", expect=130)
    monkeypatch.undo()
    assert (tmp_path / "split" / "checkpoints" / "latest").read_text().strip() == "step_0000008"
    train(*common, f"out_dir={tmp_path / 'split'}", "--resume")
    whole = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    split = read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [r["step"] for r in split] == list(range(1, 21))
    # the same batches in the same order: the losses agree to float rounding (BLAS results may
    # depend on memory alignment, which differs between the processes' tensors)
    for a, b in zip(whole, split):
        assert a["lr"] == b["lr"] and math.isclose(a["loss"], b["loss"], rel_tol=1e-5)
    state = torch.load(tmp_path / "split" / "checkpoints" / "step_0000020" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 20 and state["next_batch"] == 20


def test_stop_after_saves_a_checkpoint_at_the_time_limit(tmp_path):
    train(*TINY, f"out_dir={tmp_path}", "steps=100000", "checkpoint_every=0", "--stop-after", "1s", expect=130)
    step = int((tmp_path / "checkpoints" / "latest").read_text().split("_")[1])
    assert 1 <= step < 100000 and read_metrics(tmp_path / "metrics.jsonl")[-1]["step"] == step


@pytest.mark.parametrize("text, seconds", [("600", 600), ("45s", 45), ("90m", 5400), ("3h50m", 13800),
                                           ("1h2m3s", 3723), ("1.5h", 5400), ("", None), ("3x", None), ("m", None)])
def test_parse_duration(text, seconds):
    from dla.train.metrics import parse_duration

    if seconds is None:
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(text)
    else:
        assert parse_duration(text) == seconds


@pytest.mark.parametrize("items, message", [
    (["data.task=text", "data.text.paths={tmp}/missing.jsonl"], "data file not found: .*missing.jsonl"),
    (["data.task=text", "data.text.paths={tmp}/bad.jsonl"], "bad.jsonl:2: malformed JSON"),
    (["data.task=text", "data.text.paths={tmp}/long.jsonl", "data.text.packing=varlen"],
     "long.jsonl:1: a document of 60 tokens is longer than the maximum sequence length seq_len = 32"),
    (["data.seq_len=256"], "data.seq_len = 256 is longer than the model's maximum sequence length "
                           "model.max_position_embeddings = 128"),
    (["model.hiden_size=8"], "unknown config key 'model.hiden_size'; did you mean 'model.hidden_size'"),
    (["{tmp}/nothere.yaml"], "config file not found"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, items, message):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "broken\n')
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": "x" * 60}) + "\n")
    train(*TINY, f"out_dir={tmp_path / 'run'}", "steps=2", *[i.format(tmp=tmp_path) for i in items], expect=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    import re

    assert re.search(message, err[0]), err[0]


def test_resume_without_checkpoint_is_an_error(tmp_path, capsys):
    train(*TINY, f"out_dir={tmp_path}", "--resume", expect=2)
    assert "no checkpoint in" in capsys.readouterr().err


def numbers_in(path: Path) -> list[float]:
    data = json.loads(path.read_text())
    return [r["accuracy"] for r in data["rows"] if r["accuracy"] is not None]


def test_eval_recall(mqar_run, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", str(mqar_run), "--examples", "16", "--lengths", "32", "64", "--pairs", "2", "4", "12",
                 "--depths", "0", "1", "--out", str(out)]) == 0
    mqar = json.loads((out / "mqar.json").read_text())
    assert [r["accuracy"] is None for r in mqar["rows"]] == [False, False, True, False, False, False]
    assert all(0 <= a <= 1 for a in numbers_in(out / "mqar.json"))
    assert len(numbers_in(out / "needle.json")) == 4 and all(0 <= a <= 1 for a in numbers_in(out / "needle.json"))
    needle = json.loads((out / "needle.json").read_text())
    m = needle["task"]["value_len"]
    per_token = [sum(r["token_accuracy"][j] for r in needle["rows"]) / 4 for j in range(m)]
    assert needle["table"].endswith(" / ".join(f"{t:.3f}" for t in per_token))
    assert (out / "needle.png").stat().st_size > 1000 or not _has_matplotlib()


def test_eval_text_loss(text_run, corpus, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", str(text_run), "--text", str(corpus), "--windows", "4", "--out", str(out)]) == 0
    result = json.loads((out / "text_loss.json").read_text())
    assert len(result["per_position"]) == 32 and all(math.isfinite(x) and x > 0 for x in result["per_position"])
    assert (out / "text_loss.png").is_file() or not _has_matplotlib()


def test_inspect_text_and_synthetic(text_run, mqar_run, corpus, tmp_path):
    out = tmp_path / "text"
    assert main(["inspect", str(text_run), "--text", str(corpus), "--max-tokens", "48", "--heads", "0", "1",
                 "--out", str(out)]) == 0
    report = json.loads((out / "inspect.json").read_text())
    head = report["layers"][0]["heads"][0]
    assert report["tokens"] == 48 and len(head["states"]) == 48 and head["opened"][0] == 0
    assert 1 <= max(head["states"]) <= report["layers"][0]["capacity"]
    assert all(m["time"] > m["segment"] > m["into"] >= 0 for m in head["merges"])
    page = (out / "inspect.html").read_text()
    assert "layer 0, head 1" in page and "opened a state at 0" in page
    assert (out / "inspect.png").is_file() or not _has_matplotlib()
    assert report["regions"] == {}
    # a synthetic example marks the task's parts: 4 key-value pairs first, then the queries
    assert main(["inspect", str(mqar_run), "--synthetic", "--out", str(tmp_path / "mqar")]) == 0
    report = json.loads((tmp_path / "mqar" / "inspect.json").read_text())
    assert report["tokens"] == 32 and report["regions"]["kv_pairs"] == list(range(8))
    assert report["regions"]["queries"] and min(report["regions"]["queries"]) >= 8
    page = (tmp_path / "mqar" / "inspect.html").read_text()
    assert "Underlined: <span class='g0'>kv_pairs</span>" in page
    assert page.count("<span class='g0'>") == 1 + 8 * len(report["layers"][0]["heads"])  # the legend, each head's text
    assert main(["inspect", str(mqar_run), "--synthetic", "--max-tokens", "6", "--out", str(tmp_path / "cut")]) == 0
    assert json.loads((tmp_path / "cut" / "inspect.json").read_text())["regions"] == {"kv_pairs": list(range(6)),
                                                                                      "queries": []}


def test_region_runs_are_the_consecutive_positions():
    from dla.inspection import runs_of

    assert runs_of([1, 2, 3, 7, 9, 10]) == [(1, 3), (7, 7), (9, 10)] and runs_of([]) == []


def test_boundary_stats_count_what_the_inspect_report_shows(mqar_run):
    """The sweep's per-run summary of where states opened equals the counts of ``dla inspect``'s
    per-head report, region by region."""
    from dla.data import MQAR, SyntheticDataset
    from dla.inspection import boundary_stats, head_report, layer_schedules

    model, _, _ = load_model(mqar_run)
    task = MQAR(vocab_size=32, num_kv_pairs=4, random_non_queries=False)
    batch = SyntheticDataset(task, 32, seed=0).batch(0, 3)
    regions = task.regions(batch)
    (layer,) = boundary_stats(model, batch.input_ids, regions)
    births = merged = in_kv = in_queries = 0
    for b in range(3):
        (schedule,) = [entry["schedule"] for entry in layer_schedules(model, batch.input_ids[b:b + 1]).values()]
        for h in range(schedule.heads):
            report = head_report(schedule, h)
            opened = [p for p in report["opened"] if p > 0]
            births, merged = births + len(opened), merged + len(report["merges"])
            in_kv += sum(p < 8 for p in opened)
            in_queries += sum(bool(regions["queries"][b, p]) for p in opened)
    assert births > 0, "the tiny model (threshold 0.05) should open states"
    assert layer["births_per_100_tokens"] == pytest.approx(100 * births / (3 * schedule.heads * 32))
    assert layer["merged"] == pytest.approx(merged / births)
    assert layer["regions"]["kv_pairs"] == pytest.approx({"tokens": 0.25, "births": in_kv / births})
    assert layer["regions"]["queries"]["births"] == pytest.approx(in_queries / births)
    assert layer["regions"]["queries"]["tokens"] == pytest.approx(float(regions["queries"].float().mean()))


def test_inspect_errors(mqar_run, tmp_path, capsys):
    assert main(["inspect", str(mqar_run), "--text", str(tmp_path / "x.txt")]) == 2  # no tokenizer for MQAR
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "trained on a synthetic task" in err and "give exactly one of --text FILE and --synthetic" in err
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_bench_decoding(tmp_path):
    assert main(["bench", "--skip-ops", "--lengths", "16", "--new-tokens", "2", "--hidden-size", "64", "--layers",
                 "1", "--capacity", "4", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "decoding.json").read_text())["rows"]
    assert len(rows) == 4 and all(r["tokens_per_s"] > 0 and r["cache_bytes"] > 0 for r in rows)


def test_demo_runs_end_to_end(tmp_path):
    assert main(["demo", "--steps", "2", "--policies", "dynamic", "single", "--workers", "1", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["policy"] for r in results] == ["dynamic", "single"]
    accuracies = [a["accuracy"] for r in results for a in r["accuracy"] if a["accuracy"] is not None]
    assert len(accuracies) == 2 * 7 and all(0 <= a <= 1 for a in accuracies)  # 3 + 4 valid cells of 2 lengths


def test_lm_eval_harness_loads_a_checkpoint(text_run, tmp_path):
    """``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`` on a local task."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'lm-eval[hf]')")
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": [" a mat", " zq xj"], "label": 0}) + "\n"
                            for q in ("the cat sat on", "the dog ran to", "a cat sat on")))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(
        "task: dla_tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{{{question}}}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    checkpoint = text_run / "checkpoints" / "step_0000020"
    result = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={checkpoint},"
         "trust_remote_code=True", "--tasks", "dla_tiny_choice", "--include_path", str(tmp_path / "tasks"),
         "--device", "cpu", "--batch_size", "2", "--output_path", str(tmp_path / "results")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads(next((tmp_path / "results").rglob("results_*.json")).read_text())
    assert 0 <= saved["results"]["dla_tiny_choice"]["acc,none"] <= 1


def test_python_m_dla_help():
    result = subprocess.run([sys.executable, "-m", "dla", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and all(c in result.stdout for c in ("train", "eval", "inspect", "bench", "demo"))


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_a_router_model_resumes(tmp_path):
    # the router's projections get no gradient (the schedule is discrete), so AdamW never makes
    # state for them; a checkpoint must still load (it did not while they counted as trainable)
    common = [*TINY, "model.score=router", "checkpoint_every=3", f"out_dir={tmp_path}"]
    train(*common, "steps=6")
    train(*common, "steps=9", "--resume")
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")][-1] == 9


def test_deterministic_runs_in_deterministic_mode_and_restores_it(tmp_path, monkeypatch):
    import dla.train.loop as loop

    seen, real = [], loop._train

    def recording_mode(*args):  # what the mode is while the run trains
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real(*args)

    monkeypatch.setattr(loop, "_train", recording_mode)
    train(*TINY, "steps=2", "deterministic=true", f"out_dir={tmp_path / 'on'}")
    train(*TINY, "steps=2", f"out_dir={tmp_path / 'off'}")
    assert seen == [True, False] and not torch.are_deterministic_algorithms_enabled()
