"""Test harness for end-to-end tests: run `nfnets-train` in subprocesses
or in-process, watch compilations, load configs and checkpoints.

Device count is fixed when JAX starts, so each run with a given number of
(fake CPU) devices or processes is its own Python process. Runs share a
persistent compilation cache and skip XLA:CPU's expensive LLVM passes: the
tests run few tiny steps, where compile time dominates.
"""
from __future__ import annotations

from collections.abc import Iterator
import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "default.py")

# A tiny, deterministic digits run: the default model, 16 px, 16 images a
# step over 2 data shards (so 1, 2 or 4 devices, 1 or 2 processes all see
# the same global batches), a checkpoint every 2 steps, metrics every step,
# an evaluation at step 6 and at the end, AGC statistics (the reference run
# also writes TensorBoard events and a trace: `REFERENCE_FLAGS`).
TINY_FLAGS = (
    "--config.train.num_steps=12",
    "--config.train.global_batch_size=16",
    "--config.train.log_every_steps=1",
    "--config.dataset.num_shards=2",
    "--config.eval.batch_size=120",
    "--config.checkpoint.every_steps=2",
    "--config.checkpoint.max_to_keep=10",
    "--config.train.ema_decay=0.99",
    "--config.optimizer.lr.base_lr=1.6",  # Peak 0.1: the loss moves.
    "--config.optimizer.track_clip_stats=True",
    "--config.eval.every_steps=6",
    "--config.logging.progress_bar=False",
)
# The reference run also writes TensorBoard events (a 2 s import) and a
# profiler trace of steps 3-4.
REFERENCE_FLAGS = ("--config.logging.tensorboard=True",
                   "--config.logging.profile_steps=2,4")


def subprocess_env(devices: int = 1, cache_dir: str | None = None
                   ) -> dict[str, str]:
  """Environment for a child JAX process with `devices` CPU devices.

  Its programs trace XLA's own convolutions (`NFNETS_JAX_CONV=native`):
  jaxlib cannot write programs holding the oneDNN custom call to the
  persistent compilation cache (it fails to serialize them), so each run
  would compile its steps again. The lowerings compute the same numbers
  (tests/cpu/test_convolution.py); in-process runs use the default.
  """
  env = dict(os.environ)
  env["NFNETS_JAX_CONV"] = "native"
  env["XLA_FLAGS"] = " ".join([
      f"--xla_force_host_platform_device_count={devices}",
      "--xla_backend_optimization_level=0",
      "--xla_llvm_disable_expensive_passes=true"])
  env["JAX_PLATFORMS"] = "cpu"
  # SIGABRT (sent to a run that hangs) prints every thread's Python stack.
  env["PYTHONFAULTHANDLER"] = "1"
  # Nothing written to the user's cache folder (cli/compile_cache.py).
  env["NFNETS_JAX_COMPILE_CACHE"] = "0"
  if cache_dir:
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def train_command(workdir: str, *flags: str,
                  config: str = DEFAULT_CONFIG + ":smoke") -> list[str]:
  return [sys.executable, "-m", "nfnets_jax.cli.train", f"--config={config}",
          f"--workdir={workdir}", *TINY_FLAGS, *flags]


def run_train(workdir: str, *flags: str, devices: int = 1,
              cache_dir: str | None = None, timeout: float = 300,
              config: str = DEFAULT_CONFIG + ":smoke",
              extra_env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess:
  """Runs a tiny training to completion; returns the finished process."""
  proc = start_train(workdir, *flags, devices=devices, cache_dir=cache_dir,
                     config=config, extra_env=extra_env)
  (stdout, stderr), = communicate_all([proc], timeout)
  return subprocess.CompletedProcess(proc.args, proc.returncode, stdout,
                                     stderr)


def train_in_process(workdir: str, *flags: str, cache_dir: str,
                     config: str = DEFAULT_CONFIG + ":smoke"
                     ) -> subprocess.CompletedProcess:
  """`nfnets-train` with the tiny run's flags, in this process.

  The command's own code path (`nfnets_jax.cli.train.run` behind
  `errors.guard`, as its console entry point), without a new interpreter;
  for runs whose bits are not compared with a subprocess's (those compile
  with other XLA flags, `subprocess_env`), under `cached_compiles`.
  """
  from nfnets_jax.cli import errors  # pylint: disable=g-import-not-at-top
  from nfnets_jax.cli import train  # pylint: disable=g-import-not-at-top
  argv = [train.PROG, f"--config={config}", f"--workdir={workdir}",
          *TINY_FLAGS, *flags]
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
      cached_compiles(cache_dir):
    status = errors.guard(train.PROG, lambda: train.run(argv), argv=argv)
  return subprocess.CompletedProcess(argv, status, out.getvalue(),
                                     err.getvalue())


@contextlib.contextmanager
def cached_compiles(cache_dir: str) -> Iterator[None]:
  """In-process runs as the subprocesses compile: XLA's own convolutions
  (`NFNETS_JAX_CONV=native`) and every program kept in the persistent
  compilation cache `cache_dir`. A tiny run whose steps were compiled
  before took 4 s instead of 11 s."""
  import pytest  # pylint: disable=g-import-not-at-top
  with persistent_cache(cache_dir), pytest.MonkeyPatch.context() as patch:
    patch.setenv("NFNETS_JAX_CONV", "native")
    yield


@contextlib.contextmanager
def persistent_cache(path: str) -> Iterator[None]:
  """JAX's persistent compilation cache in `path` for the block (every
  program kept), then the process's own setting again."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache as cc  # pylint: disable=g-import-not-at-top
  old = (jax.config.jax_compilation_cache_dir,
         jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  cc.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
    cc.reset_cache()


def run_script(script: str, devices: int = 4) -> Any:
  """Runs Python `script` on `devices` fake CPU devices in a new process.

  Returns:
    The JSON value the script printed on its last line.
  """
  import json  # pylint: disable=g-import-not-at-top
  # Compiled without LLVM's expensive passes, as the test process is: these
  # scripts run tiny programs a few times, compiling is most of their time.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join([
      f"--xla_force_host_platform_device_count={devices}",
      "--xla_backend_optimization_level=0",
      "--xla_llvm_disable_expensive_passes=true"]))
  proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def compile_events() -> Iterator[list[str]]:
  """Collects an event per XLA compilation while the block runs."""
  import jax  # pylint: disable=g-import-not-at-top
  events = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if "backend_compile" in event:
      events.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def communicate_all(procs: list[subprocess.Popen], timeout: float
                    ) -> list[tuple[str, str]]:
  """`(stdout, stderr)` of each process, all finished within `timeout` s.

  Every process's pipes are drained at once (one thread each): a process
  whose pipe fills while another is waited on blocks on its write, and if
  the other waits for it (a collective, a barrier) neither ends.

  Raises:
    AssertionError: a process was still running at the deadline. Each one
      still running gets SIGABRT, so that its stderr ends with the Python
      stack of every thread (faulthandler, see `subprocess_env`), and the
      error shows the end of every process's output.
  """
  outputs: list[tuple[str, str] | None] = [None] * len(procs)

  def drain(i: int) -> None:
    outputs[i] = procs[i].communicate()

  threads = [threading.Thread(target=drain, args=(i,), daemon=True)
             for i in range(len(procs))]
  for thread in threads:
    thread.start()
  deadline = time.time() + timeout
  for thread in threads:
    thread.join(max(deadline - time.time(), 0))
  hung = [i for i, proc in enumerate(procs) if proc.poll() is None]
  if not hung:
    for thread in threads:
      thread.join()
    return outputs
  for i in hung:
    procs[i].send_signal(signal.SIGABRT)
  for i, thread in enumerate(threads):
    thread.join(30)
    if thread.is_alive():
      procs[i].kill()
      thread.join()
  reports = []
  for i, (proc, (stdout, stderr)) in enumerate(zip(procs, outputs)):
    state = "hung" if i in hung else f"exited {proc.returncode}"
    reports.append(f"--- process {i} ({state}) stdout:\n{stdout[-2000:]}"
                   f"\n--- process {i} stderr:\n{stderr[-12000:]}")
  raise AssertionError(f"{len(hung)} of {len(procs)} process(es) still "
                       f"running after {timeout} s:\n" + "\n".join(reports))


def start_train(workdir: str, *flags: str, devices: int = 1,
                cache_dir: str | None = None,
                config: str = DEFAULT_CONFIG + ":smoke",
                extra_env: dict[str, str] | None = None) -> subprocess.Popen:
  """Starts a tiny training; the caller waits for or signals it."""
  return subprocess.Popen(
      train_command(workdir, *flags, config=config), cwd=REPO,
      env={**subprocess_env(devices, cache_dir), **(extra_env or {})},
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(proc: subprocess.Popen, workdir: str, step: int,
                        timeout: float = 240) -> None:
  """Polls until `workdir` holds checkpoint `step` (fails if `proc` ends)."""
  deadline = time.time() + timeout
  while step not in checkpoint_steps(workdir):
    if proc.poll() is not None:
      raise AssertionError(f"run ended (rc {proc.returncode}) before "
                           f"checkpoint {step}: {proc.stderr.read()[-3000:]}")
    assert time.time() < deadline, f"no checkpoint {step} in {timeout} s"
    time.sleep(0.02)


def run_two_processes(workdir: str, cache_dir: str, *flags: str,
                      timeout: float = 400) -> list[tuple[str, str]]:
  """The tiny run as two `jax.distributed` processes on localhost.

  Returns:
    `(stdout, stderr)` of process 0 and 1; both must have exited 0.
  """
  import portpicker  # pylint: disable=g-import-not-at-top
  port = portpicker.pick_unused_port()
  procs = [
      start_train(
          workdir, "--config.distributed.initialize=True",
          f"--config.distributed.coordinator_address=127.0.0.1:{port}",
          "--config.distributed.num_processes=2",
          f"--config.distributed.process_id={i}", *flags,
          cache_dir=cache_dir)
      for i in range(2)]
  outputs = communicate_all(procs, timeout)
  for i, (proc, (_, stderr)) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0, f"process {i}: {stderr[-4000:]}"
  return outputs


def train_losses(workdir: str) -> dict[int, float]:
  """Step -> training loss from `metrics.jsonl`."""
  from nfnets_jax.experiment import logging as run_logging  # pylint: disable=g-import-not-at-top
  return {r["step"]: r["loss"]
          for r in run_logging.read_metrics(workdir, "train")}


def checkpoint_steps(workdir: str) -> list[int]:
  """Finished checkpoint steps in a workdir."""
  from nfnets_jax.experiment import checkpoint_io
  return checkpoint_io.checkpoint_steps(os.path.join(workdir, "checkpoints"))


def load_checkpoint(workdir: str, step: int | None = None) -> dict[str, Any]:
  """A checkpoint's state tree (NumPy) without a template."""
  from nfnets_jax.experiment import checkpoint_io
  return checkpoint_io.read_state(os.path.join(workdir, "checkpoints"), step)


def load_config(path: str, arg: str | None = None) -> Any:
  """`get_config(arg)` of a config file, locked: the CLI's own loader."""
  from nfnets_jax.cli import train_flags  # pylint: disable=g-import-not-at-top
  spec = path if arg is None else f"{path}:{arg}"
  return train_flags.load_config(train_flags.resolve_config(spec))


def config_paths() -> list[str]:
  """Every config file in configs/."""
  directory = os.path.join(REPO, "configs")
  return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                if f.endswith(".py") and not f.startswith("_"))


def tiny_pretrained(config: Any, path: str) -> str:
  """Saves an initialized 1000-class model of `config` as a pretrained file."""
  import jax  # pylint: disable=g-import-not-at-top
  import nfnets_jax as nj  # pylint: disable=g-import-not-at-top
  net = nj.make_network(config.model.name, config.model.kwargs, 1000)
  size = config.train.image_size
  params, _ = nj.cpu.compiler.run_once(
      lambda x: net.init(jax.random.PRNGKey(1), x, is_training=True),
      np.zeros((1, size, size, 3), np.float32))
  return nj.save_npz(jax.device_get(params), path)


def smoke_all(root: str, paths: list[str]) -> dict[str, dict[str, float]]:
  """Runs every config's `smoke` form end to end, ImageNet etc. mocked.

  `tfds.testing.mock_data` stands in for every TFDS dataset (32 random
  examples per split); the digits are real. The fine-tuning config gets a
  freshly initialized tiny model as its "pretrained" checkpoint.

  Returns:
    config file name -> final eval metrics.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from nfnets_jax.experiment import loop  # pylint: disable=g-import-not-at-top
  results = {}
  with tfds.testing.mock_data(num_examples=32,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    for path in paths:
      name = os.path.splitext(os.path.basename(path))[0]
      config = load_config(path, "smoke")
      config.workdir = os.path.join(root, name)
      if "finetune" in name:
        config.pretrained.path = tiny_pretrained(
            config, os.path.join(root, f"{name}_pretrained.npz"))
      results[name] = loop.run(config)
  return results


def session_dirs(basetemp: str) -> tuple[str, str]:
  """`(compilation cache dir, reference run workdir)` under a pytest basetemp.

  Test modules of one session share them: the reference run (the tiny run
  on 1 device, uninterrupted) is made once, by `reference_run`.
  """
  return (os.path.join(basetemp, "jax_cache"),
          os.path.join(basetemp, "reference_run"))


def reference_run(basetemp: str) -> str:
  """The session's uninterrupted 1-device tiny run (made on first use)."""
  cache_dir, workdir = session_dirs(basetemp)
  if 12 not in checkpoint_steps(workdir) or not os.path.exists(
      os.path.join(workdir, "metrics.jsonl")):
    proc = run_train(workdir, *REFERENCE_FLAGS, devices=1,
                     cache_dir=cache_dir)
    if proc.returncode != 0:
      raise RuntimeError(f"reference run failed:\n{proc.stderr[-4000:]}")
  return workdir
