"""oneDNN's direct convolution on CPU, called from JAX through XLA:CPU.

XLA:CPU in jaxlib 0.10.2 runs convolutions as Eigen contractions (about 195
GFLOP/s on a 2-core Xeon, where PyTorch's oneDNN kernels reach 280 on F0's
grouped 3x3 convolutions). The same jaxlib links oneDNN and runs a custom
call `__onednn$convolution` (a forward convolution, feature groups, strides,
padding and dilation, any dimension order) on XLA's thread pool; only the
compiler pass that would emit it is built out of the wheel. `conv` emits that
custom call directly (through the public `jax.ffi.ffi_lowering`), so oneDNN
runs the convolution inside the jitted program.

The custom call and its JSON config are private to jaxlib: `available()` is
False on a JAX other than `TESTED_JAX` (callers then fall back to XLA's own
convolutions), and otherwise compiles and checks one small grouped, strided
convolution against `lax.conv_general_dilated` once per process (False on a
non-x86 jaxlib without oneDNN, a CPU oneDNN cannot run, a config format that
moved). Only the forward exists here: gradients are composed from forward
convolutions in `cpu.convolution`. Programs serialized with `jax.export`, and
lowerings for other platforms, get XLA's own convolution instead.
"""
from __future__ import annotations

from collections.abc import Sequence
import functools
import json

import jax
from jax.extend import core as jex_core
from jax.interpreters import batching
from jax.interpreters import mlir
import numpy as np

CUSTOM_CALL_TARGET = "__onednn$convolution"
SUPPORTED_DTYPES = (np.dtype(np.float32),)
# The JAX releases whose jaxlib runs the custom call with this config.
TESTED_JAX = ("0.10.",)

# (batch, feature, spatial) of input and output, (in, out, spatial) of the
# kernel: NHWC x HWIO -> NHWC.
_NHWC_HWIO = ((0, 3, (1, 2)), (2, 3, (0, 1)), (0, 3, (1, 2)))

onednn_conv_p = jex_core.Primitive("onednn_conv")


def _out_size(size: int, kernel: int, pad: tuple[int, int], stride: int) -> int:
  return (size + pad[0] + pad[1] - kernel) // stride + 1


def _abstract_eval(x, w, *, stride, padding, groups):
  n, h, wd, _ = x.shape
  kh, kw, _, c_out = w.shape
  return jax.core.ShapedArray(
      (n, _out_size(h, kh, padding[0], stride[0]),
       _out_size(wd, kw, padding[1], stride[1]), c_out), x.dtype)


def _backend_config(stride, padding, groups) -> str:
  """The JSON of XLA:CPU's `BackendConfig.onednn_conv_config` proto.

  Dimension indices and window values are plain (no offset); dilation 1 is
  no dilation, as in the runtime of jaxlib 0.10.2.
  """
  (xb, xf, xs), (wi, wo, ws), (ob, of, os_) = _NHWC_HWIO
  return json.dumps({"onednn_conv_config": {
      "dims": 4,
      "input": {"data": {"batch_dim": xb, "feature_dim": xf,
                         "spatial_dims": list(xs)}},
      "kernel": {"filter": {"input_feature_dim": wi, "output_feature_dim": wo,
                            "spatial_dims": list(ws)}},
      "output": {"data": {"batch_dim": ob, "feature_dim": of,
                          "spatial_dims": list(os_)}},
      "window": {"pad_left": [p[0] for p in padding],
                 "pad_right": [p[1] for p in padding],
                 "strides": list(stride), "window_dilations": [1, 1]},
      "feature_groups": groups}})


def xla_conv(x: jax.Array, w: jax.Array, stride: Sequence[int],
             padding: Sequence[tuple[int, int]], groups: int = 1) -> jax.Array:
  """The same NHWC x HWIO convolution as XLA's `conv_general_dilated`."""
  return jax.lax.conv_general_dilated(
      x, w, window_strides=stride, padding=padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


_lower_portable = mlir.lower_fun(xla_conv, multiple_results=False)


def _for_export(ctx) -> bool:
  params = getattr(ctx.module_context, "lowering_parameters", None)
  return bool(getattr(params, "for_export", True))


def _lower_cpu(ctx, x, w, *, stride, padding, groups):
  """The custom call; XLA's convolution in `jax.export` artifacts.

  The custom call has no compatibility guarantee across jaxlib versions
  (`jax.export` refuses it), so serialized programs get the portable op.
  """
  if _for_export(ctx):
    return _lower_portable(ctx, x, w, stride=stride, padding=padding,
                           groups=groups)
  # No layout constraints: XLA's default (row-major) layouts, as the
  # convolutions XLA:CPU's own oneDNN pass would emit.
  lower = jax.ffi.ffi_lowering(
      CUSTOM_CALL_TARGET, api_version=1, skip_ffi_layout_processing=True,
      backend_config=_backend_config(stride, padding, groups))
  return lower(ctx, x, w)


def _batch_rule(args, dims, **params):
  # Under vmap: XLA's convolution, which has a batching rule of its own.
  return jax.vmap(functools.partial(xla_conv, **params), in_axes=dims)(
      *args), 0


@functools.cache
def _eager(stride, padding, groups):
  return jax.jit(functools.partial(onednn_conv_p.bind, stride=stride,
                                   padding=padding, groups=groups))


onednn_conv_p.def_abstract_eval(_abstract_eval)
onednn_conv_p.def_impl(
    lambda x, w, **params: _eager(**params)(x, w))
mlir.register_lowering(onednn_conv_p, _lower_portable)
mlir.register_lowering(onednn_conv_p, _lower_cpu, platform="cpu")
batching.primitive_batchers[onednn_conv_p] = _batch_rule


def conv(x: jax.Array, w: jax.Array, stride: Sequence[int],
         padding: Sequence[tuple[int, int]], groups: int = 1) -> jax.Array:
  """An NHWC x HWIO convolution run by oneDNN (CPU only, no gradient).

  Args:
    x: input `[N, H, W, C_in]`, float32.
    w: kernel `[kh, kw, C_in // groups, C_out]`, float32.
    stride: `(sh, sw)`.
    padding: `((lo, hi), (lo, hi))`, each >= 0.
    groups: feature group count.

  Returns:
    `[N, H', W', C_out]`, as `lax.conv_general_dilated` gives it.
  """
  stride = tuple(int(s) for s in stride)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if x.ndim != 4 or w.ndim != 4 or x.shape[3] != w.shape[2] * groups:
    raise ValueError(f"onednn_conv: x {x.shape} and w {w.shape} are not an "
                     f"NHWC input and HWIO kernel with {groups} groups")
  if any(lo < 0 or hi < 0 for lo, hi in padding):
    raise ValueError(f"onednn_conv: padding={padding}; pads must be >= 0")
  if any(d not in SUPPORTED_DTYPES for d in (x.dtype, w.dtype)):
    raise ValueError(f"onednn_conv: dtypes {x.dtype}, {w.dtype}; allowed: "
                     f"{[str(d) for d in SUPPORTED_DTYPES]}")
  return onednn_conv_p.bind(x, w, stride=stride, padding=padding,
                            groups=groups)


@functools.cache
def available() -> bool:
  """Whether `conv` compiles, runs and matches XLA on this process's CPU.

  False on a JAX outside `TESTED_JAX`; otherwise checked once per process on
  a small 2-group, stride-2, unevenly padded convolution (a compile of about
  a second).
  """
  if not jax.__version__.startswith(TESTED_JAX):
    return False
  if jax.default_backend() != "cpu":
    return False
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 7, 6, 8)).astype(np.float32)
  w = rng.standard_normal((3, 2, 4, 6)).astype(np.float32)
  params = dict(stride=(2, 1), padding=((1, 0), (0, 1)), groups=2)
  # Eager even when first asked while a model is being traced.
  with jax.ensure_compile_time_eval():
    try:
      got = np.asarray(jax.jit(lambda x, w: conv(x, w, **params))(x, w))
    except Exception:  # pylint: disable=broad-except
      return False  # E.g. a jaxlib without the custom call: XLA refuses it.
    want = np.asarray(xla_conv(x, w, **params))
  return got.shape == want.shape and bool(
      np.allclose(got, want, rtol=1e-4, atol=1e-4))
