"""Building blocks of normalizer-free networks.

References:
  [Brock, De, Smith 2021] Characterizing signal propagation to close the
    performance gap in unnormalized ResNets (ICLR). Scaled Weight
    Standardization, gamma-scaled nonlinearities, signal propagation metrics.
  [Brock, De, Smith, Simonyan 2021] High-Performance Large-Scale Image
    Recognition Without Normalization (ICML). NFNet blocks, SE scaling.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
from typing import Literal, get_args

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax import onednn_conv

Activation = Callable[[jax.Array], jax.Array]
# conv(x, w, stride, padding, groups) -> NHWC output.
ConvFn = Callable[[jax.Array, jax.Array, tuple[int, ...],
                   tuple[tuple[int, int], ...], int], jax.Array]
ConvImpl = Literal["auto", "native", "split", "onednn"]
CONV_IMPLS: tuple[str, ...] = get_args(ConvImpl)
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


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def broadcast_rows(v: jax.Array, rows: int) -> jax.Array:
  """`[C]` `v` repeated into `[rows, C]`, with a matmul for its gradient.

  Same value as `jnp.broadcast_to`. Its tangent is `ones[rows, 1] @ dv[None]`,
  so the reverse-mode gradient for `v` is `ones[1, rows] @ g` where plain
  broadcasting gives a column `reduce_sum` (XLA:CPU runs those at ~1 GB/s
  and tree-splits them into reduce-windows): the gradient of a conv + bias +
  GELU at `[8, 96, 96, 256]` took 142 ms with the reduction and 44 ms with
  the matmul on a 2-core Xeon.
  """
  return jnp.broadcast_to(v, (rows, v.shape[-1]))


@broadcast_rows.defjvp
def _broadcast_rows_jvp(rows, primals, tangents):
  (v,), (dv,) = primals, tangents
  return (broadcast_rows(v, rows),
          jnp.ones((rows, 1), dv.dtype) @ dv[None, :])


def add_bias(x: jax.Array, bias: jax.Array) -> jax.Array:
  """`x + bias` over the last axis; the bias gradient is a matmul.

  Args:
    x: `[..., C]`.
    bias: `[C]`, same dtype as `x`.
  """
  rows = x.size // x.shape[-1]
  return x + broadcast_rows(bias, rows).reshape(x.shape)


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


def _conv(x: jax.Array, w: jax.Array, stride: tuple[int, ...],
          padding: tuple[tuple[int, int], ...], groups: int = 1) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x, w, window_strides=stride, padding=padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def _nhwc_to_chwn(x: jax.Array) -> jax.Array:
  """`transpose(x, (3, 1, 2, 0))` computed as a dot with an N x N identity.

  XLA:CPU fuses the producers of a transpose into its loop (in an NFNet,
  the scaled GELU that feeds a convolution) and then reads every input
  element from a different cache line: the CHWN transpose of an
  `[8, 96, 96, 64]` activation took 128 ms in an F0 train step. A dot
  cannot take producers into its loop and Eigen reads its operands in
  blocks: 2.4x faster at `[32, 48, 48, 128]` (65 against 160 ms), on par at
  `[8, 96, 96, 64]`. The values are exact: each output is one `x * 1` plus
  zeros.
  """
  n, h, w, c = x.shape
  rows = x.reshape(n, h * w * c)
  eye = jnp.eye(n, dtype=x.dtype)
  swapped = jax.lax.dot_general(rows, eye, (((0,), (0,)), ((), ())))
  return jnp.transpose(swapped.reshape(h * w, c, n), (1, 0, 2)).reshape(
      c, h, w, n)


def _split_kernel_grad(x: jax.Array, g: jax.Array, kernel_shape: tuple[int, ...],
                       stride: tuple[int, ...],
                       padding: tuple[tuple[int, int], ...],
                       groups: int) -> jax.Array:
  """Kernel gradient of a grouped NHWC x HWIO convolution, group by group.

  `dW[i, j, c, o] = sum_{n, h, w} x_pad[n, s*h + i, s*w + j, c] g[n, h, w, o]`
  is a convolution of `x` laid out CHWN (batch C, features N) with `g` laid
  out HWNO, dilated by the stride: XLA's own kernel gradient, with the CHWN
  transpose done once for all groups by `_nhwc_to_chwn`.

  Args:
    x: input `[N, H, W, C_in]`.
    g: output gradient `[N, H', W', C_out]`.
    kernel_shape: `(kh, kw, C_in // groups, C_out)`.
    stride, padding: of the forward convolution.
    groups: feature group count.

  Returns:
    `[kh, kw, C_in // groups, C_out]`.
  """
  kh, kw, cg, c_out = kernel_shape
  og = c_out // groups
  x_chwn = _nhwc_to_chwn(x)
  g_hwno = jnp.transpose(g, (1, 2, 0, 3))
  grads = []
  for i in range(groups):
    dw = jax.lax.conv_general_dilated(
        x_chwn[i * cg:(i + 1) * cg], g_hwno[..., i * og:(i + 1) * og],
        window_strides=(1, 1), padding=padding, rhs_dilation=stride,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))  # [cg, >= kh, >= kw, og]
    grads.append(jnp.transpose(dw[:, :kh, :kw], (1, 2, 0, 3)))
  return grads[0] if groups == 1 else jnp.concatenate(grads, axis=-1)


def _split_conv_primal(x: jax.Array, w: jax.Array, stride: tuple[int, ...],
                       padding: tuple[tuple[int, int], ...],
                       groups: int) -> jax.Array:
  if groups == 1:
    return _conv(x, w, stride, padding)
  xs = jnp.split(x, groups, axis=-1)
  ws = jnp.split(w, groups, axis=-1)
  return jnp.concatenate([_conv(xi, wi, stride, padding)
                          for xi, wi in zip(xs, ws)], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _split_conv(x: jax.Array, w: jax.Array, stride: tuple[int, ...],
                padding: tuple[tuple[int, int], ...], groups: int) -> jax.Array:
  """Each group its own convolution; kernel gradient by `_split_kernel_grad`."""
  return _split_conv_primal(x, w, stride, padding, groups)


def _split_conv_fwd(x, w, stride, padding, groups):
  return _split_conv_primal(x, w, stride, padding, groups), (x, w)


def _phase_taps(kernel: int, stride: int, pad_lo: int, phase: int
                ) -> tuple[int, int, int]:
  """The kernel taps that reach input rows `stride * a + phase`, along one axis.

  Row `t` of the input feeds output `o` through tap `i` when
  `stride * o + i = t + pad_lo`. For `t = stride * a + phase` that is taps
  `i = first + stride * m` (m = 0 .. count - 1) and `o = a + offset - m`.

  Returns:
    `(first, count, offset)`; `count` is 0 when no tap reaches the phase.
  """
  first = (phase + pad_lo) % stride
  offset = (phase + pad_lo) // stride
  return first, len(range(first, kernel, stride)), offset


def _strided_input_grad(g: jax.Array, w: jax.Array, input_hw: tuple[int, int],
                        stride: tuple[int, ...],
                        padding: tuple[tuple[int, int], ...],
                        groups: int, conv: ConvFn | None = None) -> jax.Array:
  """Input gradient of a strided grouped convolution, phase by phase.

  XLA computes it as a convolution of `g` dilated by the stride, so at
  stride 2 three quarters of its multiplies are by inserted zeros. Input
  rows and columns of one phase `(stride * a + r, stride * b + c)` are each
  reached by a fixed subset of the taps: their gradient is a stride-1
  convolution of `g` with that sub-kernel, flipped and with in and out
  swapped, and the `stride**2` phases interleave into `dx`. The same
  multiply-adds as the forward; on a 2-core Xeon at batch 8, F0's stem
  64->128 (96 px) 35.2 -> 14.2 ms, its 256-channel 2-group transition 23.8 ->
  16.2 ms, the 768-channel 6-group one 16.6 -> 12.2 ms.

  Args:
    g: output gradient `[N, H', W', C_out]`.
    w: kernel `[kh, kw, C_in // groups, C_out]`.
    input_hw: `(H, W)` of the forward input.
    stride, padding: of the forward convolution.
    groups: feature group count.
    conv: runs each phase's stride-1 grouped convolution, called as
      `conv(x, w, stride, padding, groups)`; `_split_conv_primal` if None.

  Returns:
    `[N, H, W, C_in]`.
  """
  conv = conv or _split_conv_primal
  n, out_h, out_w, c_out = g.shape
  kh, kw, cg, _ = w.shape
  og = c_out // groups
  # The transposed convolution's kernel, group by group: [kh, kw, og, G*cg].
  w_t = jnp.transpose(w.reshape(kh, kw, cg, groups, og),
                      (0, 1, 4, 3, 2)).reshape(kh, kw, og, groups * cg)
  rows = [-(-(input_hw[0] - r) // stride[0]) for r in range(stride[0])]
  cols = [-(-(input_hw[1] - c) // stride[1]) for c in range(stride[1])]
  phases = []
  for r, phase_h in enumerate(rows):
    first_r, taps_r, offset_r = _phase_taps(kh, stride[0], padding[0][0], r)
    for c, phase_w in enumerate(cols):
      first_c, taps_c, offset_c = _phase_taps(kw, stride[1], padding[1][0], c)
      if taps_r == 0 or taps_c == 0:
        phase = jnp.zeros((n, phase_h, phase_w, groups * cg), g.dtype)
      else:
        sub_kernel = w_t[first_r::stride[0], first_c::stride[1]][::-1, ::-1]
        # Output o = a + offset - m: pad (or crop) g so that row a of the
        # phase sees rows a + offset - (taps - 1) ... a + offset.
        pads = ((taps_r - 1 - offset_r, phase_h + offset_r - out_h, 0),
                (taps_c - 1 - offset_c, phase_w + offset_c - out_w, 0))
        g_phase = jax.lax.pad(g, jnp.zeros((), g.dtype),
                              ((0, 0, 0), *pads, (0, 0, 0)))
        phase = conv(g_phase, sub_kernel, (1, 1), ((0, 0), (0, 0)), groups)
      # Phases differ in size by at most a row / column: pad to rows[0].
      phases.append(jnp.pad(phase, ((0, 0), (0, rows[0] - phase_h),
                                    (0, cols[0] - phase_w), (0, 0))))
  stacked = jnp.stack(phases).reshape(stride[0], stride[1], n, rows[0],
                                      cols[0], groups * cg)
  dx = jnp.transpose(stacked, (2, 3, 0, 4, 1, 5)).reshape(
      n, rows[0] * stride[0], cols[0] * stride[1], groups * cg)
  return dx[:, :input_hw[0], :input_hw[1]]


def _split_conv_bwd(stride, padding, groups, residuals, g):
  x, w = residuals
  if any(s > 1 for s in stride):
    dx = _strided_input_grad(g, w, x.shape[1:3], stride, padding, groups)
  else:
    _, input_vjp = jax.vjp(
        lambda x: _split_conv_primal(x, w, stride, padding, groups), x)
    (dx,) = input_vjp(g)
  return dx, _split_kernel_grad(x, g, w.shape, stride, padding, groups)


_split_conv.defvjp(_split_conv_fwd, _split_conv_bwd)


def _transposed_pads(kernel_hw: tuple[int, ...], input_hw: tuple[int, ...],
                     output_hw: tuple[int, ...],
                     padding: tuple[tuple[int, int], ...]
                     ) -> tuple[tuple[int, int], ...]:
  """Pads of the stride-1 convolution of `g` that gives the input gradient.

  With the kernel flipped, input row `t` gathers output rows `t + lo - i`:
  pad `g` by `k - 1 - lo` before and `H - H' + lo` after (H' = H + lo + hi -
  k + 1 at stride 1). Negative when a forward pad exceeds `k - 1`.
  """
  return tuple((k - 1 - lo, size - out + lo) for k, size, out, (lo, _) in zip(
      kernel_hw, input_hw, output_hw, padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _onednn_conv(x: jax.Array, w: jax.Array, stride: tuple[int, ...],
                 padding: tuple[tuple[int, int], ...], groups: int
                 ) -> jax.Array:
  """oneDNN forward and input gradient; the kernel gradient as 'split'."""
  return onednn_conv.conv(x, w, stride, padding, groups)


def _onednn_conv_fwd(x, w, stride, padding, groups):
  return onednn_conv.conv(x, w, stride, padding, groups), (x, w)


def _onednn_conv_bwd(stride, padding, groups, residuals, g):
  x, w = residuals
  kh, kw, cg, c_out = w.shape
  if any(s > 1 for s in stride):
    dx = _strided_input_grad(g, w, x.shape[1:3], stride, padding, groups,
                             conv=onednn_conv.conv)
  else:
    pads = _transposed_pads((kh, kw), x.shape[1:3], g.shape[1:3], padding)
    if any(p < 0 for pad in pads for p in pad):
      _, input_vjp = jax.vjp(
          lambda x: _split_conv_primal(x, w, stride, padding, groups), x)
      (dx,) = input_vjp(g)
    else:
      # Per group: in and out swapped, taps flipped: [kh, kw, og, G * cg].
      og = c_out // groups
      w_t = jnp.transpose(w.reshape(kh, kw, cg, groups, og),
                          (0, 1, 4, 3, 2)).reshape(kh, kw, og, groups * cg)
      dx = onednn_conv.conv(g, w_t[::-1, ::-1], (1, 1), pads, groups)
  return dx, _split_kernel_grad(x, g, w.shape, stride, padding, groups)


_onednn_conv.defvjp(_onednn_conv_fwd, _onednn_conv_bwd)


def grouped_conv(x: jax.Array, w: jax.Array, *, stride: Sequence[int],
                 padding: str | Sequence[tuple[int, int]], groups: int,
                 impl: ConvImpl = "auto") -> jax.Array:
  """An NHWC x HWIO convolution with `groups` feature groups.

  Three lowerings give the same numbers (up to float rounding) from the same
  kernel:
  - 'native': one `conv_general_dilated` with `feature_group_count` (right
    on GPU/TPU).
  - 'split': each group as its own ungrouped convolution, outputs
    concatenated. XLA:CPU's grouped convolution and its gradients run
    5-13x slower than the same groups computed apart (benchmarks/
    conv_layers.py). The input gradient is XLA's own at stride 1 and
    `_strided_input_grad`'s phase by phase when strided; the kernel gradient
    is XLA's formula with the input's CHWN transpose done as a dot
    (`_nhwc_to_chwn`).
  - 'onednn' (CPU, float32): the forward and the input gradient (stride 1:
    the flipped, transposed kernel; strided: phase by phase) as oneDNN
    direct convolutions (`onednn_conv`), the kernel gradient as 'split'.
    F0's grouped 3x3 forwards run 30-40% faster than on Eigen. Other dtypes
    fall back to 'split'.
  An ungrouped 1x1 stride-1 kernel is a matmul `[N*H*W, C_in] @ [C_in,
  C_out]` under 'split' and 'onednn': its kernel gradient is then a dot over
  N*H*W, with no transpose at all.
  'auto' picks 'onednn' on CPU when `onednn_conv.available()` (else
  'split'), and 'native' elsewhere.

  Args:
    x: input `[N, H, W, C_in]`.
    w: kernel `[kh, kw, C_in // groups, C_out]`.
    stride: spatial strides.
    padding: 'SAME', 'VALID' or explicit pads.
    groups: feature group count.
    impl: 'auto', 'native', 'split' or 'onednn'.

  Returns:
    `[N, H', W', C_out]`.
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv impl={impl!r}; allowed: "
                     f"{', '.join(map(repr, CONV_IMPLS))}")
  if impl == "auto":
    if jax.default_backend() != "cpu":
      impl = "native"
    else:
      impl = "onednn" if onednn_conv.available() else "split"
  if impl == "onednn" and not onednn_conv.available():
    raise ValueError("conv impl='onednn' needs jaxlib's oneDNN convolution on "
                     "CPU, which this process does not have (see "
                     "nfnets_jax.onednn_conv.available); use 'auto' or 'split'")
  stride = tuple(stride)
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(x.shape[1:3], w.shape[:2], stride,
                                      padding)
  padding = tuple(tuple(p) for p in padding)
  if impl == "native":
    return _conv(x, w, stride, padding, groups)
  if groups == 1 and w.shape[:2] == (1, 1) and stride == (1, 1) and not any(
      any(p) for p in padding):
    n, h, wd, c = x.shape
    return (x.reshape(-1, c) @ w.reshape(c, -1)).reshape(n, h, wd, -1)
  supported = onednn_conv.SUPPORTED_DTYPES
  if (impl == "onednn" and x.dtype in supported and w.dtype in supported
      and all(lo >= 0 and hi >= 0 for lo, hi in padding)):
    return _onednn_conv(x, w, stride, padding, groups)
  return _split_conv(x, w, stride, padding, groups)


class WSConv2D(hk.Conv2D):
  """2D convolution with Scaled Weight Standardization, gain and bias.

  Parameters: `w` (HWIO, He-normal fan-in init), `gain` `[out]` (init 1),
  `bias` `[out]` (init 0), all float32 whatever the input dtype; the kernel is
  standardized in float32 and cast to the input dtype for the convolution.
  Input NHWC. Names mirror the official release so checkpoints map 1:1.
  """

  def __init__(self, output_channels: int, kernel_shape: int | Sequence[int],
               stride: int | Sequence[int] = 1, padding: str = "SAME",
               feature_group_count: int = 1, eps: float = 1e-4,
               eps_mode: EpsMode = "clamp", conv_impl: ConvImpl = "auto",
               name: str | None = None):
    super().__init__(output_channels, kernel_shape, stride=stride,
                     padding=padding, feature_group_count=feature_group_count,
                     name=name)
    self.eps = eps
    self.eps_mode = eps_mode
    self.conv_impl = conv_impl

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
                            init=jnp.ones)
    bias = hk.get_parameter("bias", (self.output_channels,), jnp.float32,
                            init=jnp.zeros)
    weight = standardize_weight(w, gain, self.eps, self.eps_mode)
    out = grouped_conv(inputs, weight.astype(inputs.dtype), stride=self.stride,
                       padding=self.padding, groups=self.feature_group_count,
                       impl=self.conv_impl)
    return add_bias(out, bias.astype(out.dtype))


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


def apply_blocks(blocks: Sequence[Callable[..., tuple[jax.Array, dict]]],
                 x: jax.Array, return_metrics: bool, **block_kwargs
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Runs residual blocks in order, collecting signal metrics if asked.

  Args:
    blocks: modules mapping `(x, **block_kwargs)` to `(x, block_metrics)`.
    x: the stem's output `[N, H, W, C]`.
    return_metrics: collect `signal_metrics` of the stem output (index 0)
      and of each block's output (index i + 1), and each block's own
      metrics with the suffix `_i`.
    **block_kwargs: passed to every block (e.g. `is_training`).

  Returns:
    The last block's output and the metrics (empty unless asked).
  """
  metrics = signal_metrics(x, 0) if return_metrics else {}
  for i, block in enumerate(blocks):
    x, block_metrics = block(x, **block_kwargs)
    if return_metrics:
      metrics.update(signal_metrics(x, i + 1))
      metrics.update({f"{k}_{i}": v for k, v in block_metrics.items()})
  return x, metrics


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
