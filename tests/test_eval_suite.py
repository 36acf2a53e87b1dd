"""``dla eval --suite paper`` end to end on a tiny checkpoint against stand-in data made here: one
task of each category runs, the rest are skipped with a reason, nothing is downloaded."""

import json

import pytest
from mixer_helpers import one_thread  # noqa: F401 (autouse fixture)

import dla
from dla.cli import main
from dla.data import ByteTokenizer
from dla.eval.suite import CATEGORIES, DATASETS, markdown_table, suite_tasks

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'lm-eval[hf]')")


def write_rows(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def checkpoint(tmp_path):
    config = dla.DLAConfig(mixer="mamba2", vocab_size=257, hidden_size=32, num_hidden_layers=1, head_dim=16,
                           state_size=8, intermediate_size=64, max_position_embeddings=4096, chunk_size=16,
                           policy="dynamic", capacity=4, bos_token_id=None, eos_token_id=256, pad_token_id=256)
    directory = tmp_path / "ckpt"
    dla.DLAForCausalLM(config).save_pretrained(directory)
    ByteTokenizer().save(directory)
    return directory


@pytest.fixture
def stand_ins(tmp_path):
    root = tmp_path / "standins"
    piqa = [{"goal": f"to open a jar {i}", "sol1": "twist the lid", "sol2": "eat the jar", "label": 0}
            for i in range(3)]
    write_rows(root / "baber/piqa/train.jsonl", piqa)
    write_rows(root / "baber/piqa/validation.jsonl", piqa)
    write_rows(root / "hazyresearch/based-swde-v2/validation.jsonl",
               [{"text": "Title: Heat. Director: Mann. Director:", "value": "Mann"}] * 2)
    write_rows(root / "Xnhyacinth/LongBench/qasper/test.jsonl",
               [{"context": "The model has two layers. " * 20, "question": "How many layers?", "answers": ["two"],
                 "input": "How many layers?", "length": 100, "all_classes": None}] * 2)
    (root / "Xnhyacinth/LongBench/README.md").write_text(
        "---\nconfigs:\n- config_name: qasper\n  data_files:\n  - split: test\n    path: qasper/test.jsonl\n---\n")
    return root


def test_suite_covers_the_three_categories():
    tasks = suite_tasks()
    assert len(CATEGORIES) == 3 and all(t in DATASETS or t.startswith("niah_") for t in tasks)
    assert {"based_triviaqa", "based_nq", "based_drop", "niah_multiquery", "longbench_qasper"} <= set(tasks)
    assert suite_tasks(["recall-intensive retrieval", "piqa"])["piqa"] == "language modelling and commonsense"


def test_suite_runs_one_task_per_category_on_stand_ins_and_skips_the_rest(checkpoint, stand_ins, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))  # no cache: only the stand-ins exist
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "eval"
    assert main(["eval", str(checkpoint), "--suite", "paper", "--suite-data", str(stand_ins), "--suite-tasks", "piqa",
                 "swde", "longbench_qasper", "arc_easy", "based_drop", "niah_single_1", "--lm-eval-limit", "2",
                 "--batch-size", "2", "--device", "cpu", "--out", str(out)]) == 0
    summary = json.loads((out / "suite.json").read_text())
    rows = {r["task"]: r for r in summary["rows"]}
    for task, metric in (("piqa", "acc_norm"), ("swde", "contains"), ("longbench_qasper", "score")):
        assert "skipped" not in rows[task] and rows[task]["metric"] == metric and 0 <= rows[task]["value"] <= 1
    for task in ("arc_easy", "based_drop", "niah_single_1"):
        assert rows[task]["skipped"] and rows[task]["value"] is None
    assert "allenai/ai2_arc" in rows["arc_easy"]["skipped"] and "--suite-data" in rows["arc_easy"]["skipped"]
    table = (out / "suite.md").read_text()
    assert table == markdown_table(summary["rows"]) and "| recall-intensive retrieval | swde | contains |" in table
