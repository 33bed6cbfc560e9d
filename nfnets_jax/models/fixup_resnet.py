"""Post-activation ResNets with Fixup initialization and no normalization.

An unnormalized baseline of the NF papers: the last conv of each residual
branch starts at zero, the others are He-initialised and scaled by
`L^(-1/4)` (L residual blocks, 3 convs per branch), and scalar biases and a
scalar multiplier stand in for the normalization's affine parameters.

References:
  [Zhang, Dauphin, Ma 2019] Fixup Initialization: Residual Learning Without
    Normalization (ICLR).
  [Brock, De, Smith 2021] Characterizing signal propagation to close the
    performance gap in unnormalized ResNets (ICLR). The official release's
    `nfnets/fixup_resnet.py`, whose names, inits and defaults this file
    mirrors.
"""
from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets_jax.models import layers
from nfnets_jax.models import resnet


class ResBlock(hk.Module):
  """Post-activation Fixup bottleneck `act(x' + scale * f(x') + b3b)`.

  With `x' = x + bias1a`: conv0 (1x1) -> +b1b, act -> +b2a, conv1 (3x3,
  strided) -> +b2b, act -> +b3a, conv2 (1x1, zero init) -> * scale + b3b.
  Convs have no bias. Inits as the official release: He normal in fan-out
  form, `std = sqrt(2 / (out_ch * k * k))`, times `num_blocks^(-1/4)` for
  conv0 and conv1; the projection shortcut (strided 1x1 conv of `x'`) is
  plain He normal (fan-out).
  """

  def __init__(self, in_ch: int, out_ch: int, num_blocks: int, *,
               bottleneck_ratio: float = 0.25, kernel_size: int = 3,
               stride: int = 1, activation: layers.Activation = jax.nn.relu,
               stochdepth_rate: float | None = None,
               name: str | None = None):
    super().__init__(name=name)
    self.in_ch, self.out_ch = in_ch, out_ch
    self.activation = activation
    self.width = int(out_ch * bottleneck_ratio)
    self.stride = stride
    depth_scale = num_blocks ** (-0.25)
    normal = hk.initializers.RandomNormal
    conv = lambda ch, k, name, w_init, stride=1: resnet.Conv2D(
        ch, kernel_shape=k, stride=stride, padding="SAME", with_bias=False,
        w_init=w_init, name=name)
    self.conv0 = conv(self.width, 1, "conv0",
                      normal((2 / self.width) ** 0.5 * depth_scale))
    self.conv1 = conv(
        self.width, kernel_size, "conv1",
        normal((2 / (self.width * kernel_size**2)) ** 0.5 * depth_scale),
        stride=stride)
    self.conv2 = conv(out_ch, 1, "conv2", jnp.zeros)
    self.use_projection = stride > 1 or in_ch != out_ch
    if self.use_projection:
      self.conv_shortcut = conv(out_ch, 1, "conv_shortcut",
                                normal((2 / out_ch) ** 0.5), stride=stride)
    self.stoch_depth = (layers.StochDepth(stochdepth_rate)
                        if stochdepth_rate and 0.0 < stochdepth_rate < 1.0
                        else None)

  def __call__(self, x: jax.Array, is_training: bool
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns the block output, `branch_in_avg_var` and `res_avg_var`."""
    bias = lambda name: resnet.scalar_param(name, jnp.zeros, x.dtype)
    out = x + bias("bias1a")
    shortcut = self.conv_shortcut(out) if self.use_projection else out
    branch_in = out
    out = self.activation(self.conv0(out) + bias("bias1b"))
    out = self.activation(self.conv1(out + bias("bias2a")) + bias("bias2b"))
    out = self.conv2(out + bias("bias3a"))
    out = out * resnet.scalar_param("scale", jnp.ones, x.dtype)
    out = out + bias("bias3b")
    metrics = {"branch_in_avg_var": layers.avg_channel_var(branch_in),
               "res_avg_var": layers.avg_channel_var(out)}
    if self.stoch_depth is not None:
      out = self.stoch_depth(out, is_training)
    return self.activation(out + shortcut), metrics


class FixupResNet(hk.Module):
  """Post-activation ResNet with Fixup initialization, no normalization.

  Stem: 7x7 stride-2 conv (no bias), scalar bias, activation, 3x3 stride-2
  max pool; four stages of Fixup `ResBlock`; average pool, dropout, scalar
  bias, classifier. Input NHWC; returns a dict with `logits`, `pool`, with
  `return_metrics=True` `avg_sq_mean_{i}`, `avg_var_{i}` (i = 0 stem,
  i + 1 after block i), `res_avg_var_{i}`, `branch_in_avg_var_{i}`, and
  with `return_features=True` the feature maps `feature_info` describes.

  Attributes:
    feature_info: the maps of `return_features`: the stem's activation
      ('stem.act', reduction 2, before the max pool: post-activation
      blocks, so tapped after the activation as timm's post-activation
      ResNets tap 'act1') and each stage's output ('stages.<i>').
  """

  def __init__(self, num_classes: int, depth: resnet.Depth = 50, *,
               width: float = 4, stochdepth_rate: float = 0.1,
               drop_rate: float = 0.0, activation: str = "relu",
               fc_init: hk.initializers.Initializer | None = None,
               name: str = "FixUp_ResNet"):
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
      fc_init: classifier weight init (official zeros, as Fixup).
      name: module name (official: 'FixUp_ResNet').

    Raises:
      ValueError: unknown depth or activation.
    """
    super().__init__(name=name)
    self.num_classes = num_classes
    self.depths = resnet.get_depths(depth)
    self.activation = layers.get_activation(activation, scaled=False)
    self.drop_rate = drop_rate
    ch = int(16 * width)
    # Official: Haiku's default conv init for the stem.
    self.initial_conv = resnet.Conv2D(ch, kernel_shape=7, stride=2,
                                      padding="SAME", with_bias=False,
                                      name="initial_conv")
    num_blocks = sum(self.depths)
    self.blocks = [
        ResBlock(b.in_ch, b.out_ch, num_blocks, stride=b.stride,
                 activation=self.activation,
                 stochdepth_rate=stochdepth_rate * b.index / num_blocks)
        for b in resnet.block_layout(ch, width, self.depths)]
    self.fc = hk.Linear(num_classes, with_bias=True,
                        w_init=fc_init or jnp.zeros)
    self.feature_info = resnet.feature_info(ch, width, self.depths,
                                            stem_module="stem.act")

  def __call__(self, x: jax.Array, is_training: bool = True,
               return_metrics: bool = False, return_features: bool = False
               ) -> dict[str, jax.Array | list[jax.Array]]:
    """Returns logits (no softmax), pool, and metrics and features if asked
    (`return_features`: `features`, the NHWC maps of `feature_info`)."""
    outputs = {}
    out = self.initial_conv(x)
    stem = self.activation(
        out + resnet.scalar_param("bias1", jnp.zeros, out.dtype))
    out = hk.max_pool(stem, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1),
                      padding="SAME")
    stages, metrics = layers.apply_stages(self.blocks, self.depths, out,
                                          return_metrics,
                                          is_training=is_training)
    outputs.update(metrics)
    if return_features:
      outputs["features"] = [stem, *stages]
    outputs["pool"], pool = layers.pool_features(
        stages[-1], self.drop_rate, is_training)
    pool = pool + resnet.scalar_param("bias2", jnp.zeros, pool.dtype)
    outputs["logits"] = self.fc(pool)
    return outputs
