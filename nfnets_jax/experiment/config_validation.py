"""Checks a config before any compute; derives the run's sizes and optimizer.

`validate(config)` is the one place where config values are judged. It
decides and reports; it never changes the config and never reads more of a
pretrained checkpoint than its first bytes. Every problem is reported in one
`ConfigError` whose lines name the field, the value and what is allowed, e.g.

    config.train.global_batch_size=100 is invalid: allowed: a positive
    multiple of 8 (the number of devices, 2 processes x 4 local)

It needs the device count (so `jax.distributed` must be initialized first)
but runs nothing on the devices: the model is only traced, to check the
image size against the network's downsampling.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, NamedTuple

import haiku as hk
import jax
import optax

from nfnets_jax import data as data_lib
from nfnets_jax.cpu import lowering
from nfnets_jax.data import randaugment
from nfnets_jax.experiment import config_schema
from nfnets_jax.experiment import losses
from nfnets_jax.experiment import parallel
from nfnets_jax.experiment import profiling
from nfnets_jax.experiment import pretrained_start
from nfnets_jax.models import families
from nfnets_jax.models import stats
from nfnets_jax.optim import optimizers
from nfnets_jax.pretrained import create
from nfnets_jax.pretrained import timm

COMPUTE_DTYPES = ("float32", "bfloat16")
ConfigError = config_schema.ConfigError


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """Sizes derived from a valid config and the devices.

  Attributes:
    num_classes: classifier outputs (from the dataset).
    num_train_examples: examples of the training split.
    num_eval_examples: examples of the evaluation split.
    steps_per_epoch: `num_train_examples // global_batch_size`.
    total_steps: training steps of the run.
    total_epochs: `total_steps / steps_per_epoch` (for the lr schedule).
    num_shards: data shards over all processes.
    shards: the shard indices this process reads.
    shard_batch_size: examples per shard per step.
    eval_host_batch_size: eval examples per process per batch.
  """
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  steps_per_epoch: int
  total_steps: int
  total_epochs: float
  num_shards: int
  shards: tuple[int, ...]
  shard_batch_size: int
  eval_host_batch_size: int


class RunPlan(NamedTuple):
  """What `validate` decided.

  Attributes:
    spec: the run's sizes.
    tx: the optimizer (`optim.optimizers.make_optimizer`).
    schedule: its learning rate by step (for logging).
  """
  spec: RunSpec
  tx: optax.GradientTransformation
  schedule: optax.Schedule


_fmt = config_schema.problem


class _Problems:
  """Collects problems; `check` records one when `ok` is False."""

  def __init__(self):
    self.lines: list[str] = []

  def check(self, ok: bool, field: str, value: Any, allowed: str) -> bool:
    if not ok:
      self.lines.append(_fmt(field, value, allowed))
    return ok

  def add(self, line: str) -> None:
    self.lines.append(line)

  def raise_if_any(self) -> None:
    if self.lines:
      raise ConfigError(self.lines)


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _strided_inputs(jaxpr: Any) -> list[tuple[str, int, int]]:
  """`(primitive, input size, stride)` of every strided conv / pool."""
  found = []
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      lhs = eqn.invars[0].aval
      spatial = eqn.params["dimension_numbers"].lhs_spec[2:]
      for dim, stride in zip(spatial, eqn.params["window_strides"]):
        if stride > 1:
          found.append((name, lhs.shape[dim], stride))
    elif name.startswith("reduce_window"):
      shape = eqn.invars[0].aval.shape
      for size, stride in zip(shape, eqn.params["window_strides"]):
        if stride > 1:
          found.append((name, size, stride))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += _strided_inputs(sub)
  return found


def _trace(net: hk.TransformedWithState, image_size: int) -> Any:
  """The eval forward's jaxpr at `image_size`, XLA's convolutions in it."""
  params, state = stats.init_shapes(net, image_size)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), "float32")
  with lowering.conv_impl("native"):
    return jax.make_jaxpr(
        lambda p, s, x: net.apply(p, s, None, x, is_training=False))(
            params, state, images).jaxpr


def downsampling(net: hk.TransformedWithState) -> int:
  """The network's total downsampling factor (32 for NFNets)."""
  big = 1024
  sizes = [size // stride for _, size, stride in _strided_inputs(_trace(net, big))]
  return big // min(sizes) if sizes else 1


def check_image_size(net: hk.TransformedWithState, image_size: int,
                     field: str, jaxpr: Any = None) -> str | None:
  """A problem line if a strided layer would see less than its stride.

  Below the network's downsampling factor the last stages would work on
  zero-padding (the final feature map would be smaller than 1x1).

  Args:
    net: the network.
    image_size: the input side to check.
    field: the config field named in the problem line.
    jaxpr: the network's jaxpr at `image_size`, if already traced.
  """
  jaxpr = _trace(net, image_size) if jaxpr is None else jaxpr
  strided = _strided_inputs(jaxpr)
  if all(size >= stride for _, size, stride in strided):
    return None
  factor = downsampling(net)
  return _fmt(field, image_size,
              f">= {factor} for this model (it downsamples {factor}x; the "
              "final feature map must be at least 1x1)")


def _check_sizes(config: Any, p: _Problems) -> None:
  t, e = config.train, config.eval
  num_devices, num_processes = jax.device_count(), jax.process_count()
  devices = (f"{num_devices} devices" if num_processes == 1 else
             f"{num_devices} devices, {num_processes} processes x "
             f"{jax.local_device_count()} local")
  num_shards = config.dataset.num_shards or num_processes
  if p.check(_is_int(config.dataset.num_shards)
             and config.dataset.num_shards >= 0
             and num_shards % num_processes == 0, "dataset.num_shards",
             config.dataset.num_shards,
             f"0 (one per process) or a multiple of the process count "
             f"{num_processes}"):
    accumulation = t.accumulation_steps
    if p.check(_is_int(accumulation) and accumulation > 0,
               "train.accumulation_steps", accumulation,
               "a positive int (1: no gradient accumulation)"):
      need = math.lcm(num_devices * accumulation, num_shards)
      what = (f"the number of devices, {devices}, times "
              f"train.accumulation_steps={accumulation}" if accumulation > 1
              else f"the number of devices, {devices}")
      p.check(_is_int(t.global_batch_size) and t.global_batch_size > 0
              and t.global_batch_size % need == 0, "train.global_batch_size",
              t.global_batch_size,
              f"a positive multiple of {need} ({what}, and of data shards, "
              f"{num_shards})" if need > 1 else "a positive int")
  p.check(_is_int(e.batch_size) and e.batch_size > 0
          and e.batch_size % num_devices == 0, "eval.batch_size",
          e.batch_size, f"a positive multiple of {num_devices} ({devices})"
          if num_devices > 1 else "a positive int")
  if t.num_steps is not None:
    p.check(_is_int(t.num_steps) and t.num_steps > 0, "train.num_steps",
            t.num_steps, "a positive int, or None to use train.num_epochs")
  elif t.num_epochs is not None:
    p.check(t.num_epochs > 0, "train.num_epochs", t.num_epochs,
            "> 0, or None to use train.num_steps")
  else:
    p.add("config.train.num_steps=None and config.train.num_epochs=None: "
          "set one of them")
  for field, value in (("train.image_size", t.image_size),
                       ("eval.image_size", e.image_size)):
    p.check(_is_int(value) and value > 0, field, value, "a positive int")
  p.check(_is_int(e.crop_padding) and e.crop_padding >= 0,
          "eval.crop_padding", e.crop_padding, "an int >= 0")
  for field, value in (("train.log_every_steps", t.log_every_steps),):
    p.check(_is_int(value) and value > 0, field, value, "a positive int")
  for field, value in (("eval.every_steps", e.every_steps),
                       ("checkpoint.every_steps", config.checkpoint.every_steps),
                       ("train.prefetch", t.prefetch),
                       ("dataset.num_workers", config.dataset.num_workers)):
    p.check(_is_int(value) and value >= 0, field, value,
            "an int >= 0 (0: never / none)")
  p.check(_is_int(config.checkpoint.max_to_keep)
          and config.checkpoint.max_to_keep > 0, "checkpoint.max_to_keep",
          config.checkpoint.max_to_keep, "a positive int")


def _check_train_fields(config: Any, p: _Problems) -> None:
  t = config.train
  p.check(t.loss in losses.LOSSES, "train.loss", t.loss,
          " or ".join(map(repr, losses.LOSSES)))
  p.check(t.compute_dtype in COMPUTE_DTYPES, "train.compute_dtype",
          t.compute_dtype, " or ".join(map(repr, COMPUTE_DTYPES)))
  p.check(0.0 <= t.label_smoothing < 1.0, "train.label_smoothing",
          t.label_smoothing, "a float in [0, 1)")
  if t.ema_decay is not None:
    p.check(0.0 <= t.ema_decay < 1.0, "train.ema_decay", t.ema_decay,
            "a float in [0, 1), or None for no EMA")
  a = t.augment
  for name in ("randaugment_layers", "randaugment_magnitude", "mixup_alpha",
               "cutmix_alpha"):
    p.check(a[name] >= 0, f"train.augment.{name}", a[name], ">= 0 (0: off)")
  p.check(isinstance(a.on_device, bool), "train.augment.on_device",
          a.on_device, "True or False")
  p.check(a.randaugment_mode in randaugment.MODES,
          "train.augment.randaugment_mode", a.randaugment_mode,
          " or ".join(map(repr, randaugment.MODES))
          + " (fixed-pixel TF port, or sizes relative to the image side)")
  if p.check(bool(config.workdir), "workdir", config.workdir,
             "a directory path (--workdir)"):
    p.check(not os.path.isfile(config.workdir), "workdir", config.workdir,
            "a directory, or a path to create one at (this is a file)")
  if config.pretrained.path and _check_pretrained_path(config, p):
    _check_pretrained_model(config, p)
  try:
    parallel.wants_distributed(config.distributed)
  except ValueError as err:
    p.add(str(err))
  try:
    profiling.parse_profile_steps(config.logging.profile_steps)
  except ValueError as err:  # Names the field already.
    p.add(str(err))


def _check_pretrained_path(config: Any, p: _Problems) -> bool:
  """True if `config.pretrained.path` exists and is not an exported model.

  Only its first bytes are read: the run reads the whole file once, later
  (`pretrained_start.read`), and not at all when it resumes.
  """
  path = config.pretrained.path
  if not p.check(os.path.exists(path), "pretrained.path", path,
                 pretrained_start.ALLOWED_PATH):
    return False
  if create.detect_format(path) == "exported":
    p.add(_fmt("pretrained.path", path, "a checkpoint with params (this is "
               "an exported model)"))
    return False
  return True


def _check_pretrained_model(config: Any, p: _Problems) -> None:
  """The checkpoint's model definition must be config.model's forward.

  NFNet kwargs that differ from `pretrained_start.implied_forward` are named
  with the flags that fix them.
  """
  path = config.pretrained.path
  try:
    implied = pretrained_start.implied_forward(config)
  except (ValueError, OSError) as err:
    p.add(str(err) if str(err).startswith("config.")
          else f"config.pretrained.model: {err}")
    return
  if implied is None:
    return
  forward, what = implied
  kwargs = config.model.kwargs.to_dict()
  defaults = timm.OFFICIAL_NFNET_KWARGS  # The NFNet defaults.
  differ = {k: v for k, v in forward.items()
            if kwargs.get(k, defaults[k]) != v}
  if differ:
    p.add(f"config.pretrained.path={path!r} is {what}, whose forward needs "
          + " ".join(f"--config.model.kwargs.{k}={v}"
                     for k, v in differ.items())
          + " (config.model.kwargs has "
          + ", ".join(f"{k}={kwargs.get(k, defaults[k])!r}" for k in differ)
          + "); or set --config.pretrained.model to the definition to "
          "fine-tune it as (e.g. nfnet_f0: the official one)")


def _dataset_spec(config: Any, p: _Problems) -> data_lib.DatasetInfo | None:
  d = config.dataset
  splits = {}
  for field in ("train_split", "eval_split"):
    try:
      splits[field] = data_lib.Split.from_string(d[field])
    except ValueError:
      p.add(_fmt(f"dataset.{field}", d[field],
                 "'train', 'train_and_valid', 'valid' or 'test'"))
  try:
    return data_lib.dataset_info(d.name, d.data_dir)
  except ValueError as err:  # Names config.dataset.name already.
    p.add(str(err))
    return None


def _model_problems(config: Any, num_classes: int, p: _Problems) -> None:
  m = config.model
  try:
    net = families.make_network(m.name, m.kwargs, num_classes,
                                remat=bool(m.remat))
  except ValueError as err:  # Names config.model.remat already.
    p.add(str(err))
    return
  jaxprs = {}
  for field, size in (("train.image_size", config.train.image_size),
                      ("eval.image_size", config.eval.image_size)):
    if size not in jaxprs:
      try:
        jaxprs[size] = _trace(net, size)
      except (ValueError, TypeError, KeyError) as err:
        p.add(f"config.model.kwargs={m.kwargs.to_dict()!r} is invalid for "
              f"{m.name}: {err}")
        return
    line = check_image_size(net, size, field, jaxprs[size])
    if line:
      p.add(line)


def validate(config: Any, *, check_model: bool = True) -> RunPlan:
  """Checks `config`; returns the derived sizes and the optimizer.

  Args:
    config: a full experiment config (see `configs/default.py`).
    check_model: trace the model to check its kwargs and the image sizes.

  Raises:
    ConfigError: listing every invalid field with its value and what is
      allowed (unknown model or variant, negative lr, batch not divisible by
      the devices, image too small, missing dataset, ...).
  """
  p = _Problems()
  _check_sizes(config, p)
  _check_train_fields(config, p)
  info = _dataset_spec(config, p)
  p.raise_if_any()  # The sizes below need valid fields and a dataset.

  t = config.train
  num_train = info.num_examples[data_lib.Split.from_string(
      config.dataset.train_split)]
  num_eval = info.num_examples[data_lib.Split.from_string(
      config.dataset.eval_split)]
  num_shards = config.dataset.num_shards or jax.process_count()
  shard_batch = t.global_batch_size // num_shards
  min_shard = num_train // num_shards
  p.check(min_shard >= shard_batch * (2 if _mixing(t.augment) else 1),
          "train.global_batch_size", t.global_batch_size,
          f"at most {num_train} (the training split's size{_where(config)}; "
          "twice the batch is read per step when mixing)")
  p.check(num_eval > 0, "dataset.eval_split", config.dataset.eval_split,
          f"a split with examples (this one has none{_where(config)})")
  steps_per_epoch = max(1, num_train // t.global_batch_size)
  if t.num_steps is not None:
    total_steps = t.num_steps
  else:
    total_steps = max(1, int(num_train * t.num_epochs) // t.global_batch_size)
  total_epochs = total_steps / steps_per_epoch
  tx = schedule = None
  try:
    tx, schedule = optimizers.make_optimizer(
        config.optimizer, batch_size=t.global_batch_size,
        steps_per_epoch=steps_per_epoch, total_epochs=total_epochs)
  except ValueError as err:  # Names the config.optimizer field already.
    p.add(str(err))
  try:
    families.check_family(config.model.name, config.model.kwargs)
  except ValueError as err:  # Names the config.model field already.
    p.add(str(err))
  else:
    if check_model:
      _model_problems(config, info.num_classes, p)
  p.raise_if_any()
  per_process = num_shards // jax.process_count()
  first = jax.process_index() * per_process
  spec = RunSpec(
      num_classes=info.num_classes, num_train_examples=num_train,
      num_eval_examples=num_eval, steps_per_epoch=steps_per_epoch,
      total_steps=total_steps, total_epochs=total_epochs,
      num_shards=num_shards, shards=tuple(range(first, first + per_process)),
      shard_batch_size=shard_batch,
      eval_host_batch_size=config.eval.batch_size // jax.process_count())
  return RunPlan(spec, tx, schedule)


def _where(config: Any) -> str:
  """Where an image folder's split sizes come from, for problem lines."""
  d = config.dataset
  if d.name != data_lib.IMAGE_FOLDER:
    return ""
  return (f" in config.dataset.data_dir={d.data_dir!r}; without split "
          "folders one image in ten per class is held out for evaluation, "
          "none from a class of one image")


def _mixing(augment: Any) -> bool:
  return augment.mixup_alpha > 0 or augment.cutmix_alpha > 0
