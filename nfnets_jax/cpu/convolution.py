"""Convolution lowerings for XLA:CPU and their gradients (VJPs).

Every lowering computes the same NHWC x HWIO grouped convolution (up to float
rounding) from the same kernel; `nfnets_jax.cpu.lowering` picks one at run
time:
- 'native': one `conv_general_dilated` with `feature_group_count` (right
  on GPU/TPU).
- 'split': each group as its own ungrouped convolution, outputs
  concatenated. XLA:CPU's grouped convolution and its gradients run 5-13x
  slower than the same groups computed apart (benchmarks/conv_layers.py).
  The input gradient is XLA's own at stride 1 and `_strided_input_grad`'s
  phase by phase when strided; the kernel gradient is XLA's formula with the
  input's CHWN transpose done as a dot (`_nhwc_to_chwn`).
- 'onednn' (CPU, float32): the forward and the input gradient (stride 1:
  the flipped, transposed kernel; strided: phase by phase) as oneDNN direct
  convolutions (`cpu.onednn`), the kernel gradient as 'split'. F0's grouped
  3x3 forwards run 30-40% faster than on Eigen. Other dtypes fall back to
  'split'.
An ungrouped 1x1 stride-1 kernel is a matmul `[N*H*W, C_in] @ [C_in, C_out]`
under 'split' and 'onednn': its kernel gradient is then a dot over N*H*W,
with no transpose at all. `add_bias` adds a bias whose gradient is a matmul
rather than a column reduction.
"""
from __future__ import annotations

from collections.abc import Callable
import functools

import jax
import jax.numpy as jnp

from nfnets_jax.cpu import onednn

Pads = tuple[tuple[int, int], ...]
# conv(x, w, stride, padding, groups) -> NHWC output.
ConvFn = Callable[[jax.Array, jax.Array, tuple[int, ...], Pads, int],
                  jax.Array]
LOWERINGS = ("native", "split", "onednn")


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
                       padding: Pads,
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
                       padding: Pads,
                       groups: int) -> jax.Array:
  if groups == 1:
    return onednn.xla_conv(x, w, stride, padding)
  xs = jnp.split(x, groups, axis=-1)
  ws = jnp.split(w, groups, axis=-1)
  return jnp.concatenate([onednn.xla_conv(xi, wi, stride, padding)
                          for xi, wi in zip(xs, ws)], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _split_conv(x: jax.Array, w: jax.Array, stride: tuple[int, ...],
                padding: Pads, groups: int) -> jax.Array:
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
                        padding: Pads,
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
                     output_hw: tuple[int, ...], padding: Pads) -> Pads:
  """Pads of the stride-1 convolution of `g` that gives the input gradient.

  With the kernel flipped, input row `t` gathers output rows `t + lo - i`:
  pad `g` by `k - 1 - lo` before and `H - H' + lo` after (H' = H + lo + hi -
  k + 1 at stride 1). Negative when a forward pad exceeds `k - 1`.
  """
  return tuple((k - 1 - lo, size - out + lo) for k, size, out, (lo, _) in zip(
      kernel_hw, input_hw, output_hw, padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _onednn_conv(x: jax.Array, w: jax.Array, stride: tuple[int, ...],
                 padding: Pads, groups: int) -> jax.Array:
  """oneDNN forward and input gradient; the kernel gradient as 'split'."""
  return onednn.conv(x, w, stride, padding, groups)


def _onednn_conv_fwd(x, w, stride, padding, groups):
  return onednn.conv(x, w, stride, padding, groups), (x, w)


def _onednn_conv_bwd(stride, padding, groups, residuals, g):
  x, w = residuals
  kh, kw, cg, c_out = w.shape
  if any(s > 1 for s in stride):
    dx = _strided_input_grad(g, w, x.shape[1:3], stride, padding, groups,
                             conv=onednn.conv)
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
      dx = onednn.conv(g, w_t[::-1, ::-1], (1, 1), pads, groups)
  return dx, _split_kernel_grad(x, g, w.shape, stride, padding, groups)


_onednn_conv.defvjp(_onednn_conv_fwd, _onednn_conv_bwd)


def lowered_conv(x: jax.Array, w: jax.Array, stride: tuple[int, ...],
                 padding: Pads, groups: int, lowering: str) -> jax.Array:
  """The convolution by one of `LOWERINGS` (explicit pads, no bias).

  Args:
    x: input `[N, H, W, C_in]`.
    w: kernel `[kh, kw, C_in // groups, C_out]`.
    stride: spatial strides.
    padding: `((lo, hi), (lo, hi))`.
    groups: feature group count.
    lowering: 'native', 'split' or 'onednn' ('onednn' needs
      `onednn.available()`; other dtypes than float32 run as 'split').

  Returns:
    `[N, H', W', C_out]`.
  """
  if lowering not in LOWERINGS:
    raise ValueError(f"lowering={lowering!r}; allowed: {LOWERINGS}")
  if lowering == "native":
    return onednn.xla_conv(x, w, stride, padding, groups)
  if groups == 1 and w.shape[:2] == (1, 1) and stride == (1, 1) and not any(
      any(p) for p in padding):
    n, h, wd, c = x.shape
    return (x.reshape(-1, c) @ w.reshape(c, -1)).reshape(n, h, wd, -1)
  supported = onednn.SUPPORTED_DTYPES
  if (lowering == "onednn" and x.dtype in supported and w.dtype in supported
      and all(lo >= 0 and hi >= 0 for lo, hi in padding)):
    return _onednn_conv(x, w, stride, padding, groups)
  return _split_conv(x, w, stride, padding, groups)
