"""The experiment config schema: every field, its type and its default.

Configs in `configs/` start from `base_config()` and change values; they
never add fields, so the schema is this one function (documented field by
field in `configs/default.py`). Optional fields are ml_collections
placeholders so that `--config.x=value` can set a field whose default is None.
A value that is not allowed is reported as a `ConfigError` whose lines each
name the field, the value and what is allowed (`problem`).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ml_collections import config_dict

_placeholder = config_dict.placeholder


class ConfigError(ValueError):
  """A config value is not allowed; the message lists every such value."""

  def __init__(self, lines: list[str]):
    self.lines = list(lines)
    super().__init__("invalid config:\n  " + "\n  ".join(self.lines))


def problem(field: str, value: Any, allowed: str) -> str:
  """One line of a `ConfigError`: the field, its value, what is allowed."""
  return f"config.{field}={value!r} is invalid; allowed: {allowed}"


def base_config() -> config_dict.ConfigDict:
  """Returns the schema with defaults (unlocked; `finalize` locks it)."""
  return config_dict.ConfigDict({
      "seed": 0,
      "workdir": "",
      "model": {
          "name": "NFNet",
          "kwargs": {},
          "remat": False,
      },
      "dataset": {
          "name": "digits",
          "data_dir": _placeholder(str),
          "train_split": "train",
          "eval_split": "test",
          "num_workers": 0,
          # Fixed number of data shards (0: one per process). Each process
          # reads num_shards / process_count of them; fixing it makes the
          # data stream independent of the number of hosts.
          "num_shards": 0,
      },
      "train": {
          "global_batch_size": 256,
          "accumulation_steps": 1,
          "num_epochs": _placeholder(float),
          "num_steps": _placeholder(int),
          "image_size": 32,
          "augment": {
              "random_crop": False,
              "flip": False,
              "randaugment_layers": 0,
              "randaugment_magnitude": 0,
              # 'official' (the TF port's ops as run) or 'relative' (sizes
              # relative to the image side): `data.randaugment.MODES`.
              "randaugment_mode": "official",
              "mixup_alpha": 0.0,
              "cutmix_alpha": 0.0,
              # MixUp/CutMix, RandAugment and normalization in the jitted
              # train step, on the host's draws (`data.device_augment`).
              "on_device": False,
          },
          "label_smoothing": 0.0,
          "loss": "softmax",
          "ema_decay": _placeholder(float),
          "ema_warmup": True,
          "compute_dtype": "float32",
          "log_every_steps": 10,
          "prefetch": 2,
          # Debug hook: the images of this (1-based) step become NaN, so its
          # loss does (tests the NaN stop).
          "debug_nan_at_step": _placeholder(int),
      },
      "eval": {
          "batch_size": 256,
          "image_size": 32,
          "crop_padding": 32,
          "every_steps": 0,
      },
      "checkpoint": {
          "every_steps": 1000,
          "max_to_keep": 3,
      },
      "optimizer": {
          "name": "sgd",
          "kwargs": {"momentum": 0.9, "nesterov": True},
          "weight_decay": 0.0,
          "agc": {"clipping": 0.01, "eps": 1e-3,
                  "classifier_module": _placeholder(str)},
          "lr": {
              "base_lr": 0.1,
              "base_batch_size": 256,
              "warmup_epochs": 0.0,
              "schedule": "cosine",
              "end_lr_factor": 0.0,
              "decay_factor": _placeholder(float),
              "decay_epochs": _placeholder(float),
          },
          "track_clip_stats": False,
          "sam": {"rho": 0.0, "sync_perturbations": False},
      },
      "distributed": {
          "initialize": "auto",
          "coordinator_address": _placeholder(str),
          "num_processes": _placeholder(int),
          "process_id": _placeholder(int),
      },
      "pretrained": {
          "path": _placeholder(str),
          # The registry name (`nfnets_jax.list_models()`) of the model the
          # checkpoint was trained as; None: inferred from its format
          # (timm's files: dm_nfnet_*, official and .npz: nfnet_*). Its
          # forward kwargs must be config.model's (validated).
          "model": _placeholder(str),
          "reinit_head": True,
      },
      "logging": {
          "progress_bar": True,
          "tensorboard": False,
          # "START,STOP": a jax.profiler trace of train steps START+1 ...
          # STOP in WORKDIR/profile (experiment/profiling.py); None: none.
          "profile_steps": _placeholder(str),
      },
  })


def smoke(config: config_dict.ConfigDict, *, image_size: int = 32,
          model_kwargs: dict | None = None) -> config_dict.ConfigDict:
  """Shrinks a config to one tiny step (big_vision's `runlocal`).

  Keeps the recipe (optimizer, loss, augmentation, EMA, dtype) and replaces
  the sizes: a global batch of 8, one step, tiny images and a tiny model, so
  CI can run every config end to end on CPU.

  Args:
    config: a full config.
    image_size: train and eval resolution of the smoke run.
    model_kwargs: model keyword overrides (a tiny variant).
  """
  config.train.global_batch_size = 8
  config.train.num_steps = 1
  config.train.num_epochs = None
  config.train.image_size = image_size
  config.train.log_every_steps = 1
  config.eval.batch_size = 32
  config.eval.image_size = image_size
  config.eval.every_steps = 0
  config.checkpoint.every_steps = 1
  config.dataset.num_workers = 0
  config.optimizer.lr.warmup_epochs = 0.0
  config.logging.progress_bar = False
  if model_kwargs:
    config.model.kwargs.update(model_kwargs)
  return config


def parse_args(arg: str | None) -> set[str]:
  """Splits a `get_config` argument like 'F3,smoke' into its words."""
  return {a.strip() for a in (arg or "").split(",") if a.strip()}


def variant_arg(arg: str | None, variants: Iterable[str], default: str,
                config: str) -> tuple[str, bool]:
  """`(variant, smoke)` of a parameterized config's argument, e.g. 'F3,smoke'.

  Args:
    arg: the `get_config` argument (case-insensitive variant names).
    variants: the allowed variant names (upper case).
    default: the variant when `arg` names none.
    config: the config file, for the message.

  Raises:
    ValueError: a word that is neither a variant nor 'smoke', or two variants.
  """
  words = parse_args(arg)
  named = {w.upper() for w in words} & set(variants)
  unknown = {w for w in words if w.upper() not in named and w != "smoke"}
  if unknown or len(named) > 1:
    raise ValueError(f"{config}:{arg}: allowed: one variant of "
                     f"{', '.join(sorted(variants))} and/or 'smoke'")
  return (named.pop() if named else default), "smoke" in words
