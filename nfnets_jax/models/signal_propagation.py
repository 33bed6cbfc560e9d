"""Signal propagation at initialization: measuring it and predicting it.

Every model family returns, with `return_metrics=True`, flat metrics
`avg_sq_mean_{i}`, `avg_var_{i}` (i = 0 stem, i + 1 after block i),
`res_avg_var_{i}` and `branch_in_avg_var_{i}` of block i. This module runs a
model at initialization, stacks those metrics into per-block arrays (the data
of a Signal Propagation Plot), and predicts the variance of the residual
stream as the NF analysis does.

Reference: [Brock, De, Smith 2021] Characterizing signal propagation to close
the performance gap in unnormalized ResNets (ICLR), section 3 (Signal
Propagation Plots) and section 4 (NF-ResNets: Var(h) grows by alpha^2 per
block and is reset by each stage's projection shortcut).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax.cpu import compiler


def set_skip_gains(params: hk.Params, value: float) -> hk.Params:
  """Sets every `skip_gain` scalar (zero at init) to `value`."""
  return {mod: {name: (jnp.full_like(p, value) if name == "skip_gain" else p)
                for name, p in leaves.items()}
          for mod, leaves in params.items()}


def block_arrays(outputs: Mapping[str, jax.Array], num_blocks: int
                 ) -> dict[str, np.ndarray]:
  """Stacks the signal metrics of a model's outputs into arrays.

  Args:
    outputs: a model's outputs with `return_metrics=True`.
    num_blocks: residual blocks in the model.

  Returns:
    `h_sq_mean`, `h_var` [num_blocks + 1] (index 0 the stem output, i + 1 the
    output of block i): average squared channel mean and average channel
    variance of the residual stream; `branch_in`, `res` [num_blocks]: average
    channel variance of each block's branch input and branch output.
  """
  get = lambda key, n: np.array([float(outputs[f"{key}_{i}"])
                                 for i in range(n)])
  return {"h_sq_mean": get("avg_sq_mean", num_blocks + 1),
          "h_var": get("avg_var", num_blocks + 1),
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


def measure_at_init(model_fn: Callable[[jax.Array], Mapping[str, jax.Array]],
                    images: jax.Array, num_blocks: int, *, seed: int = 0,
                    skip_gain: float | None = None,
                    jit: bool = False) -> dict[str, np.ndarray]:
  """Signal metrics of a freshly initialised model on `images`.

  Initialises on one image and applies to the whole batch, op by op or as
  two jitted programs. On CPU the cost is compilation: op by op, each
  distinct (op, shape) compiles once, the initializers' random kernels
  slowest, so a deep network that repeats a few block shapes costs about as
  much as a shallow one; one jitted program instead grows with depth
  (compiled here without LLVM optimization, `cpu.compiler.run_once`). Use
  `jit` for shallow networks, op by op for deep ones.

  Args:
    model_fn: maps NHWC images to a model's outputs with
      `return_metrics=True`, run inside `hk.transform_with_state` (batch norm
      models: build them with `is_training=True` so they use batch
      statistics, as at the start of training).
    images: the input batch, e.g. N(0, 1) noise as in the ICLR paper's plots.
    num_blocks: residual blocks in the model.
    seed: PRNG seed of the initialisation (`seed + 1` for the apply).
    skip_gain: if given, every `skip_gain` scalar (SkipInit-style, zero at
      init) is set to it; 1 gives the NF analysis' `h + alpha f(h / beta)`.
    jit: compile init and apply as one program each (`cpu.compiler.run_once`).

  Returns:
    `block_arrays` of the outputs.
  """
  f = hk.transform_with_state(model_fn)
  init_args = (jax.random.key(seed), images[:1])
  if jit:
    params, state = compiler.run_once(f.init, *init_args)
  else:
    params, state = f.init(*init_args)
  if skip_gain is not None:
    params = set_skip_gains(params, skip_gain)
  apply_args = (params, state, jax.random.key(seed + 1), images)
  if jit:
    outputs, _ = compiler.run_once(f.apply, *apply_args)
  else:
    outputs, _ = f.apply(*apply_args)
  return block_arrays(outputs, num_blocks)
