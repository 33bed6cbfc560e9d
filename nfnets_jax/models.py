"""Registry of model families, so configs can name a model as data."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import haiku as hk

from nfnets_jax import fixup_resnet
from nfnets_jax import nf_regnet
from nfnets_jax import nf_resnet
from nfnets_jax import nfnet
from nfnets_jax import resnet
from nfnets_jax import skipinit_resnet

MODELS: dict[str, Callable[..., hk.Module]] = {
    "NFNet": nfnet.NFNet,
    "NFResNet": nf_resnet.NFResNet,
    "NFRegNet": nf_regnet.NFRegNet,
    "ResNet": resnet.ResNet,
    "SkipInitResNet": skipinit_resnet.SkipInitResNet,
    "FixupResNet": fixup_resnet.FixupResNet,
}


def build_model(name: str, num_classes: int, **kwargs: Any) -> hk.Module:
  """Builds the model family `name` (must be called inside a Haiku transform).

  Args:
    name: a key of `MODELS`.
    num_classes: classifier outputs.
    **kwargs: the family's constructor arguments (e.g. `variant='F0'`).

  Raises:
    ValueError: unknown model name.
  """
  if name not in MODELS:
    raise ValueError(f"config.model.name={name!r} is unknown; allowed: "
                     f"{sorted(MODELS)}")
  return MODELS[name](num_classes=num_classes, **kwargs)
