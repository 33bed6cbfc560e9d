"""A fine-tuning run's pretrained checkpoint: its forward, read once.

A run with `config.pretrained.path` meets its checkpoint in three steps of
`loop.run`, each done once:

1. `adopt_forward`: the NFNet forward the weights were trained with (timm's
   `dm_nfnet_*` or the official one, told by `pretrained.model` or by the
   file's first bytes) goes into a new config; a timm file of another NF
   model (`eca_nfnet_l0`, `nf_resnet50`, ...: told by its keys and shapes)
   or a `pretrained.model` naming one sets the config's model to that
   `NormFreeNet`; the loop logs what changed.
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
from nfnets_jax.pretrained import timm_normfree

ALLOWED_PATH = ("an existing checkpoint file (an official F*_haiku.npz, a "
                ".npz from nfnets-convert, a timm .pth/.safetensors) or "
                "nfnets-train workdir")
# The run's model kwargs kept when its checkpoint sets the model to a
# NormFreeNet (both are `NormFreeNet` arguments).
CARRIED_KWARGS = ("stochdepth_rate", "drop_rate")


def normfree_model(config: Any) -> registry.ModelSpec | None:
  """The `NormFreeNet` registry model `config.pretrained` is, if any.

  `pretrained.model` when it names one; unset, a timm file of one (not
  `dm_nfnet_*`), told by its keys and shapes (`timm.read_timm_shapes`: the
  header, not the weights; `timm_normfree.identify`).

  Returns:
    The registry entry, or None (another family, not a timm file, or a
    header that cannot be read: `read` reports that).

  Raises:
    ValueError: an unknown `pretrained.model`, or a timm NormFreeNet file
      of no registered model (naming the closest).
    OSError: the file cannot be opened.
  """
  name = config.pretrained.model
  if name is not None:
    spec = registry.get_spec(name)
    return spec if spec.family == "NormFreeNet" else None
  path = config.pretrained.path
  if create.detect_format(path) != "timm":
    return None
  try:
    shapes = timm.read_timm_shapes(path)
  # The file is the user's: a header that cannot be read (or no torch for
  # a .pth) is reported once, by `read`, as the run reads the whole file.
  except Exception:  # pylint: disable=broad-except
    return None
  if timm_normfree.is_dm_nfnet(shapes):
    return None
  try:
    name = timm_normfree.identify(timm_normfree.param_shapes(shapes))
  except ValueError as err:
    raise ValueError(f"config.pretrained.path={path!r}: {err}") from None
  return registry.get_spec(name)


def normfree_kwargs(config: Any, spec: registry.ModelSpec) -> dict[str, Any]:
  """`spec`'s kwargs, with the run's `CARRIED_KWARGS` (those set)."""
  kwargs = config.model.kwargs
  return {**{k: kwargs[k] for k in CARRIED_KWARGS
             if kwargs.get(k) is not None}, **spec.kwargs}


def _is_model(config: Any, spec: registry.ModelSpec) -> bool:
  return (config.model.name == spec.family
          and config.model.kwargs.get("variant") == spec.kwargs["variant"])


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
    ValueError: an unknown `pretrained.model`, one of another family than
      `config.model.name`, or a NormFreeNet checkpoint (`normfree_model`)
      that `config.model` is not (naming what to set).
    OSError: the file cannot be opened.
  """
  spec = normfree_model(config)
  if spec is not None:
    if _is_model(config, spec):
      return None
    what = (f"config.pretrained.model={config.pretrained.model!r} names"
            if config.pretrained.model is not None else
            f"config.pretrained.path={config.pretrained.path!r} is")
    raise ValueError(
        f"{what} {spec.name!r} (timm's definition, a NormFreeNet): set "
        f"--config.model.name={spec.family} and model.kwargs to "
        f"{normfree_kwargs(config, spec)} (config.model is "
        f"{config.model.name} {config.model.kwargs.to_dict()}); nfnets-train "
        "does so itself (pretrained_start.adopt_forward)")
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
  `config.pretrained.model` names the definition to use. A timm file of
  another NF model (or a `pretrained.model` naming one) sets the model to
  that `NormFreeNet` (`normfree_model`): `model.name`, and `model.kwargs`
  to its variant with the run's `CARRIED_KWARGS`; the image sizes stay the
  config's. Problems (an unknown name, a missing file) are left for
  validation to report.

  Returns:
    `(config, changed)`: a copy of `config` with the forward kwargs set (the
    same object when nothing changed), and the kwargs that changed (`name`
    and `kwargs` when the model became a NormFreeNet).
  """
  if not config.pretrained.path:
    return config, {}
  try:
    spec = normfree_model(config)
  except (ValueError, OSError):
    return config, {}
  if spec is not None:
    if _is_model(config, spec):
      return config, {}
    changed = {"name": spec.family, "kwargs": normfree_kwargs(config, spec)}
    adopted = copy.deepcopy(config)
    with adopted.unlocked():
      adopted.model.name = changed["name"]
      adopted.model.kwargs = changed["kwargs"]
    return adopted, changed
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
