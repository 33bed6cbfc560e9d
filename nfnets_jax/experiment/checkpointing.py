"""Checkpoints with orbax: the train state plus every host's data position.

The state is saved unreplicated as host NumPy arrays (one copy, written by
process 0), so a checkpoint restores into any number of devices or hosts.
Orbax writes each step into a temporary directory and renames it when
complete, so a killed process leaves either the finished step or nothing;
`max_to_keep` prunes older steps.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from nfnets_jax.experiment.train_state import TrainState


class Checkpointer:
  """Saves and restores `(TrainState, data positions)` under `directory`."""

  def __init__(self, directory: str, max_to_keep: int, *,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    """The newest complete step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: TrainState, data_states: list[Any]
           ) -> None:
    """Saves `state` (host NumPy) and the per-process data positions.

    Every process must call this (orbax synchronizes them); only process 0
    writes. A step that already exists is left as it is.
    """
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({"process_states": data_states})))
    logging.info("checkpoint of step %d queued in %s", step, self.directory)

  def restore(self, template: TrainState, step: int | None = None
              ) -> tuple[TrainState, list[Any]]:
    """Restores a step (default the newest) shaped like `template`.

    Returns:
      `(state with NumPy leaves, [data position of each saving process])`.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(template),
          data=ocp.args.JsonRestore()))
    except ValueError as err:
      raise ValueError(
          f"checkpoint step {step} in {self.directory} does not fit this "
          "config's train state (were the model, optimizer, EMA or AGC "
          "statistics settings changed since it was written? use a new "
          f"--workdir to start afresh): {err}") from err
    return restored["state"], restored["data"]["process_states"]

  def wait(self) -> None:
    """Blocks until queued saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def checkpoint_steps(directory: str) -> list[int]:
  """Finished checkpoint steps under `directory` (orbax names them by step)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def read_state(directory: str, step: int | None = None) -> dict[str, Any]:
  """A checkpoint's train state as a tree of NumPy arrays, without a template.

  Args:
    directory: a run's `checkpoints/` directory.
    step: the step to read (default the newest).

  Returns:
    The saved `TrainState` fields as a dict (`params`, `model_state`,
    `opt_state`, `ema_params`, ...), leaves as NumPy arrays.
  """
  manager = ocp.CheckpointManager(os.path.abspath(directory))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))
  finally:
    manager.close()
  return jax.tree.map(np.asarray, restored["state"])
