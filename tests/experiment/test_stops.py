"""How a run stops: a signal in each of its phases, and a checkpoint that
cannot be written.

Signals: a wrapped function of the phase sends SIGTERM to this process (as
`kill PID` does) and goes on; the runs are in-process `nfnets-train`
commands. The failed save is about a process (orbax's background threads,
what reaches stderr, the exit status), so it runs in a subprocess whose
file-size limit (RLIMIT_FSIZE) is lowered before its second checkpoint: the
write fails with an OS error, as on a full disk, also for root.
"""
import json
import logging
import os
import shutil
import signal
import subprocess

import pytest

from nfnets_jax.cpu import compiler
from nfnets_jax.experiment import checkpoint_io
from nfnets_jax.experiment import logging as run_logging
from nfnets_jax.experiment import loop
import train_harness as testing

_KEPT = "nothing new to save (the workdir keeps what earlier runs saved)"


def _sigterm_then(fn, when=lambda *args, **kwargs: True):
  """`fn`, after this process was sent SIGTERM (the first time `when`)."""
  sent = []

  def wrapped(*args, **kwargs):
    if not sent and when(*args, **kwargs):
      sent.append(True)
      os.kill(os.getpid(), signal.SIGTERM)
    return fn(*args, **kwargs)
  return wrapped


def _last_line(proc):
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return proc.stderr.strip().splitlines()[-1]


def _logged(workdir):
  if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    return []
  return [(r["split"], r["step"]) for r in run_logging.read_metrics(workdir)]


def test_sigterm_before_training_exits_130_saying_nothing_was_lost(
    cache_dir, tmp_path, monkeypatch):
  workdir = str(tmp_path / "w")
  monkeypatch.setattr(loop, "initial_state", _sigterm_then(loop.initial_state))
  proc = testing.train_in_process(workdir, cache_dir=cache_dir)
  assert proc.returncode == 130, proc.stderr[-3000:]
  assert _last_line(proc) == (
      f"nfnets-train: SIGTERM before the first step: stopped before training; "
      f"{_KEPT}")
  assert testing.checkpoint_steps(workdir) == []


@pytest.mark.slow
def test_sigterm_while_compiling_stops_before_the_first_step(
    cache_dir, tmp_path, monkeypatch):
  workdir = str(tmp_path / "w")
  monkeypatch.setattr(compiler.Compiled, "compile",
                      _sigterm_then(compiler.Compiled.compile))
  proc = testing.train_in_process(workdir, cache_dir=cache_dir)
  assert proc.returncode == 130, proc.stderr[-3000:]
  assert _last_line(proc) == (
      "nfnets-train: SIGTERM at step 0: stopped while compiling the train "
      f"step; {_KEPT}")
  assert testing.checkpoint_steps(workdir) == []
  assert _logged(workdir) == []


@pytest.mark.slow
def test_sigterm_in_a_save_and_in_an_evaluation_save_the_step_and_resume(
    cache_dir, tmp_path, monkeypatch):
  """SIGTERM while step 4 is saved: that step is the last. SIGTERM in the
  evaluation of step 5 (not a checkpoint step): step 5 is saved, its
  evaluation not recorded. The resumed run logs each (split, step) once."""
  workdir = str(tmp_path / "w")
  eval_at_5 = "--config.eval.every_steps=5"
  with monkeypatch.context() as m:
    m.setattr(checkpoint_io.Checkpointer, "save", _sigterm_then(
        checkpoint_io.Checkpointer.save, lambda self, step, *_: step == 4))
    proc = testing.train_in_process(workdir, eval_at_5, cache_dir=cache_dir)
  assert proc.returncode == 130, proc.stderr[-3000:]
  assert _last_line(proc) == "nfnets-train: SIGTERM at step 4: checkpoint saved"
  assert testing.checkpoint_steps(workdir) == [2, 4]
  assert _logged(workdir) == [("train", s) for s in range(1, 5)]

  with monkeypatch.context() as m:
    m.setattr(loop, "run_evaluation", _sigterm_then(loop.run_evaluation))
    proc = testing.train_in_process(workdir, eval_at_5, cache_dir=cache_dir)
  assert proc.returncode == 130, proc.stderr[-3000:]
  assert _last_line(proc) == ("nfnets-train: SIGTERM at step 5: stopped in "
                              "the evaluation; checkpoint saved")
  assert testing.checkpoint_steps(workdir) == [2, 4, 5]
  assert _logged(workdir) == [("train", s) for s in range(1, 6)]

  proc = testing.train_in_process(workdir, eval_at_5, cache_dir=cache_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  logged = _logged(workdir)
  assert sorted(logged) == sorted(
      [("train", s) for s in range(1, 13)] + [("eval", 5), ("eval", 10),
                                              ("eval", 12)])


@pytest.mark.slow
def test_sigterm_in_the_final_evaluation_exits_130_and_resumes_to_it(
    cache_dir, reference_run, tmp_path, monkeypatch):
  """The final checkpoint is saved, its evaluation not recorded: a second
  run evaluates it, once."""
  workdir = str(tmp_path / "w")
  shutil.copytree(reference_run, workdir)
  records = run_logging.read_metrics(workdir)
  assert (records[-1]["split"], records[-1]["step"]) == ("eval", 12)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records[:-1])

  with monkeypatch.context() as m:
    m.setattr(loop, "run_evaluation", _sigterm_then(loop.run_evaluation))
    proc = testing.train_in_process(workdir, cache_dir=cache_dir)
  assert proc.returncode == 130, proc.stderr[-3000:]
  assert _last_line(proc) == (
      "nfnets-train: SIGTERM at step 12: stopped in the final evaluation; "
      "the final checkpoint is saved, run again to evaluate it")
  assert run_logging.read_metrics(workdir) == records[:-1]

  proc = testing.train_in_process(workdir, cache_dir=cache_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  evals = [r for r in run_logging.read_metrics(workdir) if r["step"] == 12
           and r["split"] == "eval"]
  assert len(evals) == 1 and evals[0]["count"] == 360


# `nfnets-train` whose files may not grow past 100 kB from its step-4 save
# on: the checkpoint's arrays (a 286 kB file) fail to write, the run's own
# small files (metrics.jsonl ~40 kB at the end) do not.
_FILE_LIMIT = 100_000
_LIMITED_TRAIN = f"""
import resource, signal, sys
from nfnets_jax.cli import train
from nfnets_jax.experiment import checkpoint_io

save = checkpoint_io.Checkpointer.save
def limited(self, step, *args):
  if step == 4:
    self.wait()  # Step 2 is written in full.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not a kill.
    resource.setrlimit(resource.RLIMIT_FSIZE,
                       ({_FILE_LIMIT}, resource.RLIM_INFINITY))
  return save(self, step, *args)
checkpoint_io.Checkpointer.save = limited
sys.argv = sys.argv[1:]
train.main()
"""


@pytest.mark.slow
def test_a_save_that_fails_stops_the_run_and_keeps_the_previous_step(
    cache_dir, tmp_path):
  workdir = str(tmp_path / "w")
  command = testing.train_command(workdir)
  proc = subprocess.run(
      [command[0], "-c", _LIMITED_TRAIN, *command[2:]], cwd=testing.REPO,
      env=testing.subprocess_env(1, cache_dir), capture_output=True,
      text=True, timeout=300, check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  # One message, nothing else: no traceback, no orbax thread's log.
  assert proc.stderr.strip().splitlines() == [_last_line(proc)]
  message = _last_line(proc)
  directory = os.path.join(workdir, "checkpoints")
  assert message.startswith(
      f"nfnets-train: saving checkpoint step 4 in {directory} failed: "
      f"File too large (EFBIG) writing {directory}/4.orbax-checkpoint-tmp")
  stopped_at = int(message.split("Training stopped at step ")[1][:2].strip(";"))
  assert 4 <= stopped_at <= 12
  assert ("the half-written step was removed "
          f"({directory}/4.orbax-checkpoint-tmp)") in message
  assert message.endswith("the newest intact checkpoint is step 2; run "
                          "again with this workdir to resume from it once "
                          "the cause is fixed.")
  assert sorted(os.listdir(directory)) == ["2"]

  proc = testing.run_train(workdir, devices=1, cache_dir=cache_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert testing.checkpoint_steps(workdir)[-1] == 12
  logged = _logged(workdir)
  assert len(logged) == len(set(logged)) and ("eval", 12) in logged


def test_orbax_error_logs_are_hidden_and_others_kept():
  """`nfnets-train`'s filter: orbax's ERROR records and asyncio's report of
  an orbax task go (the run's own message says it); anything else stays."""
  from nfnets_jax.cli import train  # pylint: disable=g-import-not-at-top

  def record(name, path, message, level=logging.ERROR):
    return logging.LogRecord(name, level, path, 1, message, None, None)
  orbax_file = "/site-packages/orbax/checkpoint/_src/futures/future.py"
  asyncio_file = "/lib/python3.11/asyncio/base_events.py"
  assert not train._hide_orbax_errors(record("absl", orbax_file, "failed"))
  assert not train._hide_orbax_errors(record(
      "asyncio", asyncio_file, "Task exception was never retrieved\nfuture: "
      "<Task coro=<NumpyHandler._open_and_write() defined at "
      "/site-packages/orbax/checkpoint/_src/serialization/type_handlers.py"))
  assert train._hide_orbax_errors(record("asyncio", asyncio_file, "other"))
  assert train._hide_orbax_errors(record("absl", "/x/loop.py", "failed"))
  assert train._hide_orbax_errors(record("absl", orbax_file, "note",
                                         logging.WARNING))
