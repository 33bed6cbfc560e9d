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
dots) does not grow with the batch, so a model's count is the MACs of a
2-image forward minus those of a 1-image one (each read from the traced
initialization, which runs the forward).
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
  init = hk.transform_with_state(_with_zeros(model_fn)).init

  def macs(batch: int) -> int:
    # Initializing runs the forward (and initializers, which multiply
    # nothing): one trace per batch size, no parameters needed.
    x = jax.ShapeDtypeStruct((batch, image_size, image_size, channels),
                             jnp.float32)
    with lowering.conv_impl("native"):
      jaxpr = jax.make_jaxpr(lambda x: init(jax.random.key(0), x))(x).jaxpr
    return _jaxpr_macs(jaxpr)

  return macs(2) - macs(1)
