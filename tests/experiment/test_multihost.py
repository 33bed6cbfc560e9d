"""Two `jax.distributed` processes on localhost train like one process.

Each process has one CPU device and reads one of the run's 2 data shards;
the reference is the session's 1-process, 1-device run that reads both
shards, so the global batches are identical and so must the losses be.
Only process 0 writes the metrics and the checkpoint files.
"""
import os

import numpy as np
import pytest

import train_harness as testing


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  basetemp = str(tmp_path_factory.getbasetemp())
  cache_dir, _ = testing.session_dirs(basetemp)
  workdir = str(tmp_path_factory.mktemp("two_process"))
  testing.run_two_processes(workdir, cache_dir)
  return workdir


def test_two_processes_match_one_process(two_process_run, tmp_path_factory):
  reference = testing.reference_run(str(tmp_path_factory.getbasetemp()))
  losses = testing.train_losses(two_process_run)
  expected = testing.train_losses(reference)
  assert sorted(losses) == sorted(expected) == list(range(1, 13))
  for step, loss in expected.items():
    np.testing.assert_allclose(losses[step], loss, rtol=1e-5,
                               err_msg=f"step {step}")


def test_only_process_zero_writes(two_process_run):
  with open(os.path.join(two_process_run, "metrics.jsonl")) as f:
    lines = f.readlines()
  # One record per step and two evals: nothing written twice.
  assert len(lines) == 14
  assert testing.checkpoint_steps(two_process_run) == [2, 4, 6, 8, 10, 12]
  state = testing.load_checkpoint(two_process_run, 12)
  assert int(state["step"]) == 12
