"""timm's normalizer-free networks: one config-driven family (`NfCfg`).

timm (huggingface/pytorch-image-models, `timm/models/nfnet.py`) builds every
NF model it has, `eca_nfnet_l0..l3`, `nfnet_l0`, `nf_resnet*`,
`nf_seresnet*`, `nf_ecaresnet*`, `nf_regnet_b*`, its own `nfnet_f*` and the
DeepMind-compatible `dm_nfnet_f*`, as one `NormFreeNet` driven by an `NfCfg`.
`NormFreeConfig` mirrors `NfCfg` field by field, `NORMFREE_CONFIGS` is
timm's `model_cfgs` table and `NormFreeNet` its forward, built from this
package's layers, so that timm's weights (`pretrained.timm_normfree`) give
timm's logits. Where timm differs from the official NF-ResNets, NF-RegNets
and NFNets of `nf_resnet`, `nf_regnet` and `nfnet` (the papers' code):

* channels are rounded to multiples of `ch_div` (timm's `make_divisible`);
* the residual branch's last conv has a zero-initialized gain instead of a
  scalar `skip_gain` (`skipinit=False`; `dm_nfnet_*` has `skipinit=True`);
* gamma multiplies the weights of every conv (`gamma_in_act=False`) rather
  than the activations; `conv(gamma * W, a) = conv(W, gamma * a)`, so here
  the activations stay gamma-scaled and the two convs that follow no
  activation (the stem's first, on the image, and `final_conv`, on the last
  stage's output) see their input times gamma, while the final activation,
  which no conv follows, is unscaled: the same function;
* convs pad symmetrically, `((stride - 1) + (k - 1)) // 2` on each side
  (PyTorch's), not TF's 'SAME' (`same_padding=False`), and the `*_pool`
  stems max-pool 3x3 / 2 with 1 pixel of padding;
* attention: squeeze-excite with a ReLU and `make_divisible(C * rd_ratio,
  8)` hidden units, or ECA (`layers.EfficientChannelAttention`), times
  `attn_gain`; in a RegNet block ('reg') after the grouped 3x3, otherwise
  after the last 1x1;
* weight standardization adds its eps to the variance (`eps_mode='add'`),
  timm's 'gelu' is the exact (erf) GELU ('gelu_exact' here);
* stochastic depth rises linearly from 0 at the first block to the rate at
  the last, and scales kept branches by `1 / keep_prob`.

References:
  [Brock, De, Smith 2021] Characterizing signal propagation to close the
    performance gap in unnormalized ResNets (ICLR).
  [Brock, De, Smith, Simonyan 2021] High-Performance Large-Scale Image
    Recognition Without Normalization (ICML).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets_jax.models import layers
from nfnets_jax.models import resnet

STEM_TYPES = ("deep", "deep_tiered", "deep_quad", "3x3", "7x7", "deep_pool",
              "3x3_pool", "7x7_pool")
ATTN_LAYERS = (None, "se", "eca")


@dataclasses.dataclass(frozen=True)
class NormFreeConfig:
  """A normalizer-free network as timm's `NfCfg` describes it.

  Attributes:
    depths: blocks per stage.
    channels: output channels per stage (times `width_factor`, rounded).
    alpha: residual branch scale.
    stem_type: one of `STEM_TYPES`: 'deep_quad' four 3x3 convs (16, 32, 64
      channels per 128 output, strides 2, 1, 1, 2), 'deep' three (C/2, C/2,
      C; 'deep_tiered': 3C/8, C/2, C), '3x3' / '7x7' one stride-2 conv;
      '_pool' adds a 3x3 stride-2 max pool.
    stem_chs: stem output channels (default `channels[0]`).
    group_size: channels per group of the 3x3 convs (None: one group).
    attn_layer: one of `ATTN_LAYERS`: squeeze-excite, efficient channel
      attention, or none.
    attn_rd_ratio, attn_rd_divisor: squeeze-excite hidden width,
      `make_divisible(C * rd_ratio, rd_divisor)` (timm's `attn_kwargs`).
    attn_gain: the attention output's scale (2: sigmoid(0) = 1/2).
    width_factor: multiplier on every width.
    bottle_ratio: bottleneck width as a fraction of the output (or, with
      `reg`, input) channels.
    num_features: a final 1x1 conv to this many channels (0: none).
    ch_div: widths are rounded to multiples of it.
    reg: RegNet blocks: bottleneck from the input width, attention between
      the 3x3 and the last 1x1, the first block of the network unexpanded.
    extra_conv: a second grouped 3x3 conv per block (NFNets).
    gamma_in_act: gamma scales the activations (official, `dm_nfnet_*`)
      instead of the conv weights (see the module docstring).
    same_padding: TF 'SAME' padding instead of PyTorch's symmetric one.
    std_conv_eps: weight standardization eps, added to the variance.
    skipinit: a zero-initialized scalar gain per residual branch, and the
      branch's last conv gain initialized to 1 instead of 0.
    zero_init_fc: the classifier starts at zero (else N(0, 0.01)).
    act_layer: a `layers.RAW_NONLINEARITIES` name (gamma-scaled); timm's
      'gelu' is 'gelu_exact' here.
  """
  depths: tuple[int, ...]
  channels: tuple[int, ...]
  alpha: float = 0.2
  stem_type: str = "3x3"
  stem_chs: int | None = None
  group_size: int | None = None
  attn_layer: str | None = None
  attn_rd_ratio: float = 1 / 16
  attn_rd_divisor: int = 8
  attn_gain: float = 2.0
  width_factor: float = 1.0
  bottle_ratio: float = 0.5
  num_features: int = 0
  ch_div: int = 8
  reg: bool = False
  extra_conv: bool = False
  gamma_in_act: bool = False
  same_padding: bool = False
  std_conv_eps: float = 1e-5
  skipinit: bool = False
  zero_init_fc: bool = False
  act_layer: str = "silu"

  def __post_init__(self):
    if len(self.depths) != len(self.channels):
      raise ValueError(f"NormFreeConfig: depths {self.depths} and channels "
                       f"{self.channels} must have the same number of stages")
    if self.stem_type not in STEM_TYPES:
      raise ValueError(f"NormFreeConfig.stem_type={self.stem_type!r}; "
                       f"allowed: {STEM_TYPES}")
    if self.attn_layer not in ATTN_LAYERS:
      raise ValueError(f"NormFreeConfig.attn_layer={self.attn_layer!r}; "
                       f"allowed: {ATTN_LAYERS}")
    if self.act_layer not in layers.NONLINEARITY_GAMMAS:
      raise ValueError(f"NormFreeConfig.act_layer={self.act_layer!r}; "
                       f"allowed: {sorted(layers.NONLINEARITY_GAMMAS)}")

  def width(self, channels: float) -> int:
    """`channels * width_factor` rounded to a multiple of `ch_div`."""
    return resnet.make_divisible(channels * self.width_factor, self.ch_div)

  @property
  def stage_channels(self) -> tuple[int, ...]:
    """Each stage's output channels."""
    return tuple(self.width(c) for c in self.channels)

  @property
  def stem_channels(self) -> int:
    """The stem's output channels."""
    return self.width(self.stem_chs or self.channels[0])

  @property
  def final_channels(self) -> int:
    """The network's feature channels: `final_conv`'s, or the last stage's."""
    return (self.width(self.num_features) if self.num_features
            else self.stage_channels[-1])


def _nfres_cfg(depths: tuple[int, ...], attn_layer: str | None = None
               ) -> NormFreeConfig:
  """timm's `_nfres_cfg`: pre-activation NF-ResNets, 7x7 + max-pool stem
  (SE: 1/16 of the channels)."""
  return NormFreeConfig(
      depths=depths, channels=(256, 512, 1024, 2048), stem_type="7x7_pool",
      stem_chs=64, bottle_ratio=0.25, act_layer="relu",
      attn_layer=attn_layer)


def _nfreg_cfg(depths: tuple[int, ...],
               channels: tuple[int, ...] = (48, 104, 208, 440)
               ) -> NormFreeConfig:
  """timm's `_nfreg_cfg`: NF-RegNet-B, SE in the middle, 1280/440 head."""
  return NormFreeConfig(
      depths=depths, channels=channels, stem_type="3x3", group_size=8,
      width_factor=0.75, bottle_ratio=2.25,
      num_features=1280 * channels[-1] // 440, reg=True, attn_layer="se",
      attn_rd_ratio=0.5)


def _nfnet_cfg(depths: tuple[int, ...],
               channels: tuple[int, ...] = (256, 512, 1536, 1536),
               group_size: int = 128, bottle_ratio: float = 0.5,
               feat_mult: float = 2.0, act_layer: str = "gelu_exact",
               attn_layer: str = "se", attn_rd_ratio: float = 0.5
               ) -> NormFreeConfig:
  """timm's `_nfnet_cfg`: NFNet-F / L layouts, gamma in the convs."""
  return NormFreeConfig(
      depths=depths, channels=channels, stem_type="deep_quad", stem_chs=128,
      group_size=group_size, bottle_ratio=bottle_ratio, extra_conv=True,
      num_features=int(channels[-1] * feat_mult), act_layer=act_layer,
      attn_layer=attn_layer, attn_rd_ratio=attn_rd_ratio)


def _dm_nfnet_cfg(depths: tuple[int, ...]) -> NormFreeConfig:
  """timm's `_dm_nfnet_cfg`: the official NFNet-F layout (`nfnet.NFNet`)."""
  return dataclasses.replace(
      _nfnet_cfg(depths), gamma_in_act=True, same_padding=True,
      skipinit=True)


_RESNET_DEPTHS = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
_F_DEPTHS = {f"f{i}": tuple(d * (i + 1) for d in (1, 2, 6, 3))
             for i in range(8)}

# timm's `model_cfgs` (timm 1.0.31), by timm's names.
NORMFREE_CONFIGS: dict[str, NormFreeConfig] = {
    **{f"dm_nfnet_{f}": _dm_nfnet_cfg(d) for f, d in _F_DEPTHS.items()
       if f != "f7"},
    **{f"nfnet_{f}": _nfnet_cfg(d) for f, d in _F_DEPTHS.items()},
    "nfnet_l0": _nfnet_cfg(_F_DEPTHS["f0"], feat_mult=1.5, group_size=64,
                           bottle_ratio=0.25, attn_rd_ratio=0.25,
                           act_layer="silu"),
    **{f"eca_nfnet_l{i}": _nfnet_cfg(
        _F_DEPTHS[f"f{i}"], feat_mult=1.5 if i == 0 else 2.0, group_size=64,
        bottle_ratio=0.25, attn_layer="eca", act_layer="silu")
       for i in range(4)},
    "nf_regnet_b0": _nfreg_cfg((1, 3, 6, 6)),
    "nf_regnet_b1": _nfreg_cfg((2, 4, 7, 7)),
    "nf_regnet_b2": _nfreg_cfg((2, 4, 8, 8), (56, 112, 232, 488)),
    "nf_regnet_b3": _nfreg_cfg((2, 5, 9, 9), (56, 128, 248, 528)),
    "nf_regnet_b4": _nfreg_cfg((2, 6, 11, 11), (64, 144, 288, 616)),
    "nf_regnet_b5": _nfreg_cfg((3, 7, 14, 14), (80, 168, 336, 704)),
    **{f"nf_resnet{d}": _nfres_cfg(depths)
       for d, depths in _RESNET_DEPTHS.items()},
    **{f"nf_seresnet{d}": _nfres_cfg(depths, "se")
       for d, depths in _RESNET_DEPTHS.items()},
    **{f"nf_ecaresnet{d}": _nfres_cfg(depths, "eca")
       for d, depths in _RESNET_DEPTHS.items()},
}


def get_config(variant: str | NormFreeConfig | Mapping[str, Any]
               ) -> NormFreeConfig:
  """A config of `NORMFREE_CONFIGS` by name, or a custom one from a mapping.

  Raises:
    ValueError: an unknown name, or a mapping with unknown or missing fields.
  """
  if isinstance(variant, NormFreeConfig):
    return variant
  fields = {f.name for f in dataclasses.fields(NormFreeConfig)}
  if isinstance(variant, str):
    if variant not in NORMFREE_CONFIGS:
      raise ValueError(f"NormFreeNet variant={variant!r} is unknown; "
                       f"allowed: {sorted(NORMFREE_CONFIGS)} or a mapping "
                       f"of NormFreeConfig fields {sorted(fields)}")
    return NORMFREE_CONFIGS[variant]
  unknown = sorted(set(variant) - fields)
  if unknown or not {"depths", "channels"} <= set(variant):
    raise ValueError(f"custom NormFreeNet variant has fields "
                     f"{sorted(variant)}; needs 'depths' and 'channels', "
                     f"and only fields of {sorted(fields)}")
  v = dict(variant)
  v["depths"], v["channels"] = tuple(v["depths"]), tuple(v["channels"])
  return NormFreeConfig(**v)


def conv_padding(kernel: int, stride: int, same: bool
                 ) -> str | tuple[tuple[int, int], tuple[int, int]]:
  """'SAME', or PyTorch's symmetric `((s - 1) + (k - 1)) // 2` per side."""
  if same:
    return "SAME"
  p = ((stride - 1) + (kernel - 1)) // 2
  return ((p, p), (p, p))


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """`nn.MaxPool2d(3, stride=2, padding=1)` of NHWC `x` (-inf padding)."""
  return jax.lax.reduce_window(
      x, jnp.array(-jnp.inf, x.dtype), jax.lax.max, (1, 3, 3, 1),
      (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))


ConvFactory = Callable[..., layers.WSConv2D]
Attention = layers.SqueezeExcite | layers.EfficientChannelAttention


def attention(cfg: NormFreeConfig, channels: int, name: str
              ) -> Attention | None:
  """The gate of `cfg.attn_layer` over `channels` (None for none).

  Squeeze-excite as timm's `SEModule`: ReLU, `make_divisible(C * rd_ratio,
  rd_divisor, round_limit=0)` hidden units.
  """
  if cfg.attn_layer is None:
    return None
  if cfg.attn_layer == "eca":
    return layers.EfficientChannelAttention(channels, name=name)
  hidden = resnet.make_divisible(channels * cfg.attn_rd_ratio,
                                 cfg.attn_rd_divisor, round_limit=0.0)
  return layers.SqueezeExcite(channels, channels, None, hidden_ch=hidden,
                              activation=jax.nn.relu, name=name)


class NormFreeBlock(hk.Module):
  """timm's pre-activation NF block: `x + alpha * f(act(x) * beta)`.

  The branch is 1x1 -> grouped 3x3 (strided) [-> grouped 3x3] [-> attention
  with `reg`] -> 1x1 [-> attention without `reg`], then stochastic depth and
  (with `skipinit`) a scalar `skip_gain`. A block that changes width or
  stride takes its shortcut from `act(x) * beta` through a 2x2 average pool
  (if strided) and a 1x1 conv ('downsample_conv').
  """

  def __init__(self, in_ch: int, out_ch: int, *, stride: int, beta: float,
               bottle_ratio: float, cfg: NormFreeConfig, conv: ConvFactory,
               activation: layers.Activation, stochdepth_rate: float,
               name: str | None = None):
    super().__init__(name=name)
    self.stride, self.beta, self.alpha = stride, beta, cfg.alpha
    self.activation = activation
    self.attn_gain, self.skipinit = cfg.attn_gain, cfg.skipinit
    mid = resnet.make_divisible(
        (in_ch if cfg.reg else out_ch) * bottle_ratio, cfg.ch_div)
    groups = mid // cfg.group_size if cfg.group_size else 1
    if groups < 1:
      raise ValueError(f"{self.module_name}: bottleneck width {mid} is less "
                       f"than group_size={cfg.group_size}")
    if cfg.group_size and cfg.group_size % cfg.ch_div == 0:
      mid = cfg.group_size * groups
    self.downsample_conv = (conv(out_ch, 1, name="downsample_conv")
                            if in_ch != out_ch or stride != 1 else None)
    self.conv1 = conv(mid, 1, name="conv1")
    self.conv2 = conv(mid, 3, stride=stride, feature_group_count=groups,
                      name="conv2")
    self.conv2b = (conv(mid, 3, feature_group_count=groups, name="conv2b")
                   if cfg.extra_conv else None)
    self.conv3 = conv(out_ch, 1, name="conv3",
                      gain_init=jnp.ones if cfg.skipinit else jnp.zeros)
    self.attn = attention(cfg, mid, "attn") if cfg.reg else None
    self.attn_last = None if cfg.reg else attention(cfg, out_ch, "attn_last")
    self.stoch_depth = (layers.StochDepth(stochdepth_rate, scale_by_keep=True)
                        if 0.0 < stochdepth_rate < 1.0 else None)

  def __call__(self, x: jax.Array, is_training: bool
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns the block output, `branch_in_avg_var` and `res_avg_var`."""
    out = self.activation(x) * self.beta
    shortcut = x
    if self.downsample_conv is not None:
      pooled = (hk.avg_pool(out, window_shape=(1, 2, 2, 1),
                            strides=(1, 2, 2, 1), padding="SAME")
                if self.stride > 1 else out)
      shortcut = self.downsample_conv(pooled)
    out = self.conv2(self.activation(self.conv1(out)))
    if self.conv2b is not None:
      out = self.conv2b(self.activation(out))
    if self.attn is not None:
      out = out * (self.attn(out) * self.attn_gain)
    out = self.conv3(self.activation(out))
    if self.attn_last is not None:
      out = out * (self.attn_last(out) * self.attn_gain)
    metrics = {"branch_in_avg_var": layers.avg_channel_var(x * self.beta),
               "res_avg_var": layers.avg_channel_var(out)}
    if self.stoch_depth is not None:
      out = self.stoch_depth(out, is_training)
    if self.skipinit:
      out = out * resnet.scalar_param("skip_gain", jnp.zeros, out.dtype)
    return out * jnp.asarray(self.alpha, out.dtype) + shortcut, metrics


class NormFreeNet(hk.Module):
  """timm's NormFreeNet: any `NormFreeConfig` (see the module docstring).

  Input NHWC images; returns a dict with `logits` `[N, num_classes]`, `pool`
  `[N, final_channels]`, with `return_metrics=True` the signal metrics of
  the stem (index 0) and every block i (index i + 1): `avg_sq_mean_{i}`,
  `avg_var_{i}`, `res_avg_var_{i}`, `branch_in_avg_var_{i}`, and with
  `return_features=True` the feature maps `feature_info` describes.

  Module names follow timm's state-dict keys (`stem.conv1` -> `stem_conv1`,
  `stages.1.0.conv2` -> `stages_1_0/~/conv2`, `downsample.conv` ->
  `downsample_conv`, `head.fc` -> `linear`).

  Attributes:
    config: the `NormFreeConfig`.
    feature_info: the maps of `return_features`, as timm's
      `features_only=True` returns them: the stem's (the penultimate conv of
      a deep stem, else the conv before any pool), each stage's output, the
      last replaced by `final_conv`'s when there is one, all before the
      activation that follows them.
  """

  def __init__(self, num_classes: int,
               variant: str | NormFreeConfig | Mapping[str, Any]
               = "eca_nfnet_l0", *,
               stochdepth_rate: float = 0.0, drop_rate: float = 0.0,
               remat: bool = False, name: str = "NormFreeNet"):
    """Builds the network.

    Args:
      num_classes: classifier outputs.
      variant: a name of `NORMFREE_CONFIGS` (timm's), or a custom
        `NormFreeConfig` / mapping of its fields.
      stochdepth_rate: the last block's drop rate (timm's
        `drop_path_rate`); block k of N drops `rate * k / (N - 1)`.
      drop_rate: classifier dropout.
      remat: recompute each block's activations in the backward pass
        (`layers.apply_stages`): less memory, about one more forward.
      name: module name.

    Raises:
      ValueError: an unknown variant or invalid config.
    """
    super().__init__(name=name)
    cfg = self.config = get_config(variant)
    self.remat, self.drop_rate = remat, drop_rate
    self.activation = layers.get_activation(cfg.act_layer)
    # Gamma in the conv weights: see the module docstring.
    self.final_activation = layers.get_activation(cfg.act_layer,
                                                  scaled=cfg.gamma_in_act)
    self.input_scale = (1.0 if cfg.gamma_in_act
                        else layers.NONLINEARITY_GAMMAS[cfg.act_layer])

    def conv(ch: int, k: int, stride: int = 1, **kwargs) -> layers.WSConv2D:
      return layers.WSConv2D(
          ch, kernel_shape=k, stride=stride,
          padding=conv_padding(k, stride, cfg.same_padding),
          eps=cfg.std_conv_eps, eps_mode="add", **kwargs)

    stem_ch = cfg.stem_channels
    k = 7 if "7x7" in cfg.stem_type else 3
    if "deep" in cfg.stem_type:
      if "quad" in cfg.stem_type:
        chs, strides = (stem_ch // 8, stem_ch // 4, stem_ch // 2,
                        stem_ch), (2, 1, 1, 2)
      else:
        first = 3 * stem_ch // 8 if "tiered" in cfg.stem_type else (
            stem_ch // 2)
        chs, strides = (first, stem_ch // 2, stem_ch), (2, 1, 1)
      names = [f"conv{i + 1}" for i in range(len(chs))]
      self.stem_tap = len(chs) - 2  # The penultimate conv.
    else:
      chs, strides, names = (stem_ch,), (2,), ["conv"]
      self.stem_tap = 0
    self.stem = [conv(c, k, s, name=f"stem_{n}")
                 for c, s, n in zip(chs, strides, names)]
    self.stem_pool = "pool" in cfg.stem_type
    stem_stride = 4 if self.stem_pool or "quad" in cfg.stem_type else 2

    self.blocks = []
    stage_strides = []
    ch, expected_var = stem_ch, 1.0
    num_blocks, index = sum(cfg.depths), 0
    for s, (depth, out_ch) in enumerate(zip(cfg.depths, cfg.stage_channels)):
      stride = 1 if s == 0 and stem_stride > 2 else 2
      stage_strides.append(stride)
      for b in range(depth):
        self.blocks.append(NormFreeBlock(
            ch, out_ch, stride=stride if b == 0 else 1,
            beta=1.0 / expected_var ** 0.5,
            bottle_ratio=(1.0 if cfg.reg and index == 0
                          else cfg.bottle_ratio),
            cfg=cfg, conv=conv, activation=self.activation,
            stochdepth_rate=stochdepth_rate * index / max(num_blocks - 1, 1),
            name=f"stages_{s}_{b}"))
        if b == 0:
          expected_var = 1.0  # A transition block resets the variance.
        expected_var += cfg.alpha ** 2
        ch, index = out_ch, index + 1
    self.final_conv = (conv(cfg.final_channels, 1, name="final_conv")
                       if cfg.num_features else None)
    self.fc = hk.Linear(num_classes, with_bias=True,
                        w_init=(jnp.zeros if cfg.zero_init_fc
                                else hk.initializers.RandomNormal(0.01)))
    stem_info = layers.FeatureInfo(chs[self.stem_tap], 2,
                                   f"stem.{names[self.stem_tap]}")
    self.feature_info = layers.stage_feature_info(
        stem_info, stem_stride, list(zip(cfg.stage_channels, stage_strides)),
        final_channels=cfg.final_channels if cfg.num_features else None)

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
    out = x * jnp.asarray(self.input_scale, x.dtype)
    for i, conv in enumerate(self.stem):
      out = conv(out) if i == 0 else conv(self.activation(out))
      if i == self.stem_tap:
        stem_feature = out
    if self.stem_pool:
      out = max_pool_3x3_s2(out)
    stages, metrics = layers.apply_stages(
        self.blocks, self.config.depths, out, return_metrics,
        remat=self.remat, is_training=is_training)
    outputs.update(metrics)
    out = stages[-1]
    if self.final_conv is not None:
      out = self.final_conv(out * jnp.asarray(self.input_scale, out.dtype))
    if return_features:
      outputs["features"] = [stem_feature, *stages[:-1], out]
    outputs["pool"], pool = layers.pool_features(
        self.final_activation(out), self.drop_rate, is_training)
    outputs["logits"] = self.fc(pool)
    return outputs
