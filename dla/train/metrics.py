"""Where training progress goes: a progress bar, and metrics as CSV, JSONL and TensorBoard."""

from __future__ import annotations

import csv
import json
import math
import re
import sys
import time
from pathlib import Path

COLUMNS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens", "elapsed_s")


class MetricsLog:
    """Rows of :data:`COLUMNS` appended to ``metrics.csv`` and ``metrics.jsonl`` in ``out_dir``
    (and TensorBoard event files under ``out_dir/tensorboard`` when TensorBoard is installed).

    A resumed run first drops the rows logged after the step it resumes from (an interrupted run
    may have logged steps its checkpoint does not hold), so every step appears once."""

    def __init__(self, out_dir: str | Path, resume_step: int | None):
        out = Path(out_dir)
        self.csv_path, self.jsonl_path = out / "metrics.csv", out / "metrics.jsonl"
        if resume_step is None:
            self.csv_path.unlink(missing_ok=True)
            self.jsonl_path.unlink(missing_ok=True)
        else:
            self._drop_after(resume_step)
        new_csv = not self.csv_path.exists()
        self.csv_file = self.csv_path.open("a", newline="")
        self.csv = csv.DictWriter(self.csv_file, COLUMNS)
        if new_csv:
            self.csv.writeheader()
        self.jsonl_file = self.jsonl_path.open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # TensorBoard is optional
            self.tensorboard = None
        else:
            self.tensorboard = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step)

    def _drop_after(self, step: int) -> None:
        if self.jsonl_path.exists():
            rows = [line for line in self.jsonl_path.read_text().splitlines() if json.loads(line)["step"] <= step]
            self.jsonl_path.write_text("".join(r + "\n" for r in rows))
        if self.csv_path.exists():
            with self.csv_path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
            with self.csv_path.open("w", newline="") as f:
                writer = csv.DictWriter(f, COLUMNS)
                writer.writeheader()
                writer.writerows(rows)

    def log(self, row: dict) -> None:
        self.csv.writerow(row)
        self.jsonl_file.write(json.dumps(row) + "\n")
        self.csv_file.flush()
        self.jsonl_file.flush()
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step":
                    self.tensorboard.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        self.csv_file.close()
        self.jsonl_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def parse_duration(text: str) -> float:
    """Seconds in ``"600"``, ``"45s"``, ``"90m"``, ``"3h50m"`` or ``"1h2m3s"`` (the inverse of
    :func:`format_duration`, for command lines)."""
    match = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not text.strip() or match is None:
        raise ValueError(f"not a duration: {text!r} (e.g. 600, 45s, 90m, 3h50m)")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


class Progress:
    """A progress bar with loss, tokens/s and ETA: tqdm when installed, else a line every
    ``print_every`` steps. Only the main process reports; ``show=False`` hides the progress
    but not the messages passed to :meth:`write`."""

    def __init__(self, total: int, initial: int, print_every: int, main: bool = True, show: bool = True):
        self.total, self.print_every, self.main = total, print_every, main
        self.enabled = main and show
        self.start_step, self.start_time = initial, time.perf_counter()
        self.bar = None
        if self.enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            return
        if step % self.print_every and step != self.total:
            return
        done = step - self.start_step
        eta = (time.perf_counter() - self.start_time) / done * (self.total - step) if done else math.nan
        print(f"step {step}/{self.total}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  "
              f"ETA {format_duration(eta) if math.isfinite(eta) else '?'}", file=sys.stderr, flush=True)

    def write(self, message: str, progress: bool = False) -> None:
        """Print a line (without breaking the bar); a ``progress`` line only where progress shows."""
        if not self.main or (progress and not self.enabled):
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
