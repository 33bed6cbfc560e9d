"""Normalizer-Free RegNets (NF-RegNet-B0 ... B8).

EfficientNet-like inverted bottlenecks (grouped 3x3 of group size 8, SE in the
middle) made normalizer-free.

References:
  [Brock, De, Smith 2021] Characterizing signal propagation to close the
    performance gap in unnormalized ResNets (ICLR), section 5.
  The official release's `nfnets/nf_regnet.py` and `base.nf_regnet_params`,
  whose names (`NF_RegNet/~/nf_block_k/~/conv0`), defaults and variant table
  this file mirrors.
"""
from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets_jax.models import layers
from nfnets_jax.models import resnet


@dataclasses.dataclass(frozen=True)
class NFRegNetVariant:
  """Architecture and training sizes of one NF-RegNet variant.

  Attributes:
    width: output channels of each stage, before the `width` multiplier.
    depth: blocks in each stage.
    train_imsize: training resolution (pixels).
    test_imsize: evaluation resolution (pixels).
    drop_rate: dropout before the classifier.
  """
  width: tuple[int, ...]
  depth: tuple[int, ...]
  train_imsize: int
  test_imsize: int
  drop_rate: float


NF_REGNET_VARIANTS: dict[str, NFRegNetVariant] = {
    "B0": NFRegNetVariant((48, 104, 208, 440), (1, 3, 6, 6), 192, 224, 0.2),
    "B1": NFRegNetVariant((48, 104, 208, 440), (2, 4, 7, 7), 224, 256, 0.2),
    "B2": NFRegNetVariant((56, 112, 232, 488), (2, 4, 8, 8), 240, 272, 0.3),
    "B3": NFRegNetVariant((56, 128, 248, 528), (2, 5, 9, 9), 288, 320, 0.3),
    "B4": NFRegNetVariant((64, 144, 288, 616), (2, 6, 11, 11), 320, 384, 0.4),
    "B5": NFRegNetVariant((80, 168, 336, 704), (3, 7, 14, 14), 384, 456, 0.4),
    "B6": NFRegNetVariant((88, 184, 376, 792), (3, 8, 16, 16), 448, 528, 0.5),
    "B7": NFRegNetVariant((96, 208, 416, 880), (4, 10, 19, 19), 512, 600,
                          0.5),
    "B8": NFRegNetVariant((104, 232, 456, 968), (4, 11, 22, 22), 600, 672,
                          0.5),
}


def get_variant(variant: str | NFRegNetVariant | Mapping[str, Any]
                ) -> NFRegNetVariant:
  """Looks up a variant by name, or builds a custom one from a mapping.

  Raises:
    ValueError: unknown variant name, or a mapping with unknown/missing fields.
  """
  if isinstance(variant, NFRegNetVariant):
    return variant
  fields = [f.name for f in dataclasses.fields(NFRegNetVariant)]
  if isinstance(variant, str):
    if variant not in NF_REGNET_VARIANTS:
      raise ValueError(f"NF-RegNet variant={variant!r} is unknown; allowed: "
                       f"{sorted(NF_REGNET_VARIANTS)} or a mapping of "
                       f"{fields}")
    return NF_REGNET_VARIANTS[variant]
  if set(variant) != set(fields):
    raise ValueError(f"custom NF-RegNet variant has fields {sorted(variant)}; "
                     f"needs exactly {sorted(fields)}")
  v = dict(variant)
  v["width"], v["depth"] = tuple(v["width"]), tuple(v["depth"])
  if len(v["width"]) != len(v["depth"]):
    raise ValueError(f"custom NF-RegNet variant: width {v['width']} and depth "
                     f"{v['depth']} must have the same number of stages")
  return NFRegNetVariant(**v)


class NFBlock(hk.Module):
  """NF-RegNet inverted bottleneck: `x + alpha * skip_gain * f(act(x) * beta)`.

  The branch is 1x1 expansion (width `in_ch * expansion`, rounded to whole
  groups) -> grouped 3x3 (strided) -> 2 * squeeze-excite -> 1x1 projection.
  Transition blocks take the shortcut from `act(x) * beta` through a 2x2
  average pool (if strided) and a 1x1 conv.
  """

  def __init__(self, in_ch: int, out_ch: int, *, expansion: float = 2.25,
               se_ratio: float = 0.5, kernel_size: int = 3,
               group_size: int = 8, stride: int = 1, beta: float = 1.0,
               alpha: float = 0.2, activation: layers.Activation = jax.nn.relu,
               skipinit_gain: hk.initializers.Initializer | None = jnp.zeros,
               stochdepth_rate: float | None = None,
               ch_div: int | None = None,
               conv_kwargs: Mapping[str, Any] | None = None,
               name: str | None = None):
    super().__init__(name=name)
    self.in_ch, self.out_ch = in_ch, out_ch
    self.activation = activation
    self.beta, self.alpha = beta, alpha
    self.skipinit_gain = skipinit_gain
    self.stride = stride
    width = (int(in_ch * expansion) if ch_div is None
             else resnet.make_divisible(in_ch * expansion, ch_div))
    # Whole groups of `group_size` (at least one, for tiny test networks).
    self.groups = max(1, width // group_size)
    self.width = group_size * self.groups
    se_hidden = (None if ch_div is None else resnet.make_divisible(
        self.width * se_ratio, ch_div, round_limit=0.0))
    conv = lambda ch, k, name, **kw: layers.WSConv2D(
        ch, kernel_shape=k, padding="SAME", name=name, **kw,
        **(conv_kwargs or {}))
    self.conv0 = conv(self.width, 1, "conv0")
    self.conv1 = conv(self.width, kernel_size, "conv1", stride=stride,
                      feature_group_count=self.groups)
    self.conv2 = conv(out_ch, 1, "conv2")
    self.use_projection = stride > 1 or in_ch != out_ch
    if self.use_projection:
      self.conv_shortcut = conv(out_ch, 1, "conv_shortcut")
    if se_hidden is None:
      self.se = layers.SqueezeExcite(self.width, self.width, se_ratio)
    else:
      self.se = layers.SqueezeExcite(self.width, self.width, None,
                                     hidden_ch=se_hidden)
    self.stoch_depth = (layers.StochDepth(stochdepth_rate)
                        if stochdepth_rate and 0.0 < stochdepth_rate < 1.0
                        else None)

  def __call__(self, x: jax.Array, is_training: bool
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns the block output, `branch_in_avg_var` and `res_avg_var`."""
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
    out = (2 * self.se(out)) * out
    out = self.conv2(self.activation(out))
    metrics = {"branch_in_avg_var": layers.avg_channel_var(x * self.beta),
               "res_avg_var": layers.avg_channel_var(out)}
    if self.stoch_depth is not None:
      out = self.stoch_depth(out, is_training)
    if self.skipinit_gain is not None:
      out = out * resnet.scalar_param("skip_gain", self.skipinit_gain,
                                      out.dtype)
    return out * jnp.asarray(self.alpha, out.dtype) + shortcut, metrics


class NFRegNet(hk.Module):
  """Normalizer-Free RegNet (B0 ... B8).

  Stem: 3x3 stride-2 WS conv; stages of `NFBlock` (every stage starts with a
  stride-2 block; the first block of the network uses expansion 1); final 1x1
  conv to `1280 * C / 440` channels, activation, average pool, classifier.
  Input NHWC; returns a dict with `logits`, `pool`, with
  `return_metrics=True` `avg_sq_mean_{i}`, `avg_var_{i}` (i = 0 stem,
  i + 1 after block i), `res_avg_var_{i}`, `branch_in_avg_var_{i}`, and with
  `return_features=True` the feature maps `feature_info` describes.

  Attributes:
    feature_info: the maps of `return_features`, as timm's `nf_regnet_*`
      `features_only=True` returns them: the stem conv's output
      ('stem.conv', reduction 2), each stage's output but the last
      ('stages.<i>') and the final conv's ('final_conv', before the final
      activation).
  """

  def __init__(self, num_classes: int,
               variant: str | NFRegNetVariant | Mapping[str, Any] = "B0", *,
               width: float = 0.75, expansion: float = 2.25,
               group_size: int = 8, se_ratio: float = 0.5, alpha: float = 0.2,
               stochdepth_rate: float = 0.1, drop_rate: float | None = None,
               activation: str = "swish",
               fc_init: hk.initializers.Initializer | None = None,
               skipinit_gain: hk.initializers.Initializer | None = jnp.zeros,
               ch_div: int | None = None, ws_eps: float = 1e-4,
               ws_eps_mode: layers.EpsMode = "clamp",
               remat: bool = False,
               name: str = "NF_RegNet"):
    """Builds the network.

    Args:
      num_classes: classifier outputs.
      variant: 'B0'..'B8', or a custom `NFRegNetVariant`/mapping.
      width: multiplier on every stage width (official 0.75).
      expansion: inverted bottleneck expansion (first block of the net: 1).
      group_size: channels per group of the 3x3 convs.
      se_ratio: squeeze-excite hidden width as a fraction of block width.
      alpha: residual branch scale.
      stochdepth_rate: final block's drop rate; block i drops `rate * i / N`.
      drop_rate: classifier dropout; the variant's value if None.
      activation: name in `layers.NONLINEARITY_GAMMAS` (gamma-scaled).
      fc_init: classifier weight init (official zeros).
      skipinit_gain: init of each block's scalar `skip_gain` (official
        zeros); None for no skip gain parameter.
      ch_div: None rounds channels down as the official code; an int (timm:
        8) rounds stage, bottleneck, SE and head widths to multiples of it
        as timm's `make_divisible`, giving timm's `nf_regnet_*` layout.
      ws_eps, ws_eps_mode: passed to `layers.WSConv2D`.
      remat: recompute each block's activations in the backward pass
        (`layers.apply_stages`): less memory, about one more forward.
      name: module name (official: 'NF_RegNet').

    Raises:
      ValueError: unknown variant or activation.
    """
    super().__init__(name=name)
    self.remat = remat
    self.num_classes = num_classes
    self.variant = get_variant(variant)
    self.activation = layers.get_activation(activation)
    self.drop_rate = (self.variant.drop_rate if drop_rate is None
                      else drop_rate)
    conv_kwargs = dict(eps=ws_eps, eps_mode=ws_eps_mode)
    if ch_div is None:
      round_ch = int
    else:
      round_ch = lambda c: resnet.make_divisible(c, ch_div)
    ch = round_ch(self.variant.width[0] * width)
    self.initial_conv = layers.WSConv2D(ch, kernel_shape=3, stride=2,
                                        padding="SAME", name="initial_conv",
                                        **conv_kwargs)
    self.blocks = []
    expected_std = 1.0
    num_blocks, index = sum(self.variant.depth), 0
    for stage_width, stage_depth in zip(self.variant.width,
                                        self.variant.depth):
      for block_index in range(stage_depth):
        out_ch = round_ch(stage_width * width)
        self.blocks.append(NFBlock(
            ch, out_ch, expansion=1 if index == 0 else expansion,
            se_ratio=se_ratio, group_size=group_size,
            stride=2 if block_index == 0 else 1, beta=1.0 / expected_std,
            alpha=alpha, activation=self.activation,
            skipinit_gain=skipinit_gain,
            stochdepth_rate=stochdepth_rate * index / num_blocks,
            ch_div=ch_div, conv_kwargs=conv_kwargs))
        ch, index = out_ch, index + 1
        if block_index == 0:
          expected_std = 1.0
        expected_std = (expected_std**2 + alpha**2) ** 0.5
    # EfficientNet-like head: 1280 channels for a 440-channel last stage.
    if ch_div is None:
      final_ch = int(1280 * ch // 440)
    else:
      final_ch = round_ch(width * (1280 * self.variant.width[-1] // 440))
    self.final_conv = layers.WSConv2D(final_ch, kernel_shape=1,
                                      padding="SAME", name="final_conv",
                                      **conv_kwargs)
    self.fc = hk.Linear(num_classes, with_bias=True,
                        w_init=fc_init or jnp.zeros)
    self.feature_info = layers.stage_feature_info(
        layers.FeatureInfo(self.initial_conv.output_channels, 2,
                           "stem.conv"), 2,
        [(round_ch(w * width), 2) for w in self.variant.width],
        final_channels=final_ch)

  def __call__(self, x: jax.Array, is_training: bool = True,
               return_metrics: bool = False, return_features: bool = False
               ) -> dict[str, jax.Array | list[jax.Array]]:
    """Returns logits (no softmax), pool, and metrics and features if asked
    (`return_features`: `features`, the NHWC maps of `feature_info`)."""
    outputs = {}
    stem = self.initial_conv(x)
    stages, metrics = layers.apply_stages(
        self.blocks, self.variant.depth, stem, return_metrics,
        remat=self.remat, is_training=is_training)
    outputs.update(metrics)
    out = self.final_conv(stages[-1])
    if return_features:
      outputs["features"] = [stem, *stages[:-1], out]
    outputs["pool"], pool = layers.pool_features(
        self.activation(out), self.drop_rate, is_training)
    outputs["logits"] = self.fc(pool)
    return outputs
