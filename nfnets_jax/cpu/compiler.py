"""XLA:CPU compiler options for the programs nfnets_jax compiles.

The options go to each computation the package compiles itself (its train
and eval steps, `create_model`'s forward, initializers), never into
`XLA_FLAGS` or `jax.config`: a user's own jitted functions in the same
process compile exactly as without nfnets_jax. Wrap your own with `jit` (or
pass `compiler_options=compiler_options()` to `jax.jit`) to get them too.

`CPU_OPTIONS`: jaxlib 0.10.2 hands convolutions, dots, reductions and
elementwise fusions on CPU to YNNPACK. We keep YNNPACK for plain dots and
reductions only (`xla_cpu_experimental_ynn_fusion_type`):
- Convolutions stay on Eigen: YNNPACK's NHWC convolution gradients are slower
  (a 3x3 32->64 conv at 96x96, batch 8: forward + backward 587 ms with
  YNNPACK, 120 ms on Eigen on a 2-core AVX2 EPYC; kernel gradient of a 3x3
  128->128 conv at 48x48 24.6 against 19.1 ms on a Zen 5 EPYC).
- Dots go to YNNPACK: Eigen ran the input gradient of a 1x1 conv (a dot with
  a transposed kernel) slowly, `[288, 3072] x [1536, 3072]^T` 21.8 ms against
  6.3 ms with YNNPACK.
- Reductions go to YNNPACK: XLA's own split the squeeze-excite means and
  gradient sums into reduce-windows.
F0 train step at 192 px, batch 8, one process, interleaved (6 rounds): 1213 ms
with YNNPACK off, 1102 ms with dots and reductions on it on a Zen 5 EPYC
(+10%), 2172 against 1995 ms on a Zen 4 EPYC (+9%); adding YNNPACK's
elementwise fusions made both slower. Numbers change only by float rounding.
`xla_disable_hlo_passes=cse_barrier_expander`: XLA:CPU otherwise removes
the optimization barriers `jax.checkpoint` (remat) puts around the
recomputation, and common-subexpression elimination then merges the
recomputed activations with the forward pass's, so remat saved nothing
(F0 train step at 192 px, batch 32, native convolutions: 4.31 GB of
temporaries with or without remat; 1.57 GB with remat when the barriers
stay). Programs without barriers compile as before.
An option the user already set in `XLA_FLAGS` wins; `NFNETS_JAX_CPU_OPTIONS=0`
keeps XLA's defaults.

`FAST_OPTIONS` skip the LLVM passes that only pay off over many runs, for
programs that run once (initializers, measurements): an NFNet `init`
compiles in 3.5 s instead of 12.6 s.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
import os
from typing import Any

import jax

# XLA DebugOptions field -> value (the enum names as the proto spells them).
CPU_OPTIONS: dict[str, Any] = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
    "xla_disable_hlo_passes": "cse_barrier_expander"}
FAST_OPTIONS: dict[str, Any] = {"xla_backend_optimization_level": 0,
                                "xla_llvm_disable_expensive_passes": True}
OPT_OUT_ENV = "NFNETS_JAX_CPU_OPTIONS"


def compiler_options(*, fast: bool = False,
                     environ: Mapping[str, str] = os.environ
                     ) -> dict[str, Any]:
  """The options for one of the package's CPU programs ({} elsewhere).

  Args:
    fast: also `FAST_OPTIONS` (a program that runs once).
    environ: where `XLA_FLAGS` and `NFNETS_JAX_CPU_OPTIONS` are read.

  Returns:
    `CPU_OPTIONS` (and `FAST_OPTIONS`) less those named in `XLA_FLAGS`;
    no `CPU_OPTIONS` when `NFNETS_JAX_CPU_OPTIONS=0`.
  """
  if jax.default_backend() != "cpu":
    return {}
  options = {} if environ.get(OPT_OUT_ENV, "1") == "0" else dict(CPU_OPTIONS)
  if fast:
    options.update(FAST_OPTIONS)
  user = environ.get("XLA_FLAGS", "")
  return {k: v for k, v in options.items() if f"--{k}" not in user}


def jit(fun: Callable[..., Any], **jit_kwargs: Any) -> Any:
  """`jax.jit(fun, **jit_kwargs)` compiled with `compiler_options()`."""
  return jax.jit(fun, compiler_options=compiler_options(), **jit_kwargs)


class Compiled:
  """A `jax.pmap` (or `jax.jit`) compiled with `compiler_options()` per input
  signature, on first use: `jax.pmap` takes no compiler options itself.

  In a multi-process run the function is called as it is (compiled by
  `jax.pmap` without options): pmap's ahead-of-time executables expect
  global arguments there. The options are for CPUs, where several processes
  are a test setting.

  Args:
    fn: the pmapped or jitted function (positional arguments only).
    fast: compile with `FAST_OPTIONS` too.
  """

  def __init__(self, fn: Any, *, fast: bool = False):
    self._fn = fn
    self._fast = fast
    self._executables: dict[Any, Any] = {}

  @staticmethod
  def _signature(args: tuple[Any, ...]) -> Any:
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple(
        (getattr(x, "shape", None), str(getattr(x, "dtype", type(x))),
         getattr(x, "sharding", None)) for x in leaves)

  def compile(self, *args: Any) -> Any:
    """The executable for `args`' signature (compiled once)."""
    key = self._signature(args)
    if key not in self._executables:
      self._executables[key] = self._fn.lower(*args).compile(
          compiler_options=compiler_options(fast=self._fast))
    return self._executables[key]

  def __call__(self, *args: Any) -> Any:
    if jax.process_count() > 1:
      return self._fn(*args)
    return self.compile(*args)(*args)

  def lower(self, *args: Any) -> Any:
    """The wrapped function's `lower` (for `compile_fast` and the like)."""
    return self._fn.lower(*args)


def compile_fast(fn: Callable[..., Any], *args: Any) -> Callable[..., Any]:
  """`fn` compiled for `args` with `FAST_OPTIONS` (and `CPU_OPTIONS`).

  Args:
    fn: a `jax.jit` or `jax.pmap` function, or a plain one (then jitted).
    *args: example arguments (traced).
  """
  lowerable = fn if hasattr(fn, "lower") else jax.jit(fn)
  return lowerable.lower(*args).compile(
      compiler_options=compiler_options(fast=True))


def run_once(fn: Callable[..., Any], *args: Any) -> Any:
  """Compiles `fn` with `compile_fast` and calls it on `args`.

  Close over Python flags such as `is_training`: `args` are traced.
  """
  return compile_fast(fn, *args)(*args)
