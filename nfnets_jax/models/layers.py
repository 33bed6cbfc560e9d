"""Building blocks of normalizer-free networks.

References:
  [Brock, De, Smith 2021] Characterizing signal propagation to close the
    performance gap in unnormalized ResNets (ICLR). Scaled Weight
    Standardization, gamma-scaled nonlinearities, signal propagation metrics.
  [Brock, De, Smith, Simonyan 2021] High-Performance Large-Scale Image
    Recognition Without Normalization (ICML). NFNet blocks, SE scaling.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
import contextlib
import contextvars
import dataclasses
import math
from typing import Literal

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax.cpu import lowering

Activation = Callable[[jax.Array], jax.Array]
EpsMode = Literal["clamp", "add"]

# gamma such that Var(gamma * g(x)) = 1 for x ~ N(0, 1). These are the values
# shipped with the official release (and copied by timm); they were measured by
# sampling, so they agree with the analytic value to ~1e-3 (relu's exact value
# is sqrt(2 / (1 - 1/pi)) = 1.71285). We keep them, not the analytic ones, so
# that pretrained checkpoints reproduce their logits.
NONLINEARITY_GAMMAS: dict[str, float] = {
    "identity": 1.0,
    "celu": 1.270926833152771,
    "elu": 1.2716004848480225,
    "gelu": 1.7015043497085571,
    "gelu_exact": 1.7015043497085571,
    "leaky_relu": 1.70590341091156,
    "log_sigmoid": 1.9193484783172607,
    "relu": 1.7139588594436646,
    "relu6": 1.7131484746932983,
    "selu": 1.0008515119552612,
    "sigmoid": 4.803835391998291,
    "silu": 1.7881293296813965,
    "swish": 1.7881293296813965,
    "soft_sign": 2.338853120803833,
    "softplus": 1.9203323125839233,
    "tanh": 1.5939117670059204,
}

# The raw (unscaled) nonlinearities. 'gelu' is the tanh approximation used by
# the official release; 'gelu_exact' is the erf form used by PyTorch and timm.
RAW_NONLINEARITIES: dict[str, Activation] = {
    "identity": lambda x: x,
    "celu": jax.nn.celu,
    "elu": jax.nn.elu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "leaky_relu": jax.nn.leaky_relu,
    "log_sigmoid": jax.nn.log_sigmoid,
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "selu": jax.nn.selu,
    "sigmoid": jax.nn.sigmoid,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "soft_sign": jax.nn.soft_sign,
    "softplus": jax.nn.softplus,
    "tanh": jnp.tanh,
}


@dataclasses.dataclass(frozen=True)
class FeatureInfo:
  """One feature map a backbone returns (`return_features=True`).

  Attributes:
    channels: the map's channels C (NHWC).
    reduction: input size / map size (the total stride), e.g. 2, 4, ..., 32.
    module: the module whose output it is, named as timm's `feature_info`
      names it (e.g. 'stem.conv3', 'stages.0', 'final_conv'), so the two
      line up.
  """
  channels: int
  reduction: int
  module: str


def estimate_gamma(fn: Activation, num_samples: int = 4_000_000,
                   seed: int = 0) -> float:
  """Estimates gamma = 1 / std(fn(x)) for x ~ N(0, 1) by sampling.

  Args:
    fn: an elementwise nonlinearity.
    num_samples: how many standard normal samples to draw.
    seed: PRNG seed for the samples.

  Returns:
    The scalar gamma making `gamma * fn(x)` unit variance.
  """
  x = jax.random.normal(jax.random.key(seed), (num_samples,), jnp.float32)
  y = fn(x).astype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
  return float(1.0 / jnp.std(y))


def get_activation(name: str, scaled: bool = True) -> Activation:
  """Returns the nonlinearity `name`, gamma-scaled (`x -> gamma * g(x)`).

  Args:
    name: a key of `RAW_NONLINEARITIES`.
    scaled: multiply by the nonlinearity's gamma (normalizer-free nets) or
      not (the normalized and unnormalized baselines).

  Raises:
    ValueError: if `name` is not a known nonlinearity.
  """
  if name not in RAW_NONLINEARITIES:
    raise ValueError(f"activation={name!r} is not a known nonlinearity; "
                     f"allowed: {sorted(RAW_NONLINEARITIES)}")
  fn, gamma = RAW_NONLINEARITIES[name], NONLINEARITY_GAMMAS[name]
  if gamma == 1.0 or not scaled:
    return fn
  return lambda x: fn(x) * jnp.asarray(gamma, x.dtype)


def standardize_weight(w: jax.Array, gain: jax.Array, eps: float = 1e-4,
                       eps_mode: EpsMode = "clamp") -> jax.Array:
  """Scaled Weight Standardization of an HWIO kernel, per output channel.

  `W_hat = gain * (W - mean) / (std * sqrt(fan_in))`, with mean and std over
  the fan-in axes (all but the last). Mean and variance are dots of a
  `[1, fan_in]` row of `1 / fan_in` with the `[fan_in, out]` kernel (float32,
  `Precision.HIGHEST`): XLA:CPU splits a column reduction into reduce-windows,
  about 140 ms of a 1.26 s F0 train step at batch 8, and runs the dots and
  their outer-product gradients in its matmul kernels (F0 train step +3.5% to
  +5.7%, three interleaved A/Bs on a 2-core EPYC).

  Args:
    w: kernel `[..., fan_in_dims, out]` (HWIO for a 2D conv).
    gain: learnable per-output gain `[out]`.
    eps: numerical floor.
    eps_mode: 'clamp' (official release): `rsqrt(max(var * fan_in, eps))`;
      'add' (timm): `rsqrt((var + eps) * fan_in)`.

  Returns:
    The standardized kernel, same shape and dtype as `w`.
  """
  fan_in, out = int(np.prod(w.shape[:-1])), w.shape[-1]
  w2d = w.reshape(fan_in, out)
  average = jnp.full((1, fan_in), 1.0 / fan_in, w.dtype)
  mean = jnp.dot(average, w2d, precision=jax.lax.Precision.HIGHEST)
  centered = w2d - mean
  var = jnp.dot(average, centered * centered,
                precision=jax.lax.Precision.HIGHEST)
  if eps_mode == "clamp":
    scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, eps)) * gain
  elif eps_mode == "add":
    scale = jax.lax.rsqrt((var + eps) * fan_in) * gain
  else:
    raise ValueError(f"eps_mode={eps_mode!r}; allowed: 'clamp', 'add'")
  return (centered * scale).reshape(w.shape)


# The standardized kernels of `standardized_kernels`, while one is active.
_KERNELS: contextvars.ContextVar[Mapping[str, jax.Array] | None] = (
    contextvars.ContextVar("nfnets_jax_standardized_kernels", default=None))


@contextlib.contextmanager
def standardized_kernels(kernels: Mapping[str, jax.Array]) -> Iterator[None]:
  """Weight standardization done once, for a forward that does not train.

  Scaled WS depends only on the weights, so at inference it can be done once
  per set of weights instead of on every call. While this context is active
  (when the forward is *traced*), a `WSConv2D` whose module name is in
  `kernels` convolves with that kernel as it is, without standardizing its
  `w`; the others standardize as usual. `standardize_kernels` computes the
  kernels, `recording_ws_convs` finds the modules (`pretrained.create.Model`
  uses the three, through `models.stats.traced`). Not for training: gradients would stop at the kernels.

  Args:
    kernels: module name -> standardized HWIO kernel (float32), as
      `standardize_weight` computes it for that module.
  """
  token = _KERNELS.set(kernels)
  try:
    yield
  finally:
    _KERNELS.reset(token)


@contextlib.contextmanager
def recording_ws_convs() -> Iterator[dict[str, tuple[float, EpsMode]]]:
  """Records the `WSConv2D`s called inside (a Haiku init or apply, traced
  or run) into the yielded dict: module name -> `(eps, eps_mode)`."""
  found = {}

  def record(next_f, args, kwargs, context):
    if (isinstance(context.module, WSConv2D)
        and context.method_name == "__call__"):
      found[context.module.module_name] = (context.module.eps,
                                           context.module.eps_mode)
    return next_f(*args, **kwargs)

  with hk.intercept_methods(record):
    yield found


def standardize_kernels(params: Mapping[str, Mapping[str, jax.Array]],
                        settings: Mapping[str, tuple[float, EpsMode]]
                        ) -> dict[str, jax.Array]:
  """Each WS convolution's standardized kernel (`standardize_weight` of its
  `w` and `gain`), for `standardized_kernels`.

  Args:
    params: a network's params `{module: {"w", "gain", ...}}`.
    settings: module name -> `(eps, eps_mode)` of the same network
      (`recording_ws_convs`).
  """
  return {name: standardize_weight(params[name]["w"], params[name]["gain"],
                                   eps, eps_mode)
          for name, (eps, eps_mode) in settings.items()}


class WSConv2D(hk.Conv2D):
  """2D convolution with Scaled Weight Standardization, gain and bias.

  Parameters: `w` (HWIO, He-normal fan-in init), `gain` `[out]` (init 1,
  or `gain_init`), `bias` `[out]` (init 0), all float32 whatever the input
  dtype; the kernel is standardized in float32 and cast to the input dtype
  for the convolution (or taken as already standardized under
  `standardized_kernels`).
  Input NHWC. Names mirror the official release so checkpoints map 1:1.
  """

  def __init__(self, output_channels: int, kernel_shape: int | Sequence[int],
               stride: int | Sequence[int] = 1,
               padding: str | Sequence[tuple[int, int]] = "SAME",
               feature_group_count: int = 1, eps: float = 1e-4,
               eps_mode: EpsMode = "clamp",
               gain_init: hk.initializers.Initializer = jnp.ones,
               name: str | None = None):
    """Args as `hk.Conv2D` (padding: 'SAME', 'VALID' or explicit `(lo, hi)`
    pairs), plus `eps`, `eps_mode` of `standardize_weight` and the gain's
    initializer `gain_init` (timm zero-initializes a residual branch's last
    gain)."""
    super().__init__(output_channels, kernel_shape, stride=stride,
                     padding=padding, feature_group_count=feature_group_count,
                     name=name)
    self.eps = eps
    self.eps_mode = eps_mode
    self.gain_init = gain_init

  def __call__(self, inputs: jax.Array) -> jax.Array:
    in_ch = inputs.shape[-1]
    if in_ch % self.feature_group_count:
      raise ValueError(f"{self.module_name}: {in_ch} input channels are not "
                       f"divisible by {self.feature_group_count} groups")
    w_shape = (*self.kernel_shape, in_ch // self.feature_group_count,
               self.output_channels)
    w_init = hk.initializers.VarianceScaling(1.0, "fan_in", "normal")
    w = hk.get_parameter("w", w_shape, jnp.float32, init=w_init)
    gain = hk.get_parameter("gain", (self.output_channels,), jnp.float32,
                            init=self.gain_init)
    bias = hk.get_parameter("bias", (self.output_channels,), jnp.float32,
                            init=jnp.zeros)
    kernels = _KERNELS.get()
    if kernels is not None and self.module_name in kernels:
      weight = kernels[self.module_name]
    else:
      weight = standardize_weight(w, gain, self.eps, self.eps_mode)
    return lowering.conv2d(
        inputs, weight.astype(inputs.dtype), bias.astype(inputs.dtype),
        stride=self.stride, padding=self.padding,
        groups=self.feature_group_count)


class SqueezeExcite(hk.Module):
  """Squeeze-and-excite gate: `sigmoid(fc1(act(fc0(mean_hw(x)))))`.

  Returns the gate `[N, 1, 1, out_ch]`; NFNet blocks multiply by `2 * gate`
  so the gate is ~1 at init (sigmoid(0) = 1/2) and variance is preserved.
  """

  def __init__(self, in_ch: int, out_ch: int, se_ratio: float | None = 0.5,
               hidden_ch: int | None = None,
               activation: Activation = jax.nn.relu,
               name: str | None = None):
    super().__init__(name=name)
    if se_ratio is None:
      if hidden_ch is None:
        raise ValueError("SqueezeExcite needs one of se_ratio or hidden_ch")
      self.hidden_ch = hidden_ch
    else:
      self.hidden_ch = max(1, int(in_ch * se_ratio))
    self.in_ch, self.out_ch = in_ch, out_ch
    self.activation = activation
    self.fc0 = hk.Linear(self.hidden_ch, with_bias=True)
    self.fc1 = hk.Linear(self.out_ch, with_bias=True)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jnp.mean(x, axis=(1, 2))
    h = self.fc1(self.activation(self.fc0(h)))
    return jax.nn.sigmoid(h)[:, None, None].astype(x.dtype)


def eca_kernel_size(channels: int, gamma: float = 2.0, beta: float = 1.0
                    ) -> int:
  """ECA-Net's kernel size for `channels`: `|log2(C) + beta| / gamma`
  truncated, made odd upwards, at least 3 (timm's `EcaModule`)."""
  t = int(abs(math.log(channels, 2) + beta) / gamma)
  return max(t if t % 2 else t + 1, 3)


class EfficientChannelAttention(hk.Module):
  """Efficient channel attention gate: `sigmoid(conv1d(mean_hw(x)))`.

  The pooled channels `[N, C]` are cross-correlated with one learned kernel
  `w` `[k]` (no bias, zero padding, `k = eca_kernel_size(C)`), so each
  channel's gate sees its k neighbours. Returns the gate `[N, 1, 1, C]`, as
  `SqueezeExcite` does; timm's NF models multiply by `2 * gate`.

  Reference: Wang et al. 2020, ECA-Net: Efficient Channel Attention for Deep
  Convolutional Neural Networks (CVPR); timm's `EcaModule`, whose
  `conv.weight` `[1, 1, k]` is `w` here.
  """

  def __init__(self, channels: int, name: str | None = None):
    super().__init__(name=name)
    self.channels = channels
    self.kernel_size = eca_kernel_size(channels)

  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    # PyTorch's Conv1d init: U(-1/sqrt(k), 1/sqrt(k)).
    w = hk.get_parameter("w", (k,), jnp.float32,
                         init=hk.initializers.VarianceScaling(
                             1.0 / 3.0, "fan_in", "uniform"))
    y = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    pad = (k - 1) // 2
    y = jnp.pad(y, ((0, 0), (pad, pad)))
    c = x.shape[-1]
    h = sum(w[j] * y[:, j:j + c] for j in range(k))
    return jax.nn.sigmoid(h)[:, None, None].astype(x.dtype)


class StochDepth(hk.Module):
  """Batch-wise stochastic depth: zeroes a whole residual branch per example.

  As the official release, kept branches are not rescaled by `1 / keep_prob`
  unless `scale_by_keep`; identity at evaluation.
  """

  def __init__(self, drop_rate: float, scale_by_keep: bool = False,
               name: str | None = None):
    super().__init__(name=name)
    self.drop_rate = drop_rate
    self.scale_by_keep = scale_by_keep

  def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
    if not is_training:
      return x
    r = jax.random.uniform(hk.next_rng_key(), (x.shape[0],) + (1,) * (x.ndim - 1),
                           dtype=x.dtype)
    keep_prob = 1.0 - self.drop_rate
    keep = jnp.floor(keep_prob + r)
    if self.scale_by_keep:
      x = x / keep_prob
    return x * keep


def avg_channel_sq_mean(x: jax.Array) -> jax.Array:
  """Average over channels of the squared channel mean of NHWC `x`."""
  return jnp.mean(jnp.mean(x.astype(jnp.float32), axis=(0, 1, 2)) ** 2)


def avg_channel_var(x: jax.Array) -> jax.Array:
  """Average over channels of the channel variance of NHWC `x`."""
  return jnp.mean(jnp.var(x.astype(jnp.float32), axis=(0, 1, 2)))


def signal_metrics(x: jax.Array, i: int) -> dict[str, jax.Array]:
  """Signal propagation metrics of activation `x` after block `i`."""
  return {f"avg_sq_mean_{i}": avg_channel_sq_mean(x),
          f"avg_var_{i}": avg_channel_var(x)}


def apply_stages(blocks: Sequence[Callable[..., tuple[jax.Array, dict]]],
                 depths: Sequence[int], x: jax.Array, return_metrics: bool,
                 *, remat: bool = False, **block_kwargs
                 ) -> tuple[list[jax.Array], dict[str, jax.Array]]:
  """Runs residual blocks in order, keeping each stage's output.

  Args:
    blocks: modules mapping `(x, **block_kwargs)` to `(x, block_metrics)`,
      every block of the network in order.
    depths: blocks per stage; they sum to `len(blocks)`.
    x: the stem's output `[N, H, W, C]`.
    return_metrics: collect `signal_metrics` of the stem output (index 0)
      and of each block's output (index i + 1), and each block's own
      metrics with the suffix `_i`.
    remat: rematerialize each block (`hk.remat`): its activations are not
      kept for the backward pass but recomputed there, so training holds
      about one block's activations instead of every block's; outputs,
      gradients and parameter names are unchanged.
    **block_kwargs: passed to every block (e.g. `is_training`).

  Returns:
    Each stage's last output `[N, H_s, W_s, C_s]` (the last one is the
    network's), and the metrics (empty unless asked).

  Raises:
    ValueError: `depths` do not sum to the number of blocks.
  """
  if sum(depths) != len(blocks):
    raise ValueError(f"depths={tuple(depths)} sum to {sum(depths)}; the "
                     f"network has {len(blocks)} blocks")
  metrics = signal_metrics(x, 0) if return_metrics else {}
  outputs, i = [], 0
  for depth in depths:
    for block in blocks[i:i + depth]:
      call = lambda y, block=block: block(y, **block_kwargs)
      x, block_metrics = (hk.remat(call) if remat else call)(x)
      if return_metrics:
        metrics.update(signal_metrics(x, i + 1))
        metrics.update({f"{k}_{i}": v for k, v in block_metrics.items()})
      i += 1
    outputs.append(x)
  return outputs, metrics


def stage_feature_info(stem: FeatureInfo, stem_stride: int,
                       stages: Sequence[tuple[int, int]],
                       final_channels: int | None = None
                       ) -> tuple[FeatureInfo, ...]:
  """A backbone's feature maps: its stem's, then each stage's output.

  As timm's `feature_info` of the same networks: every map is its module's
  output, before any activation that follows it; a final 1x1 conv after the
  last stage replaces that stage's map ('final_conv').

  Args:
    stem: the stem's map.
    stem_stride: the stem's total stride (the first stage's input
      reduction; more than `stem.reduction` after a max pool or a strided
      conv past the map).
    stages: `(output channels, stride)` of each stage.
    final_channels: the final conv's output channels, or None (none).

  Returns:
    `stem`, then one `FeatureInfo` per stage ('stages.<i>', or
    'final_conv' for the last).
  """
  infos, reduction = [stem], stem_stride
  for i, (channels, stride) in enumerate(stages):
    reduction *= stride
    infos.append(FeatureInfo(channels, reduction, f"stages.{i}"))
  if final_channels is not None:
    infos[-1] = FeatureInfo(final_channels, reduction, "final_conv")
  return tuple(infos)


def pool_features(features: jax.Array, drop_rate: float, is_training: bool
                  ) -> tuple[jax.Array, jax.Array]:
  """Global average pool `[N, H, W, C] -> [N, C]`, then classifier dropout.

  Returns:
    `(pool, classifier input)`: the pooled features, and the same with
    dropout at `drop_rate` when training.
  """
  pool = jnp.mean(features, axis=(1, 2))
  if drop_rate > 0.0 and is_training:
    return pool, hk.dropout(hk.next_rng_key(), drop_rate, pool)
  return pool, pool
