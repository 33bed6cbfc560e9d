"""Checks a config before any compute; derives the run's sizes.

`validate(config)` is the one place where config values are judged. Every
problem is reported in one `ConfigError` whose lines name the field, the
value and what is allowed, e.g.

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
import pickle
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets_jax import data as data_lib
from nfnets_jax.data import randaugment
from nfnets_jax import models
from nfnets_jax import optim
from nfnets_jax.experiment import losses
from nfnets_jax.experiment import parallel

COMPUTE_DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
  """A config value is not allowed; the message lists every such value."""


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


def _fmt(field: str, value: Any, allowed: str) -> str:
  return f"config.{field}={value!r} is invalid; allowed: {allowed}"


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
      raise ConfigError("invalid config:\n  " + "\n  ".join(self.lines))


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
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  params, state = jax.eval_shape(
      lambda x: net.init(jax.random.PRNGKey(0), x, is_training=True), images)
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
    need = math.lcm(num_devices, num_shards)
    p.check(_is_int(t.global_batch_size) and t.global_batch_size > 0
            and t.global_batch_size % need == 0, "train.global_batch_size",
            t.global_batch_size,
            f"a positive multiple of {need} (the number of devices, "
            f"{devices}, and of data shards, {num_shards})" if need > 1
            else "a positive int")
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
  p.check(a.randaugment_mode in randaugment.MODES,
          "train.augment.randaugment_mode", a.randaugment_mode,
          " or ".join(map(repr, randaugment.MODES))
          + " (fixed-pixel TF port, or sizes relative to the image side)")
  if p.check(bool(config.workdir), "workdir", config.workdir,
             "a directory path (--workdir)"):
    p.check(not os.path.isfile(config.workdir), "workdir", config.workdir,
            "a directory, or a path to create one at (this is a file)")
  if config.pretrained.path and _pretrained_loads(config, p):
    _check_pretrained_model(config, p)
  try:
    parallel.wants_distributed(config.distributed)
  except ValueError as err:
    p.add(str(err))


def _pretrained_loads(config: Any, p: _Problems) -> bool:
  """True if `config.pretrained.path` loads as training will load it.

  Reading the file here (the restricted unpickler runs nothing from it)
  stops a run with a file that is not a checkpoint, or an unsafe one,
  before anything is built or compiled.
  """
  # pylint: disable-next=g-import-not-at-top
  from nfnets_jax import builder
  path = config.pretrained.path
  allowed = ("an existing checkpoint file (an official F*_haiku.npz, a .npz "
             "from python -m nfnets_jax.convert_checkpoint, a timm "
             ".pth/.safetensors) or nfnets-train workdir")
  if not p.check(os.path.exists(path), "pretrained.path", path, allowed):
    return False
  if builder.detect_format(path) == "exported":
    return True  # _check_pretrained_model names it.
  try:
    builder.load_checkpoint(path)
  except pickle.UnpicklingError as err:  # Unsafe: refused, nothing ran.
    p.add(f"config.pretrained.path={path!r} is refused: {err}")
    return False
  # The file is the user's: whatever reading it raises (torch: KeyError,
  # RuntimeError; safetensors: its own error) means it is not a checkpoint.
  except Exception as err:  # pylint: disable=broad-except
    p.add(_fmt("pretrained.path", path,
               f"{allowed}; reading it failed: {type(err).__name__}: {err}"))
    return False
  return True


def pretrained_forward(config: Any) -> tuple[dict[str, Any], str] | None:
  """The NFNet forward kwargs `config.pretrained` was trained with.

  `pretrained.model` (a registry name) or, unset, the file's format says
  which definition the weights were trained as: timm's `dm_nfnet_*` (eps
  added to the weight variance, exact GELU; `TIMM_NFNET_KWARGS`) or the
  official one. None when nothing is implied (official/.npz files and
  workdirs without `pretrained.model`, non-NFNet models).

  Returns:
    `(kwargs, what)`: e.g. `({'activation': 'gelu_exact', ...}, 'a timm
    dm_nfnet_* file')`.

  Raises:
    ValueError: an unknown `pretrained.model`, or one of another family
      than `config.model.name`.
  """
  # pylint: disable=g-import-not-at-top
  from nfnets_jax import builder
  from nfnets_jax import registry
  from nfnets_jax import timm_weights
  name = config.pretrained.model
  if name is not None:
    spec = registry.get_spec(name)
    if spec.family != config.model.name:
      raise ValueError(_fmt("pretrained.model", name,
                            f"a model of family config.model.name="
                            f"{config.model.name!r} ({name} is a "
                            f"{spec.family})"))
    return ({k: spec.kwargs[k] for k in timm_weights.TIMM_NFNET_KWARGS
             if k in spec.kwargs}, f"config.pretrained.model={name!r}")
  if (config.model.name == "NFNet"
      and builder.detect_format(config.pretrained.path) == "timm"):
    return dict(timm_weights.TIMM_NFNET_KWARGS), "a timm dm_nfnet_* file"
  return None


def adopt_pretrained_forward(config: Any) -> dict[str, Any]:
  """Sets `config.model.kwargs`' forward fields to the checkpoint's.

  A timm `dm_nfnet_*` file is fine-tuned with timm's forward (its WS eps and
  exact GELU) and an official one with the official forward, unless
  `config.pretrained.model` names the definition to use. Problems (an
  unknown name, an unreadable file) are left for `validate` to report.

  Returns:
    The kwargs that were changed (empty when none).
  """
  if not config.pretrained.path:
    return {}
  try:
    implied = pretrained_forward(config)
  except (ValueError, OSError):
    return {}
  if implied is None:
    return {}
  kwargs = config.model.kwargs
  changed = {k: v for k, v in implied[0].items() if kwargs.get(k) != v}
  with config.unlocked():
    kwargs.update(changed)
  return changed


def _check_pretrained_model(config: Any, p: _Problems) -> None:
  """The checkpoint's model definition must be config.model's forward.

  NFNet kwargs that differ from `pretrained_forward` are named with the
  flags that fix them.
  """
  # pylint: disable=g-import-not-at-top
  from nfnets_jax import builder
  from nfnets_jax import timm_weights
  path = config.pretrained.path
  if builder.detect_format(path) == "exported":
    p.add(_fmt("pretrained.path", path, "a checkpoint with params (this is "
               "an exported model)"))
    return
  try:
    implied = pretrained_forward(config)
  except ValueError as err:
    p.add(str(err) if str(err).startswith("config.")
          else f"config.pretrained.model: {err}")
    return
  if implied is None:
    return
  forward, what = implied
  kwargs = config.model.kwargs.to_dict()
  defaults = timm_weights.OFFICIAL_NFNET_KWARGS  # The NFNet defaults.
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
  # Imported here to avoid a cycle (train_state imports this package's peers).
  from nfnets_jax.experiment import train_state  # pylint: disable=g-import-not-at-top
  m = config.model
  if not p.check(m.name in models.MODELS, "model.name", m.name,
                 f"one of {sorted(models.MODELS)}"):
    return
  net = train_state.make_network(m, num_classes)
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


def validate(config: Any, *, check_model: bool = True) -> RunSpec:
  """Checks `config`; returns the derived sizes.

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
  try:
    optim.make_optimizer(config.optimizer, batch_size=t.global_batch_size,
                         steps_per_epoch=steps_per_epoch,
                         total_epochs=total_epochs)
  except ValueError as err:  # Names the config.optimizer field already.
    p.add(str(err))
  if check_model:
    _model_problems(config, info.num_classes, p)
  p.raise_if_any()
  per_process = num_shards // jax.process_count()
  first = jax.process_index() * per_process
  return RunSpec(
      num_classes=info.num_classes, num_train_examples=num_train,
      num_eval_examples=num_eval, steps_per_epoch=steps_per_epoch,
      total_steps=total_steps, total_epochs=total_epochs,
      num_shards=num_shards, shards=tuple(range(first, first + per_process)),
      shard_batch_size=shard_batch,
      eval_host_batch_size=config.eval.batch_size // jax.process_count())


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
