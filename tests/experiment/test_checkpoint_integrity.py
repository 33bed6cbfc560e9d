"""Verified checkpoints: corrupt steps are set aside, never trained on.

Unit tests write tiny train states with `Checkpointer` and damage them as a
disk would (bytes flipped inside an array, a file cut short, a data
position changed); end-to-end tests damage copies of the session's
reference run (the tiny digits run of `tests/train_harness.py`, a
checkpoint every 2 steps) and resume it to step 12, which must end bit for
bit where the uninterrupted run ended.
"""
import json
import logging
import os
import shutil
import sys
import types

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from nfnets_jax.experiment import checkpoint_io
from nfnets_jax.experiment import train_state as ts
import checkpoint_files
import train_harness as testing

# A failed orbax read leaves coroutines that are never awaited.
pytestmark = [
    pytest.mark.filterwarnings(
        "ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings(
        "ignore:coroutine .* was never awaited:RuntimeWarning")]


def _state(step: int, width: int = 3000) -> ts.TrainState:
  """A tiny train state whose arrays differ by step and from each other.

  `model_state.noise.u` is 8 KB of random bytes: compression cannot shrink
  it, so orbax stores it verbatim and a test can find and damage it.
  """
  rng = np.random.default_rng(step)
  params = {"lin": {"w": rng.normal(size=(8, 16)).astype(np.float32),
                    "b": rng.normal(size=(width,)).astype(np.float32)}}
  tx = optax.sgd(0.1, momentum=0.9)
  return ts.TrainState(
      params=params,
      model_state={"noise": {"u": rng.integers(0, 256, 8192, np.uint8)}},
      opt_state=jax.tree.map(lambda x: x + 1.0, tx.init(params)),
      ema_params=jax.tree.map(lambda x: x * 0.5, params), ema_model_state={},
      step=np.asarray(step, np.int32),
      rng=np.asarray(jax.random.PRNGKey(3)))


def _noise(step: int) -> np.ndarray:
  return _state(step).model_state["noise"]["u"]


def _positions(step: int) -> list:
  return [{"0": {"next_index": 16 * step}, "1": {"next_index": 16 * step}}]


def _write(directory: str, steps=(1, 2, 3)) -> None:
  ckpt = checkpoint_io.Checkpointer(directory, 10, async_save=False)
  for step in steps:
    ckpt.save(step, _state(step), _positions(step))
  ckpt.close()





def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _restore_newest(directory, template=None):
  ckpt = checkpoint_io.Checkpointer(directory, 10, async_save=False)
  try:
    return ckpt.restore_newest_intact(template or _state(0)), ckpt.all_steps()
  finally:
    ckpt.close()


def test_intact_steps_round_trip_verified(tmp_path):
  _write(str(tmp_path))
  restored, steps = _restore_newest(str(tmp_path))
  assert (restored.step, restored.verified, restored.set_aside) == (3, True,
                                                                    [])
  assert steps == [1, 2, 3]
  _assert_trees_equal(restored.state, _state(3))
  assert restored.process_states == _positions(3)
  _assert_trees_equal(checkpoint_io.read_state(str(tmp_path), 3),
                      checkpoint_io.read_state(str(tmp_path)))


def test_flipped_bytes_set_step_aside_and_restore_previous(tmp_path,
                                                           caplog):
  directory = str(tmp_path / "checkpoints")
  _write(directory)
  checkpoint_files.flip_array_bytes(os.path.join(directory, "3"), _noise(3))
  with caplog.at_level(logging.WARNING):
    restored, steps = _restore_newest(directory)
  assert restored.step == 2 and restored.verified
  _assert_trees_equal(restored.state, _state(2))
  assert restored.process_states == _positions(2)
  (failure,) = restored.set_aside
  assert failure.step == 3
  assert "checksum mismatch in 1 array(s): model_state.noise.u" in (
      failure.reason)
  assert "checkpoint step 3 is corrupt" in caplog.text
  assert "model_state.noise.u" in caplog.text
  # Moved out of orbax's sight, kept whole; the other steps stay.
  assert steps == [1, 2]
  assert checkpoint_io.checkpoint_steps(directory) == [1, 2]
  assert os.path.isdir(str(tmp_path / "checkpoints_corrupt" / "3" / "state"))
  # The resumed run writes step 3 again; set aside again, both are kept.
  _write(directory, steps=(3,))
  checkpoint_files.flip_array_bytes(os.path.join(directory, "3"), _noise(3))
  restored, _ = _restore_newest(directory)
  assert restored.step == 2
  assert sorted(os.listdir(tmp_path / "checkpoints_corrupt")) == ["3",
                                                                  "3.1"]


def test_truncated_file_sets_step_aside(tmp_path, caplog):
  directory = str(tmp_path)
  _write(directory)
  checkpoint_files.truncate_largest_file(os.path.join(directory, "3"))
  with caplog.at_level(logging.WARNING):
    restored, steps = _restore_newest(directory)
  assert restored.step == 2 and steps == [1, 2]
  _assert_trees_equal(restored.state, _state(2))
  (failure,) = restored.set_aside
  assert failure.step == 3
  # Either orbax failed to read it, or what it read fails the checksums.
  assert ("cannot be read" in failure.reason
          or "checksum mismatch" in failure.reason), failure.reason
  assert "checkpoint step 3 is corrupt" in caplog.text


def test_changed_data_position_is_corrupt(tmp_path):
  directory = str(tmp_path)
  _write(directory)
  path = os.path.join(directory, "3", "data", "metadata")
  with open(path) as f:
    data = json.load(f)
  data["process_states"][0]["1"]["next_index"] += 1
  with open(path, "w") as f:
    json.dump(data, f)
  restored, _ = _restore_newest(directory)
  assert restored.step == 2
  assert "checksum mismatch in the data positions" in (
      restored.set_aside[0].reason)


def test_all_steps_corrupt_raise_no_intact_checkpoint(tmp_path):
  directory = str(tmp_path / "checkpoints")
  _write(directory, steps=(1, 2))
  checkpoint_files.flip_array_bytes(os.path.join(directory, "2"), _noise(2))
  checkpoint_files.truncate_largest_file(os.path.join(directory, "1"))
  with pytest.raises(checkpoint_io.NoIntactCheckpointError) as info:
    _restore_newest(directory)
  message = str(info.value)
  assert "no intact checkpoint" in message
  assert "steps 2, 1 were tried" in message
  assert "step 2: checksum mismatch in 1 array(s): model_state.noise.u" in (
      message)
  assert [f.step for f in info.value.failures] == [2, 1]
  assert checkpoint_io.checkpoint_steps(directory) == []
  assert sorted(os.listdir(tmp_path / "checkpoints_corrupt")) == ["1", "2"]


def test_given_step_is_checked_not_set_aside(tmp_path):
  directory = str(tmp_path)
  _write(directory)
  checkpoint_files.flip_array_bytes(os.path.join(directory, "2"), _noise(2))
  ckpt = checkpoint_io.Checkpointer(directory, 10, async_save=False)
  try:
    with pytest.raises(checkpoint_io.CorruptCheckpointError,
                       match="model_state.noise.u"):
      ckpt.restore(_state(0), step=2)
    state, positions = ckpt.restore(_state(0))  # The newest: step 3.
    assert int(state.step) == 3 and positions == _positions(3)
    assert ckpt.all_steps() == [1, 2, 3]
  finally:
    ckpt.close()
  with pytest.raises(checkpoint_io.CorruptCheckpointError,
                     match="step 2 is corrupt"):
    checkpoint_io.read_state(directory, 2)


def test_different_config_is_a_mismatch_not_corruption(tmp_path):
  directory = str(tmp_path)
  _write(directory)
  with pytest.raises(checkpoint_io.CheckpointMismatchError) as info:
    _restore_newest(directory, template=_state(0, width=100))
  message = str(info.value)
  assert "does not fit this config's train state" in message
  assert "params.lin.b (checkpoint float32[3000], config float32[100])" in (
      message)
  no_ema = _state(0)._replace(ema_params=None)
  with pytest.raises(checkpoint_io.CheckpointMismatchError,
                     match="2 array.s. only in the checkpoint: "
                     "ema_params.lin.b, ema_params.lin.w"):
    _restore_newest(directory, template=no_ema)
  assert checkpoint_io.checkpoint_steps(directory) == [1, 2, 3]
  assert not os.path.exists(str(tmp_path) + "_corrupt")


def test_checkpoint_without_checksums_restores_unverified(tmp_path, caplog):
  """A step written before checksums existed (the old save, verbatim)."""
  directory = str(tmp_path)
  manager = ocp.CheckpointManager(directory)
  manager.save(4, args=ocp.args.Composite(
      state=ocp.args.StandardSave(_state(4)),
      data=ocp.args.JsonSave({"process_states": _positions(4)})))
  manager.wait_until_finished()
  manager.close()
  with caplog.at_level(logging.WARNING):
    restored, _ = _restore_newest(directory)
  assert restored.step == 4 and not restored.verified
  _assert_trees_equal(restored.state, _state(4))
  assert "checkpoint step 4" in caplog.text
  assert "restored unverified" in caplog.text


def test_every_process_must_verify_a_step():
  ok, unverified = ["ok", ""], ["unverified", ""]
  corrupt = ["corrupt", "it cannot be read: OSError: x"]
  mismatch = ["mismatch", "does not fit"]
  assert checkpoint_io.agree([ok, ok]) == ("ok", "")
  assert checkpoint_io.agree([ok, unverified]) == ("unverified", "")
  assert checkpoint_io.agree([ok, corrupt]) == (
      "corrupt", "process 1: it cannot be read: OSError: x")
  assert checkpoint_io.agree([corrupt]) == ("corrupt", corrupt[1])
  assert checkpoint_io.agree([corrupt, mismatch]) == ("mismatch",
                                                      "does not fit")


def test_checksum_covers_dtype_shape_and_bytes():
  x = np.arange(6, dtype=np.float32)
  crc = checkpoint_io.array_checksum(x)
  assert checkpoint_io.array_checksum(x.copy()) == crc
  assert checkpoint_io.array_checksum(x.reshape(2, 3)) != crc
  assert checkpoint_io.array_checksum(x.view(np.int32)) != crc
  y = x.copy()
  y[3] = np.nextafter(y[3], np.float32(np.inf))  # One bit.
  assert checkpoint_io.array_checksum(y) != crc
  # Column-major input is checksummed in C order, as orbax reads it back.
  assert checkpoint_io.array_checksum(np.asfortranarray(x.reshape(2, 3))) == (
      checkpoint_io.array_checksum(x.reshape(2, 3)))


def test_late_read_callbacks_dropped_other_unraisables_kept(monkeypatch):
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  checkpoint_io.drop_late_io_callbacks()
  checkpoint_io.drop_late_io_callbacks()  # Wraps once.
  late = RuntimeError("Event loop is closed")
  sys.unraisablehook(types.SimpleNamespace(
      exc_type=RuntimeError, exc_value=late, exc_traceback=None,
      err_msg=None, object=None))
  assert not seen

  class RaisesInDel:
    def __del__(self):
      raise RuntimeError("Event loop is closed")

  RaisesInDel()  # A real unraisable exception, from an object: kept.
  other = ValueError("unrelated")
  sys.unraisablehook(types.SimpleNamespace(
      exc_type=ValueError, exc_value=other, exc_traceback=None,
      err_msg=None, object=None))
  assert [u.exc_value for u in seen][-1] is other
  assert len(seen) == 2 and "RaisesInDel.__del__" in repr(seen[0].object)


def test_step_that_cannot_be_moved_stops_the_restore(tmp_path):
  directory = str(tmp_path / "checkpoints")
  _write(directory)
  checkpoint_files.flip_array_bytes(os.path.join(directory, "3"), _noise(3))
  (tmp_path / "checkpoints_corrupt").write_text("a file, not a directory")
  with pytest.raises(OSError, match="cannot move corrupt checkpoint step 3"):
    _restore_newest(directory)
  assert checkpoint_io.checkpoint_steps(directory) == [1, 2, 3]


# End to end: damaged copies of the reference run's checkpoints.


def _copy_checkpoints(reference_run, workdir, steps):
  """The reference run's checkpoints of `steps` in a fresh workdir."""
  for step in steps:
    shutil.copytree(os.path.join(reference_run, "checkpoints", str(step)),
                    os.path.join(workdir, "checkpoints", str(step)))
  return os.path.join(workdir, "checkpoints")


@pytest.mark.slow
def test_corrupt_newest_steps_resume_previous_bit_exact(
    reference_run, cache_dir, tmp_path):
  """The newest step has 4 KB inverted, the one before a file cut in half:
  the run warns about each, sets both aside, resumes from the step before
  them and ends bit for bit where the uninterrupted run ended."""
  workdir = str(tmp_path / "run")
  checkpoints = _copy_checkpoints(reference_run, workdir, (4, 6, 8))
  checkpoint_files.flip_in_largest_file(os.path.join(checkpoints, "8"))
  checkpoint_files.truncate_largest_file(os.path.join(checkpoints, "6"))
  proc = testing.run_train(workdir, devices=1, cache_dir=cache_dir)
  assert proc.returncode == 0, proc.stderr[-4000:]
  for step in (8, 6):
    assert f"checkpoint step {step} is corrupt" in proc.stderr
    assert os.path.isdir(os.path.join(workdir, "checkpoints_corrupt",
                                      str(step), "state"))
  assert "resumed from step 4 " in proc.stdout
  assert sorted(testing.train_losses(workdir)) == list(range(5, 13))
  _assert_trees_equal(testing.load_checkpoint(workdir, 12),
                      testing.load_checkpoint(reference_run, 12))


@pytest.mark.slow
def test_all_steps_corrupt_exit_2(reference_run, cache_dir, tmp_path):
  workdir = str(tmp_path / "run")
  checkpoints = _copy_checkpoints(reference_run, workdir, (2, 4))
  checkpoint_files.flip_in_largest_file(os.path.join(checkpoints, "4"))
  checkpoint_files.truncate_largest_file(os.path.join(checkpoints, "2"))
  proc = testing.run_train(workdir, devices=1, cache_dir=cache_dir)
  assert proc.returncode == 2, proc.stderr[-4000:]
  # One message, no traceback of it, nor of reads finishing after it.
  assert proc.stderr.count("nfnets-train: ") == 1
  assert "Event loop is closed" not in proc.stderr
  message = proc.stderr.split("nfnets-train: ")[1]
  assert message.startswith("no intact checkpoint in ")
  assert "steps 4, 2 were tried" in message
  assert "NoIntactCheckpointError" not in proc.stderr
  assert testing.checkpoint_steps(workdir) == []
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints_corrupt"))) == [
      "2", "4"]
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))
