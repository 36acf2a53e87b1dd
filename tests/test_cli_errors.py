"""Every mistake a new user made on the command line ends as one ``error:`` line with status 2
(found by trying ``dla`` as a new user would; the run-directory cases are in test_run_safety.py)."""

import json
import re

import pytest
from mixer_helpers import one_thread  # noqa: F401 (autouse)
from test_cli import TINY, train

from dla.cli import main


def fails(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]


@pytest.fixture(scope="module")
def mqar_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("mqar")
    train(*TINY, f"out_dir={out}", "steps=2")
    return out


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("text")
    corpus = out / "corpus.txt"
    corpus.write_text("the cat sat on the mat " * 40)
    train(*TINY, f"out_dir={out}", "steps=2", "data.task=text", f"data.text.paths={corpus}")
    return out


# ----------------------------------------------------------------------------- the training config
@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1", "optim.lr must be a finite number > 0, got -1.0"),
    ("optim.lr=nan", "optim.lr must be a finite number > 0, got nan"),
    ("optim.lr=inf", "optim.lr must be a finite number > 0, got inf"),
    ("optim.betas=[2,3]", r"optim.betas\[0\] must be in \[0, 1\), got 2.0"),
    ("optim.betas=[0.9,1]", r"optim.betas\[1\] must be in \[0, 1\), got 1.0"),
    ("optim.eps=-1", "optim.eps must be a finite number >= 0, got -1.0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be a finite number >= 0"),
    ("optim.grad_clip=nan", "optim.grad_clip must be a finite number >= 0"),
    ("optim.warmup_steps=-10", "optim.warmup_steps must be >= 0, got -10"),
    ("optim.min_lr_ratio=5", r"optim.min_lr_ratio must be in \[0, 1\]"),
])
def test_optimizer_values_are_checked_with_the_key(tmp_path, capsys, override, message):
    fails(capsys, ["train", *TINY, f"out_dir={tmp_path}", "steps=2", override, "--quiet"], message)
    assert not (tmp_path / "checkpoints").exists()


def test_overrides_may_follow_the_flags(tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"steps": 3}))
    assert main(["train", "--quiet", str(config), *TINY, f"out_dir={tmp_path / 'a'}", "--stop-after", "1h",
                 "log_every=1"]) == 0
    assert (tmp_path / "a" / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    fails(capsys, ["train", str(config), "--quiet", "--no-such-flag", "steps=2"],
          r"dla train: unrecognized arguments: --no-such-flag \(see 'dla train --help'\)")
    fails(capsys, ["eval", "somewhere", "extra"], "dla eval: unrecognized arguments: extra")


def test_non_utf8_config_and_data(tmp_path, capsys):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("out_dir: caf\xe9\n".encode("latin-1"))
    fails(capsys, ["train", str(config)], r"latin1.yaml: not UTF-8 text .*save the config as UTF-8")
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"text": "fine"}\n' + '{"text": "caf\xe9"}\n'.encode("latin-1"))
    fails(capsys, ["train", *TINY, f"out_dir={tmp_path / 'run'}", "steps=2", "data.task=text",
                   f"data.text.paths={data}", "--quiet"], r"latin1.jsonl:2: not UTF-8 text")


def test_a_missing_hf_dataset_directory(tmp_path, capsys):
    pytest.importorskip("datasets")
    for name in (str(tmp_path / "nothere"), "./nothere/either"):
        fails(capsys, ["train", *TINY, f"out_dir={tmp_path / 'run'}", "steps=2", "data.task=text",
                       f"data.text.hf_dataset={name}", "--quiet"],
              f"data.text.hf_dataset: the directory {re.escape(name)} does not exist")


# ----------------------------------------------------------------------------- eval, inspect, bench
@pytest.mark.parametrize("args, message", [
    (["--examples", "0"], "argument --examples: must be >= 1, got 0"),
    (["--lengths", "0"], "argument --lengths: must be >= 1, got 0"),
    (["--pairs", "0"], "argument --pairs: must be >= 1, got 0"),
    (["--pairs", "two"], "argument --pairs: 'two' is not an integer"),
    (["--windows", "-3"], "argument --windows: must be >= 1, got -3"),
    (["--depths", "2"], r"--depths must be in \[0, 1\], got \[2.0\]"),
    (["--out", "{file}"], "--out .*a_file is a file: give a directory"),
])
def test_eval_arguments(mqar_model, tmp_path, capsys, args, message):
    (tmp_path / "a_file").write_text("x")
    fails(capsys, ["eval", str(mqar_model), *[a.format(file=tmp_path / "a_file") for a in args]], message)


def test_eval_lm_eval_unknown_task(text_model, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    fails(capsys, ["eval", str(text_model), "--lm-eval", "no_such_task", "--out", str(tmp_path)],
          "--lm-eval: no such lm-evaluation-harness task: 'no_such_task'")


def test_eval_text_on_empty_data(text_model, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    fails(capsys, ["eval", str(text_model), "--text", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "e")],
          r"empty.jsonl: 0 tokens, fewer than seq_len \+ 1 = 33")
    assert not (tmp_path / "e" / "text_loss.json").exists()


def test_inspect_arguments(mqar_model, tmp_path, capsys):
    fails(capsys, ["inspect", str(mqar_model), "--synthetic", "--max-tokens", "0"],
          "argument --max-tokens: must be >= 1, got 0")
    (tmp_path / "a_file").write_text("x")
    fails(capsys, ["inspect", str(mqar_model), "--synthetic", "--out", str(tmp_path / "a_file")], "is a file")


@pytest.mark.parametrize("args, message", [
    (["--capacity", "0"], "argument --capacity: must be >= 1, got 0"),
    (["--lengths", "0"], "argument --lengths: must be >= 1, got 0"),
    (["--new-tokens", "-1"], "argument --new-tokens: must be >= 1, got -1"),
    (["--layers", "0"], "argument --layers: must be >= 1, got 0"),
    (["--hidden-size", "7"], r"the benchmark model \(hidden_size=7, .*\) is not valid: head_dim \(64\) must divide"),
    (["--out", "{file}"], "--out .*a_file is a file: give a directory"),
])
def test_bench_arguments(tmp_path, capsys, args, message):
    (tmp_path / "a_file").write_text("x")
    fails(capsys, ["bench", "--skip-ops", "--device", "cpu", "--lengths", "8", "--new-tokens", "1",
                   *[a.format(file=tmp_path / "a_file") for a in args]], message)
    assert not (tmp_path / "decoding.json").exists()
