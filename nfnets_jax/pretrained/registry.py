"""Named models: family, constructor arguments and input geometry, as data.

`nfnets_jax.create_model(name, ...)` builds what a name here says;
`list_models()` lists them:

* `nfnet_f0` ... `nfnet_f7`, `nfnet_f0+` ... `nfnet_f7+`: the official NFNet
  definition (`OFFICIAL_NFNET_KWARGS`), the paper's train/test sizes and its
  evaluation crop (resize to test size + 32, center crop).
* `dm_nfnet_f0` ... `dm_nfnet_f6`: timm's definition of the same weights
  (`TIMM_NFNET_KWARGS`: weight-standardization eps added to the variance,
  exact GELU) and timm's default data config (`timm/models/nfnet.py` of
  huggingface/pytorch-image-models: `input_size`, `test_input_size`,
  `crop_pct`, `crop_mode='squash'`, bicubic, ImageNet mean/std). timm's
  squash crop resizes both sides to `floor(test_size / crop_pct)` and
  center-crops, which is this package's eval crop with `crop_padding =
  floor(test_size / crop_pct) - test_size` (F0: 284 -> 256, padding 28).
* `nf_resnet26` ... `nf_resnet600` (every depth of `resnet.RESNET_DEPTHS`)
  and `nf_regnet_b0` ... `nf_regnet_b8`: the NF-ResNets and NF-RegNets of the
  two NF papers, official defaults.
* Baselines, named after their classes: `resnet<depth>` (BatchNorm
  ResNet-V2), `skipinit_resnet<depth>`, `fixup_resnet<depth>`.
* timm's other normalizer-free models (`models.normfree.NormFreeNet`,
  timm's `NfCfg` definitions) with timm's default data config at its test
  size (`TIMM_NORMFREE_DATA`: `crop_mode='center'`, the shorter side
  resized): `eca_nfnet_l0` ... `eca_nfnet_l3`, `nfnet_l0`,
  `nf_seresnet26/50/101`, `nf_ecaresnet26/50/101` under timm's names, and
  under `timm_<timm name>` those whose timm name already means the official
  definition here: `timm_nf_resnet26/50/101`, `timm_nf_regnet_b0` ... `b5`,
  `timm_nfnet_f0` ... `f7` (timm's NFNet-F: gamma in the convs, no skip
  gain, PyTorch padding; not the `dm_nfnet_*` layout). `TIMM_NAMES` maps
  every timm NF name to its registry name.

No weights ship with a name: `pretrained=` gives them (see
`pretrained.create`).
"""
from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import difflib
import math
import os
from typing import Any

import numpy as np

from nfnets_jax.models import nf_regnet
from nfnets_jax.models import nfnet
from nfnets_jax.models import resnet
from nfnets_jax.data import images
from nfnets_jax.data import preprocessing
from nfnets_jax.pretrained.timm import OFFICIAL_NFNET_KWARGS
from nfnets_jax.pretrained.timm import TIMM_NFNET_KWARGS

# The paper's evaluation: resize to test size + 32, then center crop
# (Brock et al. 2021, Appendix A.1).
PAPER_CROP_PADDING = 32
# ResNet-style baselines: the usual 224 px, resize 256 -> crop 224.
RESNET_SIZE = 224
# The eval crops `DataConfig.preprocess` implements (timm's `crop_mode`).
CROP_MODES = ("squash", "center")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """How images are prepared for a model (what the eval pipeline does).

  Attributes:
    train_size: training resolution (pixels).
    test_size: evaluation resolution (pixels): the crop side.
    crop_padding: evaluation resizes both sides to `test_size +
      crop_padding`, then keeps the central `test_size` square.
    mean, std: per-channel RGB normalization in 0-255 units.
    interpolation: the resize kernel.
    crop_mode: one of `CROP_MODES`: 'squash' resizes both sides (the
      official pipeline, timm's `dm_nfnet_*`), 'center' the shorter side,
      keeping the aspect ratio (timm's default, its other NF models).
  """
  train_size: int
  test_size: int
  crop_padding: int = PAPER_CROP_PADDING
  mean: tuple[float, float, float] = preprocessing.MEAN_RGB
  std: tuple[float, float, float] = preprocessing.STDDEV_RGB
  interpolation: str = "bicubic"
  crop_mode: str = "squash"

  def preprocess(self, image: np.ndarray | str | os.PathLike
                 ) -> np.ndarray:
    """The evaluation pipeline's preprocessing of one image.

    Resize (bicubic; both sides, or with `crop_mode='center'` the shorter
    side, aspect kept) to `test_size + crop_padding`, central `test_size`
    crop, mean/std normalization: exactly `nfnets_jax.data`'s eval mode
    (`preprocessing.eval_resize_crop`).

    Args:
      image: `[H, W, 3]` RGB, 0-255 (uint8 or float), or an image file's
        path, read by `nfnets_jax.data.images.read_rgb` (16-bit scaled,
        transparency over white, EXIF orientation, CMYK: the picture a
        person sees; `nfnets-predict` and image folders read it so too).

    Returns:
      float32 `[test_size, test_size, 3]`.

    Raises:
      ValueError: a mean/std/interpolation/crop mode the eval pipeline does
        not have.
      nfnets_jax.data.ImageDecodeError: a file that cannot be read (its
        subclass `ImageTooLargeError`: over PIL's pixel limit).
    """
    if isinstance(image, (str, os.PathLike)):
      image = images.read_rgb(image)
    if (tuple(self.mean) != tuple(preprocessing.MEAN_RGB)
        or tuple(self.std) != tuple(preprocessing.STDDEV_RGB)
        or self.interpolation != "bicubic"
        or self.crop_mode not in CROP_MODES):
      raise ValueError(
          f"data config {self}: the eval pipeline implements bicubic "
          f"resizing with the ImageNet mean/std and crop modes {CROP_MODES} "
          "only")
    return preprocessing.normalize(preprocessing.eval_resize_crop(
        image, self.test_size, self.crop_padding,
        keep_aspect=self.crop_mode == "center"))

  @property
  def crop_pct(self) -> float:
    """timm's name for the kept fraction: test size / resize size."""
    return self.test_size / (self.test_size + self.crop_padding)

  def to_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "mean": list(self.mean),
            "std": list(self.std)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"data config has unknown fields {unknown}; allowed: "
                       f"{sorted(fields)}")
    d = dict(d)
    for key in ("mean", "std"):
      if key in d:
        d[key] = tuple(float(x) for x in d[key])
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """One named model.

  Attributes:
    name: the registry name.
    family: a key of `models.families.MODELS`.
    kwargs: the family's constructor arguments (besides `num_classes`).
    data: its input geometry.
    num_classes: classifier outputs of its reference weights (ImageNet).
  """
  name: str
  family: str
  kwargs: Mapping[str, Any]
  data: DataConfig
  num_classes: int = 1000


def timm_crop_padding(test_size: int, crop_pct: float) -> int:
  """timm's squash crop as a padding: `floor(test_size / crop_pct) - size`."""
  return math.floor(test_size / crop_pct) - test_size


# timm's `dm_nfnet_*` default cfgs: (input_size, test_input_size, crop_pct).
TIMM_DATA: dict[str, tuple[int, int, float]] = {
    "F0": (192, 256, 0.9), "F1": (224, 320, 0.91), "F2": (256, 352, 0.92),
    "F3": (320, 416, 0.94), "F4": (384, 512, 0.951),
    "F5": (416, 544, 0.954), "F6": (448, 576, 0.956),
}


# timm's default data configs of its other NF models (`default_cfgs` of
# timm/models/nfnet.py, by timm's name, `normfree.NORMFREE_CONFIGS`):
# (input_size, test_input_size, crop_pct at the test size: `test_crop_pct`
# where timm gives one, else `crop_pct`); all bicubic, ImageNet mean/std,
# crop_mode 'center'.
TIMM_NORMFREE_DATA: dict[str, tuple[int, int, float]] = {
    "nfnet_f0": (192, 256, 0.9), "nfnet_f1": (224, 320, 0.9),
    "nfnet_f2": (256, 352, 0.9), "nfnet_f3": (320, 416, 0.9),
    "nfnet_f4": (384, 512, 0.9), "nfnet_f5": (416, 544, 0.9),
    "nfnet_f6": (448, 576, 0.9), "nfnet_f7": (480, 608, 0.9),
    "nfnet_l0": (224, 288, 1.0),
    "eca_nfnet_l0": (224, 288, 1.0), "eca_nfnet_l1": (256, 320, 1.0),
    "eca_nfnet_l2": (320, 384, 1.0), "eca_nfnet_l3": (352, 448, 1.0),
    "nf_regnet_b0": (192, 256, 0.9), "nf_regnet_b1": (256, 288, 0.9),
    "nf_regnet_b2": (240, 272, 0.9), "nf_regnet_b3": (288, 320, 0.9),
    "nf_regnet_b4": (320, 384, 0.9), "nf_regnet_b5": (384, 456, 0.9),
    "nf_resnet26": (224, 224, 0.9), "nf_resnet50": (256, 288, 0.94),
    "nf_resnet101": (224, 224, 0.9),
    **{f"nf_{kind}resnet{depth}": (224, 224, 0.9) for kind in ("se", "eca")
       for depth in (26, 50, 101)},
}
# timm's definition of a name that already means the official one here.
TIMM_PREFIX = "timm_"


def _build_registry() -> dict[str, ModelSpec]:
  specs = []
  for variant, v in nfnet.NFNET_VARIANTS.items():
    specs.append(ModelSpec(
        f"nfnet_{variant.lower()}", "NFNet",
        {"variant": variant, **OFFICIAL_NFNET_KWARGS},
        DataConfig(v.train_imsize, v.test_imsize)))
  for variant, (train, test, crop_pct) in TIMM_DATA.items():
    specs.append(ModelSpec(
        f"dm_nfnet_{variant.lower()}", "NFNet",
        {"variant": variant, **TIMM_NFNET_KWARGS},
        DataConfig(train, test, timm_crop_padding(test, crop_pct))))
  for variant, v in nf_regnet.NF_REGNET_VARIANTS.items():
    specs.append(ModelSpec(f"nf_regnet_{variant.lower()}", "NFRegNet",
                           {"variant": variant},
                           DataConfig(v.train_imsize, v.test_imsize)))
  resnet_data = DataConfig(RESNET_SIZE, RESNET_SIZE)
  for prefix, family in (("nf_resnet", "NFResNet"), ("resnet", "ResNet"),
                         ("skipinit_resnet", "SkipInitResNet"),
                         ("fixup_resnet", "FixupResNet")):
    for depth in resnet.RESNET_DEPTHS:
      specs.append(ModelSpec(f"{prefix}{depth}", family, {"depth": depth},
                             resnet_data))
  official = {s.name for s in specs}
  for timm_name, (train, test, crop_pct) in TIMM_NORMFREE_DATA.items():
    specs.append(ModelSpec(
        TIMM_PREFIX + timm_name if timm_name in official else timm_name,
        "NormFreeNet", {"variant": timm_name},
        DataConfig(train, test, timm_crop_padding(test, crop_pct),
                   crop_mode="center")))
  return {s.name: s for s in specs}


REGISTRY: dict[str, ModelSpec] = _build_registry()
# Every timm NF model name (`normfree.NORMFREE_CONFIGS`) -> its registry
# name: `dm_nfnet_*` (the `NFNet` family), the `NormFreeNet` entries.
TIMM_NAMES: dict[str, str] = {
    **{f"dm_nfnet_{v.lower()}": f"dm_nfnet_{v.lower()}" for v in TIMM_DATA},
    **{s.kwargs["variant"]: s.name for s in REGISTRY.values()
       if s.family == "NormFreeNet"},
}


def list_models(pattern: str = "") -> list[str]:
  """The registry names containing `pattern` (all by default), sorted."""
  return sorted(n for n in REGISTRY if pattern in n)


def get_spec(name: str) -> ModelSpec:
  """The `ModelSpec` of a registry name (case-insensitive).

  Raises:
    ValueError: an unknown name, listing the closest known ones.
  """
  spec = REGISTRY.get(str(name).lower())
  if spec is None:
    ratio = lambda n: difflib.SequenceMatcher(None, str(name).lower(),
                                              n).ratio()
    close = sorted((n for n in REGISTRY if ratio(n) >= 0.6),
                   key=lambda n: (-ratio(n), n))[:5]
    hint = (f"did you mean {', '.join(map(repr, close))}? " if close else "")
    raise ValueError(f"model name {name!r} is unknown; {hint}all names: "
                     "nfnets_jax.list_models() (nfnet_f0 ... nfnet_f7+, "
                     "dm_nfnet_f0 ... dm_nfnet_f6, nf_resnet26 ..., "
                     "nf_regnet_b0 ... nf_regnet_b8, eca_nfnet_l0 ..., "
                     "timm_nf_resnet50 ..., resnet50, ...)")
  return spec


def name_for_nfnet(variant: str, *, timm: bool) -> str:
  """The registry name of an NFNet variant ('F0') in either definition."""
  return f"{'dm_' if timm else ''}nfnet_{variant.lower()}"
