"""NFNets: normalizer-free SE-ResNeXt-D-like networks.

Reference: [Brock, De, Smith, Simonyan 2021] High-Performance Large-Scale
Image Recognition Without Normalization (ICML).
"""
from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets_jax.models import layers


@dataclasses.dataclass(frozen=True)
class NFNetVariant:
  """Architecture and training sizes of one NFNet variant.

  Attributes:
    width: output channels of each of the four stages.
    depth: blocks in each stage.
    train_imsize: training resolution (pixels).
    test_imsize: evaluation resolution (pixels).
    randaugment_layers: RandAugment ops per image.
    randaugment_magnitude: RandAugment magnitude.
    drop_rate: dropout before the classifier.
  """
  width: tuple[int, ...]
  depth: tuple[int, ...]
  train_imsize: int
  test_imsize: int
  randaugment_layers: int
  randaugment_magnitude: int
  drop_rate: float


def _f_variant(depth_mult: int, train: int, test: int, magnitude: int,
               drop: float) -> NFNetVariant:
  return NFNetVariant(width=(256, 512, 1536, 1536),
                      depth=tuple(d * depth_mult for d in (1, 2, 6, 3)),
                      train_imsize=train, test_imsize=test,
                      randaugment_layers=4, randaugment_magnitude=magnitude,
                      drop_rate=drop)


_BASE_VARIANTS = {
    "F0": _f_variant(1, 192, 256, 5, 0.2),
    "F1": _f_variant(2, 224, 320, 10, 0.3),
    "F2": _f_variant(3, 256, 352, 10, 0.4),
    "F3": _f_variant(4, 320, 416, 15, 0.4),
    "F4": _f_variant(5, 384, 512, 15, 0.5),
    "F5": _f_variant(6, 416, 544, 15, 0.5),
    "F6": _f_variant(7, 448, 576, 15, 0.5),
    "F7": _f_variant(8, 480, 608, 15, 0.5),
}
# The `+` variants are the same networks, wider.
NFNET_VARIANTS: dict[str, NFNetVariant] = {
    **_BASE_VARIANTS,
    **{f"{name}+": dataclasses.replace(v, width=(384, 768, 2048, 2048))
       for name, v in _BASE_VARIANTS.items()},
}


def get_variant(variant: str | NFNetVariant | Mapping[str, Any]) -> NFNetVariant:
  """Looks up a variant by name, or builds a custom one from a mapping.

  Raises:
    ValueError: unknown variant name, or a mapping with unknown/missing fields.
  """
  if isinstance(variant, NFNetVariant):
    return variant
  if isinstance(variant, str):
    if variant not in NFNET_VARIANTS:
      raise ValueError(f"NFNet variant={variant!r} is unknown; allowed: "
                       f"{sorted(NFNET_VARIANTS)} or a mapping of "
                       f"{[f.name for f in dataclasses.fields(NFNetVariant)]}")
    return NFNET_VARIANTS[variant]
  fields = {f.name for f in dataclasses.fields(NFNetVariant)}
  if set(variant) != fields:
    raise ValueError(f"custom NFNet variant has fields {sorted(variant)}; "
                     f"needs exactly {sorted(fields)}")
  v = dict(variant)
  v["width"], v["depth"] = tuple(v["width"]), tuple(v["depth"])
  if len(v["width"]) != len(v["depth"]):
    raise ValueError(f"custom NFNet variant: width {v['width']} and depth "
                     f"{v['depth']} must have the same number of stages")
  return NFNetVariant(**v)


class NFBlock(hk.Module):
  """NFNet bottleneck block: `x + alpha * skip_gain * f(act(x) * beta)`.

  The residual branch is 1x1 conv -> grouped 3x3 (strided) -> grouped 3x3 ->
  1x1 conv -> 2 * squeeze-excite, then stochastic depth and a zero-initialised
  scalar `skip_gain`. Transition blocks (stride > 1 or a width change) take
  the shortcut from the branch input through an average pool and 1x1 conv.
  """

  def __init__(self, in_ch: int, out_ch: int, *, expansion: float = 0.5,
               se_ratio: float = 0.5, kernel_shape: int = 3,
               group_size: int = 128, stride: int = 1, beta: float = 1.0,
               alpha: float = 0.2, activation: layers.Activation = jax.nn.gelu,
               big_width: bool = True, use_two_convs: bool = True,
               stochdepth_rate: float | None = None,
               conv_kwargs: Mapping[str, Any] | None = None,
               name: str | None = None):
    super().__init__(name=name)
    self.in_ch, self.out_ch = in_ch, out_ch
    self.activation = activation
    self.beta, self.alpha = beta, alpha
    self.stride = stride
    self.use_two_convs = use_two_convs
    width = int((out_ch if big_width else in_ch) * expansion)
    self.groups = max(1, width // group_size)
    self.width = min(group_size, width) * self.groups
    conv = lambda ch, k, name, **kw: layers.WSConv2D(
        ch, kernel_shape=k, padding="SAME", name=name, **kw,
        **(conv_kwargs or {}))
    self.conv0 = conv(self.width, 1, "conv0")
    self.conv1 = conv(self.width, kernel_shape, "conv1", stride=stride,
                      feature_group_count=self.groups)
    if use_two_convs:
      self.conv1b = conv(self.width, kernel_shape, "conv1b",
                         feature_group_count=self.groups)
    self.conv2 = conv(out_ch, 1, "conv2")
    self.use_projection = stride > 1 or in_ch != out_ch
    if self.use_projection:
      self.conv_shortcut = conv(out_ch, 1, "conv_shortcut")
    self.se = layers.SqueezeExcite(out_ch, out_ch, se_ratio)
    self.stoch_depth = (layers.StochDepth(stochdepth_rate)
                        if stochdepth_rate and 0.0 < stochdepth_rate < 1.0
                        else None)

  def __call__(self, x: jax.Array, is_training: bool
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns the block output and its signal metrics.

    Metrics: `branch_in_avg_var` (channel variance of `x * beta`, the scaled
    input the branch sees) and `res_avg_var` (of the branch output, before
    stochastic depth and skip gain).
    """
    out = self.activation(x) * self.beta
    if self.stride > 1:
      shortcut = hk.avg_pool(out, window_shape=(1, 2, 2, 1),
                             strides=(1, 2, 2, 1), padding="SAME")
      if self.use_projection:
        shortcut = self.conv_shortcut(shortcut)
    elif self.use_projection:
      shortcut = self.conv_shortcut(out)
    else:
      shortcut = x
    out = self.conv0(out)
    out = self.conv1(self.activation(out))
    if self.use_two_convs:
      out = self.conv1b(self.activation(out))
    out = self.conv2(self.activation(out))
    out = (2 * self.se(out)) * out
    metrics = {"branch_in_avg_var": layers.avg_channel_var(x * self.beta),
               "res_avg_var": layers.avg_channel_var(out)}
    if self.stoch_depth is not None:
      out = self.stoch_depth(out, is_training)
    skip_gain = hk.get_parameter("skip_gain", (), jnp.float32, init=jnp.zeros)
    return out * (skip_gain * self.alpha).astype(out.dtype) + shortcut, metrics


class NFNet(hk.Module):
  """Normalizer-Free Network (NFNet-F0 ... F7 and the wider `+` variants).

  Input NHWC images; returns a dict with `logits` `[N, num_classes]`, `pool`
  `[N, features]`, with `return_metrics=True` the signal metrics of the
  stem (index 0) and every block i (index i + 1): `avg_sq_mean_{i}`,
  `avg_var_{i}`, `res_avg_var_{i}`, `branch_in_avg_var_{i}`, and with
  `return_features=True` the feature maps `feature_info` describes.

  Attributes:
    feature_info: the maps of `return_features`, as timm's `dm_nfnet_*`
      `features_only=True` returns them: the third stem conv's output
      ('stem.conv3', 64 channels, reduction 2), each stage's output but the
      last ('stages.<i>'), and the final conv's ('final_conv'), all before
      the activation that follows them.
  """

  def __init__(self, num_classes: int,
               variant: str | NFNetVariant | Mapping[str, Any] = "F0", *,
               width: float = 1.0, se_ratio: float = 0.5, alpha: float = 0.2,
               stochdepth_rate: float = 0.1, drop_rate: float | None = None,
               activation: str = "gelu",
               fc_init: hk.initializers.Initializer | None = None,
               final_conv_mult: float = 2.0, use_two_convs: bool = True,
               group_size: int = 128, ws_eps: float = 1e-4,
               ws_eps_mode: layers.EpsMode = "clamp",
               remat: bool = False,
               name: str = "NFNet"):
    """Builds the network.

    Args:
      num_classes: classifier outputs.
      variant: 'F0'..'F7', 'F0+'..'F7+', or a custom `NFNetVariant`/mapping.
      width: multiplier on every stage width.
      se_ratio: squeeze-excite hidden width as a fraction of block width.
      alpha: residual branch scale.
      stochdepth_rate: final block's drop rate; block i drops `rate * i / N`.
      drop_rate: classifier dropout; the variant's value if None.
      activation: name in `layers.NONLINEARITY_GAMMAS` (gamma-scaled).
      fc_init: classifier weight init (default N(0, 0.01)).
      final_conv_mult: final 1x1 conv width as a multiple of the last stage.
      use_two_convs: two grouped 3x3 convs per block (NFNet) or one.
      group_size: channels per group of the 3x3 convs.
      ws_eps, ws_eps_mode: weight standardization floor ('clamp' official,
        'add' as timm).
      remat: recompute each block's activations in the backward pass
        (`layers.apply_stages`): less memory, about one more forward.
      name: module name (official checkpoints use 'NFNet').
    """
    super().__init__(name=name)
    self.remat = remat
    self.num_classes = num_classes
    self.variant = get_variant(variant)
    self.activation = layers.get_activation(activation)
    self.drop_rate = (self.variant.drop_rate if drop_rate is None
                      else drop_rate)
    self.conv_kwargs = dict(eps=ws_eps, eps_mode=ws_eps_mode)
    conv = lambda ch, stride, name: layers.WSConv2D(
        ch, kernel_shape=3, stride=stride, name=name, **self.conv_kwargs)
    stem_ch = self.variant.width[0] // 2
    self.stem = [conv(16, 2, "stem_conv0"), conv(32, 1, "stem_conv1"),
                 conv(64, 1, "stem_conv2"), conv(stem_ch, 2, "stem_conv3")]

    self.blocks = []
    ch, expected_std = stem_ch, 1.0
    num_blocks, index = sum(self.variant.depth), 0
    strides = [1] + [2] * (len(self.variant.depth) - 1)
    for stage_width, stage_depth, stride in zip(self.variant.width,
                                                self.variant.depth, strides):
      for block_index in range(stage_depth):
        out_ch = int(stage_width * width)
        self.blocks.append(NFBlock(
            ch, out_ch, se_ratio=se_ratio, group_size=group_size,
            stride=stride if block_index == 0 else 1,
            beta=1.0 / expected_std, alpha=alpha, activation=self.activation,
            use_two_convs=use_two_convs,
            stochdepth_rate=stochdepth_rate * index / num_blocks,
            conv_kwargs=self.conv_kwargs))
        ch, index = out_ch, index + 1
        # A transition block's output has the shortcut's unit variance; each
        # block then adds alpha^2.
        if block_index == 0:
          expected_std = 1.0
        expected_std = (expected_std**2 + alpha**2) ** 0.5

    self.final_conv = layers.WSConv2D(int(final_conv_mult * ch), kernel_shape=1,
                                      name="final_conv", **self.conv_kwargs)
    self.fc = hk.Linear(num_classes, with_bias=True,
                        w_init=fc_init or hk.initializers.RandomNormal(0.01))
    self.feature_info = layers.stage_feature_info(
        layers.FeatureInfo(64, 2, "stem.conv3"), 4,
        [(int(w * width), s) for w, s in zip(self.variant.width, strides)],
        final_channels=self.final_conv.output_channels)

  def __call__(self, x: jax.Array, is_training: bool = True,
               return_metrics: bool = False, return_features: bool = False
               ) -> dict[str, jax.Array | list[jax.Array]]:
    """Returns logits (no softmax), pool, and metrics and features if asked.

    Args:
      x: NHWC images.
      is_training: stochastic depth and dropout on.
      return_metrics: add the signal propagation metrics.
      return_features: add `features`, the list of NHWC maps of
        `feature_info`.
    """
    outputs = {}
    out = x
    for i, conv in enumerate(self.stem):
      out = conv(out) if i == 0 else conv(self.activation(out))
      if i == 2:  # timm's 'stem.conv3' (its convs count from 1).
        stem_feature = out
    stages, metrics = layers.apply_stages(
        self.blocks, self.variant.depth, out, return_metrics,
        remat=self.remat, is_training=is_training)
    outputs.update(metrics)
    out = self.final_conv(stages[-1])
    if return_features:
      outputs["features"] = [stem_feature, *stages[:-1], out]
    outputs["pool"], pool = layers.pool_features(
        self.activation(out), self.drop_rate, is_training)
    outputs["logits"] = self.fc(pool)
    return outputs
