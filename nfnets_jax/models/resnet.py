"""Pre-activation ResNets (v2), with a choice of normalizer or none.

The normalized baseline of the NF papers, and the shared ResNet layout (depth
table, stage widths, float32-parameter plain convolution) that the NF-ResNet,
SkipInit and Fixup families build on. The normalizers (batch norm, the
official baseline's; running batch norm; layer, instance and group norm) are
`normalizers.py`'s.

References:
  [He, Zhang, Ren, Sun 2016] Identity Mappings in Deep Residual Networks
    (ECCV). Pre-activation (v2) bottleneck blocks.
  [Brock, De, Smith 2021] Characterizing signal propagation to close the
    performance gap in unnormalized ResNets (ICLR). The BN and unnormalized
    ResNets of its signal propagation plots; the official release's
    `nfnets/resnet.py`, whose names and defaults this file mirrors.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets_jax.models import layers
from nfnets_jax.models import normalizers

Normalization = normalizers.Normalization
# The norm layers' builder and applier, under the names the blocks use.
make_norm = normalizers.make_norm
apply_norm = normalizers.apply_norm

# Blocks per stage of the bottleneck ResNets. 26-200 as He et al. / timm,
# 270-420 as ResNet-RS (Bello et al. 2021), 288 and 600 the deep uniform
# networks of the official release (used for the signal propagation plots).
RESNET_DEPTHS: dict[int, tuple[int, int, int, int]] = {
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
    270: (4, 29, 53, 4),
    288: (24, 24, 24, 24),
    350: (4, 36, 72, 4),
    420: (4, 44, 87, 4),
    600: (50, 50, 50, 50),
}
# Stage widths are these times the `width` multiplier (official default 4:
# 256, 512, 1024, 2048); the stem has 16 * width channels.
STAGE_WIDTHS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)

Depth = int | str | Sequence[int]


def get_depths(depth: Depth) -> tuple[int, ...]:
  """Blocks per stage of a ResNet.

  Args:
    depth: a key of `RESNET_DEPTHS` (50), the official variant name
      ('ResNet50'), or a custom per-stage tuple such as (24, 24, 24, 24).

  Returns:
    A tuple of positive ints, one per stage.

  Raises:
    ValueError: unknown depth, or a malformed custom tuple.
  """
  allowed = (f"allowed: {sorted(RESNET_DEPTHS)}, 'ResNet<depth>', or a "
             f"per-stage tuple of positive ints")
  if isinstance(depth, str):
    name = depth.removeprefix("ResNet")
    if not name.isdigit() or int(name) not in RESNET_DEPTHS:
      raise ValueError(f"ResNet depth={depth!r} is unknown; {allowed}")
    return RESNET_DEPTHS[int(name)]
  if isinstance(depth, int):
    if depth not in RESNET_DEPTHS:
      raise ValueError(f"ResNet depth={depth!r} is unknown; {allowed}")
    return RESNET_DEPTHS[depth]
  depths = tuple(depth)
  if (not depths or len(depths) > len(STAGE_WIDTHS)
      or not all(isinstance(d, int) and d > 0 for d in depths)):
    raise ValueError(f"ResNet depth={depth!r} is not a tuple of 1 to "
                     f"{len(STAGE_WIDTHS)} positive ints; {allowed}")
  return depths


def stage_widths(width: float, num_stages: int) -> list[int]:
  """Output channels of each stage for a width multiplier."""
  return [int(w * width) for w in STAGE_WIDTHS[:num_stages]]


class BlockLayout(NamedTuple):
  """Where one residual block of a ResNet-layout network sits.

  Attributes:
    in_ch, out_ch: input and output channels.
    stride: 2 for the first block of stages 2-4, else 1.
    first_in_stage: a transition block (projection shortcut).
    index: the block's position over the whole network (0-based); the
      stochastic depth rate of block i is `rate * i / num_blocks`.
  """
  in_ch: int
  out_ch: int
  stride: int
  first_in_stage: bool
  index: int


def block_layout(stem_ch: int, width: float, depths: Sequence[int]
                 ) -> list[BlockLayout]:
  """Every block of a ResNet with stage widths `64..512 x width`."""
  blocks, ch = [], stem_ch
  for out_ch, stage_depth, stride in zip(
      stage_widths(width, len(depths)), depths, STAGE_STRIDES):
    for i in range(stage_depth):
      blocks.append(BlockLayout(ch, out_ch, stride if i == 0 else 1, i == 0,
                                len(blocks)))
      ch = out_ch
  return blocks


def feature_info(stem_ch: int, width: float, depths: Sequence[int],
                 stem_module: str = "stem.conv"
                 ) -> tuple[layers.FeatureInfo, ...]:
  """The `return_features` maps of a ResNet-layout network.

  As timm's ResNet-V2 / NF-ResNet `features_only=True`: the 7x7 stem
  conv's output (reduction 2, before the max pool), then each stage's.

  Args:
    stem_ch: the stem conv's channels.
    width: the stage width multiplier.
    depths: blocks per stage.
    stem_module: the stem map's name.
  """
  return layers.stage_feature_info(
      layers.FeatureInfo(stem_ch, 2, stem_module), 4,
      list(zip(stage_widths(width, len(depths)), STAGE_STRIDES)))


class Conv2D(hk.Conv2D):
  """`hk.Conv2D` whose parameters are float32 whatever the input dtype.

  The kernel and bias are created in float32 and cast to the input dtype for
  the convolution, as `layers.WSConv2D` does, so a model initialised in
  float32 runs with bfloat16 inputs and keeps float32 master weights.
  """

  def __call__(self, inputs: jax.Array, **kwargs: Any) -> jax.Array:
    dtype = inputs.dtype

    def create(next_creator, shape, _, init, context):
      del context
      return next_creator(shape, jnp.float32, init)

    def get(next_getter, value, context):
      del context
      return next_getter(value).astype(dtype)

    with hk.custom_creator(create), hk.custom_getter(get):
      return super().__call__(inputs, **kwargs)


def scalar_param(name: str, init: hk.initializers.Initializer,
                 dtype: jnp.dtype) -> jax.Array:
  """A float32 scalar parameter, cast to the compute dtype."""
  return hk.get_parameter(name, (), jnp.float32, init=init).astype(dtype)


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None,
                   round_limit: float = 0.9) -> int:
  """Rounds a channel count to a multiple of `divisor`, as timm does.

  Nearest multiple, at least `min_value` (default `divisor`), bumped up one
  multiple if rounding lost more than `1 - round_limit` of `v`.
  """
  min_value = min_value or divisor
  new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
  if new_v < round_limit * v:
    new_v += divisor
  return new_v


class ResBlockV2(hk.Module):
  """Pre-activation bottleneck: `x + f(act(bn0(x)))`.

  `bn0`, `bn1`, `bn2` are the norm slots (the official names, whatever the
  normalizer: `normalizers.make_norm`).

  `f` is conv0 (1x1) -> bn1, act -> conv1 (3x3, strided) -> bn2, act ->
  conv2 (1x1), all convs without bias.

  The first block of each stage projects the shortcut with a (strided) 1x1
  conv of the pre-activated input; optional squeeze-excite scales the branch.
  """

  def __init__(self, out_ch: int, *, stride: int = 1,
               use_projection: bool = False,
               activation: layers.Activation = jax.nn.relu,
               normalization: Normalization = "batchnorm",
               norm_kwargs: Mapping[str, Any] | None = None,
               conv_kwargs: Mapping[str, Any] | None = None,
               se_ratio: float | None = None, name: str | None = None):
    super().__init__(name=name)
    self.out_ch = out_ch
    self.stride = stride
    self.use_projection = use_projection
    self.activation = activation
    self.width = out_ch // 4
    norm = lambda name: make_norm(normalization, norm_kwargs or {}, name)
    conv = lambda ch, k, name, stride=1: Conv2D(
        ch, kernel_shape=k, stride=stride, with_bias=False, padding="SAME",
        name=name, **(conv_kwargs or {}))
    self.bn0 = norm("bn0")
    self.conv0 = conv(self.width, 1, "conv0")
    self.bn1 = norm("bn1")
    self.conv1 = conv(self.width, 3, "conv1", stride=stride)
    self.bn2 = norm("bn2")
    self.conv2 = conv(out_ch, 1, "conv2")
    if use_projection:
      self.conv_shortcut = conv(out_ch, 1, "conv_shortcut", stride=stride)
    self.se = (layers.SqueezeExcite(out_ch, out_ch, se_ratio)
               if se_ratio is not None else None)

  def __call__(self, x: jax.Array, is_training: bool,
               test_local_stats: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns the block output and `branch_in_avg_var`, `res_avg_var`."""
    bn_args = (is_training, test_local_stats)
    normed = apply_norm(self.bn0, x, *bn_args)
    out = self.activation(normed)
    shortcut = self.conv_shortcut(out) if self.use_projection else x
    out = self.conv0(out)
    out = self.conv1(self.activation(apply_norm(self.bn1, out, *bn_args)))
    out = self.conv2(self.activation(apply_norm(self.bn2, out, *bn_args)))
    if self.se is not None:
      out = self.se(out) * out
    metrics = {"branch_in_avg_var": layers.avg_channel_var(normed),
               "res_avg_var": layers.avg_channel_var(out)}
    return out + shortcut, metrics


class ResNet(hk.Module):
  """Pre-activation ResNet (v2) with batch norm, another normalizer, or none.

  Stem: 7x7 stride-2 conv and 3x3 stride-2 max pool; four stages of
  bottleneck blocks; final norm, activation, average pool, classifier.
  Input NHWC; returns a dict with `logits`, `pool` and, with
  `return_metrics=True`, the signal metrics of the stem (index 0) and of each
  block i (index i + 1): `avg_sq_mean_{i}`, `avg_var_{i}`, `res_avg_var_{i}`,
  `branch_in_avg_var_{i}` (the same keys as `NFNet`), and with
  `return_features=True` the feature maps `feature_info` describes.
  Batch norm statistics live in Haiku state (use `hk.transform_with_state`).
  The norm layers keep the official batch-norm names (`bn0`-`bn2` per block,
  `final_bn`) under every normalizer, so parameter trees line up.

  Attributes:
    feature_info: the maps of `return_features`, as timm's `resnetv2_*`
      `features_only=True` returns them: the stem conv's output
      ('stem.conv', reduction 2) and each stage's ('stages.<i>', the last
      one before the final norm).
  """

  def __init__(self, num_classes: int, depth: Depth = 50, *,
               width: float = 4, normalization: Normalization = "batchnorm",
               norm_kwargs: Mapping[str, Any] | None = None,
               activation: str = "relu", drop_rate: float = 0.0,
               fc_init: hk.initializers.Initializer | None = None,
               conv_kwargs: Mapping[str, Any] | None = None,
               se_ratio: float | None = None, name: str = "ResNet"):
    """Builds the network.

    Args:
      num_classes: classifier outputs.
      depth: 26, 50, ... 600 (`RESNET_DEPTHS`), 'ResNet50', or per-stage
        block counts such as (24, 24, 24, 24).
      width: multiplier of the stage widths (64, 128, 256, 512); official 4.
      normalization: 'batchnorm' (the official baseline), 'running_batchnorm'
        (the fast.ai course's running batch norm), 'layernorm' (over H, W, C
        per example), 'instancenorm', 'groupnorm' (at most 32 groups), or
        'none' for the unnormalized ResNet (same layout and init, every norm
        removed): `normalizers.NORMALIZATIONS`.
      norm_kwargs: overrides of the norm layer's arguments
        (`normalizers.DEFAULT_KWARGS`; 'batchnorm': `create_scale=True,
        create_offset=True, decay_rate=0.9`, and e.g. `cross_replica_axis`
        for batch statistics over devices; 'groupnorm': `groups`).
      activation: unscaled nonlinearity name (`layers.RAW_NONLINEARITIES`).
      drop_rate: classifier dropout.
      fc_init: classifier weight init (official: zeros).
      conv_kwargs: extra `hk.Conv2D` arguments for every conv, e.g.
        `w_init` (official default: Haiku's truncated normal 1/sqrt(fan_in)).
      se_ratio: squeeze-excite hidden ratio; None for no SE (official
        `use_se=False`).
      name: module name (official: 'ResNet').

    Raises:
      ValueError: unknown depth, normalization or activation.
    """
    super().__init__(name=name)
    normalizers.check_normalization(normalization)
    self.num_classes = num_classes
    self.depths = get_depths(depth)
    self.normalization = normalization
    self.activation = layers.get_activation(activation, scaled=False)
    self.drop_rate = drop_rate
    norm_kwargs = dict(norm_kwargs or {})
    self.initial_conv = Conv2D(int(16 * width), kernel_shape=7, stride=2,
                               padding="SAME", with_bias=False,
                               name="initial_conv", **(conv_kwargs or {}))
    self.blocks = [
        ResBlockV2(b.out_ch, stride=b.stride, use_projection=b.first_in_stage,
                   activation=self.activation, normalization=normalization,
                   norm_kwargs=norm_kwargs, conv_kwargs=conv_kwargs,
                   se_ratio=se_ratio)
        for b in block_layout(int(16 * width), width, self.depths)]
    self.final_bn = make_norm(normalization, norm_kwargs, "final_bn")
    self.fc = hk.Linear(num_classes, with_bias=True,
                        w_init=fc_init or jnp.zeros)
    self.feature_info = feature_info(int(16 * width), width, self.depths)

  def __call__(self, x: jax.Array, is_training: bool = True,
               return_metrics: bool = False,
               test_local_stats: bool = False, return_features: bool = False
               ) -> dict[str, jax.Array | list[jax.Array]]:
    """Returns logits (no softmax), pool, and metrics and features if asked.

    Args:
      x: NHWC images.
      is_training: batch statistics (and updates of the moving averages)
        if True, moving averages if False; enables dropout.
      return_metrics: add the signal propagation metrics.
      test_local_stats: use batch statistics at evaluation too (batch
        norms only).
      return_features: add `features`, the NHWC maps of `feature_info`.
    """
    outputs = {}
    stem = self.initial_conv(x)
    out = hk.max_pool(stem, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1),
                      padding="SAME")
    stages, metrics = layers.apply_stages(
        self.blocks, self.depths, out, return_metrics,
        is_training=is_training, test_local_stats=test_local_stats)
    outputs.update(metrics)
    if return_features:
      outputs["features"] = [stem, *stages]
    out = self.activation(
        apply_norm(self.final_bn, stages[-1], is_training, test_local_stats))
    outputs["pool"], pool = layers.pool_features(
        out, self.drop_rate, is_training)
    outputs["logits"] = self.fc(pool)
    return outputs
