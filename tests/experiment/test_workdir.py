"""One run per workdir, and logs that match the checkpoints.

The lock test holds the workdir from a second process (a few lines of
Python, no JAX): the behaviour is about processes. The runs are in-process
`nfnets-train` commands (`train_harness.train_in_process`).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from nfnets_jax.experiment import logging as run_logging
from nfnets_jax.experiment import loop
from nfnets_jax.experiment import run_identity
from nfnets_jax.experiment import workdir_lock
import train_harness as testing

# Takes the lock of argv[1] with the package's own module (loaded from its
# file: no JAX import), says so, and holds it until killed.
_HOLDER = f"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("workdir_lock",
                                              {workdir_lock.__file__!r})
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)
held = lock.WorkdirLock(sys.argv[1])
assert held.try_acquire() is None
print("locked", flush=True)
time.sleep(600)
"""


def _workdir_files(workdir):
  return sorted(os.listdir(workdir))


def test_a_live_run_holds_the_workdir_and_a_killed_one_does_not(
    cache_dir, tmp_path):
  workdir = str(tmp_path / "w")
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER, workdir],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    proc = testing.train_in_process(workdir, cache_dir=cache_dir)
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert f"workdir {workdir} is in use by another run" in message
    assert f"pid {holder.pid}" in message
    assert f"host {socket.gethostname()}" in message and "started 20" in message
    assert "Traceback" not in proc.stderr
    assert _workdir_files(workdir) == [workdir_lock.LOCK_FILE]  # Nothing else.
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
  # The kernel dropped the killed process's lock; its record stays.
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE)) as f:
    assert json.load(f)["pid"] == holder.pid
  lock = workdir_lock.WorkdirLock(workdir)
  assert lock.try_acquire() is None
  # ... and this process's lock refuses another holder until released.
  assert workdir_lock.WorkdirLock(workdir).try_acquire()["pid"] == os.getpid()
  lock.release()
  assert workdir_lock.WorkdirLock(workdir).try_acquire() is None


def _records(steps, split):
  return [{"step": s, "split": split, "time": float(s), "loss": 1.0 / s}
          for s in steps]


def test_resume_moves_records_after_the_checkpoint_aside(tmp_path):
  logged = _records(range(1, 11), "train") + _records((5, 10), "eval")
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in logged)
  logger = run_logging.RunLogger(str(tmp_path), enabled=True, total_steps=12,
                                 progress_bar=False, tensorboard=False)
  kept = logger.start(6)  # Resumed from the step-6 checkpoint.
  assert kept == [r for r in logged if r["step"] <= 6]
  logger.write(7, "train", {"loss": 0.5})
  logger.close()
  records = run_logging.read_metrics(str(tmp_path))
  assert [(r["split"], r["step"]) for r in records] == (
      [("train", s) for s in range(1, 7)] + [("eval", 5), ("train", 7)])
  with open(tmp_path / run_logging.SET_ASIDE_FILE) as f:
    aside = [json.loads(line) for line in f]
  assert aside == [{**r, "set_aside_at": 6} for r in logged if r["step"] > 6]


@pytest.mark.slow
def test_a_finished_workdir_reports_its_result_or_reevaluates(
    cache_dir, reference_run, tmp_path):
  workdir = str(tmp_path / "finished")
  shutil.copytree(reference_run, workdir)
  before = run_logging.read_metrics(workdir)
  final = before[-1]
  assert (final["split"], final["step"]) == ("eval", 12)

  proc = testing.train_in_process(workdir, cache_dir=cache_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == loop.final_line(
      12, final) + " (recorded: the run had finished)"
  assert run_logging.read_metrics(workdir) == before  # Nothing added.

  proc = testing.train_in_process(workdir, "--reevaluate", cache_dir=cache_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1].endswith("(re-evaluated)")
  after = run_logging.read_metrics(workdir)
  assert after[:-1] == before and after[-1]["split"] == "reeval"
  assert after[-1]["step"] == 12 and after[-1]["count"] == 360
  # The same weights on the same images (other lowerings round otherwise).
  for key in ("top1", "ema_top1"):
    np.testing.assert_allclose(after[-1][key], final[key], atol=2 / 360)


# Suite time: the end-to-end refusal is opt-in (-m long); which fields
# count is test_identity_ignores_free_fields_and_names_missing_ones below.
@pytest.mark.long
def test_a_resume_that_changes_the_model_is_refused_unless_allowed(
    cache_dir, tmp_path):
  """A resume with another activation (same shapes) and run length: exit 2
  naming both values of each; with the override it trains, the original
  config.json kept and the changes recorded beside it."""
  workdir = str(tmp_path / "w")
  proc = testing.train_in_process(workdir, "--config.train.num_steps=4",
                                  cache_dir=cache_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  config_json = (tmp_path / "w" / run_identity.CONFIG_FILE).read_bytes()
  logged = run_logging.read_metrics(workdir)

  changed = ("--config.model.kwargs.activation=relu",
             "--config.eval.every_steps=0")  # Free: not the trained state.
  proc = testing.train_in_process(workdir, *changed, cache_dir=cache_dir)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  message = proc.stderr.split("nfnets-train: error: ")[1]
  assert message.splitlines()[1:3] == [
      "  config.model.kwargs.activation: recorded 'gelu', now 'relu'",
      "  config.train.num_steps: recorded 4, now 12"]
  assert ("--allow_config_change=model.kwargs.activation,train.num_steps"
          in message)
  assert testing.checkpoint_steps(workdir) == [2, 4]
  assert run_logging.read_metrics(workdir) == logged

  proc = testing.train_in_process(
      workdir, *changed,
      "--allow_config_change=model.kwargs.activation,train.num_steps",
      cache_dir=cache_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert testing.checkpoint_steps(workdir)[-1] == 12
  assert (tmp_path / "w" / run_identity.CONFIG_FILE).read_bytes() == config_json
  with open(os.path.join(workdir, run_identity.CHANGES_FILE)) as f:
    records = [json.loads(line) for line in f]
  assert len(records) == 1 and records[0]["step"] == 4
  assert records[0]["changes"] == {
      "model.kwargs.activation": ["gelu", "relu"],
      "train.num_steps": [4, 12]}
  now = run_identity.workdir_config(workdir)
  assert now["model"]["kwargs"]["activation"] == "relu"
  assert now["train"]["num_steps"] == 12


def test_identity_ignores_free_fields_and_names_missing_ones():
  recorded = {"model": {"name": "NFNet", "kwargs": {}},
              "eval": {"every_steps": 5}, "train": {"num_steps": 4}}
  now = {"model": {"name": "NFNet", "kwargs": {"activation": "relu"}},
         "eval": {"every_steps": 0}, "train": {"num_steps": 4}}
  changes = run_identity.identity_changes(recorded, now)
  assert changes == {"model.kwargs.activation": ("(not set)", "relu")}
  assert run_identity.unflatten(run_identity.flatten(now)) == now
