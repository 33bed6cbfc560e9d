"""Adaptive Gradient Clipping (AGC) as an optax gradient transformation.

AGC clips each *unit* (one output neuron or output channel) of a gradient
whose norm is large relative to the norm of the matching unit of the
parameter:

    G_u <- G_u * clipping * max(||W_u||, eps) / ||G_u||
           if ||G_u|| / max(||W_u||, eps) > clipping.

Reference: Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image
Recognition Without Normalization", ICML 2021 (arXiv:2102.06171), Section 4.1.

The arithmetic comes from optax (`optax.transforms.unitwise_norm` and
`optax.transforms.unitwise_clip`); this module chooses the unit axes, computes
the norms in float32, checks its inputs and can record how often it clips.

Unit conventions compared with `optax.adaptive_grad_clip` (optax 0.2.8) and the
official release's `agc_optax.py`, which share one rule (tested in
tests/test_agc.py, `OptaxAgreementTest`):

* Same: scalars and vectors are one unit; dense `(in, out)` kernels with
  in, out > 1 have a unit per output (axis 0 reduced); conv HWIO and DHWIO
  kernels a unit per output channel; a ratio exactly at `clipping` leaves the
  gradient unchanged; `max(||W||, eps)` bounds parameter norms.
* Tensors with at most one dim of size > 1, e.g. a dense `(1, out)` or a conv
  `(1, 1, 1, out)` kernel: here one unit per output; optax squeezes first and
  makes the whole tensor one unit.
* Rank 3: here all but the last axis are reduced (Conv1D `(width, in, out)`:
  a unit per output channel); optax reduces axis 0 only (multi-head
  `(in, heads, dim)`: a unit per (head, dim)). Pass
  `unitwise_axes=lambda name, p: (0,) if p.ndim == 3 else None` for optax's.
* Rank >= 6: here all but the last axis are reduced; optax raises.
* Low-precision gradients: here norms are float32; optax computes them in the
  gradient's dtype, where a float16 sum of squares overflows to inf and the
  gradient is zeroed.
* Tiny gradients: optax and the official code divide by `max(||G||, 1e-6)`,
  which shrinks a clipped unit below `clipping * max(||W||, eps)` when that
  bound is under 1e-6 (never with the defaults eps=1e-3 and
  clipping >= 1e-3); here the floor is float32's `tiny`, so a clipped unit's
  norm is the bound.

In short: for rank >= 2, every unit here is one index of the last axis.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import transforms as optax_transforms

Axes = Union[int, Sequence[int]]
UnitwiseAxes = Union[None, Axes, Callable[[str, jax.Array], Optional[Axes]]]

_NO_PARAMS_MSG = (
    "adaptive_grad_clip needs the current parameters: call "
    "`update(grads, state, params)`; AGC compares each gradient unit with "
    "the norm of the matching parameter unit."
)


class AdaptiveGradClipState(NamedTuple):
  """State of `adaptive_grad_clip(..., track_clip_stats=True)`.

  Attributes:
    param_clip_frac: a tree like the parameters holding, per parameter, the
      fraction (float32 scalar) of its units clipped at the last update.
    num_clipped: int32 scalar, units clipped at the last update, all
      parameters together.
    num_units: int32 scalar, number of units in all parameters (0 before the
      first update).
  """

  param_clip_frac: Any
  num_clipped: jax.Array
  num_units: jax.Array

  @property
  def clip_frac(self) -> jax.Array:
    """Fraction of all units clipped at the last update (0 before any)."""
    return self.num_clipped / jnp.maximum(self.num_units, 1)


def default_unitwise_axes(shape: Sequence[int]) -> tuple[int, ...]:
  """Axes reduced to compute the norm of each unit of a tensor.

  Scalars and vectors form one unit. Higher-rank tensors are taken to have
  their output units on the last axis, as Haiku's dense `(in, out)` and
  conv `(..., in, out)` kernels do, so every other axis is reduced.

  Args:
    shape: the shape of the parameter (or gradient).

  Returns:
    The tuple of axes to reduce.
  """
  ndim = len(shape)
  if ndim <= 1:
    return tuple(range(ndim))
  return tuple(range(ndim - 1))


def _resolve_axes(
    unitwise_axes: UnitwiseAxes, name: str, param: jax.Array
) -> tuple[int, ...]:
  """One parameter's reduction axes, as sorted non-negative ints."""
  if callable(unitwise_axes):
    axes = unitwise_axes(name, param)
  else:
    axes = unitwise_axes
  if axes is None:
    return default_unitwise_axes(param.shape)
  axes = (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)
  ndim = param.ndim
  if any(not -ndim <= a < ndim for a in axes):
    raise ValueError(
        f"adaptive_grad_clip: unitwise_axes {axes} out of range for parameter "
        f"{name!r} of shape {param.shape}."
    )
  return tuple(sorted(a % ndim for a in axes))


def _check_value(name: str, value: Any, minimum: float, strict: bool) -> None:
  """Raises ValueError if a concrete hyperparameter is out of range.

  Traced values (inside `jit`, e.g. hyperparameters injected by
  `optax.inject_hyperparams`) cannot be inspected and are skipped.
  """
  if isinstance(value, jax.core.Tracer):
    return
  v = float(value)
  if v < minimum or (strict and v == minimum) or np.isnan(v):
    bound = ">" if strict else ">="
    raise ValueError(
        f"adaptive_grad_clip: {name} must be {bound} {minimum}, got {value}."
    )


def _clip_one(
    grad: jax.Array,
    param: jax.Array,
    clipping: jax.typing.ArrayLike,
    eps: jax.typing.ArrayLike,
    axes: tuple[int, ...],
) -> tuple[jax.Array, jax.Array]:
  """Clips one gradient tensor unit-wise; norms in float32.

  Returns:
    The clipped gradient in the gradient's dtype, and a boolean array with one
    entry per unit, True where the unit was clipped.
  """
  g32 = grad.astype(jnp.float32)
  g_norm = optax_transforms.unitwise_norm(g32, axis=axes)
  p_norm = optax_transforms.unitwise_norm(param.astype(jnp.float32), axis=axes)
  max_norm = clipping * jnp.maximum(p_norm, eps)
  # optax's default floor on the divisor (1e-6) over-clips units whose
  # gradient norm lies between max_norm and 1e-6 (seen: 2.8e-7 -> 7.9e-8
  # on clipping an already clipped gradient again); the float32 `tiny`
  # only guards the division by zero that `g_norm > max_norm` rules out.
  clipped = optax_transforms.unitwise_clip(
      g_norm, max_norm, g32, div_eps=jnp.finfo(jnp.float32).tiny)
  # All entries of a unit share one norm, so any() over the unit axes reads
  # off one flag per unit.
  unit_clipped = jnp.any(g_norm > max_norm, axis=axes)
  return clipped.astype(grad.dtype), unit_clipped


def _check_trees(updates: Any, params: Any) -> None:
  """Raises ValueError unless updates and params match leaf for leaf."""
  u_def = jax.tree.structure(updates)
  p_def = jax.tree.structure(params)
  if u_def != p_def:
    raise ValueError(
        "adaptive_grad_clip: gradients and params have different tree "
        f"structures.\n  gradients: {u_def}\n  params:    {p_def}"
    )
  for (path, g), p in zip(
      jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(params)
  ):
    if jnp.shape(g) != jnp.shape(p):
      raise ValueError(
          f"adaptive_grad_clip: gradient {_path_name(path)!r} has shape "
          f"{jnp.shape(g)} but its parameter has shape {jnp.shape(p)}."
      )


def _path_name(path: Sequence[Any]) -> str:
  """Slash-joined readable name of a tree path, e.g. 'NFNet/~/linear/w'."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def adaptive_grad_clip(
    clipping: jax.typing.ArrayLike,
    eps: jax.typing.ArrayLike = 1e-3,
    *,
    unitwise_axes: UnitwiseAxes = None,
    track_clip_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Unit-wise Adaptive Gradient Clipping (Brock et al., 2021, Sec. 4.1).

  Each unit of a gradient G is rescaled to norm `clipping * max(||W||, eps)`
  when `||G|| / max(||W||, eps) > clipping`, and left untouched otherwise
  (a ratio exactly at `clipping` is left untouched). Norms are computed in
  float32 whatever the gradient dtype; the result keeps the gradient's dtype.
  Zero parameters use `eps` as their norm, zero gradients stay zero: no NaN or
  Inf arises from zeros.

  Units (see the module docstring for how this differs from optax): scalars
  and vectors are one unit; tensors of rank >= 2 have one unit per index of
  the last axis (dense `(in, out)` kernels: per output unit; conv HWIO: per
  output channel).

  Use it first in a chain, on the raw gradient, as the paper does:
  `optax.chain(adaptive_grad_clip(0.01), optax.sgd(lr, 0.9, nesterov=True))`.
  Exclude the classifier with `optax.masked(adaptive_grad_clip(0.01),
  nfnets_jax.agc_mask)`.

  With `optax.inject_hyperparams`, `clipping` and `eps` may be injected; pass
  `static_args=('unitwise_axes',)` if you set `unitwise_axes` (optax would
  otherwise read a callable as a schedule). Range checks run only on concrete
  values, not on traced ones.

  Args:
    clipping: maximum allowed ratio of a unit's gradient norm to its parameter
      norm; must be > 0. The paper uses 0.01 for NFNets at batch 4096 and
      finds larger batches need smaller values (Sec. 4.1).
    eps: lower bound on parameter norms, so that zero-initialised parameters
      (e.g. skip gains) can still move; must be >= 0.
    unitwise_axes: how units are formed. None: `default_unitwise_axes`. An int
      or a sequence of ints: those axes are reduced for every parameter. A
      callable `(name, param) -> axes or None`, called per parameter with its
      slash-joined tree path (e.g. 'NFNet/~/linear/w'), None meaning the
      default.
    track_clip_stats: if True the state is an `AdaptiveGradClipState` holding
      the fraction of units clipped at the last update, per parameter and
      overall (read it with `clip_stats`). If False the state is empty.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose
    `update(grads, state, params)` returns the clipped gradients.

  Raises:
    ValueError: if `clipping <= 0` or `eps < 0` (when concrete); at update, if
      `params` is None, if gradients and params differ in tree structure or
      shape, or if `unitwise_axes` names an axis a parameter does not have.
  """
  _check_value("clipping", clipping, 0.0, strict=True)
  _check_value("eps", eps, 0.0, strict=False)

  def init_fn(params: Any) -> Union[optax.EmptyState, AdaptiveGradClipState]:
    if not track_clip_stats:
      return optax.EmptyState()
    return AdaptiveGradClipState(
        param_clip_frac=jax.tree.map(
            lambda _: jnp.zeros([], jnp.float32), params
        ),
        num_clipped=jnp.zeros([], jnp.int32),
        num_units=jnp.zeros([], jnp.int32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(_NO_PARAMS_MSG)
    _check_trees(updates, params)
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(updates)
    new_leaves, unit_flags = [], []
    for (path, grad), param in zip(leaves_with_path, jax.tree.leaves(params)):
      grad, param = jnp.asarray(grad), jnp.asarray(param)
      axes = _resolve_axes(unitwise_axes, _path_name(path), param)
      new_grad, flags = _clip_one(grad, param, clipping, eps, axes)
      new_leaves.append(new_grad)
      unit_flags.append(flags)
    new_updates = treedef.unflatten(new_leaves)
    if not track_clip_stats:
      return new_updates, state
    counts = [jnp.sum(f, dtype=jnp.int32) for f in unit_flags]
    fracs = [c.astype(jnp.float32) / max(f.size, 1)
             for c, f in zip(counts, unit_flags)]
    new_state = AdaptiveGradClipState(
        param_clip_frac=treedef.unflatten(fracs),
        num_clipped=sum(counts, jnp.zeros([], jnp.int32)),
        num_units=jnp.asarray(sum(f.size for f in unit_flags), jnp.int32),
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def clip_stats(
    opt_state: Any, prefix: str = "agc_clip_frac"
) -> dict[str, jax.Array]:
  """Flat logging metrics from every tracking AGC state inside `opt_state`.

  Finds each `AdaptiveGradClipState` however deeply it is nested (in
  `optax.chain`, `optax.masked`, `optax.inject_hyperparams`,
  `optax.MultiSteps`, ...). Under `pmap` the values keep their device axis.

  Args:
    opt_state: any optimizer state.
    prefix: name of the overall metric and prefix of the per-parameter ones.

  Returns:
    `{prefix: overall fraction of units clipped at the last update,
    f'{prefix}/{param name}': that parameter's fraction, ...}`, where the
    overall fraction pools the units of all AGC states found and parameter
    names are slash-joined tree paths (e.g. 'agc_clip_frac/NFNet/~/conv0/w').
    If two AGC states track the same parameter, the later one's entry is
    kept. `{}` if no tracking AGC state is found.
  """
  is_agc = lambda x: isinstance(x, AdaptiveGradClipState)
  states = [s for s in jax.tree.leaves(opt_state, is_leaf=is_agc) if is_agc(s)]
  if not states:
    return {}
  metrics = {}
  for state in states:
    for path, frac in jax.tree_util.tree_leaves_with_path(
        state.param_clip_frac
    ):
      metrics[f"{prefix}/{_path_name(path)}"] = frac
  num_clipped = sum(s.num_clipped for s in states)
  num_units = sum(s.num_units for s in states)
  metrics[prefix] = num_clipped / jnp.maximum(num_units, 1)
  return metrics
