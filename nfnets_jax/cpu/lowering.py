"""Which convolution lowering runs: a run-time setting, not a model argument.

Every weight-standardized convolution of the models goes through `conv2d`,
which reads the setting when the model is traced:

    NFNETS_JAX_CONV=split python train.py        # for a whole process
    with nfnets_jax.cpu.conv_impl("native"):      # for what is traced inside
      logits = jax.jit(forward)(params, images)

Values (`CONV_IMPLS`): 'auto' (default: 'onednn' on CPU where
`cpu.onednn.available()`, else 'split'; 'native' on GPU/TPU), 'native',
'split', 'onednn' (see `cpu.convolution`). All give the same numbers up to
float rounding, so a function traced under one setting and reused under
another computes the same thing at a different speed: the setting is read at
trace time, and `jax.jit` keeps what it traced.

As timm's fused-attention switch (`timm/layers/config.py`), it changes no
signature and is saved nowhere: model kwargs, configs and checkpoints hold
no backend choice.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib
import contextvars
import os

import jax

from nfnets_jax.cpu import convolution
from nfnets_jax.cpu import onednn

CONV_IMPLS: tuple[str, ...] = ("auto", *convolution.LOWERINGS)
ENV = "NFNETS_JAX_CONV"

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "nfnets_jax_conv_impl", default=None)


def _check(impl: str, where: str) -> str:
  if impl not in CONV_IMPLS:
    raise ValueError(f"{where}={impl!r} is not a convolution lowering; "
                     f"allowed: {', '.join(map(repr, CONV_IMPLS))}")
  return impl


def current_conv_impl() -> str:
  """The setting in force: `conv_impl`'s innermost context, else `$ENV`.

  Raises:
    ValueError: `$NFNETS_JAX_CONV` holds an unknown value.
  """
  impl = _override.get()
  if impl is not None:
    return impl
  return _check(os.environ.get(ENV, "auto") or "auto", ENV)


@contextlib.contextmanager
def conv_impl(impl: str) -> Iterator[str]:
  """Runs the block with convolutions lowered by `impl` (one of `CONV_IMPLS`).

  Applies to functions traced inside the block (in this thread or task).

  Raises:
    ValueError: an unknown `impl`; 'onednn' where this process has no
      oneDNN convolution.
  """
  _check(impl, "conv_impl")
  if impl == "onednn" and not onednn.available():
    raise ValueError("conv_impl='onednn' needs jaxlib's oneDNN convolution on "
                     "CPU, which this process does not have (see "
                     "nfnets_jax.cpu.onednn.available); use 'auto' or 'split'")
  token = _override.set(impl)
  try:
    yield impl
  finally:
    _override.reset(token)


def resolved_conv_impl(impl: str | None = None) -> str:
  """`impl` (default: the current setting) with 'auto' resolved.

  Raises:
    ValueError: 'onednn' asked for where this process has no oneDNN
      convolution (through `$NFNETS_JAX_CONV`).
  """
  impl = current_conv_impl() if impl is None else _check(impl, "impl")
  if impl == "auto":
    if jax.default_backend() != "cpu":
      return "native"
    return "onednn" if onednn.available() else "split"
  if impl == "onednn" and not onednn.available():
    raise ValueError(f"{ENV}='onednn' needs jaxlib's oneDNN convolution on "
                     "CPU, which this process does not have; use 'auto' or "
                     "'split'")
  return impl


def conv2d(x: jax.Array, w: jax.Array, bias: jax.Array | None = None, *,
           stride: Sequence[int], padding: str | Sequence[tuple[int, int]],
           groups: int = 1) -> jax.Array:
  """An NHWC x HWIO convolution with feature groups, plus a bias.

  The models' one convolution entry point; the lowering is the current
  setting's (`current_conv_impl`).

  Args:
    x: input `[N, H, W, C_in]`.
    w: kernel `[kh, kw, C_in // groups, C_out]`, same dtype as `x`.
    bias: `[C_out]` or None; its gradient is a matmul (`add_bias`).
    stride: spatial strides.
    padding: 'SAME', 'VALID' or explicit `((lo, hi), (lo, hi))`.
    groups: feature group count.

  Returns:
    `[N, H', W', C_out]`.
  """
  stride = tuple(int(s) for s in stride)
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(x.shape[1:3], w.shape[:2], stride,
                                      padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  out = convolution.lowered_conv(x, w, stride, padding, groups,
                                 resolved_conv_impl())
  return out if bias is None else convolution.add_bias(out, bias)


def resolved_inference_conv_impl() -> str:
  """The lowering for forward-only programs (`Model.__call__`): the current
  setting, with 'auto' as 'native'.

  On CPU XLA's own convolutions ran F0's eval forward as fast as oneDNN's
  (256 px, batches 1, 4 and 16; `benchmarks/startup.py`), and JAX's
  persistent compilation cache keeps their programs, which it cannot do
  for oneDNN's: a later process reads the compiled forward back.
  """
  impl = current_conv_impl()
  return "native" if impl == "auto" else resolved_conv_impl(impl)
