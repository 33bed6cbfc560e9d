"""What a config's train step needs on each device, before any data is read.

`step_memory` compiles the data-parallel train step of `train_state` for one
device's share of the global batch, with `jax.ShapeDtypeStruct` arguments
(no weights initialized, no data read, nothing run), and reads XLA's own
accounting of the compiled program (`memory_analysis()`, `cost_analysis()`).
`plan` does so for a config over a given device count and, when the step
does not fit a device's memory, finds the gradient-accumulation steps and/or
rematerialization that do (`nfnets-plan` prints it). Convolutions are
lowered to XLA's own convolution op, as on GPUs and TPUs (not the CPU
lowerings of `cpu.convolution`), and compiled with `cpu.compiler`'s fast
options (the LLVM passes they skip do not change buffer assignment).

The estimate is the compiling backend's: XLA:CPU, XLA:GPU and XLA:TPU fuse,
schedule and pad differently, so a plan compiled on a CPU is a guide for an
accelerator, not its measurement. Peak memory is XLA's buffer assignment:
arguments + outputs - donated (aliased) buffers + temporaries; the runtime
adds its own (allocator fragmentation, collective buffers, cuDNN workspace).
"""
from __future__ import annotations

from collections.abc import Callable
import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nfnets_jax.cpu import compiler
from nfnets_jax.cpu import lowering
from nfnets_jax.experiment import config_schema
from nfnets_jax.experiment import train_state as ts
from nfnets_jax.models import families
from nfnets_jax.models import stats
from nfnets_jax.optim import agc
from nfnets_jax.optim import optimizers

GIB = 2**30
# Candidates compiled per remat setting before giving up on it.
VERIFY_TRIES = 3


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """XLA's accounting of one device's compiled train step.

  Attributes:
    micro_batch: images per forward/backward pass on the device.
    accumulation_steps: micro-batches per update.
    remat: residual blocks rematerialized.
    argument_bytes: the state and the batch passed in.
    output_bytes: the new state and the metrics.
    alias_bytes: outputs written into donated arguments.
    temp_bytes: temporaries (activations kept for the backward pass,
      gradients, optimizer intermediates).
    flops: XLA's count of floating-point operations of the step (multiply
      and add counted apart; -1 when the backend does not say).
    compile_s: seconds spent compiling.
    backend: the platform that compiled it ('cpu', 'gpu', 'tpu').
  """
  micro_batch: int
  accumulation_steps: int
  remat: bool
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  flops: float
  compile_s: float
  backend: str

  @property
  def peak_bytes(self) -> int:
    """Arguments, outputs not written in place, and temporaries."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes
            + self.temp_bytes)

  def flags(self) -> str:
    """The `nfnets-train` overrides that select this setting."""
    return (f"--config.train.accumulation_steps={self.accumulation_steps} "
            f"--config.model.remat={self.remat}")


def _per_device(tree: Any) -> Any:
  """Adds pmap's leading axis of one device to every leaf's shape."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((1,) + tuple(x.shape), x.dtype), tree)


def step_memory(config: Any, *, per_device_batch: int,
                accumulation_steps: int, remat: bool, num_classes: int
                ) -> StepMemory:
  """Compiles one device's train step for `config`; returns its memory.

  Args:
    config: an experiment config (`configs/*.py`); its model, optimizer
      and train fields shape the step.
    per_device_batch: images per device and update.
    accumulation_steps: micro-batches it is split into.
    remat: rematerialize each residual block (`config.model.remat`).
    num_classes: classifier outputs.
  """
  t = config.train
  net = families.make_network(config.model.name, config.model.kwargs,
                              num_classes, remat=remat)
  # The schedule's length does not change the step's memory.
  tx, schedule = optimizers.make_optimizer(
      config.optimizer, batch_size=t.global_batch_size, steps_per_epoch=1,
      total_epochs=config.optimizer.lr.warmup_epochs + 1.0)
  train_config = ml_collections.ConfigDict(t.to_dict())
  train_config.accumulation_steps = accumulation_steps
  step = ts.make_train_step(
      net, tx, schedule, train_config,
      clip_stats=agc.clip_stats if config.optimizer.track_clip_stats else None,
      sam_perturbation=optimizers.sam_perturbation(config.optimizer))
  state = ts.train_state_template(net, tx, image_size=t.image_size,
                                  use_ema=t.ema_decay is not None)
  size = t.image_size
  batch = {
      "images": jax.ShapeDtypeStruct((per_device_batch, size, size, 3),
                                     jnp.float32),
      "labels": jax.ShapeDtypeStruct((per_device_batch,), jnp.int32),
      "soft_labels": jax.ShapeDtypeStruct((per_device_batch, num_classes),
                                          jnp.float32)}
  start = time.perf_counter()
  with lowering.conv_impl("native"):  # What GPUs and TPUs compile.
    lowered = step.lower(_per_device(state), _per_device(batch))
  # The fast options skip LLVM passes, after buffer assignment: F0's step
  # at batch 8 has the same argument, output, alias and temporary bytes.
  compiled = lowered.compile(
      compiler_options=compiler.compiler_options(fast=True))
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, list):
    cost = cost[0] if cost else {}
  return StepMemory(
      micro_batch=per_device_batch // accumulation_steps,
      accumulation_steps=accumulation_steps, remat=remat,
      argument_bytes=int(memory.argument_size_in_bytes),
      output_bytes=int(memory.output_size_in_bytes),
      alias_bytes=int(memory.alias_size_in_bytes),
      temp_bytes=int(memory.temp_size_in_bytes),
      flops=float((cost or {}).get("flops", -1.0)),
      compile_s=seconds, backend=jax.default_backend())


@dataclasses.dataclass(frozen=True)
class Plan:
  """One device's train step for a config over `num_devices` devices.

  Attributes:
    num_devices: devices over all hosts.
    per_device_batch: the global batch's share of each device.
    num_params: model parameters.
    macs_per_image: multiply-accumulates of one forward pass at the train
      size (the papers' FLOPs).
    step: XLA's accounting of the step as configured.
    device_memory_bytes: memory of one device (None: not given).
    suggestions: when the step does not fit, the fewest accumulation steps
      that fit without remat and with it, each compiled (see `plan`).
    probes: the compiles of small micro-batches the candidates were
      estimated from.
  """
  num_devices: int
  per_device_batch: int
  num_params: int
  macs_per_image: int
  step: StepMemory
  device_memory_bytes: int | None
  suggestions: tuple[StepMemory, ...]
  probes: tuple[StepMemory, ...]

  @property
  def fits(self) -> bool | None:
    if self.device_memory_bytes is None:
      return None
    return self.step.peak_bytes <= self.device_memory_bytes


def check(config: Any, num_devices: int) -> None:
  """Raises `ConfigError` when `config` cannot be planned on the devices.

  Checks what the plan depends on: the model family, its kwargs and remat,
  the global batch against devices x accumulation steps, the image size.
  """
  t, problem = config.train, config_schema.problem
  lines = []
  if not _positive_int(num_devices):
    lines.append(f"--devices={num_devices!r} is invalid; allowed: a positive "
                 "int")
  if not _positive_int(t.accumulation_steps):
    lines.append(problem("train.accumulation_steps", t.accumulation_steps,
                         "a positive int (1: no gradient accumulation)"))
  elif _positive_int(num_devices):
    need = num_devices * t.accumulation_steps
    if not _positive_int(t.global_batch_size) or t.global_batch_size % need:
      lines.append(problem(
          "train.global_batch_size", t.global_batch_size,
          f"a positive multiple of {need} (--devices={num_devices} times "
          f"train.accumulation_steps={t.accumulation_steps})"))
  if not _positive_int(t.image_size):
    lines.append(problem("train.image_size", t.image_size, "a positive int"))
  try:
    families.make_network(config.model.name, config.model.kwargs, 1,
                          remat=bool(config.model.remat))
  except ValueError as err:  # Names the config.model field already.
    lines.append(str(err))
  if lines:
    raise config_schema.ConfigError(lines)


def _positive_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _accumulator_bytes(params: Any) -> int:
  """The float32 gradient sum that accumulation carries across micro-batches."""
  return sum(int(np.prod(p.shape)) * 4 for p in jax.tree.leaves(params))


def plan(config: Any, *, num_devices: int, num_classes: int,
         device_memory_gib: float | None = None,
         progress: Callable[[str], None] | None = None) -> Plan:
  """Compiles `config`'s train step for one device; suggests what fits.

  The step is compiled as configured (`train.accumulation_steps`,
  `model.remat`) for `global_batch_size / num_devices` images per device.
  When its peak exceeds `device_memory_gib`, it is compiled again for a
  micro-batch of an eighth the size, as configured and with remat (where
  the family has it). Peak memory is then estimated as linear in the
  micro-batch (the two compiles as configured give the line; remat's line
  shares its intercept: weights, optimizer state and gradients do not
  depend on remat), plus the float32 gradient sum for accumulation steps
  `K > 1`. The fewest `K` (dividing the per-device batch) whose estimate
  fits is compiled, without remat and with it; the estimate runs a few
  percent low, so a `K` that does not fit when compiled gives way to the
  next (up to `VERIFY_TRIES`). Suggestions are compiled figures.

  Args:
    config: an experiment config.
    num_devices: data-parallel devices over all hosts.
    num_classes: the classifier's outputs.
    device_memory_gib: memory of one device in GiB (None: no fit check).
    progress: called with a line before each compile (e.g. `print`).

  Raises:
    ConfigError: see `check`.
  """
  check(config, num_devices)
  say = progress or (lambda line: None)
  t, m = config.train, config.model
  per_device = t.global_batch_size // num_devices
  net = families.make_network(m.name, m.kwargs, num_classes)
  try:
    params, _ = stats.init_shapes(net, t.image_size)
  except (ValueError, TypeError, KeyError) as err:
    raise config_schema.ConfigError([
        f"config.model.kwargs={m.kwargs.to_dict()!r} is invalid for "
        f"{m.name} at train.image_size={t.image_size}: {err}"]) from err

  def forward(images):
    return families.build_model(m.name, num_classes, **m.kwargs)(
        images, is_training=False)

  compiled = {}

  def compile_step(batch: int, steps: int, remat: bool) -> StepMemory:
    if (batch, steps, remat) not in compiled:
      say(f"compiling the train step for {batch // steps} images per pass, "
          f"accumulation_steps={steps}, remat={remat} ...")
      compiled[batch, steps, remat] = step_memory(
          config, per_device_batch=batch, accumulation_steps=steps,
          remat=remat, num_classes=num_classes)
    return compiled[batch, steps, remat]

  step = compile_step(per_device, t.accumulation_steps, bool(m.remat))
  limit = None if device_memory_gib is None else int(device_memory_gib * GIB)
  suggestions, probes = [], []
  if limit is not None and step.peak_bytes > limit:
    accumulator = _accumulator_bytes(params)
    lines, probes = _memory_lines(
        step, accumulator, compile_step,
        can_remat=m.name in families.remat_families())
    for remat, line in sorted(lines.items()):
      candidates = _candidates(line, remat, step, per_device, accumulator)
      # The first whose estimate fits, compiled to confirm; the estimate can
      # be low by a few percent, then the next one is tried.
      tries = [c for c in candidates if c[2] <= limit][:VERIFY_TRIES]
      for steps, _, _ in tries:
        candidate = compile_step(per_device, steps, remat)
        if candidate.peak_bytes <= limit:
          suggestions.append(candidate)
          break
  return Plan(num_devices=num_devices, per_device_batch=per_device,
              num_params=stats.count_params(params),
              macs_per_image=stats.count_flops(forward, t.image_size),
              step=step, device_memory_bytes=limit,
              suggestions=tuple(suggestions), probes=tuple(probes))


Line = tuple[float, float]  # Bytes at micro-batch 0, bytes per image.


def _memory_lines(step: StepMemory, accumulator: int,
                  compile_step: Callable[[int, int, bool], StepMemory],
                  *, can_remat: bool
                  ) -> tuple[dict[bool, Line], list[StepMemory]]:
  """Peak bytes as a line in the micro-batch, per remat setting.

  Returns `({remat: (intercept, slope)}, probes compiled)`. A step of one
  image per pass has no smaller micro-batch: only remat, compiled as is.
  """
  without_sum = step.peak_bytes - (
      accumulator if step.accumulation_steps > 1 else 0)
  probe_batch = max(1, step.micro_batch // 8)
  lines, probes = {}, []
  if probe_batch < step.micro_batch:
    own = compile_step(probe_batch, 1, step.remat)
    slope = (without_sum - own.peak_bytes) / (step.micro_batch - probe_batch)
    intercept = own.peak_bytes - slope * probe_batch
    lines[step.remat] = (intercept, slope)
    probes.append(own)
    if can_remat and not step.remat:
      other = compile_step(probe_batch, 1, True)
      lines[True] = (intercept, (other.peak_bytes - intercept) / probe_batch)
      probes.append(other)
  elif can_remat and not step.remat:
    other = compile_step(step.micro_batch * step.accumulation_steps,
                         step.accumulation_steps, True)
    lines[True] = (other.peak_bytes - (
        accumulator if step.accumulation_steps > 1 else 0), 0.0)
    probes.append(other)
  return lines, probes


def _candidates(line: Line, remat: bool, step: StepMemory, per_device: int,
                accumulator: int) -> list[tuple[int, int, int]]:
  """`(accumulation steps, micro-batch, estimated peak)` that shrink memory.

  Every `K` dividing the per-device batch whose micro-batch is smaller than
  the step's (or, switching remat on, not larger), fewest steps first.
  """
  intercept, slope = line
  found = []
  for steps in range(1, per_device + 1):
    micro = per_device // steps
    if per_device % steps or micro > step.micro_batch or (
        remat == step.remat and micro == step.micro_batch):
      continue
    found.append((steps, micro, int(intercept + slope * micro
                                    + (accumulator if steps > 1 else 0))))
  return found
