"""SAM runs end to end: a resume in the middle of a SAM run, and the
digits default with SAM on.

The optimizer state holds SAM's (`optax.contrib.SAMState` around AGC and
momentum), so an exact resume has to bring it back; the subprocess runs are
the tiny digits run of `tests/train_harness.py` with `sam.rho` set.
"""
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from nfnets_jax.experiment import logging as run_logging
import train_harness as testing

pytestmark = pytest.mark.slow  # End-to-end runs.

SAM = ("--config.optimizer.sam.rho=0.05",)


# Suite time: opt-in (-m long); resuming bit-exact is run in
# tests/experiment/test_train.py, SAM's state and updates in tests/optim.
@pytest.mark.long
def test_a_sam_run_killed_after_step_4_resumes_bit_exact(cache_dir, tmp_path):
  """A SIGKILL leaves the finished checkpoints and nothing after them (the
  mechanics: tests/experiment/test_train.py); here the finished SAM run's
  workdir cut back to step 4 is that state, and its resume must end on the
  uninterrupted run's bits."""
  reference = str(tmp_path / "reference")
  proc = testing.run_train(reference, *SAM, devices=1, cache_dir=cache_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]

  workdir = str(tmp_path / "killed")
  shutil.copytree(reference, workdir)
  for step in testing.checkpoint_steps(workdir):
    if step > 4:
      shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
  proc = testing.run_train(workdir, *SAM, devices=1, cache_dir=cache_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from step 4" in proc.stdout + proc.stderr

  final = testing.load_checkpoint(workdir, 12)
  expected = testing.load_checkpoint(reference, 12)
  assert "opt_state" in expected and jax.tree.leaves(expected["opt_state"])
  jax.tree.map(np.testing.assert_array_equal, final, expected)
  logged = [(r["split"], r["step"]) for r in run_logging.read_metrics(workdir)]
  assert sorted(logged) == sorted(
      (r["split"], r["step"]) for r in run_logging.read_metrics(reference))


@pytest.mark.long  # A full-length run: ~1 minute (-m long).
def test_the_digits_default_with_sam_reaches_95_percent(tmp_path):
  """`nfnets-train --config configs/default.py --config.optimizer.sam.rho=
  0.05`, as a user runs it (no test compile flags)."""
  workdir = str(tmp_path / "sam")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["NFNETS_JAX_COMPILE_CACHE"] = "0"  # Nothing in the user's cache.
  proc = subprocess.run(
      [sys.executable, "-m", "nfnets_jax.cli.train",
       f"--config={testing.DEFAULT_CONFIG}", f"--workdir={workdir}", *SAM,
       "--config.logging.progress_bar=False"],
      cwd=testing.REPO, env=env, capture_output=True, text=True, timeout=600,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  final = run_logging.read_metrics(workdir, "eval")[-1]
  assert final["step"] == 449 and final["count"] == 360
  assert final["top1"] >= 0.95, final
