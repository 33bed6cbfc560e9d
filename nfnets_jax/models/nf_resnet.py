"""Normalizer-Free pre-activation ResNets (NF-ResNets).

Reference: [Brock, De, Smith 2021] Characterizing signal propagation to close
the performance gap in unnormalized ResNets (ICLR). Mirrors the official
release's `nfnets/nf_resnet.py` (names `NF_ResNet/~/nf_res_block_k/~/conv0`).
"""
from __future__ import annotations

from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets_jax.models import layers
from nfnets_jax.models import resnet


class NFResBlock(hk.Module):
  """NF pre-activation bottleneck: `x + alpha * skip_gain * f(act(x) * beta)`.

  `beta = 1 / sqrt(Var(x))` (predicted analytically) so the branch sees unit
  variance input; the branch is 1x1 -> 3x3 (strided) -> 1x1 convs with
  optional 2 * squeeze-excite. A projection block (stride > 1 or a width
  change) takes its shortcut through a strided 1x1 conv of `act(x) * beta`,
  which resets the variance of the stream to ~1.
  """

  def __init__(self, in_ch: int, out_ch: int, *,
               bottleneck_ratio: float = 0.25, kernel_size: int = 3,
               stride: int = 1, beta: float = 1.0, alpha: float = 0.2,
               activation: layers.Activation = jax.nn.relu,
               conv: Any = layers.WSConv2D,
               skipinit_gain: hk.initializers.Initializer | None = jnp.zeros,
               stochdepth_rate: float | None = None,
               se_ratio: float | None = None, name: str | None = None):
    super().__init__(name=name)
    self.in_ch, self.out_ch = in_ch, out_ch
    self.activation = activation
    self.beta, self.alpha = beta, alpha
    self.skipinit_gain = skipinit_gain
    self.width = int(out_ch * bottleneck_ratio)
    self.stride = stride
    self.conv0 = conv(self.width, kernel_shape=1, padding="SAME", name="conv0")
    self.conv1 = conv(self.width, kernel_shape=kernel_size, stride=stride,
                      padding="SAME", name="conv1")
    self.conv2 = conv(out_ch, kernel_shape=1, padding="SAME", name="conv2")
    self.use_projection = stride > 1 or in_ch != out_ch
    if self.use_projection:
      self.conv_shortcut = conv(out_ch, kernel_shape=1, stride=stride,
                                padding="SAME", name="conv_shortcut")
    self.stoch_depth = (layers.StochDepth(stochdepth_rate)
                        if stochdepth_rate and 0.0 < stochdepth_rate < 1.0
                        else None)
    self.se = (layers.SqueezeExcite(out_ch, out_ch, se_ratio)
               if se_ratio is not None else None)

  def __call__(self, x: jax.Array, is_training: bool
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns the block output and its signal metrics.

    Metrics: `branch_in_avg_var` (channel variance of `x * beta`, ~1 by
    design) and `res_avg_var` (branch output, before stochastic depth and
    skip gain), as `nfnet.NFBlock`.
    """
    out = self.activation(x) * self.beta
    shortcut = self.conv_shortcut(out) if self.use_projection else x
    out = self.conv0(out)
    out = self.conv1(self.activation(out))
    out = self.conv2(self.activation(out))
    if self.se is not None:
      out = (2 * self.se(out)) * out
    metrics = {"branch_in_avg_var": layers.avg_channel_var(x * self.beta),
               "res_avg_var": layers.avg_channel_var(out)}
    if self.stoch_depth is not None:
      out = self.stoch_depth(out, is_training)
    if self.skipinit_gain is not None:
      out = out * resnet.scalar_param("skip_gain", self.skipinit_gain,
                                      out.dtype)
    return out * jnp.asarray(self.alpha, out.dtype) + shortcut, metrics


class NFResNet(hk.Module):
  """Normalizer-Free pre-activation ResNet (NF-ResNet-26 ... 600).

  Stem: 7x7 stride-2 (WS) conv and 3x3 stride-2 max pool; four stages of
  `NFResBlock`; final activation, average pool, dropout, classifier.
  Input NHWC; returns a dict with `logits`, `pool`, with
  `return_metrics=True` `avg_sq_mean_{i}`, `avg_var_{i}` (i = 0 stem,
  i + 1 after block i), `res_avg_var_{i}`, `branch_in_avg_var_{i}`, and with
  `return_features=True` the feature maps `feature_info` describes.

  Attributes:
    feature_info: the maps of `return_features`, as timm's `nf_resnet*`
      `features_only=True` returns them: the stem conv's output
      ('stem.conv', before the max pool, reduction 2) and each stage's
      output ('stages.<i>', the last one before the final activation).
  """

  def __init__(self, num_classes: int, depth: resnet.Depth = 50, *,
               width: float = 4, alpha: float = 0.2,
               stochdepth_rate: float = 0.1, drop_rate: float = 0.0,
               activation: str = "relu",
               fc_init: hk.initializers.Initializer | None = None,
               skipinit_gain: hk.initializers.Initializer | None = jnp.zeros,
               se_ratio: float | None = None, use_ws: bool = True,
               ws_eps: float = 1e-4, ws_eps_mode: layers.EpsMode = "clamp",
               remat: bool = False,
               name: str = "NF_ResNet"):
    """Builds the network.

    Args:
      num_classes: classifier outputs.
      depth: 26, 50, ... 600 (`resnet.RESNET_DEPTHS`), 'ResNet50', or
        per-stage block counts such as (24, 24, 24, 24).
      width: multiplier of the stage widths (64, 128, 256, 512); official 4.
        Fractional values give narrow test networks.
      alpha: residual branch scale; Var(h) grows by alpha^2 per block.
      stochdepth_rate: final block's drop rate; block i drops `rate * i / N`.
      drop_rate: classifier dropout (the official code reads a missing
        variant entry; 0 here).
      activation: name in `layers.NONLINEARITY_GAMMAS` (gamma-scaled).
      fc_init: classifier weight init (default N(0, 0.01) as official).
      skipinit_gain: init of each block's learnable scalar `skip_gain`
        (official zeros: every block starts as the identity); None for no
        skip gain parameter (the branch enters at `alpha` from the start,
        and the tree has timm's `nf_resnet` layout).
      se_ratio: squeeze-excite hidden ratio (official `use_se=True,
        se_ratio=0.25`); None for no SE.
      use_ws: Scaled Weight Standardization convs (`layers.WSConv2D`); if
        False plain convs with the same N(0, 1/fan_in) init and a bias,
        the ICLR paper's "NF-ResNet without WS" (its mean shift grows).
      ws_eps, ws_eps_mode: passed to `layers.WSConv2D`.
      remat: recompute each block's activations in the backward pass
        (`layers.apply_stages`): less memory, about one more forward.
      name: module name (official: 'NF_ResNet').

    Raises:
      ValueError: unknown depth or activation.
    """
    super().__init__(name=name)
    self.remat = remat
    self.num_classes = num_classes
    self.depths = resnet.get_depths(depth)
    self.activation = layers.get_activation(activation)
    self.drop_rate = drop_rate
    if use_ws:
      ws_kwargs = dict(eps=ws_eps, eps_mode=ws_eps_mode)
      conv = lambda *a, **kw: layers.WSConv2D(*a, **kw, **ws_kwargs)
    else:
      w_init = hk.initializers.VarianceScaling(1.0, "fan_in", "normal")
      conv = lambda *a, **kw: resnet.Conv2D(*a, **kw, w_init=w_init)
    ch = int(16 * width)
    # The official stem asks for no bias, but its WSConv2D always adds one.
    self.initial_conv = conv(ch, kernel_shape=7, stride=2, padding="SAME",
                             name="initial_conv")
    self.blocks = []
    expected_std = 1.0
    num_blocks = sum(self.depths)
    for b in resnet.block_layout(ch, width, self.depths):
      self.blocks.append(NFResBlock(
          b.in_ch, b.out_ch, stride=b.stride, beta=1.0 / expected_std,
          alpha=alpha, activation=self.activation, conv=conv,
          skipinit_gain=skipinit_gain,
          stochdepth_rate=stochdepth_rate * b.index / num_blocks,
          se_ratio=se_ratio))
      # A projection block's output has the shortcut conv's unit variance;
      # each block then adds alpha^2.
      if b.first_in_stage:
        expected_std = 1.0
      expected_std = (expected_std**2 + alpha**2) ** 0.5
    self.fc = hk.Linear(num_classes, with_bias=True,
                        w_init=fc_init or hk.initializers.RandomNormal(0.01))
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
    stages, metrics = layers.apply_stages(
        self.blocks, self.depths, out, return_metrics, remat=self.remat,
        is_training=is_training)
    outputs.update(metrics)
    if return_features:
      outputs["features"] = [stem, *stages]
    outputs["pool"], pool = layers.pool_features(
        self.activation(stages[-1]), self.drop_rate, is_training)
    outputs["logits"] = self.fc(pool)
    return outputs
