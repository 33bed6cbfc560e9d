"""Initial weights drawn on the host with NumPy, from a network's own
initializers: a random model without compiling its initialization.

`jax.jit(net.init)` of F0 cost XLA:CPU 7 s to compile and threefry 5.7 s to
draw its 71.5 M truncated normals (`benchmarks/startup.py`). Instead, the
abstract trace of the initialization that `models.stats.traced` makes
anyway records the initializer of every parameter and state
(`recording_initializers`), and `draw` samples each from the same
distribution with NumPy's PCG64: the same shapes and distributions as
`net.init`, other values. Each leaf's stream is seeded by `(seed, its full
name)`, so a seed gives the same weights in every process, and adding a
parameter does not change the others.

Initializers it draws: `hk.initializers.VarianceScaling`, `TruncatedNormal`,
`RandomNormal`, `RandomUniform`, `Constant`, and `jnp.zeros` / `jnp.ones`.
A network with any other (`draw` returns None) is initialized by `net.init`
as before.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
import contextlib
from typing import Any
import zlib

import haiku as hk
import jax
import numpy as np

Sampler = Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]
Shapes = Mapping[str, Mapping[str, tuple[int, ...]]]


def _truncated_normal(rng: np.random.Generator, shape: tuple[int, ...],
                      lower: float, upper: float) -> np.ndarray:
  """Standard normal draws redrawn until inside `[lower, upper]`."""
  x = rng.standard_normal(shape, np.float32)
  bad = np.flatnonzero((x < lower) | (x > upper))
  while bad.size:
    x.flat[bad] = rng.standard_normal(bad.size, np.float32)
    bad = bad[(x.flat[bad] < lower) | (x.flat[bad] > upper)]
  return x


def _fans(shape: tuple[int, ...], fan_in_axes: Any) -> tuple[float, float]:
  """Fan-in and fan-out of a weight shape, as Haiku's `_compute_fans`."""
  if not shape:
    return 1, 1
  if len(shape) == 1:
    return shape[0], shape[0]
  if len(shape) == 2:
    return shape[0], shape[1]
  if fan_in_axes is not None:
    fan_in = np.prod([shape[i] for i in fan_in_axes])
    return fan_in, np.prod([d for i, d in enumerate(shape)
                            if i not in fan_in_axes])
  receptive_field = np.prod(shape[:-2])  # Kernels: (..., in, out).
  return shape[-2] * receptive_field, shape[-1] * receptive_field


def _variance_scaling(init: hk.initializers.VarianceScaling,
                      shape: tuple[int, ...]) -> Sampler:
  """`VarianceScaling.__call__`'s arithmetic (Haiku), sampled by NumPy."""
  fan_in, fan_out = _fans(shape, init.fan_in_axes)
  fan = {"fan_in": fan_in, "fan_out": fan_out,
         "fan_avg": (fan_in + fan_out) / 2.0}[init.mode]
  scale = init.scale / max(1.0, fan)
  if init.distribution == "truncated_normal":
    # scipy.stats.truncnorm.std(a=-2, b=2): Haiku's constant.
    stddev = np.sqrt(scale) / .87962566103423978
    return lambda rng, s: stddev * _truncated_normal(rng, s, -2.0, 2.0)
  if init.distribution == "normal":
    return lambda rng, s: np.sqrt(scale) * rng.standard_normal(s, np.float32)
  limit = np.sqrt(3.0 * scale)
  return lambda rng, s: rng.uniform(-limit, limit, s)


def sampler(init: Any, shape: tuple[int, ...]) -> Sampler | None:
  """A NumPy sampler of `init`'s distribution, or None for an initializer
  this module does not know."""
  inits = hk.initializers
  if init is jax.numpy.zeros:
    return lambda rng, s: np.zeros(s)
  if init is jax.numpy.ones:
    return lambda rng, s: np.ones(s)
  if type(init) is inits.Constant:  # pylint: disable=unidiomatic-typecheck
    value = np.asarray(init.constant)
    return lambda rng, s: np.broadcast_to(value, s)
  if type(init) is inits.VarianceScaling:  # Subclasses may differ.  # pylint: disable=unidiomatic-typecheck
    return _variance_scaling(init, shape)
  if type(init) is inits.TruncatedNormal:  # pylint: disable=unidiomatic-typecheck
    return lambda rng, s: init.mean + init.stddev * _truncated_normal(
        rng, s, init.lower, init.upper)
  if type(init) is inits.RandomNormal:  # pylint: disable=unidiomatic-typecheck
    return lambda rng, s: init.mean + init.stddev * rng.standard_normal(
        s, np.float32)
  if type(init) is inits.RandomUniform:  # pylint: disable=unidiomatic-typecheck
    return lambda rng, s: rng.uniform(init.minval, init.maxval, s)
  return None


Key = tuple[bool, str, str]  # (is_state, module name, leaf name)


@contextlib.contextmanager
def zero_initializers() -> Iterator[None]:
  """Creates every parameter and state made inside as zeros, for a trace
  that wants shapes or the forward's ops, not values (F0's shape trace took
  0.4 s instead of 1.1 s with its truncated normals' sampling traced). Use
  it inside a Haiku transform."""

  def zeros(next_creator, shape, dtype, init, context):
    del init, context
    return next_creator(shape, dtype, jax.numpy.zeros)

  with hk.custom_creator(zeros, params=True, state=True):
    yield


@contextlib.contextmanager
def recording_initializers(into: dict[Key, Any]) -> Iterator[None]:
  """Records the initializer of every parameter and state created inside
  into `into`: `(is_state, module, name)` -> `(initializer, dtype)`, and
  creates them as zeros (`zero_initializers`; `models.stats.traced`). Use
  it inside a Haiku transform."""

  def recorder(is_state: bool) -> Callable[..., Any]:
    def record(next_creator, shape, dtype, init, context):
      into[(is_state, context.module_name, context.name)] = (init, dtype)
      return next_creator(shape, dtype, init)
    return record

  # Creators run outermost first: the record sees the real initializer.
  with hk.custom_creator(recorder(False), params=True, state=False), \
      hk.custom_creator(recorder(True), params=False, state=True), \
      zero_initializers():
    yield


def draw(initializers: Mapping[Key, Any], params: Shapes, state: Shapes,
         seed: int) -> tuple[hk.Params, hk.State] | None:
  """Draws every leaf from its initializer's distribution with NumPy.

  Args:
    initializers: `recording_initializers`' record of the network.
    params, state: `{module: {name: shape}}` to draw (`stats.param_shapes`).
    seed: with each leaf's full name, the seed of its stream.

  Returns:
    `(params, state)` trees of NumPy arrays, or None when a leaf's
    initializer is one `sampler` does not know, or it has none (a state
    that `hk.set_state` writes): use `net.init` then.
  """
  samplers = {}
  for is_state, tree in ((False, params), (True, state)):
    for module, leaves in tree.items():
      for name, shape in leaves.items():
        init, _ = initializers.get((is_state, module, name), (None, None))
        samplers[(is_state, module, name)] = sampler(init, shape)
  if any(s is None for s in samplers.values()):
    return None
  out = ({}, {})
  for (is_state, module, name), sample in samplers.items():
    shape = (state if is_state else params)[module][name]
    rng = np.random.default_rng(
        [seed % 2**64, zlib.crc32(f"{module}/{name}".encode())])
    _, dtype = initializers[(is_state, module, name)]
    out[is_state].setdefault(module, {})[name] = np.asarray(
        sample(rng, shape), np.dtype(dtype))
  return out
