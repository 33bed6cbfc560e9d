"""Helpers for tests of signal propagation at initialization.

Reads the flat metrics every model family returns with `return_metrics=True`
(`avg_var_{i}`: i = 0 stem, i + 1 after block i; `res_avg_var_{i}`,
`branch_in_avg_var_{i}` of block i) into arrays, and predicts the variance of
the residual stream as the NF papers do.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

# XLA's CPU backend spends seconds optimizing the threefry/normal kernels of
# every parameter initializer (a 12-block net: ~25 s to compile `init`); at
# optimization level 0 it takes ~4x less, and init runs once.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def fast_init(init_fn: Callable[..., Any], *args: Any) -> Any:
  """Runs a Haiku `init` under `jax.jit`, compiled without LLVM optimization.

  `args` are traced: close over Python flags such as `is_training`.
  """
  return jax.jit(init_fn).lower(*args).compile(FAST_COMPILE)(*args)


def set_skip_gains(params: hk.Params, value: float) -> hk.Params:
  """Sets every `skip_gain` scalar (zero at init) to `value`."""
  return {mod: {name: (jnp.full_like(p, value) if name == "skip_gain" else p)
                for name, p in leaves.items()}
          for mod, leaves in params.items()}


def block_arrays(outputs: Mapping[str, jax.Array], num_blocks: int
                 ) -> dict[str, np.ndarray]:
  """Stacks the metrics: `h_var` [num_blocks + 1] (0 = stem), `branch_in`,
  `res` [num_blocks]."""
  get = lambda key, n: np.array([float(outputs[f"{key}_{i}"])
                                 for i in range(n)])
  return {"h_var": get("avg_var", num_blocks + 1),
          "branch_in": get("branch_in_avg_var", num_blocks),
          "res": get("res_avg_var", num_blocks)}


def transition_blocks(depths: Sequence[int]) -> set[int]:
  """Global indices of each stage's first block."""
  return {int(i) for i in np.cumsum([0, *depths[:-1]])}


def predicted_variances(depths: Sequence[int], alpha: float) -> np.ndarray:
  """Var(h) after each block as the NF analysis predicts at init.

  A stage's first block resets the stream to the unit-variance shortcut and
  every block adds `alpha^2` (unit-variance branch): 1 + k alpha^2 after the
  k-th block of a stage.
  """
  return np.array([1.0 + (k + 1) * alpha**2
                   for d in depths for k in range(d)])
