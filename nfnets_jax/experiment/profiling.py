"""Where a run's time goes: input-wait accounting and a profiler window.

* `StepTimer` sums the wall time the train loop spends waiting for its next
  batch; each logged train record gets `step_time_s` (wall seconds per step
  over the logging interval) and `input_wait_frac` (the fraction of that
  wall time spent waiting for input). A fraction near 1 means the input
  pipeline, not the accelerator, sets the pace.
* `config.logging.profile_steps="START,STOP"` writes a `jax.profiler` trace
  of train steps START+1 ... STOP into `WORKDIR/profile/` (`StepProfiler`),
  which TensorBoard's profile plugin or Perfetto (ui.perfetto.dev, the
  `*.trace.json.gz` file) opens.
"""
from __future__ import annotations

import os
import time
from typing import Any

import jax

PROFILE_DIR = "profile"


def parse_profile_steps(value: str | None) -> tuple[int, int] | None:
  """`"START,STOP"` -> `(START, STOP)` with `0 <= START < STOP`; None: off.

  Raises:
    ValueError: anything else, naming the field and the value.
  """
  if value is None or value == "":
    return None
  parts = str(value).split(",")
  try:
    start, stop = (int(x) for x in parts)
  except ValueError:
    start = stop = -1
  if len(parts) != 2 or not 0 <= start < stop:
    raise ValueError(
        f"config.logging.profile_steps={value!r} is invalid; allowed: "
        "'START,STOP', two integers with 0 <= START < STOP (the trace "
        "covers train steps START+1 ... STOP), or None (no trace)")
  return start, stop


class StepTimer:
  """Wall time per logging interval and the part spent waiting for input."""

  def __init__(self, step: int):
    self.reset(step)

  def reset(self, step: int) -> None:
    """Starts a new interval at `step` (after a log or an evaluation)."""
    self._start, self._step, self._waited = time.perf_counter(), step, 0.0

  def next_batch(self, batches: Any) -> Any:
    """`next(batches)`, its wall time counted as input wait."""
    start = time.perf_counter()
    try:
      return next(batches)
    finally:
      self._waited += time.perf_counter() - start

  def interval(self, step: int, images_per_step: int) -> dict[str, float]:
    """The interval's metrics up to `step`; starts the next interval.

    Returns:
      `images_per_sec`, `step_time_s` (wall seconds per step) and
      `input_wait_frac` (in [0, 1]).
    """
    elapsed = max(time.perf_counter() - self._start, 1e-9)
    steps = max(step - self._step, 1)
    metrics = {"images_per_sec": images_per_step * steps / elapsed,
               "step_time_s": elapsed / steps,
               "input_wait_frac": min(self._waited / elapsed, 1.0)}
    self.reset(step)
    return metrics


class StepProfiler:
  """A `jax.profiler` trace of train steps `start+1 ... stop` (or nothing).

  `after_step(step, state)` is called before the first step (with the step
  the run starts from) and after each step is dispatched: at `start` it
  starts the trace, at `stop` it waits for `state` and ends it. A run that
  resumes past `start` writes no trace. `close()` ends a trace a stopped run
  left open.
  """

  def __init__(self, steps: tuple[int, int] | None, workdir: str,
               process: int | None = None):
    """`process`: in a multi-process run, this one's index (its trace goes
    to `WORKDIR/profile/process_<i>`)."""
    self.steps = steps
    self.directory = os.path.join(
        workdir, PROFILE_DIR,
        *([] if process is None else [f"process_{process}"]))
    self._active = False

  def after_step(self, step: int, state: Any) -> None:
    if self.steps is None:
      return
    start, stop = self.steps
    if step == start and not self._active:
      jax.block_until_ready(state)  # Earlier steps stay out of the trace.
      jax.profiler.start_trace(self.directory)
      self._active = True
    elif step == stop and self._active:
      jax.block_until_ready(state)
      self.close()

  def close(self) -> None:
    if self._active:
      jax.profiler.stop_trace()
      self._active = False
