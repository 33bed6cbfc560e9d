"""Two `jax.distributed` processes on localhost train like one process.

Each process has one CPU device and reads one of the run's 2 data shards;
the reference is the session's 1-process, 1-device run that reads both
shards, so the global batches are identical and so must the losses be.
Only process 0 writes the metrics and the checkpoint files.
"""
import os
import subprocess

import numpy as np
import portpicker
import pytest

import train_harness as testing


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  basetemp = str(tmp_path_factory.getbasetemp())
  cache_dir, _ = testing.session_dirs(basetemp)
  workdir = str(tmp_path_factory.mktemp("two_process"))
  port = portpicker.pick_unused_port()
  procs = [
      subprocess.Popen(
          testing.train_command(
              workdir, "--config.distributed.initialize=True",
              f"--config.distributed.coordinator_address=127.0.0.1:{port}",
              "--config.distributed.num_processes=2",
              f"--config.distributed.process_id={i}"),
          cwd=testing.REPO, env=testing.subprocess_env(1, cache_dir),
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=400))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for proc, (_, stderr) in zip(procs, outputs):
    assert proc.returncode == 0, stderr[-4000:]
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
