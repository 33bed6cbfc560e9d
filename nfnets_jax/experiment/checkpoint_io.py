"""Checkpoints with orbax: the train state plus every host's data position.

The state is saved unreplicated as host NumPy arrays (one copy, written by
process 0), so a checkpoint restores into any number of devices or hosts.
Orbax writes each step into a temporary directory and renames it when
complete, so a killed process leaves either the finished step or nothing;
`max_to_keep` prunes older steps.

Every step is verified. At save, a CRC32 of each array (over its dtype,
shape and bytes) and of the data positions goes into the step's `data`
item; at restore they are recomputed on what was read. A step that cannot be
read or fails the check is moved to `<directory>_corrupt/<step>` (kept,
never deleted) with a warning, and the next newest step is tried; every
process must accept a step before any uses it. A checkpoint whose arrays
(names, shapes, dtypes in its metadata) differ from the config's train state
is a config error, not corruption: that is checked before any array is read.

A save that fails (disk full, permission) stops the run: orbax writes in
the background, so each check point of the train loop asks whether the
queued save failed (`raise_if_save_failed`); the half-written step is
removed and `CheckpointSaveError` names the step, the path and the OS error,
while the previous steps stay as they were.
"""
from __future__ import annotations

import errno
import glob
import json
import logging
import os
import re
import shutil
import sys
import time
from typing import Any, NamedTuple
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from nfnets_jax.experiment import parallel

# The train state: a pytree of arrays (a `train_state.TrainState`).
TrainState = Any

# Verdicts of one process on one step, in order of precedence.
_MISMATCH, _CORRUPT = "mismatch", "corrupt"
_UNVERIFIED, _OK = "unverified", "ok"
_LIST_AT_MOST = 5  # Array names quoted in one message.
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for an unfinished step.
# A failed step's directory must stay gone this long to count as removed.
_SETTLE_S, _SETTLE_MAX_S = 0.5, 10.0


class CheckpointMismatchError(ValueError):
  """A checkpoint's arrays differ from the train state the config builds."""


class CorruptCheckpointError(RuntimeError):
  """A step cannot be read, or what was read fails its checksums."""

  def __init__(self, step: int, reason: str):
    self.step = step
    self.reason = reason
    super().__init__(f"checkpoint step {step} is corrupt: {reason}")


class NoIntactCheckpointError(RuntimeError):
  """Every checkpoint step failed its check: the run cannot resume."""

  def __init__(self, directory: str, failures: list[CorruptCheckpointError],
               set_aside_dir: str):
    self.failures = failures
    steps = ", ".join(str(f.step) for f in failures)
    reasons = "; ".join(f"step {f.step}: {f.reason}" for f in failures)
    super().__init__(
        f"no intact checkpoint in {directory}: steps {steps} were tried and "
        f"each failed ({reasons}). They were moved to {set_aside_dir} (kept, "
        "not deleted); running again with this workdir starts afresh.")


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written; the run stopped.

  Attributes:
    step: the step whose save failed.
    stopped_at: the step the run had reached when the failure was seen.
    newest: the newest intact step left in the directory (None if none).
  """

  def __init__(self, step: int, directory: str, reason: str,
               stopped_at: int, newest: int | None, removed: str | None):
    self.step, self.stopped_at, self.newest = step, stopped_at, newest
    kept = (f"the newest intact checkpoint is step {newest}; run again with "
            "this workdir to resume from it" if newest is not None else
            "no checkpoint is left; running again starts afresh")
    super().__init__(
        f"saving checkpoint step {step} in {directory} failed: {reason}. "
        f"Training stopped at step {stopped_at}; "
        + (f"the half-written step was removed ({removed}); " if removed
           else "") + kept + " once the cause is fixed.")


# What TensorStore puts in a failed write's message.
_OS_ERROR_CODE = re.compile(r"\[os_error_code='?(\d+)'?\]")
_FAILED_PATH = re.compile(r'(?:Failed writing|writing): "([^"]+)"')


def describe_write_error(err: BaseException) -> str:
  """`No space left on device (errno 28) writing PATH` from an orbax or
  TensorStore error; its first line when it carries no OS error code."""
  if isinstance(err, OSError) and err.errno:
    where = f" writing {err.filename}" if err.filename else ""
    return f"{os.strerror(err.errno)} (errno {err.errno}){where}"
  text = str(err)
  code = _OS_ERROR_CODE.search(text)
  if code is None:
    return _first_line(err)
  path = _FAILED_PATH.findall(text)
  number = int(code.group(1))
  name = errno.errorcode.get(number, "")
  return (f"{os.strerror(number)} ({name or 'errno ' + str(number)})"
          + (f" writing {path[-1]}" if path else ""))


class Restored(NamedTuple):
  """What `Checkpointer.restore_newest_intact` found.

  Attributes:
    state: the train state, NumPy leaves.
    process_states: the data position of each saving process.
    step: the step restored.
    verified: False for a checkpoint written without checksums.
    set_aside: the newer steps that failed, newest first.
  """
  state: TrainState
  process_states: list[Any]
  step: int
  verified: bool
  set_aside: list[CorruptCheckpointError]


def leaf_name(path: tuple[Any, ...]) -> str:
  """`params.linear.w`, `opt_state.0.trace.linear.w`: orbax's array names."""
  parts = []
  for key in path:
    for attr in ("name", "key", "idx"):  # GetAttr, Dict/FlattenedIndex, Seq.
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return ".".join(parts)


def named_leaves(tree: Any) -> dict[str, Any]:
  """`{leaf_name: leaf}` of a pytree (None and empty nodes have none)."""
  return {leaf_name(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def array_checksum(x: Any) -> int:
  """CRC32 of an array's dtype name, shape and bytes (C order)."""
  x = np.ascontiguousarray(x)
  header = zlib.crc32(f"{x.dtype.name}{x.shape}".encode())
  return zlib.crc32(x.reshape(-1).view(np.uint8), header)


def state_checksums(state: Any) -> dict[str, int]:
  """`{leaf_name: array_checksum}` of every array of `state`."""
  return {name: array_checksum(x) for name, x in named_leaves(state).items()}


def _json_checksum(obj: Any) -> int:
  return zlib.crc32(json.dumps(obj, sort_keys=True).encode())


def _quote(names: list[str]) -> str:
  more = len(names) - _LIST_AT_MOST
  return ", ".join(names[:_LIST_AT_MOST]) + (f" and {more} more"
                                              if more > 0 else "")


def _first_line(err: BaseException, limit: int = 300) -> str:
  text = (str(err).strip().splitlines() or [""])[0]
  text = text[:limit] + ("..." if len(text) > limit else "")
  return f"{type(err).__name__}: {text}"


def _is_late_io_callback(unraisable: Any) -> bool:
  """Whether an unraisable exception is a read or write finishing after
  orbax's event loop closed."""
  exc = unraisable.exc_value
  return (unraisable.object is None and isinstance(exc, RuntimeError)
          and str(exc) == "Event loop is closed")


def drop_late_io_callbacks() -> None:
  """Silences the reads and writes that finish after orbax gave up a step.

  When one array of a step cannot be read (or written: a full disk), orbax
  raises and closes its asyncio event loop while TensorStore still completes
  the step's other operations; each completion then fails to reach the
  closed loop and prints a bare "RuntimeError: Event loop is closed"
  traceback through `sys.unraisablehook`: hundreds per step, over 64 KB of
  stderr (enough to block a process whose stderr is a pipe nobody reads
  yet). Called when a `Checkpointer` is made, it wraps the hook, once per
  process, to drop exactly those; every other unraisable exception goes to
  the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, "drops_late_io_callbacks", False):
    return

  def hook(unraisable: Any) -> None:
    if not _is_late_io_callback(unraisable):
      previous(unraisable)

  hook.drops_late_io_callbacks = True
  sys.unraisablehook = hook


def verify(state: Any, data: Any, step: int, step_dir: str) -> bool:
  """Checks a restored step against the checksums saved with it.

  Args:
    state: the restored train state (NamedTuple or dict tree).
    data: the restored `data` item (`process_states`, `checksums`).
    step: the step number the checkpoint is filed under.
    step_dir: its directory (for the messages).

  Returns:
    True if verified, False if the step has no checksums (written before
    they existed).

  Raises:
    CorruptCheckpointError: naming the arrays that differ.
  """
  if not isinstance(data, dict) or "process_states" not in data:
    raise CorruptCheckpointError(
        step, f"{step_dir}/data holds no data positions")
  saved_step = named_leaves(state).get("step")
  if saved_step is None or int(np.asarray(saved_step)) != step:
    raise CorruptCheckpointError(
        step, f"{step_dir}/state holds step {saved_step}")
  checksums = data.get("checksums")
  if checksums is None:
    return False
  if not isinstance(checksums, dict) or not isinstance(
      checksums.get("state"), dict):
    raise CorruptCheckpointError(
        step, f"the checksum record in {step_dir}/data is malformed")
  saved, got = checksums["state"], state_checksums(state)
  bad = sorted(name for name in saved.keys() | got.keys()
               if saved.get(name) != got.get(name))
  if bad:
    raise CorruptCheckpointError(
        step, f"checksum mismatch in {len(bad)} array(s): {_quote(bad)} "
        f"(read from {step_dir}/state)")
  if _json_checksum(data["process_states"]) != checksums.get(
      "process_states"):
    raise CorruptCheckpointError(
        step, f"checksum mismatch in the data positions ({step_dir}/data)")
  return True


def _array_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """`{leaf_name: (shape, dtype name)}` of arrays or orbax array metadata."""
  return {name: (tuple(x.shape), np.dtype(x.dtype).name)
          for name, x in named_leaves(tree).items()}


def describe_mismatch(saved: dict[str, tuple[tuple[int, ...], str]],
                      wanted: dict[str, tuple[tuple[int, ...], str]]) -> str:
  """How a checkpoint's `{name: (shape, dtype)}` differs from the config's."""
  parts = []
  differ = sorted(k for k in saved.keys() & wanted.keys()
                  if saved[k] != wanted[k])
  if differ:
    fmt = lambda s: f"{s[1]}{list(s[0])}"
    parts.append("shape or dtype differs: " + _quote(
        [f"{k} (checkpoint {fmt(saved[k])}, config {fmt(wanted[k])})"
         for k in differ]))
  only_saved = sorted(saved.keys() - wanted.keys())
  if only_saved:
    parts.append(f"{len(only_saved)} array(s) only in the checkpoint: "
                 + _quote(only_saved))
  only_wanted = sorted(wanted.keys() - saved.keys())
  if only_wanted:
    parts.append(f"{len(only_wanted)} array(s) only in the config's state: "
                 + _quote(only_wanted))
  return "; ".join(parts)


def agree(verdicts: list[list[str]]) -> tuple[str, str]:
  """One verdict on a step from every process's `[kind, message]`.

  A step is accepted only if every process read and verified it; a config
  mismatch anywhere wins over corruption.
  """
  for kind in (_MISMATCH, _CORRUPT, _UNVERIFIED):
    messages = [(i, m) for i, (k, m) in enumerate(verdicts) if k == kind]
    if not messages:
      continue
    if len(verdicts) == 1 or kind != _CORRUPT:
      return kind, messages[0][1]
    return kind, "; ".join(f"process {i}: {m}" for i, m in messages)
  return _OK, ""


class Checkpointer:
  """Saves and restores `(TrainState, data positions)` under `directory`."""

  def __init__(self, directory: str, max_to_keep: int, *,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.set_aside_dir = self.directory + "_corrupt"
    self._queued: int | None = None  # Saved in the background, unconfirmed.
    self._failed = False  # A save failed and was reported.
    drop_late_io_callbacks()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            enable_async_checkpointing=async_save),
        # Handlers by name, so a step's metadata can be read before it is
        # restored.
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    """The newest complete step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: TrainState, data_states: list[Any]
           ) -> None:
    """Saves `state` (host NumPy), the data positions and their checksums.

    Every process must call this (orbax synchronizes them); only process 0
    writes. A step that already exists is left as it is.

    Raises:
      CheckpointSaveError: this save, or the one queued before it, failed.
    """
    self.wait(step)  # Orbax would wait for the previous save anyway.
    if step in self._manager.all_steps():
      return
    checksums = {"algorithm": "crc32", "state": state_checksums(state),
                 "process_states": _json_checksum(data_states)}
    # Shapes and dtypes too, so that a restore can tell a different config
    # from damage by reading one JSON file (orbax's array metadata goes
    # through TensorStore, which has hung in multi-process runs).
    specs = {name: [list(shape), dtype]
             for name, (shape, dtype) in _array_specs(state).items()}
    self._queued = step
    error = None
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave({"process_states": data_states,
                                  "checksums": checksums,
                                  "array_specs": specs})))
    except Exception as err:  # pylint: disable=broad-except
      error = describe_write_error(err)  # Failed before the background.
    self._report_failure(error, step)
    logging.info("checkpoint of step %d queued in %s", step, self.directory)

  def raise_if_save_failed(self, at_step: int) -> None:
    """Raises if the save queued last has failed; never blocks on it.

    Every process must call this (process 0's answer is everyone's).

    Raises:
      CheckpointSaveError: naming the step, path and OS error.
    """
    error = None
    if (self._queued is not None and parallel.is_host0()
        and not self._manager.is_saving_in_progress()):
      error = self._finish_queued()
    self._report_failure(error, at_step)

  def wait(self, at_step: int | None = None) -> None:
    """Blocks until the queued save is on disk.

    Every process must call this.

    Raises:
      CheckpointSaveError: it failed (`at_step`: where the run stopped,
        default the failed step).
    """
    error = self._finish_queued() if self._queued is not None else None
    self._report_failure(error, self._queued if at_step is None
                         else at_step)

  def _finish_queued(self) -> str | None:
    """Waits for the queued save; its error, or None once it is on disk."""
    try:
      self._manager.wait_until_finished()
    except Exception as err:  # pylint: disable=broad-except
      return describe_write_error(err)
    if parallel.is_host0() and self._queued not in self._manager.all_steps():
      return "the step was not finalized (see orbax's log with --verbose)"
    self._queued = None
    return None

  def _report_failure(self, error: str | None, at_step: int | None) -> None:
    """Every process raises if process 0 saw the queued save fail."""
    if self._queued is None and error is None and jax.process_count() == 1:
      return
    error = parallel.allgather_json(error)[0]
    if error is None:
      return
    step, self._queued, self._failed = self._queued, None, True
    removed = self._remove_unfinished(step) if parallel.is_host0() else None
    self._manager.reload()
    raise CheckpointSaveError(
        step, self.directory, error, step if at_step is None else at_step,
        self._manager.latest_step(), removed)

  def _remove_unfinished(self, step: int) -> str | None:
    """Deletes the failed step's temporary directory (half written).

    Orbax reports the first failed write while TensorStore still completes
    the step's other writes, which recreate the directory; so it is removed
    again until it has stayed gone for `_SETTLE_S` (at most `_SETTLE_MAX_S`).
    """
    pattern = os.path.join(self.directory, f"{step}{_TMP_SUFFIX}*")
    removed = set()
    deadline = time.monotonic() + _SETTLE_MAX_S
    gone_since = None
    while time.monotonic() < deadline:
      paths = glob.glob(pattern)
      if paths:
        removed.update(paths)
        gone_since = None
        for path in paths:
          shutil.rmtree(path, ignore_errors=True)
      elif gone_since is None:
        gone_since = time.monotonic()
      elif time.monotonic() - gone_since >= _SETTLE_S:
        break
      time.sleep(0.05)
    return ", ".join(sorted(removed)) or None

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _check_fits(self, template: TrainState, step: int) -> None:
    """Compares the step's saved array metadata with `template`.

    Raises:
      CheckpointMismatchError: the arrays differ (a different config).
      CorruptCheckpointError: the metadata cannot be read.
    """
    data_file = os.path.join(self._step_dir(step), "data", "metadata")
    try:
      with open(data_file) as f:
        specs = json.load(f).get("array_specs")
      if specs is not None:
        saved = {name: (tuple(shape), dtype)
                 for name, (shape, dtype) in specs.items()}
      else:  # Written before the specs were saved: orbax's metadata.
        data_file = os.path.join(self._step_dir(step), "state", "_METADATA")
        metadata = self._manager.item_metadata(step)["state"]
        saved = _array_specs(getattr(metadata, "tree", metadata))
    except Exception as err:  # pylint: disable=broad-except
      raise CorruptCheckpointError(
          step, f"its metadata ({data_file}) cannot be read: "
          f"{_first_line(err)}") from err
    wanted = _array_specs(template)
    if saved != wanted:
      raise CheckpointMismatchError(
          f"checkpoint step {step} in {self.directory} does not fit this "
          "config's train state (were the model, optimizer, EMA or AGC "
          "statistics settings changed since it was written? use a new "
          f"--workdir to start afresh): {describe_mismatch(saved, wanted)}")

  def _read(self, template: TrainState, step: int
            ) -> tuple[TrainState, list[Any], bool]:
    """Restores and verifies one step: `(state, positions, verified)`.

    Raises:
      CheckpointMismatchError: the step holds a different train state.
      CorruptCheckpointError: it cannot be read or fails its checksums.
    """
    self._check_fits(template, step)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(template),
          data=ocp.args.JsonRestore()))
    # The fit was checked above, so any failure here is of the files (orbax
    # raises ValueError, OSError, RuntimeError... for a damaged one).
    except Exception as err:  # pylint: disable=broad-except
      raise CorruptCheckpointError(
          step, f"it cannot be read: {_first_line(err)}") from err
    state, data = restored["state"], restored["data"]
    verified = verify(state, data, step, self._step_dir(step))
    return state, data["process_states"], verified

  def restore(self, template: TrainState, step: int | None = None
              ) -> tuple[TrainState, list[Any]]:
    """Restores a step shaped like `template`, verified.

    Without `step`, the newest intact step (see `restore_newest_intact`);
    a given step is only checked (CorruptCheckpointError if it fails).

    Returns:
      `(state with NumPy leaves, [data position of each saving process])`.
    """
    if step is None:
      restored = self.restore_newest_intact(template)
      return restored.state, restored.process_states
    state, positions, _ = self._read(template, step)
    return state, positions

  def restore_newest_intact(self, template: TrainState) -> Restored:
    """The newest step that every process reads and verifies.

    Newer steps that fail are moved to `set_aside_dir` (by process 0) with
    a warning. Every process must call this.

    Raises:
      FileNotFoundError: there is no checkpoint.
      CheckpointMismatchError: a step holds a different train state.
      NoIntactCheckpointError: every step failed.
    """
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    failures = []
    for step in steps:
      result, verdict = None, [_OK, ""]
      try:
        result = self._read(template, step)
        if not result[2]:
          verdict = [_UNVERIFIED, ""]
      except CheckpointMismatchError as err:
        verdict = [_MISMATCH, str(err)]
      except CorruptCheckpointError as err:
        verdict = [_CORRUPT, err.reason]
      kind, message = agree(parallel.allgather_json(verdict))
      if kind == _MISMATCH:
        raise CheckpointMismatchError(message)
      if kind == _CORRUPT:
        failure = CorruptCheckpointError(step, message)
        dest = self._set_aside(step)
        logging.warning("%s; moved it to %s (kept, not deleted)%s", failure,
                        dest, "" if step == steps[-1] else
                        "; trying the next newest step")
        failures.append(failure)
        continue
      if kind == _UNVERIFIED:
        logging.warning(
            "checkpoint step %d in %s has no checksums (written before they "
            "were saved): restored unverified", step, self.directory)
      state, positions, _ = result
      return Restored(state, positions, step, kind == _OK, failures)
    raise NoIntactCheckpointError(self.directory, failures,
                                  self.set_aside_dir)

  def _set_aside(self, step: int) -> str:
    """Moves a step out of orbax's sight; returns where (same everywhere)."""
    moved = {"dest": None, "error": None}
    if parallel.is_host0():
      dest = os.path.join(self.set_aside_dir, str(step))
      n = 1
      while os.path.exists(dest):  # Set aside before: keep both.
        dest = os.path.join(self.set_aside_dir, f"{step}.{n}")
        n += 1
      try:
        os.makedirs(self.set_aside_dir, exist_ok=True)
        os.rename(self._step_dir(step), dest)
        moved["dest"] = dest
      except OSError as err:  # Reported by every process, below.
        moved["error"] = f"{type(err).__name__}: {err}"
    # Also the barrier: no process reloads before process 0 has moved it.
    moved = parallel.allgather_json(moved)[0]
    if moved["error"]:
      raise OSError(f"cannot move corrupt checkpoint step {step} out of "
                    f"{self.directory}: {moved['error']}")
    self._manager.reload()
    return moved["dest"]

  def close(self) -> None:
    """Waits for the queued save and releases orbax's threads.

    After a reported save failure, orbax's own errors are not raised again.
    """
    try:
      if not self._failed:
        self.wait()
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except
        if not self._failed:
          raise


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

  Raises:
    CorruptCheckpointError: the step fails its checksums.
  """
  manager = ocp.CheckpointManager(os.path.abspath(directory))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
  finally:
    manager.close()
  state = jax.tree.map(np.asarray, restored["state"])
  verify(state, restored["data"], step, os.path.join(directory, str(step)))
  return state
