"""Parameter shapes and counts, and FLOPs, of any Haiku model, traced.

The one place that traces a model for its parameter shapes: `init_shapes`
(any network), `traced` (a named family, once: shapes and WS convolutions),
`param_shapes` and `classifier_names` (the leaves whose shapes follow the
class count). Models
are traced under the 'native' convolution lowering (one op per convolution,
the quickest to trace; shapes and counts do not depend on the lowering).

FLOPs are counted as the papers do: multiply-accumulates (MACs) of the
convolutions and matrix multiplies (classifier, squeeze-excite linears) for
one image; elementwise ops, pooling and weight standardization are free.
Work on the weights alone (weight standardization's mean and variance are
dots) is left out by following the images through one traced 1-image
initialization (which runs the forward): only ops on values that depend on
them count. (The same counts as the 2-image forward's MACs minus the
1-image one's, from one trace instead of two: F0 0.36 s instead of 0.73 s.)
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax.cpu import lowering
from nfnets_jax.models import families
from nfnets_jax.models import host_init
from nfnets_jax.models import layers

ModelFn = Callable[[jax.Array], Any]
Shapes = dict[str, dict[str, tuple[int, ...]]]
# Input side for tracing: no family's parameter shapes depend on it.
TRACE_SIZE = 64


def count_params(params: hk.Params) -> int:
  """Total number of scalars in a parameter tree."""
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def init_shapes(model: hk.TransformedWithState | ModelFn,
                image_size: int = TRACE_SIZE, channels: int = 3
                ) -> tuple[hk.Params, hk.State]:
  """Parameter and state shapes of a model, without compute.

  Args:
    model: `hk.transform_with_state` of `forward(images, is_training)`
      (`families.make_network`; initialized in training mode, where batch
      norm creates its moving averages), or a function of NHWC images to
      outputs, run inside `hk.transform_with_state`.
    image_size: input height and width.
    channels: input channels.

  Returns:
    `(params, state)` trees of `jax.ShapeDtypeStruct`.
  """
  if isinstance(model, hk.TransformedWithState):
    init = lambda x: model.init(jax.random.key(0), x, is_training=True)
  else:
    init = lambda x: hk.transform_with_state(_with_zeros(model)).init(
        jax.random.key(0), x)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, channels),
                                jnp.float32)
  with lowering.conv_impl("native"):
    return jax.eval_shape(init, images)


def _with_zeros(model_fn: ModelFn) -> ModelFn:
  """`model_fn` creating its parameters as zeros (nothing sampled: a
  quicker trace with the same shapes and forward ops)."""
  def zeros_model(images: jax.Array) -> Any:
    with host_init.zero_initializers():
      return model_fn(images)
  return zeros_model


def as_shapes(tree: Mapping[str, Mapping[str, Any]]) -> Shapes:
  """`{module: {name: array-like}}` -> `{module: {name: shape}}`."""
  return {m: {n: tuple(np.shape(v)) for n, v in leaves.items()}
          for m, leaves in tree.items()}


def _frozen(kwargs: Mapping[str, Any]) -> Any:
  if isinstance(kwargs, Mapping):
    return tuple(sorted((k, _frozen(v)) for k, v in kwargs.items()))
  if isinstance(kwargs, (list, tuple)):
    return tuple(_frozen(v) for v in kwargs)
  return kwargs


# The class count a named model is traced with: no family has a layer this
# wide, so the parameter axes of this length are the classifier's, and one
# trace gives the shapes for every class count.
TRACE_CLASSES = 9973


@dataclasses.dataclass(frozen=True)
class Traced:
  """What one abstract initialization of a named model shows (`traced`).

  Attributes:
    params, state: `{module: {name: shape}}` at `TRACE_CLASSES` classes.
    ws_convs: the weight-standardized convolutions it calls: module name ->
      `(eps, eps_mode)` (`layers.recording_ws_convs`).
    initializers: each leaf's initializer and dtype
      (`host_init.recording_initializers`; `host_init.draw` samples them).
  """
  params: Shapes
  state: Shapes
  ws_convs: Mapping[str, tuple[float, str]]
  initializers: Mapping[host_init.Key, tuple[Any, Any]]


_TRACED: dict[Any, Traced] = {}


def traced(family: str, kwargs: Mapping[str, Any]) -> Traced:
  """One abstract trace of a named model's initialization (cached).

  Args:
    family: a key of `families.MODELS`.
    kwargs: its constructor arguments.
  """
  kwargs = dict(kwargs.to_dict() if hasattr(kwargs, "to_dict") else kwargs)
  key = (family, _frozen(kwargs))
  if key not in _TRACED:
    forward = families.network_fn(family, kwargs, TRACE_CLASSES)
    initializers = {}

    def recorded(images: jax.Array, is_training: bool) -> Any:
      with host_init.recording_initializers(initializers):
        return forward(images, is_training)

    with layers.recording_ws_convs() as ws_convs:
      params, state = init_shapes(hk.transform_with_state(recorded))
    _TRACED[key] = Traced(as_shapes(params), as_shapes(state),
                          dict(ws_convs), initializers)
  return _TRACED[key]


def _with_classes(shapes: Shapes, num_classes: int) -> Shapes:
  return {m: {n: tuple(num_classes if d == TRACE_CLASSES else d for d in s)
              for n, s in leaves.items()} for m, leaves in shapes.items()}


def param_shapes(family: str, kwargs: Mapping[str, Any], num_classes: int
                 ) -> tuple[Shapes, Shapes]:
  """`({module: {param: shape}}, state shapes)` of a named model.

  From the cached `traced` shapes, the classifier's axes set to
  `num_classes`.

  Args:
    family: a key of `families.MODELS`.
    kwargs: its constructor arguments.
    num_classes: classifier outputs.
  """
  model = traced(family, kwargs)
  return (_with_classes(model.params, num_classes),
          _with_classes(model.state, num_classes))


def classifier_names(family: str, kwargs: Mapping[str, Any]
                     ) -> list[tuple[str, str]]:
  """The `(module, param)` names whose shapes depend on `num_classes`."""
  return sorted((m, n) for m, leaves in traced(family, kwargs).params.items()
                for n, s in leaves.items() if TRACE_CLASSES in s)


def _eqn_macs(eqn: jax.extend.core.JaxprEqn) -> int:
  """Multiply-accumulates of one convolution or dot product (else 0)."""
  if eqn.primitive.name == "conv_general_dilated":
    rhs = eqn.invars[1].aval
    dn = eqn.params["dimension_numbers"]
    kernel_in = rhs.shape[dn.rhs_spec[1]]  # already in_ch // groups
    kernel_spatial = np.prod([rhs.shape[d] for d in dn.rhs_spec[2:]])
    return int(np.prod(eqn.outvars[0].aval.shape)) * int(
        kernel_in * kernel_spatial)
  if eqn.primitive.name == "dot_general":
    lhs = eqn.invars[0].aval
    (contract_lhs, _), _ = eqn.params["dimension_numbers"]
    contracted = np.prod([lhs.shape[d] for d in contract_lhs])
    return int(np.prod(eqn.outvars[0].aval.shape)) * int(contracted)
  return 0


def _jaxpr_macs(jaxpr: jax.extend.core.Jaxpr, inputs: list[bool]
                ) -> tuple[int, list[bool]]:
  """MACs of the ops of `jaxpr` that depend on the inputs flagged in
  `inputs` (one flag per input), and which outputs depend on them.

  Ops on values that do not depend on them (weight standardization's
  dots over the weights) are not counted. A nested jaxpr whose inputs are
  its equation's is followed value by value; any other (loops, branches)
  as if all its inputs and outputs depended on the flagged ones when any
  of its equation's inputs do.
  """
  var = jax.extend.core.Var
  dependent = {v for v, flag in zip(jaxpr.invars, inputs) if flag}
  macs = 0
  for eqn in jaxpr.eqns:
    flags = [isinstance(v, var) and v in dependent for v in eqn.invars]
    outs = [any(flags)] * len(eqn.outvars)
    subs = list(jax.extend.core.jaxprs_in_params(eqn.params))
    if any(flags):
      macs += _eqn_macs(eqn)
    for sub in subs:
      if len(subs) == 1 and len(sub.invars) == len(flags) and len(
          sub.outvars) == len(outs):
        sub_macs, outs = _jaxpr_macs(sub, flags)
      else:
        sub_macs, _ = _jaxpr_macs(sub, [any(flags)] * len(sub.invars))
      macs += sub_macs
    dependent.update(v for v, flag in zip(eqn.outvars, outs) if flag)
  return macs, [isinstance(v, var) and v in dependent for v in jaxpr.outvars]


def count_flops(model_fn: ModelFn, image_size: int, channels: int = 3) -> int:
  """Multiply-accumulates of one forward pass on one image (eval mode).

  Args:
    model_fn: maps NHWC images to outputs (traced with one image), run
      inside `hk.transform_with_state`; build the model for evaluation.
    image_size: input height and width (the paper uses the test resolution).
    channels: input channels.

  Returns:
    MACs, the unit the NFNet paper reports as FLOPs.
  """
  init = hk.transform_with_state(_with_zeros(model_fn)).init
  x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
  # Initializing runs the forward; the parameters come from the key, so the
  # ops that depend on the images are the forward's (per image at batch 1).
  with lowering.conv_impl("native"):
    jaxpr = jax.make_jaxpr(lambda key, x: init(key, x))(
        jax.random.key(0), x).jaxpr
  return _jaxpr_macs(jaxpr, [False, True])[0]
