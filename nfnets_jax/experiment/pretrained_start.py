"""A fine-tuning run's pretrained checkpoint: its forward, read once.

A run with `config.pretrained.path` meets its checkpoint in three steps of
`loop.run`, each done once:

1. `adopt_forward`: the NFNet forward the weights were trained with (timm's
   `dm_nfnet_*` or the official one, told by `pretrained.model` or by the
   file's first bytes) goes into a new config; the loop logs what changed.
2. `read`: the whole file, before anything is built or written; a file that
   is not a checkpoint, or an unsafe pickle (refused, nothing of it runs),
   is a `ConfigError`.
3. `initial_params`: a new classifier for the dataset's classes
   (`pretrained.reinit_head`), and every shape checked against the network.

A resumed run skips 2 and 3: its weights come from its own checkpoint.
"""
from __future__ import annotations

import copy
import pickle
from typing import Any

import haiku as hk

from nfnets_jax.experiment import config_schema
from nfnets_jax.models import stats
from nfnets_jax.pretrained import checks
from nfnets_jax.pretrained import create
from nfnets_jax.pretrained import registry
from nfnets_jax.pretrained import timm

ALLOWED_PATH = ("an existing checkpoint file (an official F*_haiku.npz, a "
                ".npz from nfnets-convert, a timm .pth/.safetensors) or "
                "nfnets-train workdir")


def implied_forward(config: Any) -> tuple[dict[str, Any], str] | None:
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
    OSError: the file cannot be opened.
  """
  name = config.pretrained.model
  if name is not None:
    spec = registry.get_spec(name)
    if spec.family != config.model.name:
      raise ValueError(config_schema.problem(
          "pretrained.model", name,
          f"a model of family config.model.name={config.model.name!r} "
          f"({name} is a {spec.family})"))
    return ({k: spec.kwargs[k] for k in timm.TIMM_NFNET_KWARGS
             if k in spec.kwargs}, f"config.pretrained.model={name!r}")
  if (config.model.name == "NFNet"
      and create.detect_format(config.pretrained.path) == "timm"):
    return dict(timm.TIMM_NFNET_KWARGS), "a timm dm_nfnet_* file"
  return None


def adopt_forward(config: Any) -> tuple[Any, dict[str, Any]]:
  """`config` with its model kwargs set to the checkpoint's forward.

  A timm `dm_nfnet_*` file is fine-tuned with timm's forward (its WS eps and
  exact GELU) and an official one with the official forward, unless
  `config.pretrained.model` names the definition to use. Problems (an
  unknown name, a missing file) are left for validation to report.

  Returns:
    `(config, changed)`: a copy of `config` with the forward kwargs set (the
    same object when nothing changed), and the kwargs that changed.
  """
  if not config.pretrained.path:
    return config, {}
  try:
    implied = implied_forward(config)
  except (ValueError, OSError):
    return config, {}
  if implied is None:
    return config, {}
  kwargs = config.model.kwargs
  changed = {k: v for k, v in implied[0].items() if kwargs.get(k) != v}
  if not changed:
    return config, {}
  adopted = copy.deepcopy(config)
  with adopted.unlocked():
    adopted.model.kwargs.update(changed)
  return adopted, changed


def read(config: Any) -> create.Checkpoint:
  """Reads `config.pretrained.path` (any format `create_model` reads).

  Raises:
    ConfigError: the file is not a checkpoint, or an unsafe pickle (refused
      before anything in it ran).
  """
  path = config.pretrained.path
  try:
    return create.load_checkpoint(path)
  except pickle.UnpicklingError as err:  # Unsafe: refused, nothing ran.
    raise config_schema.ConfigError(
        [f"config.pretrained.path={path!r} is refused: {err}"]) from err
  # The file is the user's: whatever reading it raises (torch: KeyError,
  # RuntimeError; safetensors: its own error) means it is not a checkpoint.
  except Exception as err:  # pylint: disable=broad-except
    raise config_schema.ConfigError([config_schema.problem(
        "pretrained.path", path,
        f"{ALLOWED_PATH}; reading it failed: {type(err).__name__}: {err}")
    ]) from err


def initial_params(config: Any, net: hk.TransformedWithState,
                   num_classes: int, checkpoint: create.Checkpoint
                   ) -> tuple[hk.Params, hk.State]:
  """The checkpoint's params and state, ready to fine-tune `net`.

  With `config.pretrained.reinit_head`, the classifier is replaced for
  `num_classes` (seed `config.seed + 1`).

  Raises:
    ParamsMismatchError: naming every param that does not fit `net`.
  """
  params, model_state = checkpoint.params, checkpoint.state
  kwargs = config.model.kwargs.to_dict()
  if config.pretrained.reinit_head:
    params = checks.replace_classifier(params, config.model.name, kwargs,
                                       num_classes, seed=config.seed + 1)
  want, _ = stats.init_shapes(net, config.train.image_size)
  checks.compare_shapes(
      params, stats.as_shapes(want),
      source=f"config.pretrained.path={config.pretrained.path!r}",
      target=f"config.model ({config.model.name}, {kwargs}; set the model "
      "kwargs of the pretrained network, and pretrained.reinit_head=True "
      "for a new label set)")
  return params, model_state
