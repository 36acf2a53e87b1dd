"""``dla eval --suite paper``: the paper's three categories through lm-evaluation-harness in one
run, one table (JSON + Markdown).

Nothing is downloaded. Before lm-eval starts, every task's data is looked for -- in the Hugging
Face datasets cache, or under ``--suite-data DIR`` (local stand-ins: ``DIR/<dataset path>/`` as a
datasets folder, e.g. ``DIR/baber/piqa/validation.jsonl``, configs named in a ``README.md`` card
when the task uses one) -- and a task whose data is missing is skipped with the reason. lm-eval
then runs once on the tasks that remain, in a subprocess with ``HF_DATASETS_OFFLINE=1`` and
``HF_HUB_OFFLINE=1`` whose working directory is the stand-in directory (so ``load_dataset``
finds a stand-in by its dataset path before any cache).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from dla.errors import UserError

LOCAL_TASKS = Path(__file__).resolve().parent / "tasks"  # based_triviaqa, based_nq, based_drop
RULER_LENGTHS = (4096, 8192, 16384)
NIAH = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
        "niah_multivalue", "niah_multiquery")
LONGBENCH = ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report", "qmsum",
             "multi_news", "trec", "triviaqa", "samsum", "lcc", "repobench-p")
CATEGORIES = {
    "language modelling and commonsense": ("wikitext", "lambada_openai", "piqa", "hellaswag", "winogrande",
                                           "arc_easy", "arc_challenge"),
    "recall-intensive retrieval": ("swde", "fda", "squad_completion", "based_triviaqa", "based_nq", "based_drop"),
    "long context": NIAH + tuple(f"longbench_{t}" for t in LONGBENCH),
}
# the (dataset path, config name) each task reads, as lm-eval 0.4.x defines them
DATASETS = {
    "wikitext": ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1"),
    "lambada_openai": ("EleutherAI/lambada_openai", "default"),
    "piqa": ("baber/piqa", None),
    "hellaswag": ("Rowan/hellaswag", None),
    "winogrande": ("allenai/winogrande", "winogrande_xl"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
    "swde": ("hazyresearch/based-swde-v2", "default"),
    "fda": ("hazyresearch/based-fda", "default"),
    "squad_completion": ("hazyresearch/based-squad", "default"),
    "based_triviaqa": ("hazyresearch/based_triviaqa", None),
    "based_nq": ("hazyresearch/based_nq_2048", None),
    "based_drop": ("hazyresearch/based_drop", None),
    **{f"longbench_{t}": ("Xnhyacinth/LongBench", t) for t in LONGBENCH},
}
ESSAY_HAYSTACK = {"niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery"}
# the headline metric of each task family in the table
METRICS = ("word_perplexity", "acc_norm", "acc", "contains", "score", "4096", "8192", "16384")


def suite_tasks(names: list[str] | None = None) -> dict[str, str]:
    """``task -> category`` for the paper suite, or for the named subset of it (a name may also
    be a category)."""
    every = {t: c for c, tasks in CATEGORIES.items() for t in tasks}
    if not names:
        return every
    chosen = {}
    for name in names:
        if name in CATEGORIES:
            chosen.update({t: name for t in CATEGORIES[name]})
        elif name in every:
            chosen[name] = every[name]
        else:
            raise UserError(f"--suite-tasks: {name!r} is not in the paper suite (tasks: {', '.join(every)}; "
                            f"categories: {', '.join(CATEGORIES)})")
    return chosen


def offline_env(extra: dict | None = None) -> dict:
    return {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", **(extra or {})}


_PROBE = """
import json, sys
import datasets
missing = {}
for task, path, name in json.loads(sys.argv[1]):
    try:
        datasets.load_dataset_builder(path, name)
    except Exception as e:
        missing[task] = (f"{path}" + (f" ({name})" if name else "")
                         + f" is neither in the datasets cache nor a stand-in under --suite-data ({type(e).__name__})")
print(json.dumps(missing))
"""


def probe(wanted: list[tuple], data_dir: Path, timeout: float = 120) -> dict[str, str]:
    """``name -> why`` for each ``(name, dataset path, config)`` that ``load_dataset_builder`` cannot
    find offline (stand-ins under ``data_dir`` first, then the cache), checked in a subprocess with a
    timeout so that nothing here can hang on the network."""
    if not wanted:
        return {}
    try:
        result = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(wanted)], cwd=data_dir, env=offline_env(),
                                capture_output=True, text=True, timeout=timeout)
        return json.loads(result.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError):
        return {name: "could not check its data offline" for name, *_ in wanted}


def missing_data(tasks: list[str], data_dir: Path) -> dict[str, str]:
    """``task -> why`` for each task whose data is neither a stand-in under ``data_dir`` nor in the
    datasets cache, or (RULER) whose generator lacks a package or nltk's data."""
    ruler = [t for t in tasks if t in NIAH]
    wanted = [(t, *DATASETS[t]) for t in tasks if t in DATASETS]
    if any(t in ESSAY_HAYSTACK for t in ruler):
        wanted.append(("essays", "baber/paul_graham_essays", None))
    missing = probe(wanted, data_dir)
    essays = missing.pop("essays", None)
    why = packages_missing(("nltk", "wonderwords"), "ruler") or punkt_missing() if ruler else None
    for t in ruler:
        if why or (t in ESSAY_HAYSTACK and essays):
            missing[t] = why or f"the essay haystack {essays}"
    why = packages_missing(("jieba", "fuzzywuzzy", "rouge"), "longbench")
    missing.update({t: why for t in tasks if t.startswith("longbench_") and why and t not in missing})
    return missing


def packages_missing(modules, extra: str) -> str | None:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            return f"needs the {module} package (pip install 'lm-eval[{extra}]')"
    return None


def punkt_missing() -> str | None:
    """RULER's generator imports nltk and downloads its punkt_tab data when absent: check first."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
    except LookupError:
        return "RULER needs nltk's punkt_tab data (python -m nltk.downloader punkt_tab)"
    return None


def headline(metrics: dict) -> tuple[str | None, float | None]:
    """The metric shown in the table: the first of :data:`METRICS` the task reports."""
    for name in METRICS:
        for key, value in metrics.items():
            if key.split(",")[0] == name and isinstance(value, (int, float)):
                return name, float(value)
    return None, None


def run_suite(checkpoint: Path, out: Path, data_dir: str | None = None, names: list[str] | None = None,
              limit: int | None = None, batch_size: int = 8, device: str = "cpu",
              ruler_lengths=RULER_LENGTHS, timeout: float | None = None) -> dict:
    """Run the suite; write ``OUT/suite.json`` and ``OUT/suite.md``; return the JSON's content."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("--suite needs lm-evaluation-harness: pip install 'lm-eval[hf]'")
    checkpoint, out = Path(checkpoint).resolve(), Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(data_dir).resolve() if data_dir else out / "_no_stand_ins"
    if not data_dir.is_dir():
        if data_dir.name != "_no_stand_ins":
            raise UserError(f"--suite-data: no directory {data_dir}")
        data_dir.mkdir()
    tasks = suite_tasks(names)
    skipped = missing_data(list(tasks), data_dir)
    for task, why in skipped.items():
        print(f"skipping {task}: {why}")
    run = [t for t in tasks if t not in skipped]
    results, log = {}, None
    if run:
        print(f"lm-eval on {len(run)} task(s): {', '.join(run)}", flush=True)
        raw = out / "lm_eval_raw"
        metadata = {"max_seq_lengths": list(ruler_lengths), "tokenizer": str(checkpoint)}
        cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
               f"pretrained={checkpoint},trust_remote_code=True", "--tasks", ",".join(run),
               "--include_path", str(LOCAL_TASKS), "--device", str(device), "--batch_size", str(batch_size),
               "--output_path", str(raw), "--metadata", json.dumps(metadata)]
        if limit:
            cmd += ["--limit", str(limit)]
        proc = subprocess.run(cmd, cwd=data_dir, env=offline_env(), capture_output=True, text=True, timeout=timeout)
        log = out / "lm_eval.log"
        log.write_text(proc.stdout + "\n" + proc.stderr)
        if proc.returncode != 0:
            raise UserError(f"lm-eval failed (exit {proc.returncode}); see {log}:\n" + proc.stderr[-2000:])
        saved = sorted(raw.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
        results = json.loads(saved[-1].read_text())["results"] if saved else {}
    rows = []
    for task, category in tasks.items():
        metric, value = headline(results.get(task, {}))
        row = {"category": category, "task": task, "metric": metric, "value": value}
        if task in skipped:
            row["skipped"] = skipped[task]
        elif task not in results:
            row["skipped"] = "lm-eval returned no result"
        if task in NIAH and task in results:
            row["by_length"] = {str(n): results[task].get(f"{n},none") for n in ruler_lengths}
        rows.append(row)
    summary = {"checkpoint": str(checkpoint), "limit": limit, "ruler_lengths": list(ruler_lengths), "rows": rows,
               "lm_eval": results, "skipped": skipped}
    (out / "suite.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "suite.md").write_text(markdown_table(rows, ruler_lengths))
    print(markdown_table(rows, ruler_lengths))
    return summary


def markdown_table(rows: list[dict], ruler_lengths=RULER_LENGTHS) -> str:
    lines = ["| category | task | metric | value |", "|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            value = f"skipped: {r['skipped']}"
        elif "by_length" in r:
            value = " / ".join(f"{n}: {fmt(r['by_length'].get(str(n)))}" for n in ruler_lengths)
        else:
            value = fmt(r["value"])
        lines.append(f"| {r['category']} | {r['task']} | {r['metric'] or '-'} | {value} |")
    return "\n".join(lines) + "\n"


def fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"
