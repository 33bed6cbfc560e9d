"""Parameter and FLOP counts of any Haiku model, read from its traced program.

FLOPs are counted as the papers do: multiply-accumulates (MACs) of the
convolutions and matrix multiplies (classifier, squeeze-excite linears) for
one image; elementwise ops, pooling and weight standardization are free.
Work on the weights alone (weight standardization's mean and variance are
dots) does not grow with the batch, so a model's count is the MACs of a
2-image forward minus those of a 1-image one.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

ModelFn = Callable[[jax.Array], Any]


def count_params(params: hk.Params) -> int:
  """Total number of scalars in a parameter tree."""
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def init_shapes(model_fn: ModelFn, image_size: int, channels: int = 3
                ) -> tuple[hk.Params, hk.State]:
  """Parameter and state shapes of `model_fn` on one image, without compute.

  Args:
    model_fn: maps NHWC images to outputs, run inside `hk.transform_with_state`.
    image_size: input height and width.
    channels: input channels.

  Returns:
    `(params, state)` trees of `jax.ShapeDtypeStruct`.
  """
  f = hk.transform_with_state(model_fn)
  x = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
  return jax.eval_shape(f.init, jax.random.key(0), x)


def _jaxpr_macs(jaxpr: jax.extend.core.Jaxpr) -> int:
  macs = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      lhs, rhs = (v.aval for v in eqn.invars)
      out = eqn.outvars[0].aval
      dn = eqn.params["dimension_numbers"]
      kernel_in = rhs.shape[dn.rhs_spec[1]]  # already in_ch // groups
      kernel_spatial = np.prod([rhs.shape[d] for d in dn.rhs_spec[2:]])
      macs += int(np.prod(out.shape)) * int(kernel_in * kernel_spatial)
    elif eqn.primitive.name == "onednn_conv":  # NHWC x HWIO, see onednn_conv.
      kh, kw, kernel_in, _ = eqn.invars[1].aval.shape
      macs += int(np.prod(eqn.outvars[0].aval.shape)) * int(kh * kw * kernel_in)
    elif eqn.primitive.name == "dot_general":
      lhs = eqn.invars[0].aval
      (contract_lhs, _), _ = eqn.params["dimension_numbers"]
      out = eqn.outvars[0].aval
      contracted = np.prod([lhs.shape[d] for d in contract_lhs])
      macs += int(np.prod(out.shape)) * int(contracted)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      macs += _jaxpr_macs(sub)
  return macs


def count_flops(model_fn: ModelFn, image_size: int, channels: int = 3) -> int:
  """Multiply-accumulates of one forward pass on one image (eval mode).

  Args:
    model_fn: maps NHWC images to outputs (traced with batches 1 and 2),
      run inside `hk.transform_with_state`; build the model for evaluation.
    image_size: input height and width (the paper uses the test resolution).
    channels: input channels.

  Returns:
    MACs, the unit the NFNet paper reports as FLOPs.
  """
  f = hk.transform_with_state(model_fn)
  params, state = init_shapes(model_fn, image_size, channels)

  def macs(batch: int) -> int:
    x = jax.ShapeDtypeStruct((batch, image_size, image_size, channels),
                             jnp.float32)
    return _jaxpr_macs(jax.make_jaxpr(f.apply)(params, state, None, x).jaxpr)

  return macs(2) - macs(1)
