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

In short, in the default "haiku" layout: for rank >= 2, every unit here is
one index of the last axis.

Other libraries store their kernels differently, so `adaptive_grad_clip`
takes a `layout` that reads each parameter's unit axes off its '/'-joined
tree path and its shape (never importing Flax or Equinox):

* "haiku" (default): the rule above. Right for Haiku, and for Flax
  Dense/Conv kernels.
* "flax": Flax's names. Dense/Conv `kernel`s as "haiku"; the attention
  projections of `nn.MultiHeadDotProductAttention` / `nnx.MultiHeadAttention`
  (`LinearGeneral`): `query`/`key`/`value` kernels `(in, heads, head_dim)`
  have a unit per (head, head_dim) pair (axis 0 reduced), the `out` kernel
  `(heads, head_dim, out)` a unit per output (axes 0 and 1 reduced); every
  `bias` (also the `(heads, head_dim)` ones) is one unit.
* "equinox": Equinox's `(out, in, ...)` weights. Every tensor of rank >= 2
  but a `bias` has a unit per index of axis 0; biases (also a conv's
  `(out, 1, 1)`) are one unit.
* a callable `(name, param) -> axes` for anything else.

`stacked_axes` keeps the leading layer axes that `hk.layer_stack`,
`nn.scan`, `nnx.vmap` or `eqx.filter_vmap` put on stacked layers' parameters:
they are never reduced, so every layer keeps its own units. `exclude` (a
regular expression on the path name) leaves parameters such as the
classifier unclipped, through `optax.masked`.

Trees: Haiku and Flax linen params dicts, Flax NNX `State`s (pure, as
`nnx.Optimizer` hands them to optax, or holding `nnx.Variable`s, whose own
'value' key is left out of the name) and Equinox `eqx.filter(model,
eqx.is_array)` trees with `None` leaves.
"""

from collections.abc import Callable, Sequence
import functools
import re
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import transforms as optax_transforms

Axes = Union[int, Sequence[int]]
AxesFn = Callable[[str, jax.Array], Optional[Axes]]
UnitwiseAxes = Union[None, Axes, AxesFn]
Layout = Union[str, AxesFn]
StackedAxes = Union[None, int, Callable[[str, jax.Array], int]]
Exclude = Union[None, str, re.Pattern]

LAYOUTS = ("haiku", "flax", "equinox")
# Flax's attention projections (`LinearGeneral` with features (heads,
# head_dim)): their kernels are (in, heads, head_dim).
_FLAX_HEAD_PROJECTIONS = frozenset({"query", "key", "value"})

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
  """Axes reduced to compute the norm of each unit of a tensor ("haiku").

  The rule of the default layout, "haiku". Scalars and vectors form one unit. Higher-rank tensors are taken to have
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


def _name_parts(name: str) -> tuple[str, str]:
  """(module, leaf) of a '/'-joined path: 'a/query/kernel' -> query, kernel."""
  parts = name.split("/")
  return (parts[-2] if len(parts) > 1 else ""), parts[-1]


def flax_unitwise_axes(name: str, shape: Sequence[int]) -> tuple[int, ...]:
  """Axes reduced per unit for Flax (linen or NNX) parameters.

  Dense `(in, out)` and Conv `(..., in, out)` kernels have a unit per output
  (all but the last axis reduced, as `default_unitwise_axes`). The attention
  projections of `nn.MultiHeadDotProductAttention` / `nnx.MultiHeadAttention`
  are `LinearGeneral`s: a `query`, `key` or `value` kernel
  `(in, heads, head_dim)` has a unit per (head, head_dim) output feature
  (axis 0 reduced); the `out` kernel `(heads, head_dim, out)` a unit per
  output (axes 0 and 1 reduced, as for any other kernel). Every `bias`, the
  `(heads, head_dim)` ones too, is one unit, as a Dense bias vector is.

  Args:
    name: the parameter's '/'-joined path, e.g. 'params/attn/query/kernel'.
    shape: the shape of one layer's parameter (stacked axes removed).

  Returns:
    The tuple of axes to reduce.
  """
  ndim = len(shape)
  module, leaf = _name_parts(name)
  if ndim <= 1 or leaf == "bias":
    return tuple(range(ndim))
  if leaf == "kernel" and module in _FLAX_HEAD_PROJECTIONS and ndim == 3:
    return (0,)
  return tuple(range(ndim - 1))


def equinox_unitwise_axes(name: str, shape: Sequence[int]) -> tuple[int, ...]:
  """Axes reduced per unit for Equinox parameters.

  Equinox puts the output first: `Linear.weight` is `(out, in)`,
  `Conv.weight` `(out, in, *kernel)`. Every tensor of rank >= 2 but a `bias`
  has a unit per index of axis 0 (all other axes reduced). Scalars, vectors
  and biases (also a conv's `(out, 1, ..., 1)` bias) are one unit.

  Args:
    name: the parameter's '/'-joined path, e.g. 'layers/0/weight'.
    shape: the shape of one layer's parameter (stacked axes removed).

  Returns:
    The tuple of axes to reduce.
  """
  ndim = len(shape)
  if ndim <= 1 or _name_parts(name)[1] == "bias":
    return tuple(range(ndim))
  return tuple(range(1, ndim))


_LAYOUT_RULES = {
    "haiku": lambda name, shape: default_unitwise_axes(shape),
    "flax": flax_unitwise_axes,
    "equinox": equinox_unitwise_axes,
}


def _normalize_axes(
    axes: Axes, arg: str, name: str, shape: Sequence[int]
) -> tuple[int, ...]:
  """`axes` as sorted non-negative ints, checked against `shape`."""
  axes = (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)
  ndim = len(shape)
  if any(not -ndim <= a < ndim for a in axes):
    raise ValueError(
        f"adaptive_grad_clip: {arg} {axes} out of range for parameter "
        f"{name!r} of shape {tuple(shape)}."
    )
  return tuple(sorted({int(a) % ndim for a in axes}))


def _num_stacked(stacked_axes: StackedAxes, name: str, param: jax.Array) -> int:
  """Number of leading layer axes of one parameter, checked."""
  n = stacked_axes(name, param) if callable(stacked_axes) else stacked_axes
  if n is None:
    return 0
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
    raise ValueError(
        f"adaptive_grad_clip: stacked_axes must be an int >= 0 (a Python "
        f"int: under `optax.inject_hyperparams` pass "
        f"static_args=('stacked_axes',)), got {n!r} for parameter {name!r}."
    )
  if not 0 <= n <= param.ndim:
    raise ValueError(
        f"adaptive_grad_clip: stacked_axes={n} for parameter {name!r} of "
        f"shape {param.shape}; it must be between 0 and the parameter's rank "
        f"{param.ndim}."
    )
  return int(n)


def _resolve_axes(
    name: str,
    param: jax.Array,
    *,
    layout: Layout = "haiku",
    unitwise_axes: UnitwiseAxes = None,
    stacked_axes: StackedAxes = None,
) -> tuple[int, ...]:
  """One parameter's reduction axes, as sorted non-negative ints.

  `unitwise_axes`, where it gives axes, wins over `layout`. Both see one
  layer of the parameter (its first `stacked_axes` axes indexed at 0) and
  their axes count from that layer's first axis; the result counts from the
  parameter's.
  """
  n = _num_stacked(stacked_axes, name, param)
  shape = param.shape[n:]
  # Callables are given an array, as before: one layer's slice if stacked.
  layer = lambda: param if n == 0 else param[(0,) * n]
  axes, arg = None, "unitwise_axes"
  if callable(unitwise_axes):
    axes = unitwise_axes(name, layer())
  elif unitwise_axes is not None:
    axes = unitwise_axes
  if axes is None and callable(layout):
    axes, arg = layout(name, layer()), "layout"
  if axes is None:
    rule = _LAYOUT_RULES["haiku" if callable(layout) else layout]
    axes = rule(name, shape)
  return tuple(n + a for a in _normalize_axes(axes, arg, name, shape))


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
  for name, g, p in zip(
      _leaf_names(updates), jax.tree.leaves(updates), jax.tree.leaves(params)
  ):
    if jnp.shape(g) != jnp.shape(p):
      raise ValueError(
          f"adaptive_grad_clip: gradient {name!r} has shape "
          f"{jnp.shape(g)} but its parameter has shape {jnp.shape(p)}."
      )


def _path_name(path: Sequence[Any]) -> str:
  """Slash-joined readable name of a tree path, e.g. 'NFNet/~/linear/w'.

  Dict keys, attribute names (Equinox modules) and sequence or flattened
  indices each give one component: `model.layers[0].weight` ->
  'layers/0/weight'.
  """
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def _is_nnx_variable(node: Any) -> bool:
  """Whether `node` is a Flax NNX `Variable`, told without importing Flax."""
  return any(
      c.__name__ == "Variable" and c.__module__.startswith("flax.nnx")
      for c in type(node).__mro__
  )


def _leaf_names(tree: Any) -> list[str]:
  """The '/'-joined path name of every leaf, in `jax.tree.leaves` order.

  An NNX `Variable`'s own key ('value') is left out, so an `nnx.State` of
  Variables names its leaves as the pure State that `nnx.Optimizer` hands to
  optax does: 'attn/query/kernel', not 'attn/query/kernel/value'.
  """
  names = []
  nodes = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=_is_nnx_variable)[0]
  for path, node in nodes:
    names += [_path_name(path)] * len(jax.tree.leaves(node))
  return names


def _compile_exclude(exclude: Exclude) -> re.Pattern:
  """`exclude` as a compiled regular expression, checked."""
  if isinstance(exclude, re.Pattern):
    return exclude
  if not isinstance(exclude, str):
    raise ValueError(
        "adaptive_grad_clip: exclude must be None or a regular expression "
        f"(str or re.Pattern) on parameter path names, got {exclude!r}."
    )
  try:
    return re.compile(exclude)
  except re.error as e:
    raise ValueError(
        f"adaptive_grad_clip: exclude={exclude!r} is not a valid regular "
        f"expression: {e}."
    ) from e


def _clip_mask(pattern: re.Pattern, tree: Any) -> Any:
  """A tree like `tree` of bools: False where `pattern` searches the name.

  Raises:
    ValueError: if the pattern matches no parameter (a typo would otherwise
      silently clip the layer meant to be left out).
  """
  leaves, treedef = jax.tree.flatten(tree)
  names = _leaf_names(tree)
  keep = [pattern.search(name) is None for name in names]
  if leaves and all(keep):
    shown = ", ".join(repr(n) for n in names[:6])
    more = ", ..." if len(names) > 6 else ""
    raise ValueError(
        f"adaptive_grad_clip: exclude={pattern.pattern!r} matches no "
        f"parameter; the names are {shown}{more}."
    )
  return treedef.unflatten(keep)


def _check_layout(layout: Layout) -> None:
  """Raises ValueError unless `layout` is a known name or a callable."""
  if callable(layout) or (isinstance(layout, str) and layout in LAYOUTS):
    return
  allowed = ", ".join(repr(n) for n in LAYOUTS)
  raise ValueError(
      f"adaptive_grad_clip: layout must be one of {allowed} or a callable "
      f"(name, param) -> axes to reduce, got {layout!r}."
  )


def _check_stacked_axes(stacked_axes: StackedAxes) -> None:
  """Raises ValueError unless `stacked_axes` is None, int >= 0 or callable."""
  if stacked_axes is None or callable(stacked_axes):
    return
  if isinstance(stacked_axes, jax.core.Tracer) or not isinstance(
      stacked_axes, (int, np.integer)) or isinstance(stacked_axes, bool):
    raise ValueError(
        "adaptive_grad_clip: stacked_axes must be None, an int >= 0 or a "
        f"callable (name, param) -> int, got {stacked_axes!r} (under "
        "`optax.inject_hyperparams` pass static_args=('stacked_axes',))."
    )
  if stacked_axes < 0:
    raise ValueError(
        f"adaptive_grad_clip: stacked_axes must be >= 0, got {stacked_axes}."
    )


def adaptive_grad_clip(
    clipping: jax.typing.ArrayLike,
    eps: jax.typing.ArrayLike = 1e-3,
    *,
    layout: Layout = "haiku",
    stacked_axes: StackedAxes = None,
    exclude: Exclude = None,
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
  and vectors are one unit; in the default "haiku" layout, tensors of rank
  >= 2 have one unit per index of the last axis (dense `(in, out)` kernels:
  per output unit; conv HWIO: per output channel). `layout` gives Flax's and
  Equinox's rules, `stacked_axes` keeps stacked layers apart.

  Use it first in a chain, on the raw gradient, as the paper does:
  `optax.chain(adaptive_grad_clip(0.01), optax.sgd(lr, 0.9, nesterov=True))`.
  Exclude the classifier with `exclude=` (any library), or, for this
  package's Haiku models, with `optax.masked(adaptive_grad_clip(0.01),
  nfnets_jax.agc_mask)`.

  It takes any params tree: Haiku and Flax linen dicts, Flax NNX `State`s
  (pure, as `nnx.Optimizer` passes them, or of `nnx.Variable`s) and Equinox
  `eqx.filter(model, eqx.is_array)` trees, whose `None` leaves are skipped.

  With `optax.inject_hyperparams`, `clipping` and `eps` may be injected; pass
  `static_args=` naming `unitwise_axes`, `stacked_axes` or a callable
  `layout` if you set them (optax would otherwise read a callable as a
  schedule and inject an int). Range checks run only on concrete values, not
  on traced ones.

  Args:
    clipping: maximum allowed ratio of a unit's gradient norm to its parameter
      norm; must be > 0. The paper uses 0.01 for NFNets at batch 4096 and
      finds larger batches need smaller values (Sec. 4.1).
    eps: lower bound on parameter norms, so that zero-initialised parameters
      (e.g. skip gains) can still move; must be >= 0.
    layout: how the library stores its kernels, i.e. which axes make a unit.
      "haiku": `default_unitwise_axes` (rank >= 2: a unit per index of the
      last axis); also right for Flax Dense/Conv kernels. "flax":
      `flax_unitwise_axes` (as "haiku", but attention `query`/`key`/`value`
      kernels `(in, heads, head_dim)` reduce axis 0 only and every `bias` is
      one unit). "equinox": `equinox_unitwise_axes` (rank >= 2 but biases:
      a unit per index of axis 0, for `(out, in, ...)` weights). Or a
      callable `(name, param) -> axes to reduce` (None: the "haiku" rule).
    stacked_axes: the number of leading layer axes that stacking
      (`hk.layer_stack`, `nn.scan`, `nnx.vmap`, `eqx.filter_vmap`) put on
      parameters. They are never reduced, so each layer keeps its own units,
      and the layout sees one layer's shape. None or 0: no stacked axes. An
      int: the same for every parameter. A callable `(name, param) -> int` for
      models where only some parameters are stacked, e.g.
      `lambda name, p: 1 if name.startswith('params/ScanBlock_0/') else 0`.
    exclude: a regular expression (str or `re.Pattern`); parameters whose
      '/'-joined path name it matches (`re.search`) are left untouched and
      not counted in the clip statistics, e.g. `exclude=r'head/kernel$'` for
      the classifier. Implemented with `optax.masked`, so the state is then a
      `MaskedState` holding this one (`clip_stats` still finds it). It must
      match at least one parameter.
    unitwise_axes: per-parameter override of `layout`. None: the layout
      decides. An int or a sequence of ints: those axes are reduced for every
      parameter. A callable `(name, param) -> axes or None`, called per
      parameter with its slash-joined tree path (e.g. 'NFNet/~/linear/w'),
      None meaning the layout's rule. Axes count from one layer's first axis
      when `stacked_axes` is set.
    track_clip_stats: if True the state is an `AdaptiveGradClipState` holding
      the fraction of units clipped at the last update, per parameter and
      overall (read it with `clip_stats`). If False the state is empty.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose
    `update(grads, state, params)` returns the clipped gradients.

  Raises:
    ValueError: if `clipping <= 0` or `eps < 0` (when concrete), or if
      `layout`, `stacked_axes` or `exclude` is not one of the allowed forms;
      at init or update, if `exclude` matches no parameter; at update, if
      `params` is None, if gradients and params differ in tree structure or
      shape, if `unitwise_axes` or `layout` names an axis a parameter does
      not have, or if a parameter has fewer axes than `stacked_axes`.
  """
  _check_value("clipping", clipping, 0.0, strict=True)
  _check_value("eps", eps, 0.0, strict=False)
  _check_layout(layout)
  _check_stacked_axes(stacked_axes)
  pattern = None if exclude is None else _compile_exclude(exclude)

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
    leaves, treedef = jax.tree.flatten(updates)
    names = _leaf_names(updates)
    new_leaves, unit_flags = [], []
    for name, grad, param in zip(names, leaves, jax.tree.leaves(params)):
      grad, param = jnp.asarray(grad), jnp.asarray(param)
      axes = _resolve_axes(name, param, layout=layout,
                           unitwise_axes=unitwise_axes,
                           stacked_axes=stacked_axes)
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

  tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
  if pattern is None:
    return tx
  return optax.masked(tx, functools.partial(_clip_mask, pattern))


def _array(node: Any) -> jax.Array:
  """The array in `node`: itself, or the value of an NNX Variable holding it."""
  (leaf,) = jax.tree.leaves(node)
  return jnp.asarray(leaf)


def clip_stats(
    opt_state: Any, prefix: str = "agc_clip_frac"
) -> dict[str, jax.Array]:
  """Flat logging metrics from every tracking AGC state inside `opt_state`.

  Finds each `AdaptiveGradClipState` however deeply it is nested (in
  `optax.chain`, `optax.masked`, `optax.inject_hyperparams`,
  `optax.MultiSteps`, ...). Under `pmap` the values keep their device axis.
  Works on the states of every tree `adaptive_grad_clip` takes, including an
  `nnx.Optimizer`'s `opt_state` (whose arrays sit in NNX Variables) and
  Equinox trees (whose `None` leaves have no entry).

  Args:
    opt_state: any optimizer state.
    prefix: name of the overall metric and prefix of the per-parameter ones.

  Returns:
    `{prefix: overall fraction of units clipped at the last update,
    f'{prefix}/{param name}': that parameter's fraction, ...}`, where the
    overall fraction pools the units of all AGC states found and parameter
    names are slash-joined tree paths (e.g. 'agc_clip_frac/NFNet/~/conv0/w',
    'agc_clip_frac/attn/query/kernel' for NNX, 'agc_clip_frac/layers/0/weight'
    for Equinox). If two AGC states track the same parameter, the later one's
    entry is kept. `{}` if no tracking AGC state is found.
  """
  is_agc = lambda x: isinstance(x, AdaptiveGradClipState)
  states = [s for s in jax.tree.leaves(opt_state, is_leaf=is_agc) if is_agc(s)]
  if not states:
    return {}
  metrics = {}
  for state in states:
    fracs = state.param_clip_frac
    for name, frac in zip(_leaf_names(fracs), jax.tree.leaves(fracs)):
      metrics[f"{prefix}/{name}"] = frac
  num_clipped = sum(_array(s.num_clipped) for s in states)
  num_units = sum(_array(s.num_units) for s in states)
  metrics[prefix] = num_clipped / jnp.maximum(num_units, 1)
  return metrics
