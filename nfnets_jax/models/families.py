"""Model families by name, and the one way to build a network from data.

A config or a registry entry names a model as `(family, kwargs)`;
`make_network` turns that into the `hk.transform_with_state` of
`forward(images, is_training) -> outputs` that training, evaluation,
`create_model` and export all use.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
import inspect
from typing import Any

import haiku as hk
import jax

from nfnets_jax.models import fixup_resnet
from nfnets_jax.models import layers
from nfnets_jax.models import nf_regnet
from nfnets_jax.models import nf_resnet
from nfnets_jax.models import nfnet
from nfnets_jax.models import normfree
from nfnets_jax.models import resnet
from nfnets_jax.models import skipinit_resnet

MODELS: dict[str, Callable[..., hk.Module]] = {
    "NFNet": nfnet.NFNet,
    "NFResNet": nf_resnet.NFResNet,
    "NFRegNet": nf_regnet.NFRegNet,
    "NormFreeNet": normfree.NormFreeNet,
    "ResNet": resnet.ResNet,
    "SkipInitResNet": skipinit_resnet.SkipInitResNet,
    "FixupResNet": fixup_resnet.FixupResNet,
}
# Keyword arguments models took before the lowering became a run-time
# setting (`nfnets_jax.cpu.conv_impl`, `$NFNETS_JAX_CONV`).
RUNTIME_SETTINGS = ("conv_impl",)


def check_family(name: str, kwargs: Mapping[str, Any]) -> None:
  """Raises ValueError for an unknown family or a run-time setting in kwargs.

  Raises:
    ValueError: naming the field, the value and what is allowed.
  """
  if name not in MODELS:
    raise ValueError(f"config.model.name={name!r} is invalid; allowed: one "
                     f"of {sorted(MODELS)}")
  for key in RUNTIME_SETTINGS:
    if key in kwargs:
      raise ValueError(
          f"config.model.kwargs.{key}={kwargs[key]!r} is not a model "
          "argument: the convolution lowering is a run-time setting, not "
          "part of the model. Remove it, and set NFNETS_JAX_CONV="
          f"{kwargs[key]} in the environment (or use `with "
          f"nfnets_jax.cpu.conv_impl({kwargs[key]!r}):`) if you need it")


def build_model(name: str, num_classes: int, **kwargs: Any) -> hk.Module:
  """Builds the model family `name` (must be called inside a Haiku transform).

  Args:
    name: a key of `MODELS`.
    num_classes: classifier outputs.
    **kwargs: the family's constructor arguments (e.g. `variant='F0'`).

  Raises:
    ValueError: unknown model name, or a run-time setting among kwargs.
  """
  check_family(name, kwargs)
  return MODELS[name](num_classes=num_classes, **kwargs)


def remat_families() -> list[str]:
  """The families whose residual blocks can be rematerialized."""
  return sorted(name for name, cls in MODELS.items()
                if "remat" in inspect.signature(cls).parameters)


def feature_families() -> list[str]:
  """The families whose forward takes `return_features` (feature maps)."""
  return sorted(name for name, cls in MODELS.items()
                if "return_features" in inspect.signature(cls.__call__)
                .parameters)


def feature_info(family: str, kwargs: Mapping[str, Any]
                 ) -> tuple[layers.FeatureInfo, ...]:
  """The maps a family's model returns with `return_features=True`.

  Cheap: builds the module (inside a Haiku transform) and reads its
  `feature_info`; nothing is traced or compiled.

  Args:
    family: a key of `MODELS`.
    kwargs: its constructor arguments (a dict or a ConfigDict).

  Returns:
    One `layers.FeatureInfo` per map (channels, reduction, module), in the
    order of `outputs['features']`.

  Raises:
    ValueError: unknown family, a run-time setting among kwargs, or a
      family without feature maps.
  """
  kwargs = dict(kwargs.to_dict() if hasattr(kwargs, "to_dict") else kwargs)
  check_family(family, kwargs)
  if family not in feature_families():
    raise ValueError(f"family={family!r} has no feature maps "
                     "(return_features); allowed: one of "
                     f"{feature_families()}")
  found = []
  hk.transform(lambda: found.append(
      build_model(family, 1, **kwargs).feature_info)).init(None)
  return found[0]


def network_fn(family: str, kwargs: Mapping[str, Any], num_classes: int,
               *, remat: bool = False) -> Callable[..., dict[str, Any]]:
  """`forward(images, is_training)` -> outputs, to run inside a Haiku
  transform (`make_network` transforms it).

  `forward(images, is_training, return_features=True)` adds the feature
  maps (`feature_info`) as `outputs['features']`; the parameters are the
  same either way.

  Args:
    family: a key of `MODELS`.
    kwargs: its constructor arguments (a dict or a ConfigDict).
    num_classes: classifier outputs.
    remat: recompute each residual block's activations in the backward pass
      (`config.model.remat`; `layers.apply_stages`).

  Raises:
    ValueError: unknown family, a run-time setting among kwargs, or remat
      for a family without it.
  """
  kwargs = dict(kwargs.to_dict() if hasattr(kwargs, "to_dict") else kwargs)
  check_family(family, kwargs)
  if remat:
    if family not in remat_families():
      raise ValueError(
          f"config.model.remat=True is not supported by {family}; allowed "
          f"with {', '.join(remat_families())} (or False)")
    kwargs["remat"] = True

  def forward(images: jax.Array, is_training: bool,
              return_features: bool = False) -> dict[str, Any]:
    model = build_model(family, num_classes, **kwargs)
    if return_features:  # Only asked of the families that have it.
      return model(images, is_training=is_training, return_features=True)
    return model(images, is_training=is_training)

  return forward


def make_network(family: str, kwargs: Mapping[str, Any], num_classes: int,
                 *, remat: bool = False) -> hk.TransformedWithState:
  """`hk.transform_with_state` of `network_fn`'s `forward(images,
  is_training)` -> outputs (arguments and errors as `network_fn`'s)."""
  return hk.transform_with_state(
      network_fn(family, kwargs, num_classes, remat=remat))
