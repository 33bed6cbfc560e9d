"""Run logging: a progress bar, JSON-lines metrics, optional TensorBoard.

Only process 0 writes. `metrics.jsonl` in the workdir gets one JSON object
per line: `{"step": int, "split": "train" | "eval" | "reeval", "time": unix
seconds, <metric>: float, ...}`, each (split, step) once: a resumed run
first moves the records after its checkpoint's step to
`metrics.set_aside.jsonl` (`RunLogger.start`). TensorBoard scalars go under
`workdir/tensorboard/`, written by tensorboardX (no TensorFlow needed).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
import tqdm

SET_ASIDE_FILE = "metrics.set_aside.jsonl"
_BAR_KEYS = (("loss", "loss"), ("top1", "acc"), ("learning_rate", "lr"),
             ("images_per_sec", "img/s"), ("input_wait_frac", "wait"))


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
  return {k: (v.item() if isinstance(v, np.generic | np.ndarray) else v)
          for k, v in metrics.items()}


class RunLogger:
  """Writes metrics on process 0; a no-op elsewhere.

  `start(step)` begins a run's logging at its first step: 0, or the step of
  the checkpoint it resumed from.
  """

  def __init__(self, workdir: str, *, enabled: bool, total_steps: int,
               progress_bar: bool, tensorboard: bool):
    self.enabled = enabled
    self.workdir = workdir
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.set_aside_path = os.path.join(workdir, SET_ASIDE_FILE)
    self._total_steps = total_steps
    self._progress_bar = progress_bar
    self._tensorboard = tensorboard
    self._bar = None
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)

  def start(self, step: int) -> list[dict]:
    """Begins logging at `step` (0, or the restored checkpoint's step).

    Records of `metrics.jsonl` after `step` (a run that went on past its
    newest checkpoint, or ran without reaching one) are moved to
    `metrics.set_aside.jsonl`, each with `"set_aside_at": step`, so that
    every (split, step) appears once in `metrics.jsonl`. TensorBoard is told
    to drop the events after `step` (tensorboardX's `purge_step`, applied by
    TensorBoard when it reads the event files; the files keep them).

    Returns:
      The records kept (all splits), on process 0; [] elsewhere.
    """
    if not self.enabled:
      return []
    kept = self._cut_back(step)
    if self._progress_bar:
      self._bar = tqdm.tqdm(total=self._total_steps, initial=step,
                            unit="step", dynamic_ncols=True)
    if self._tensorboard:
      # Imported here: it takes seconds, and most runs do not ask for it.
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(
          os.path.join(self.workdir, "tensorboard"),
          purge_step=step + 1 if step else None)
    return kept

  def _cut_back(self, step: int) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    records = read_metrics(self.workdir)
    kept = [r for r in records if r["step"] <= step]
    later = [r for r in records if r["step"] > step]
    if later:
      # The set-aside records are on disk before metrics.jsonl loses them.
      with open(self.set_aside_path, "a") as f:
        for r in later:
          f.write(json.dumps({**r, "set_aside_at": step}) + "\n")
        f.flush()
        os.fsync(f.fileno())
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, self.path)
    return kept

  def advance(self, steps: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(steps)

  def write(self, step: int, split: str, metrics: dict[str, Any], *,
            echo: bool = True) -> None:
    """Records `metrics` of `split` ('train' or 'eval') at `step`.

    An eval record is also printed as one line, unless `echo` is False.
    """
    if not self.enabled:
      return
    metrics = _jsonable(metrics)
    record = {"step": step, "split": split, "time": time.time(), **metrics}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for name, value in metrics.items():
        if isinstance(value, int | float):
          self._tb.add_scalar(f"{split}/{name}", value, step)
      self._tb.flush()
    if split == "train" and self._bar is not None:
      self._bar.set_postfix({short: f"{metrics[k]:.4g}"
                             for k, short in _BAR_KEYS if k in metrics},
                            refresh=False)
    elif split != "train" and echo:
      summary = " ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                         if isinstance(v, float))
      self.info(f"[step {step}] {split}: {summary}")

  def info(self, message: str) -> None:
    """Prints a message on process 0 (above the progress bar)."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(message)
    else:
      print(message, flush=True)

  def finish(self, message: str) -> None:
    """Closes the progress bar, then prints `message` as the run's last line."""
    self._close_bar()
    self.info(message)

  def close(self) -> None:
    self._close_bar()
    if self._tb is not None:
      self._tb.close()

  def _close_bar(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None


def read_metrics(workdir: str, split: str | None = None) -> list[dict]:
  """The records of `workdir/metrics.jsonl` (of one split if given)."""
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if split is None or r["split"] == split]


def param_table(params: Any) -> str:
  """A module / parameter / shape / count table (cf. hk.experimental.tabulate)."""
  rows, total = [], 0
  for module in sorted(params):
    for name, value in sorted(params[module].items()):
      count = int(np.prod(value.shape))
      total += count
      rows.append((module, name, "x".join(map(str, value.shape)) or "scalar",
                   count))
  width = max([len(r[0]) for r in rows] + [6])
  lines = [f"{'module':<{width}}  {'param':<10} {'shape':<16} {'count':>12}"]
  lines += [f"{m:<{width}}  {n:<10} {s:<16} {c:>12,}" for m, n, s, c in rows]
  lines.append(f"{'total':<{width}}  {'':<10} {'':<16} {total:>12,}")
  return "\n".join(lines)


def module_summary(params: Any, max_rows: int = 12) -> str:
  """Parameter counts per top-level module (at most `max_rows` of them).

  A module is a name up to its second `/~/` (`NFNet/~/nf_block_3`), so a
  block's convolutions count as one row.
  """
  counts: dict[str, int] = {}
  for module in sorted(params):
    top = "/~/".join(module.split("/~/")[:2])
    counts[top] = counts.get(top, 0) + sum(
        int(np.prod(v.shape)) for v in params[module].values())
  rows = list(counts.items())
  width = max([len(m) for m, _ in rows[:max_rows]] + [5])
  lines = ["parameters by module:"]
  lines += [f"  {m:<{width}} {c:>12,}" for m, c in rows[:max_rows]]
  if len(rows) > max_rows:
    rest = sum(c for _, c in rows[max_rows:])
    lines.append(f"  {f'... {len(rows) - max_rows} more':<{width}} "
                 f"{rest:>12,}")
  lines.append(f"  {'total':<{width}} {sum(counts.values()):>12,}")
  return "\n".join(lines)
