"""The experiment: validate, build, restore or init, train, evaluate, save.

`run(config)` composes the pieces of this package, one way through:

1. `jax.distributed` starts if asked (before anything touches a device);
2. a fine-tuning run adopts its checkpoint's forward (`pretrained_start`:
   a new config, logged);
3. the whole config is validated (no compute): the run's sizes and its
   optimizer;
4. a fresh run reads its pretrained checkpoint, once, before anything is
   written; a resumed one does not read it;
5. process 0 locks the workdir (`workdir_lock`: one run per workdir);
6. network, pmapped train/eval steps, checkpointer, logger;
7. the state is restored from the newest checkpoint in the workdir (params,
   optimizer state, EMA, step, RNG and data position) into a template
   traced with `jax.eval_shape`, or initialized;
8. the train loop runs to `total_steps`, logging, evaluating and saving on
   schedule; a non-finite loss stops it (the last good checkpoint stays), and
   SIGINT / SIGTERM save a checkpoint before stopping, and so does an image
   file that cannot be decoded (`BadImageError`); a checkpoint that cannot
   be written stops it (`checkpoint_io.CheckpointSaveError`);
9. a final checkpoint and a final evaluation with raw and EMA weights,
   reported in one line.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import contextlib
import json
import os
import signal
import threading
from typing import Any, NamedTuple

import haiku as hk
import jax
import numpy as np
import optax

from nfnets_jax import data as data_lib
from nfnets_jax.experiment import checkpoint_io
from nfnets_jax.experiment import config_validation
from nfnets_jax.experiment import evaluation
from nfnets_jax.experiment import inputs
from nfnets_jax.experiment import logging as run_logging
from nfnets_jax.experiment import parallel
from nfnets_jax.experiment import profiling
from nfnets_jax.experiment import pretrained_start
from nfnets_jax.experiment import run_identity
from nfnets_jax.experiment import train_state as ts
from nfnets_jax.experiment import workdir_lock
from nfnets_jax.models import families
from nfnets_jax.models import stats
from nfnets_jax.optim import agc
from nfnets_jax.optim import optimizers
from nfnets_jax.pretrained import create

TrainState = ts.TrainState
PARAM_TABLE_FILE = "params.txt"  # Every parameter's shape, in the workdir.
# A run of at most this many steps (a smoke run) compiles its steps without
# LLVM's expensive passes: compiling, not stepping, is most of its time.
FAST_COMPILE_STEPS = 20
_NOTHING_NEW = ("nothing new to save (the workdir keeps what earlier runs "
                "saved)")


class NonFiniteLossError(RuntimeError):
  """The loss or gradient became NaN/Inf; the run stopped without saving."""

  def __init__(self, step: int, last_checkpoint: int | None, directory: str):
    self.step = step
    self.last_checkpoint = last_checkpoint
    super().__init__(
        f"non-finite loss or gradient at step {step}: training stopped; the "
        f"update of step {step} was not applied and no checkpoint was "
        f"written after it. Last good checkpoint: "
        f"{'none' if last_checkpoint is None else f'step {last_checkpoint}'}"
        f" in {directory}.")


class Interrupted(KeyboardInterrupt):
  """SIGINT/SIGTERM stopped the run; the message says what is saved.

  In the train loop (steps, saves, evaluations) the run saves a checkpoint
  of the current step first; before it (start-up, compilation) and in the
  final evaluation (after the final checkpoint) nothing unsaved is lost, so
  the run stops at once.
  """

  def __init__(self, step: int | None, signum: int,
               saved: str = "checkpoint saved"):
    self.step = step
    self.signum = signum
    where = "before the first step" if step is None else f"at step {step}"
    super().__init__(f"{signal.Signals(signum).name} {where}: {saved}")


@contextlib.contextmanager
def _signals_handled_by(handle: Callable[[int, Any], None]) -> Iterator[None]:
  """SIGINT and SIGTERM go to `handle(signum, frame)` while the block runs
  (the previous handlers come back after it); a no-op off the main thread,
  where Python cannot install handlers."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {s: signal.signal(s, handle)
              for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def _interrupting(step: int | None,
                  saved: str) -> contextlib.AbstractContextManager[None]:
  """SIGINT/SIGTERM raise `Interrupted(step, signum, saved)` at once."""
  def handle(signum, frame):
    del frame
    raise Interrupted(step, signum, saved)
  return _signals_handled_by(handle)


class BadImageError(ValueError):
  """An image file could not be decoded; the run saved a checkpoint and
  stopped (bad input: fix or remove the file, then run again to resume)."""

  def __init__(self, err: data_lib.ImageDecodeError, step: int,
               last_checkpoint: int | None, directory: str):
    self.path = err.path
    self.step = step
    saved = ("none" if last_checkpoint is None
             else f"step {last_checkpoint}")
    super().__init__(
        f"{err} (at step {step}): training stopped. Checkpoint: {saved} in "
        f"{directory}. Replace or remove the file, then run again to "
        "resume.")


class Components(NamedTuple):
  """What the loop is made of (built once per run)."""
  net: hk.TransformedWithState
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  train_step: Callable[..., Any]
  eval_step: evaluation.EvalStep
  mesh: jax.sharding.Mesh
  checkpointer: checkpoint_io.Checkpointer
  logger: run_logging.RunLogger


def build(config: Any, plan: config_validation.RunPlan) -> Components:
  """Network, pmapped steps, checkpointer and logger (creates the workdir)."""
  spec = plan.spec
  net = families.make_network(config.model.name, config.model.kwargs,
                              spec.num_classes, remat=config.model.remat)
  clip_stats = agc.clip_stats if config.optimizer.track_clip_stats else None
  fast = spec.total_steps <= FAST_COMPILE_STEPS
  train_step = ts.make_train_step(
      net, plan.tx, plan.schedule, config.train, clip_stats=clip_stats,
      sam_perturbation=optimizers.sam_perturbation(config.optimizer),
      fast_compile=fast, augment=ts.device_augmentation(config.train))
  return Components(
      net=net, tx=plan.tx, schedule=plan.schedule, train_step=train_step,
      eval_step=evaluation.make_eval_step(net, config.train.loss,
                                          fast_compile=fast),
      mesh=parallel.local_mesh(),
      checkpointer=checkpoint_io.Checkpointer(
          checkpoint_dir(config), config.checkpoint.max_to_keep),
      logger=run_logging.RunLogger(
          config.workdir, enabled=parallel.is_host0(),
          total_steps=spec.total_steps, progress_bar=config.logging.progress_bar,
          tensorboard=config.logging.tensorboard))


def checkpoint_dir(config: Any) -> str:
  return os.path.join(config.workdir, "checkpoints")


def initial_state(config: Any, spec: config_validation.RunSpec,
                  c: Components,
                  pretrained: create.Checkpoint | None = None) -> TrainState:
  """A fresh host state, from the seed or from the pretrained checkpoint.

  Args:
    config: the run's config.
    spec: its sizes.
    c: its components.
    pretrained: `config.pretrained.path`, read (`pretrained_start.read`);
      its classifier is replaced for the dataset's classes when
      `pretrained.reinit_head`.
  """
  params = model_state = None
  if pretrained is not None:
    params, model_state = pretrained_start.initial_params(
        config, c.net, spec.num_classes, pretrained)
  return ts.init_train_state(
      c.net, c.tx, seed=config.seed, image_size=config.train.image_size,
      use_ema=config.train.ema_decay is not None, params=params,
      model_state=model_state)


def restore(config: Any, spec: config_validation.RunSpec, c: Components
            ) -> tuple[TrainState, dict | None]:
  """The newest intact checkpoint's state and data position.

  The state restores into a template of shapes and dtypes traced with
  `jax.eval_shape` (no weights read, no initializer run). Newer steps that
  cannot be read or fail their checksums are set aside (see
  `checkpoint_io`); none intact raises `NoIntactCheckpointError`.
  """
  template = ts.train_state_template(
      c.net, c.tx, image_size=config.train.image_size,
      use_ema=config.train.ema_decay is not None)
  restored = c.checkpointer.restore_newest_intact(template)
  skipped = ", ".join(str(f.step) for f in restored.set_aside)
  c.logger.info(
      f"resumed from step {restored.step} ({c.checkpointer.directory})"
      + ("" if restored.verified else ", unverified (no checksums)")
      + (f"; corrupt step(s) {skipped} moved to "
         f"{c.checkpointer.set_aside_dir}" if skipped else ""))
  return restored.state, inputs.positions_from_checkpoint(
      restored.process_states, spec.num_shards)


def save(c: Components, state: TrainState, position: dict | None) -> None:
  """Checkpoints the (replicated) state and every host's data position."""
  host_state = parallel.unreplicate(state)
  positions = parallel.allgather_json(
      {str(k): v for k, v in (position or {}).items()})
  c.checkpointer.save(int(host_state.step), host_state, positions)


def run_evaluation(config: Any, spec: config_validation.RunSpec,
                   c: Components, state: TrainState) -> dict[str, float]:
  """Top-1/top-5/loss of the raw weights and, with EMA, `ema_*` of the EMA."""
  def one(params, model_state):
    batches = inputs.eval_batches(config, spec, jax.process_index(),
                                  jax.process_count())
    return evaluation.evaluate(c.eval_step, params, model_state, batches,
                               c.mesh)
  metrics = one(state.params, state.model_state)
  if state.ema_params is not None:
    ema = one(state.ema_params, state.ema_model_state)
    metrics.update({f"ema_{k}": v for k, v in ema.items() if k != "count"})
  return metrics


class _StopRequest:
  """Turns SIGINT/SIGTERM into a flag the loop polls (a second SIGINT
  interrupts at once)."""

  def __init__(self):
    self.signum: int | None = None

  def _handle(self, signum, frame):
    del frame
    if self.signum == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum

  @contextlib.contextmanager
  def installed(self) -> Iterator["_StopRequest"]:
    with _signals_handled_by(self._handle):
      yield self


def _host_metrics(metrics: dict[str, jax.Array]) -> dict[str, float]:
  return {k: float(v) for k, v in parallel.unreplicate(metrics).items()}


def poisoned(batches: Iterator[tuple[dict, Any]], step: int, nan_step: int
             ) -> Iterator[tuple[dict, Any]]:
  """Debug hook: the images and soft labels of step `nan_step` (1-based)
  become NaN (images alone would not reach the loss through RandAugment's
  uint8 conversion in the train step, `train.augment.on_device`).

  Bad data is a realistic source of a NaN loss, and poisoning the input
  leaves the compiled train step unchanged (`config.train.debug_nan_at_step`).

  Args:
    batches: `(batch, position)` pairs, the first for step `step + 1`.
    step: the step before the first batch.
    nan_step: the 1-based step whose images become NaN.
  """
  for batch, position in batches:
    step += 1
    if step == nan_step:
      batch = {**batch, **{k: np.full_like(batch[k], np.nan)
                           for k in ("images", "soft_labels")}}
    yield batch, position


def train_loop(config: Any, spec: config_validation.RunSpec, c: Components,
               state: TrainState, stream: inputs.TrainStream,
               position: dict | None) -> TrainState:
  """Steps from the state's step to `spec.total_steps`.

  Metrics of step t are read back while step t + 1 runs (no stall), except
  at log, eval and checkpoint steps, where they are read first: a
  checkpoint is only written after every step before it was found finite.
  An image that cannot be decoded saves the last completed step, then
  raises `BadImageError`. SIGINT/SIGTERM while the train step compiles stop
  at once (`Interrupted`, nothing new to save); later, they save the
  current step first, also in the middle of an evaluation.
  """
  t = config.train
  step = int(parallel.unreplicate(state.step))
  host_batches = iter(stream)
  if t.debug_nan_at_step is not None:
    host_batches = poisoned(host_batches, step, t.debug_nan_at_step)
  batches = parallel.prefetch_to_device(host_batches, c.mesh, t.prefetch)
  pending = None  # (step, device metrics) not yet checked.
  timer = profiling.StepTimer(step)
  profiler = profiling.StepProfiler(
      profiling.parse_profile_steps(config.logging.profile_steps),
      config.workdir,
      None if jax.process_count() == 1 else jax.process_index())

  def check(pending):
    at, metrics = pending
    host = _host_metrics(metrics)
    if not host.pop("finite"):
      c.checkpointer.wait(at)
      raise NonFiniteLossError(at, c.checkpointer.latest_step(),
                               c.checkpointer.directory)
    return host

  def stop_on_bad_image(err: data_lib.ImageDecodeError) -> BadImageError:
    if pending is not None:
      check(pending)
    save(c, state, position)
    c.checkpointer.wait(step)
    return BadImageError(err, step, c.checkpointer.latest_step(),
                         c.checkpointer.directory)

  def evaluate_or_stop() -> dict[str, float]:
    """The mid-run evaluation; a signal in it saves the step and stops."""
    try:
      with _interrupting(step, ""):
        return run_evaluation(config, spec, c, state)
    except Interrupted as interrupted:
      save(c, state, position)
      c.checkpointer.wait(step)
      raise Interrupted(step, interrupted.signum,
                        "stopped in the evaluation; checkpoint saved"
                        ) from None
    except data_lib.ImageDecodeError as err:
      raise stop_on_bad_image(err) from err

  compiled = False  # The first step compiles the train step.
  with _StopRequest().installed() as stop, contextlib.closing(profiler):
    profiler.after_step(step, state)
    while step < spec.total_steps:
      try:
        batch, position = timer.next_batch(batches)
      except data_lib.ImageDecodeError as err:
        raise stop_on_bad_image(err) from err
      if compiled:
        state, metrics = c.train_step(state, batch)
      else:
        with _interrupting(step, "stopped while compiling the train step; "
                           + _NOTHING_NEW):
          state, metrics = c.train_step(state, batch)
        compiled = True
      if pending is not None:
        check(pending)
      step += 1
      pending = (step, metrics)
      profiler.after_step(step, state)
      c.logger.advance()
      log_now = step % t.log_every_steps == 0 or step == spec.total_steps
      ckpt_now = (config.checkpoint.every_steps
                  and step % config.checkpoint.every_steps == 0)
      eval_now = (config.eval.every_steps
                  and step % config.eval.every_steps == 0
                  and step < spec.total_steps)
      if not (log_now or ckpt_now or eval_now or stop.signum):
        continue
      host = check(pending)
      pending = None
      c.checkpointer.raise_if_save_failed(step)
      if log_now:
        host.update(timer.interval(step, t.global_batch_size))
        host["epoch"] = step / spec.steps_per_epoch
        c.logger.write(step, "train", host)
      if ckpt_now or stop.signum:
        save(c, state, position)
      if stop.signum:
        c.checkpointer.wait(step)
        raise Interrupted(step, stop.signum)
      if eval_now:
        c.logger.write(step, "eval", evaluate_or_stop())
        timer.reset(step)
    if pending is not None:
      check(pending)
    save(c, state, position)  # The final checkpoint, written in background.
    if stop.signum:
      c.checkpointer.wait(step)
      raise Interrupted(step, stop.signum)
  return state


def run(config: Any, *, reevaluate: bool = False,
        allow_config_change: Sequence[str] = ()) -> dict[str, float]:
  """Trains and evaluates as `config` says; returns the final eval metrics.

  One run per workdir: process 0 holds an OS lock on it for the whole run
  (`workdir_lock`). A finished workdir answers with its recorded final
  evaluation; with `reevaluate`, it evaluates again and records that as a
  `reeval` record.

  A resume trains what the workdir's checkpoints were trained with: a
  config that differs in a field of the run's identity (`run_identity`) is
  refused unless the field is in `allow_config_change`; allowed changes are
  recorded beside the workdir's config.json, which is never rewritten.

  `config` itself is not changed (a fine-tuning run adopting its
  checkpoint's forward works on a copy, saved as the run's config.json).

  Raises:
    config_validation.ConfigError: a bad config or pretrained file (before
      any compute, and before anything is written); a resume whose config
      changed (`run_identity.ConfigChangedError`).
    NonFiniteLossError: the loss became NaN/Inf.
    Interrupted: SIGINT/SIGTERM (after saving a checkpoint).
    BadImageError: an image file cannot be decoded (after saving one).
    checkpoint_io.CheckpointSaveError: a checkpoint could not be written
      (the previous ones are kept).
    workdir_lock.WorkdirLockedError: another live run holds the workdir.
  """
  parallel.maybe_initialize_distributed(config.distributed)
  config, adopted = pretrained_start.adopt_forward(config)
  plan = config_validation.validate(config)
  # A fresh run reads its pretrained checkpoint before anything is written
  # (a bad file leaves no workdir behind); a resumed one never reads it.
  pretrained = None
  if config.pretrained.path and not _resuming(config):
    pretrained = pretrained_start.read(config)
  lock = lock_workdir(config.workdir)
  try:
    return _run_locked(config, plan, adopted, pretrained, reevaluate,
                       tuple(allow_config_change))
  finally:
    if lock is not None:
      lock.release()


def _resuming(config: Any) -> bool:
  return bool(checkpoint_io.checkpoint_steps(checkpoint_dir(config)))


def lock_workdir(workdir: str) -> workdir_lock.WorkdirLock | None:
  """Process 0 locks the workdir for the run; every process learns if it
  could (`WorkdirLockedError` on all of them if not).

  Returns:
    The held lock on process 0, None on the others.
  """
  lock = workdir_lock.WorkdirLock(workdir) if parallel.is_host0() else None
  holder = lock.try_acquire() if lock is not None else None
  holder = parallel.allgather_json(holder)[0]
  if holder is not None:
    raise workdir_lock.WorkdirLockedError(workdir, holder)
  return lock


def _run_locked(config: Any, plan: config_validation.RunPlan,
                adopted: dict[str, Any],
                pretrained: create.Checkpoint | None,
                reevaluate: bool, allowed: tuple[str, ...]
                ) -> dict[str, float]:
  spec = plan.spec
  resuming = _resuming(config)  # Again, now that the workdir is ours.
  changes = (run_identity.check_resume(config.workdir, config, allowed)
             if resuming else {})
  if config.pretrained.path and not resuming and pretrained is None:
    pretrained = pretrained_start.read(config)  # Its checkpoints went.
  c = build(config, plan)
  try:
    with _interrupting(None, f"stopped before training; {_NOTHING_NEW}"):
      host_state, position, done, eval_missing = _start(
          config, spec, c, adopted, pretrained, resuming)
      if changes and parallel.is_host0():
        run_identity.record_changes(config.workdir, int(host_state.step),
                                    changes, allowed)
        c.logger.info("resumed with config changes (recorded in "
                      f"{run_identity.CHANGES_FILE}): " + "; ".join(
                          f"{f}: {old!r} -> {new!r}"
                          for f, (old, new) in changes.items()))
      del pretrained
      if done is not None and not reevaluate:
        c.logger.finish(final_line(spec.total_steps, done)
                        + " (recorded: the run had finished)")
        return done
      state = parallel.replicate(host_state, c.mesh)
      del host_state
      stream = inputs.TrainStream(config, spec, position)
    if eval_missing:  # Its run was stopped in it: evaluate it now.
      start = int(parallel.unreplicate(state.step))
      with _interrupting(start, "stopped in the evaluation of the restored "
                         f"step; {_NOTHING_NEW}"):
        c.logger.write(start, "eval", run_evaluation(config, spec, c, state))
    state = train_loop(config, spec, c, state, stream, position)
    with _interrupting(spec.total_steps,
                       "stopped in the final evaluation; the final "
                       "checkpoint is saved, run again to evaluate it"):
      try:
        metrics = run_evaluation(config, spec, c, state)
      except data_lib.ImageDecodeError as err:  # Saved by train_loop.
        raise BadImageError(err, spec.total_steps, spec.total_steps,
                            c.checkpointer.directory) from err
    c.checkpointer.wait(spec.total_steps)  # Written while evaluating.
    split = "reeval" if done is not None else "eval"
    c.logger.write(spec.total_steps, split, metrics, echo=False)
    c.logger.finish(final_line(spec.total_steps, metrics)
                    + (" (re-evaluated)" if done is not None else ""))
    return metrics
  finally:
    c.checkpointer.close()
    c.logger.close()


def _start(config: Any, spec: config_validation.RunSpec, c: Components,
           adopted: dict[str, Any], pretrained: create.Checkpoint | None,
           resuming: bool
           ) -> tuple[TrainState, dict | None, dict[str, float] | None, bool]:
  """The host state to start from, its data position, the recorded final
  evaluation of a finished run (None if not finished), and whether the
  restored step is due an evaluation that is not recorded (its run was
  stopped in it).

  Restores or initializes the state, writes the run's files and starts the
  logger (which sets aside records after the state's step).
  """
  if adopted:
    c.logger.info("model forward set to the pretrained checkpoint's: "
                  + ", ".join(f"{k}={v!r}" for k, v in adopted.items()))
  if resuming:
    host_state, position = restore(config, spec, c)
  else:
    host_state = initial_state(config, spec, c, pretrained)
    position = None
  start = int(host_state.step)
  if parallel.is_host0():
    _write_run_info(config, spec, host_state, c.logger, resuming)
  kept = c.logger.start(start)
  # A finished run (its final evaluation recorded) is not evaluated again
  # unless asked; every process learns process 0's answer.
  every = config.eval.every_steps
  eval_missing = (bool(every) and 0 < start < spec.total_steps
                  and start % every == 0
                  and not any(r["split"] == "eval" and r["step"] == start
                              for r in kept))
  done, eval_missing = parallel.allgather_json(
      [_final_record(kept, spec.total_steps), eval_missing])[0]
  return host_state, position, done, eval_missing


def _final_record(records: list[dict], total_steps: int
                  ) -> dict[str, float] | None:
  """The metrics of the recorded final evaluation, if there is one."""
  for r in records:
    if r["split"] == "eval" and r["step"] == total_steps:
      return {k: v for k, v in r.items() if k not in ("step", "split", "time")}
  return None


def final_line(step: int, metrics: dict[str, float]) -> str:
  """The run's result in one line, e.g. `final evaluation at step 449 on 360
  images: top-1 97.50%, top-5 99.72% (EMA: top-1 97.50%, top-5 99.72%)`."""
  line = (f"final evaluation at step {step} on {int(metrics['count'])} "
          f"images: top-1 {100 * metrics['top1']:.2f}%, top-5 "
          f"{100 * metrics['top5']:.2f}%")
  if "ema_top1" in metrics:
    line += (f" (EMA: top-1 {100 * metrics['ema_top1']:.2f}%, top-5 "
             f"{100 * metrics['ema_top5']:.2f}%)")
  return line


def _write_run_info(config: Any, spec: config_validation.RunSpec,
                    state: TrainState, logger: run_logging.RunLogger,
                    resuming: bool) -> None:
  config_file = os.path.join(config.workdir, run_identity.CONFIG_FILE)
  if not (resuming and os.path.exists(config_file)):
    run_identity.write_config(config.workdir, config)
  with open(os.path.join(config.workdir, "run_spec.json"), "w") as f:
    json.dump({**spec.__dict__, "devices": jax.device_count(),
               "processes": jax.process_count()}, f, indent=2)
  if config.dataset.name == data_lib.IMAGE_FOLDER:
    # Label names (index = label) for nfnets-predict --pretrained WORKDIR.
    names = data_lib.dataset_info(config.dataset.name,
                                  config.dataset.data_dir).class_names
    with open(os.path.join(config.workdir, create.CLASS_NAMES_FILE),
              "w") as f:
      json.dump(list(names), f, indent=2)
  table = run_logging.param_table(state.params)
  with open(os.path.join(config.workdir, PARAM_TABLE_FILE), "w") as f:
    f.write(table + "\n")
  logger.info(run_logging.module_summary(state.params))
  logger.info(
      f"{config.model.name}: {stats.count_params(state.params):,} "
      f"params (every one in {PARAM_TABLE_FILE}); {spec.total_steps} steps "
      f"of {config.train.global_batch_size} images ({spec.steps_per_epoch} "
      f"steps/epoch) on {jax.device_count()} device(s), "
      f"{jax.process_count()} process(es)")
