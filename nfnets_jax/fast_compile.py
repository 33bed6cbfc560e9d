"""Compiling programs that run once (initializers, measurements) fast on CPU.

XLA:CPU spends most of a one-off program's compile time in LLVM passes that
only pay off over many runs: an NFNet `init` compiles in 3.5 s instead of
12.6 s without them, a 12-block network's `init` about 4x faster. On other
backends the options are empty and these are plain `jax.jit`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

CPU_OPTIONS = {"xla_backend_optimization_level": 0,
               "xla_llvm_disable_expensive_passes": True}


def compile_fast(fn: Callable[..., Any], *args: Any) -> Callable[..., Any]:
  """`fn` compiled for `args`, without LLVM optimization on CPU.

  Args:
    fn: a `jax.jit` or `jax.pmap` function, or a plain one (then jitted).
    *args: example arguments (traced).
  """
  options = CPU_OPTIONS if jax.default_backend() == "cpu" else {}
  lowerable = fn if hasattr(fn, "lower") else jax.jit(fn)
  return lowerable.lower(*args).compile(compiler_options=options)


def run_once(fn: Callable[..., Any], *args: Any) -> Any:
  """Compiles `fn` with `compile_fast` and calls it on `args`.

  Close over Python flags such as `is_training`: `args` are traced.
  """
  return compile_fast(fn, *args)(*args)
