"""Pre-activation ResNets with SkipInit: no normalization, zero-init skip gain.

An unnormalized baseline of the NF papers: every residual branch is scaled by
a learnable scalar initialised to zero, so the network starts as the
identity, but nothing controls the signal once the gains move.

References:
  [De, Smith 2020] Batch Normalization Biases Residual Blocks Towards the
    Identity Function in Deep Networks (NeurIPS). SkipInit.
  [Brock, De, Smith 2021] Characterizing signal propagation to close the
    performance gap in unnormalized ResNets (ICLR). The official release's
    `nfnets/skipinit_resnet.py`, whose names and defaults this file mirrors.
"""
from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets_jax.models import layers
from nfnets_jax.models import resnet


class NFResBlock(hk.Module):
  """Unnormalized pre-activation bottleneck `x + skip_gain * f(act(x))`.

  Plain (biased) convs 1x1 -> 3x3 (strided) -> 1x1; a projection block takes
  its shortcut through a strided 1x1 conv of `act(x)`. Named `NFResBlock` as
  the official release, so its parameters are `.../nf_res_block_k/...`.
  """

  def __init__(self, in_ch: int, out_ch: int, *,
               bottleneck_ratio: float = 0.25, kernel_size: int = 3,
               stride: int = 1, activation: layers.Activation = jax.nn.relu,
               stochdepth_rate: float | None = None,
               name: str | None = None):
    super().__init__(name=name)
    self.in_ch, self.out_ch = in_ch, out_ch
    self.activation = activation
    self.width = int(out_ch * bottleneck_ratio)
    self.stride = stride
    conv = lambda ch, k, name, stride=1: resnet.Conv2D(
        ch, kernel_shape=k, stride=stride, padding="SAME", name=name)
    self.conv0 = conv(self.width, 1, "conv0")
    self.conv1 = conv(self.width, kernel_size, "conv1", stride=stride)
    self.conv2 = conv(out_ch, 1, "conv2")
    self.use_projection = stride > 1 or in_ch != out_ch
    if self.use_projection:
      self.conv_shortcut = conv(out_ch, 1, "conv_shortcut", stride=stride)
    self.stoch_depth = (layers.StochDepth(stochdepth_rate)
                        if stochdepth_rate and 0.0 < stochdepth_rate < 1.0
                        else None)

  def __call__(self, x: jax.Array, is_training: bool
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns the block output, `branch_in_avg_var` and `res_avg_var`."""
    out = self.activation(x)
    shortcut = self.conv_shortcut(out) if self.use_projection else x
    out = self.conv0(out)
    out = self.conv1(self.activation(out))
    out = self.conv2(self.activation(out))
    metrics = {"branch_in_avg_var": layers.avg_channel_var(x),
               "res_avg_var": layers.avg_channel_var(out)}
    if self.stoch_depth is not None:
      out = self.stoch_depth(out, is_training)
    out = out * resnet.scalar_param("skip_gain", jnp.zeros, out.dtype)
    return out + shortcut, metrics


class SkipInitResNet(hk.Module):
  """Pre-activation ResNet with SkipInit and no normalization.

  Stem: 7x7 stride-2 conv (no bias) and 3x3 stride-2 max pool; four stages
  of `NFResBlock`; final activation, average pool, dropout, classifier.
  Input NHWC; returns a dict with `logits`, `pool`, with
  `return_metrics=True` `avg_sq_mean_{i}`, `avg_var_{i}` (i = 0 stem,
  i + 1 after block i), `res_avg_var_{i}`, `branch_in_avg_var_{i}`, and with
  `return_features=True` the feature maps `feature_info` describes.

  Attributes:
    feature_info: the maps of `return_features`, as `NFResNet`'s: the stem
      conv's output ('stem.conv', reduction 2) and each stage's
      ('stages.<i>', the last one before the final activation).
  """

  def __init__(self, num_classes: int, depth: resnet.Depth = 50, *,
               width: float = 4, stochdepth_rate: float = 0.1,
               drop_rate: float = 0.0, activation: str = "relu",
               fc_init: hk.initializers.Initializer | None = None,
               name: str = "SkipInit_ResNet"):
    """Builds the network.

    Args:
      num_classes: classifier outputs.
      depth: 26, 50, ... 600 (`resnet.RESNET_DEPTHS`), 'ResNet50', or
        per-stage block counts.
      width: multiplier of the stage widths (64, 128, 256, 512); official 4.
      stochdepth_rate: final block's drop rate; block i drops `rate * i / N`.
      drop_rate: classifier dropout (the official code reads a missing
        variant entry; 0 here).
      activation: unscaled nonlinearity name (official: relu, swish,
        identity).
      fc_init: classifier weight init (official zeros).
      name: module name (official: 'SkipInit_ResNet').

    Raises:
      ValueError: unknown depth or activation.
    """
    super().__init__(name=name)
    self.num_classes = num_classes
    self.depths = resnet.get_depths(depth)
    self.activation = layers.get_activation(activation, scaled=False)
    self.drop_rate = drop_rate
    ch = int(16 * width)
    self.initial_conv = resnet.Conv2D(ch, kernel_shape=7, stride=2,
                                      padding="SAME", with_bias=False,
                                      name="initial_conv")
    num_blocks = sum(self.depths)
    self.blocks = [
        NFResBlock(b.in_ch, b.out_ch, stride=b.stride,
                   activation=self.activation,
                   stochdepth_rate=stochdepth_rate * b.index / num_blocks)
        for b in resnet.block_layout(ch, width, self.depths)]
    self.fc = hk.Linear(num_classes, with_bias=True,
                        w_init=fc_init or jnp.zeros)
    self.feature_info = resnet.feature_info(ch, width, self.depths)

  def __call__(self, x: jax.Array, is_training: bool = True,
               return_metrics: bool = False, return_features: bool = False
               ) -> dict[str, jax.Array | list[jax.Array]]:
    """Returns logits (no softmax), pool, and metrics and features if asked
    (`return_features`: `features`, the NHWC maps of `feature_info`)."""
    outputs = {}
    stem = self.initial_conv(x)
    out = hk.max_pool(stem, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1),
                      padding="SAME")
    stages, metrics = layers.apply_stages(self.blocks, self.depths, out,
                                          return_metrics,
                                          is_training=is_training)
    outputs.update(metrics)
    if return_features:
      outputs["features"] = [stem, *stages]
    outputs["pool"], pool = layers.pool_features(
        self.activation(stages[-1]), self.drop_rate, is_training)
    outputs["logits"] = self.fc(pool)
    return outputs
