"""Two `jax.distributed` processes on localhost train like one process.

Each process has one CPU device and reads one of the run's 2 data shards;
the reference is the session's 1-process, 1-device run that reads both
shards, so the global batches are identical and so must the losses be.
The two processes resume from a copy of the reference run's checkpoints
whose newest step is cut: both must reject it, process 0 alone sets it
aside, and only process 0 writes metrics and checkpoint files.
"""
import os
import shutil

import numpy as np
import pytest

import checkpoint_files
import train_harness as testing

pytestmark = pytest.mark.slow  # End-to-end runs.


@pytest.fixture(scope="module")
def two_process_run(reference_run, cache_dir, tmp_path_factory):
  """The two processes, resumed from the reference run's steps 8 and a cut
  step 10: `(workdir, [(stdout, stderr) of process 0, of process 1])`."""
  workdir = str(tmp_path_factory.mktemp("two_process"))
  for step in (8, 10):
    shutil.copytree(os.path.join(reference_run, "checkpoints", str(step)),
                    os.path.join(workdir, "checkpoints", str(step)))
  checkpoint_files.truncate_largest_file(os.path.join(workdir, "checkpoints", "10"))
  return workdir, testing.run_two_processes(workdir, cache_dir)


def test_two_processes_agree_on_a_damaged_step(two_process_run):
  """A failed read is the case where orbax quits while TensorStore still
  finishes the step's other reads: their late callbacks must not reach
  stderr (they once filled a pipe and hung both processes)."""
  workdir, outputs = two_process_run
  for _, stderr in outputs:
    assert "checkpoint step 10 is corrupt: process 0: it cannot be read" in (
        stderr)
    assert "; process 1: it cannot be read" in stderr
    assert "Event loop is closed" not in stderr
  assert "resumed from step 8 " in outputs[0][0]
  assert os.listdir(os.path.join(workdir, "checkpoints_corrupt")) == ["10"]


def test_two_processes_match_one_process(two_process_run, reference_run):
  losses = testing.train_losses(two_process_run[0])
  expected = testing.train_losses(reference_run)
  assert sorted(losses) == [9, 10, 11, 12]
  for step in losses:
    np.testing.assert_allclose(losses[step], expected[step], rtol=1e-5,
                               err_msg=f"step {step}")


def test_only_process_zero_writes(two_process_run):
  workdir, _ = two_process_run
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = f.readlines()
  # One record per step and the final eval: nothing written twice.
  assert len(lines) == 5
  assert testing.checkpoint_steps(workdir) == [8, 10, 12]
  state = testing.load_checkpoint(workdir, 12)
  assert int(state["step"]) == 12
