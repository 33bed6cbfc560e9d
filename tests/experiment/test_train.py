"""End-to-end tests of the training loop (`nfnets-train`) on CPU.

Every run is a subprocess (the device count is fixed when JAX starts) of the
tiny digits run of `tests/train_harness.py`: 12 steps of 16 images,
a checkpoint every 2 steps. One 1-device run is the reference; the others
must reproduce its per-step losses (other device counts) or its final state
bit for bit (resumed after SIGKILL and after Ctrl-C).
"""
import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from nfnets_jax.experiment import logging as run_logging
import train_harness as testing

pytestmark = pytest.mark.slow  # End-to-end runs.


def _check_ok(proc):
  assert proc.returncode == 0, proc.stderr[-4000:]


def _assert_losses_match(losses, reference, steps, rtol=1e-5):
  assert sorted(losses) == sorted(steps), sorted(losses)
  for step in steps:
    np.testing.assert_allclose(losses[step], reference[step], rtol=rtol,
                               err_msg=f"loss of step {step}")


def test_reference_run_learns_and_logs(reference_run):
  losses = testing.train_losses(reference_run)
  assert sorted(losses) == list(range(1, 13))
  assert losses[12] < losses[1]  # The learning rate is high enough to move.
  assert testing.checkpoint_steps(reference_run) == [2, 4, 6, 8, 10, 12]
  evals = run_logging.read_metrics(reference_run, "eval")
  assert [e["step"] for e in evals] == [6, 12]  # On schedule and at the end.
  for final in evals:
    assert final["count"] == 360
    for key in ("top1", "top5", "loss", "ema_top1", "ema_top5", "ema_loss"):
      assert np.isfinite(final[key]), key
  train = run_logging.read_metrics(reference_run, "train")[-1]
  for key in ("loss", "top1", "top5", "learning_rate", "images_per_sec",
              "grad_norm", "step_time_s"):
    assert key in train, key
  assert 0.0 <= train["input_wait_frac"] <= 1.0
  # --config.logging.profile_steps=2,4: one jax.profiler trace, for Perfetto.
  traces = [f for _, _, files in os.walk(os.path.join(reference_run,
                                                       "profile"))
            for f in files if f.endswith(".trace.json.gz")]
  assert len(traces) == 1, traces
  assert 0.0 <= train["agc_clip_frac"] <= 1.0  # AGC statistics are logged.
  events = os.listdir(os.path.join(reference_run, "tensorboard"))
  assert len(events) == 1 and events[0].startswith("events.out.tfevents")


def test_one_device_checkpoint_resumes_on_four_devices_alike(
    reference_run, cache_dir, tmp_path):
  """The reference run's step-6 checkpoint resumes on 4 devices: the same
  global batches split over 4 devices give the same per-step losses."""
  workdir = str(tmp_path / "resharded")
  shutil.copytree(os.path.join(reference_run, "checkpoints"),
                  os.path.join(workdir, "checkpoints"))
  for step in (8, 10, 12):
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
  proc = testing.run_train(workdir, devices=4, cache_dir=cache_dir,
                           extra_env={"JAX_LOG_COMPILES": "1"})
  _check_ok(proc)
  # pmap compiled once for training and once for evaluation: the sharded
  # inputs did not trigger the second-call recompilation.
  assert proc.stderr.count("Compiling jit(_fun)") == 2, proc.stderr[-3000:]
  _assert_losses_match(testing.train_losses(workdir),
                       testing.train_losses(reference_run), range(7, 13))
  final = testing.load_checkpoint(workdir, 12)
  expected = testing.load_checkpoint(reference_run, 12)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               final["params"], expected["params"])


def test_sigkill_and_ctrl_c_resume_bit_exact(reference_run, cache_dir,
                                             tmp_path):
  """SIGKILL after the 2nd checkpoint, resume, Ctrl-C, resume: the final
  state equals the uninterrupted run's bit for bit."""
  workdir = str(tmp_path / "interrupted")
  proc = testing.start_train(workdir, devices=1, cache_dir=cache_dir)
  testing.wait_for_checkpoint(proc, workdir, 4)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  killed_at = testing.checkpoint_steps(workdir)
  assert 12 not in killed_at, "the run finished before it was killed"

  proc = testing.start_train(workdir, devices=1, cache_dir=cache_dir)
  testing.wait_for_checkpoint(proc, workdir, max(killed_at) + 2)
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 130, stderr[-3000:]  # Saved, then stopped.
  step = int(stderr.split("SIGINT at step ")[1].split(":")[0])
  assert step < 12 and step in testing.checkpoint_steps(workdir)

  _check_ok(testing.run_train(workdir, devices=1, cache_dir=cache_dir))
  final = testing.load_checkpoint(workdir, 12)
  expected = testing.load_checkpoint(reference_run, 12)
  assert jax.tree.structure(final) == jax.tree.structure(expected)
  jax.tree.map(np.testing.assert_array_equal, final, expected)
  # The log matches the checkpoints: each (split, step) once, as in the
  # uninterrupted run, with its losses; what the killed run logged after
  # its last checkpoint is set aside.
  logged = [(r["split"], r["step"]) for r in run_logging.read_metrics(workdir)]
  assert sorted(logged) == sorted(
      (r["split"], r["step"]) for r in run_logging.read_metrics(reference_run))
  _assert_losses_match(testing.train_losses(workdir),
                       testing.train_losses(reference_run), range(1, 13))
  aside = os.path.join(workdir, run_logging.SET_ASIDE_FILE)
  if os.path.exists(aside):
    with open(aside) as f:
      for record in map(json.loads, f):
        assert record["step"] > record["set_aside_at"] >= max(killed_at) - 2


def test_nan_loss_stops_and_keeps_last_good_checkpoint(cache_dir, tmp_path):
  workdir = str(tmp_path / "nan")
  proc = testing.run_train(workdir, "--config.train.debug_nan_at_step=5",
                           devices=1, cache_dir=cache_dir)
  assert proc.returncode == 3, proc.stderr[-3000:]
  assert "non-finite loss or gradient at step 5" in proc.stderr
  assert "Last good checkpoint: step 4" in proc.stderr
  assert testing.checkpoint_steps(workdir) == [2, 4]
  state = testing.load_checkpoint(workdir, 4)
  assert int(state["step"]) == 4
  for leaf in jax.tree.leaves(state["params"]):
    assert np.all(np.isfinite(leaf))
  assert max(testing.train_losses(workdir)) <= 4
