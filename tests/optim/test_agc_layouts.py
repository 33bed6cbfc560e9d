"""AGC's layouts on Flax (linen and NNX) and Equinox models.

Each test builds a tiny real model, makes a gradient whose units alternate
between a ratio ||G_u|| / max(||W_u||, eps) of 4 x clipping (clipped) and
0.25 x clipping (untouched), and checks `adaptive_grad_clip` unit by unit
against a NumPy reference that takes the units from the documented rules,
written out here per layout, and loops over them with `np.linalg.norm`.
"""

import inspect
import re

import equinox as eqx
from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nfnets_jax.optim import agc

CLIP = 0.01
EPS = 1e-3
HIGH, LOW = 4.0, 0.25  # Ratios to `CLIP` of clipped and untouched units.


# --- The reference ------------------------------------------------------------


def unit_axes(layout, name, shape, stacked=0):
  """The axes indexing units (never reduced), as the docs state them.

  Args:
    layout: "haiku", "flax" or "equinox".
    name: the parameter's '/'-joined path.
    shape: its shape, stacked layer axes first.
    stacked: the number of leading layer axes.

  Returns:
    The kept axes of the whole parameter: the layer axes, then the unit axes
    of one layer.
  """
  layer = shape[stacked:]
  parts = name.split("/")
  leaf, module = parts[-1], parts[-2] if len(parts) > 1 else ""
  if len(layer) <= 1:
    per_layer = []  # Scalars and vectors: one unit.
  elif layout == "haiku":
    per_layer = [len(layer) - 1]  # (in, out), (h, w, in, out): the outputs.
  elif layout == "flax":
    if leaf == "bias":
      per_layer = []  # (heads, head_dim) projection biases: one unit.
    elif leaf == "kernel" and module in ("query", "key", "value"):
      per_layer = [1, 2]  # (in, heads, head_dim): each (head, dim) pair.
    else:
      per_layer = [len(layer) - 1]  # Dense, Conv, out (heads, dim, out).
  elif layout == "equinox":
    # (out, in) and (out, in, kh, kw) weights: the outputs; (out, 1, 1)
    # conv biases: one unit.
    per_layer = [] if leaf == "bias" else [0]
  else:
    raise ValueError(layout)
  return list(range(stacked)) + [stacked + a for a in per_layer]


def units(shape, keep):
  """Index expressions of every unit: one per index of the kept axes."""
  for idx in np.ndindex(*[shape[a] for a in keep]):
    sl = [slice(None)] * len(shape)
    for a, i in zip(keep, idx):
      sl[a] = i
    yield tuple(sl)


def make_grad(rng, w, keep, counter):
  """A gradient whose units alternate between HIGH and LOW ratios.

  `counter` (a one-item list) numbers units across the whole tree, so that
  one-unit parameters alternate too.
  """
  w = np.asarray(w, np.float64)
  g = np.zeros_like(w)
  for sl in units(w.shape, keep):
    direction = rng.normal(size=w[sl].shape)
    direction /= max(np.linalg.norm(direction), 1e-30)
    ratio = HIGH if counter[0] % 2 == 0 else LOW
    counter[0] += 1
    g[sl] = direction * ratio * CLIP * max(np.linalg.norm(w[sl]), EPS)
  return g.astype(np.float32)


def check_leaf(got, g, w, keep, name):
  """Checks one clipped gradient unit by unit; returns (clipped, untouched)."""
  got, g, w = np.asarray(got), np.asarray(g), np.asarray(w)
  n_clipped = n_kept = 0
  for sl in units(np.shape(w), keep):
    g_u = np.asarray(g[sl], np.float64)
    bound = CLIP * max(np.linalg.norm(np.asarray(w[sl], np.float64)), EPS)
    g_norm = np.linalg.norm(g_u)
    if g_norm > bound:
      n_clipped += 1
      assert np.linalg.norm(got[sl]) <= bound * (1 + 1e-5), (name, sl)
      np.testing.assert_allclose(got[sl], g_u * (bound / g_norm), rtol=1e-5,
                                 atol=1e-12, err_msg=f"{name} {sl}")
    else:
      n_kept += 1
      np.testing.assert_array_equal(got[sl], g[sl], err_msg=f"{name} {sl}")
  return n_clipped, n_kept


def names_of(tree):
  """'/'-joined key names of a tree's leaves, written out for the test."""
  def key(k):
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    raise TypeError(k)
  return ["/".join(map(key, path))
          for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def manufactured(params, layout, stacked=lambda name: 0, seed=0):
  """(grads tree, {name: kept axes}) for `params`, by the reference rules."""
  rng, counter = np.random.default_rng(seed), [0]
  leaves, treedef = jax.tree.flatten(params)
  leaves = [np.asarray(x) for x in leaves]
  keeps, grads = {}, []
  for name, w in zip(names_of(params), leaves):
    keeps[name] = unit_axes(layout, name, np.shape(w), stacked(name))
    grads.append(make_grad(rng, w, keeps[name], counter))
  return treedef.unflatten(grads), keeps


def check_tree(got, grads, params, keeps):
  """Checks every parameter; returns {name: fraction of units clipped}."""
  fracs, total = {}, np.zeros(2, int)
  for name, o, g, w in zip(names_of(params), jax.tree.leaves(got),
                           jax.tree.leaves(grads), jax.tree.leaves(params)):
    counts = np.array(check_leaf(o, g, w, keeps[name], name))
    fracs[name] = counts[0] / counts.sum()
    total += counts
  assert total[0] > 0 and total[1] > 0, total  # Both cases are exercised.
  return fracs


def run(tx, grads, params):
  """One jitted AGC update from a fresh state: (clipped, clip_stats)."""
  @jax.jit
  def update(grads, params):
    out, state = tx.update(grads, tx.init(params), params)
    return out, agc.clip_stats(state)
  return update(grads, params)


def check_stats(stats, fracs):
  assert set(stats) == {"agc_clip_frac"} | {f"agc_clip_frac/{n}" for n in fracs}
  for name, frac in fracs.items():
    assert float(stats[f"agc_clip_frac/{name}"]) == pytest.approx(frac), name


# --- Models -------------------------------------------------------------------


class NnxNet(nnx.Module):
  """A small CNN with self-attention over its pixels and a classifier."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
        num_heads=2, in_features=4, qkv_features=6, out_features=5,
        decode=False, rngs=rngs)
    self.head = nnx.Linear(5, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv(x))
    x = self.attn(x.reshape(x.shape[0], -1, x.shape[-1]))
    return self.head(x.mean(axis=1))


class Block(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    return nn.relu(nn.Dense(4)(x)), None


class LinenNet(nn.Module):
  """Conv, attention, a scanned stack of 3 Dense layers and a classifier."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = x.reshape(x.shape[0], -1, 4)
    x = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=6)(x)
    x, _ = nn.scan(Block, variable_axes={"params": 0},
                   split_rngs={"params": True}, length=3)()(x, None)
    return nn.Dense(3, name="head")(x.mean(axis=1))


class EqxNet(eqx.Module):
  """Linear, Conv2d, a filter_vmap-stacked MLP (3 layers deep) and a head."""
  conv: eqx.nn.Conv2d
  linear: eqx.nn.Linear
  stack: eqx.nn.MLP
  head: eqx.nn.Linear

  def __init__(self, key):
    k = jax.random.split(key, 4)
    self.conv = eqx.nn.Conv2d(2, 4, 3, key=k[0])
    self.linear = eqx.nn.Linear(4, 5, key=k[1])
    make = lambda key: eqx.nn.MLP(5, 5, 3, 1, key=key)
    self.stack = eqx.filter_vmap(make)(jax.random.split(k[2], 3))
    self.head = eqx.nn.Linear(5, 3, key=k[3])

  def __call__(self, x):  # x: (2, h, w)
    x = jax.nn.relu(self.conv(x)).mean(axis=(1, 2))
    x = self.linear(x)
    dynamic, static = eqx.partition(self.stack, eqx.is_array)
    def layer(x, params):
      return eqx.combine(params, static)(x), None
    x, _ = jax.lax.scan(layer, x, dynamic)
    return self.head(x)


def _eqx_stacked(name):
  return 1 if name.startswith("stack/") else 0


def _linen_stacked(name):
  return 1 if "/ScanBlock_0/" in name else 0


# Models are initialized under jit: one compilation is quicker than running
# each initializer eagerly.
@pytest.fixture(scope="module")
def nnx_model():
  return nnx.jit(lambda: NnxNet(nnx.Rngs(0)))()


@pytest.fixture(scope="module")
def linen_params():
  return jax.jit(LinenNet().init)(jax.random.key(0), jnp.ones((1, 4, 4, 2)))


@pytest.fixture(scope="module")
def eqx_model():
  return eqx.filter_jit(EqxNet)(jax.random.key(0))


# --- Per-unit agreement, per library ------------------------------------------


def test_flax_nnx_cnn_and_attention(nnx_model):
  model = nnx_model
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  grads, keeps = manufactured(params, "flax")
  # The documented units of each kind of kernel.
  shapes = dict(zip(names_of(params), map(np.shape, jax.tree.leaves(params))))
  assert shapes["attn/query/kernel"] == (4, 2, 3)
  assert keeps["attn/query/kernel"] == [1, 2]  # 6 units: one per (head, dim).
  assert shapes["attn/out/kernel"] == (2, 3, 5)
  assert keeps["attn/out/kernel"] == [2]  # 5 units: one per output.
  assert keeps["attn/key/bias"] == [] and keeps["conv/kernel"] == [3]
  tx = agc.adaptive_grad_clip(CLIP, EPS, layout="flax", track_clip_stats=True)
  out, stats = run(tx, grads, params)
  check_stats(stats, check_tree(out, grads, params, keeps))
  # The same through a State of nnx.Variables, as `nnx.state` returns it:
  # names (and so units) leave out the Variable's 'value' key.
  var_params = nnx.state(model, nnx.Param)
  var_grads = jax.tree.unflatten(jax.tree.structure(var_params),
                                 jax.tree.leaves(grads))
  var_out, var_stats = run(tx, var_grads, var_params)
  for a, b in zip(jax.tree.leaves(var_out), jax.tree.leaves(out)):
    np.testing.assert_array_equal(a, b)
  assert set(var_stats) == set(stats)


def test_flax_linen_dense_conv_attention_and_scan(linen_params):
  params = linen_params
  grads, keeps = manufactured(params, "flax", _linen_stacked)
  attn = "params/MultiHeadDotProductAttention_0"
  assert keeps[f"{attn}/value/kernel"] == [1, 2]
  assert keeps[f"{attn}/out/kernel"] == [2]
  # (3 layers, in, out): a unit per (layer, output); the (3, out) biases one
  # unit per layer.
  assert keeps["params/ScanBlock_0/Dense_0/kernel"] == [0, 2]
  assert keeps["params/ScanBlock_0/Dense_0/bias"] == [0]
  tx = agc.adaptive_grad_clip(
      CLIP, EPS, layout="flax", track_clip_stats=True,
      stacked_axes=lambda name, p: _linen_stacked(name))
  out, stats = run(tx, grads, params)
  check_stats(stats, check_tree(out, grads, params, keeps))


def test_equinox_linear_conv_and_vmapped_mlp(eqx_model):
  model = eqx_model
  params = eqx.filter(model, eqx.is_array)
  # Non-array fields (the MLP's activations) are None leaves.
  assert any(x is None for x in jax.tree.leaves(
      params, is_leaf=lambda x: x is None))
  grads, keeps = manufactured(params, "equinox", _eqx_stacked)
  assert keeps["conv/weight"] == [0]  # (out, in, kh, kw): 4 units.
  assert keeps["conv/bias"] == []  # (out, 1, 1): one unit.
  assert keeps["stack/layers/0/weight"] == [0, 1]  # (3, out, in).
  tx = agc.adaptive_grad_clip(
      CLIP, EPS, layout="equinox", track_clip_stats=True,
      stacked_axes=lambda name, p: _eqx_stacked(name))
  out, stats = run(tx, grads, params)
  check_stats(stats, check_tree(out, grads, params, keeps))


def test_haiku_layout_is_the_default(linen_params):
  params = linen_params
  grads, keeps = manufactured(params, "haiku", _linen_stacked, seed=1)
  # (tests/optim/test_agc.py checks the default arguments' rule.)
  layout = inspect.signature(agc.adaptive_grad_clip).parameters["layout"]
  assert layout.default == "haiku"
  stacked = lambda name, p: _linen_stacked(name)
  out = run(agc.adaptive_grad_clip(CLIP, EPS, layout="haiku",
                                   stacked_axes=stacked), grads, params)[0]
  check_tree(out, grads, params, keeps)


# --- Stacked layers -----------------------------------------------------------


@pytest.mark.parametrize("layout", ["haiku", "flax", "equinox"])
def test_stacked_axes_keep_layers_apart(layout):
  # Two stacked (4, 4) kernels: layer 0's weights are 100x layer 1's, the
  # gradients alike. Per layer, layer 1's units are clipped and layer 0's are
  # not. Merged over the layer axis, the answer differs: "haiku" and "flax"
  # see units spanning both layers, dominated by layer 0's weights, and clip
  # nothing; "equinox" takes the layer axis for its output axis.
  name = {"haiku": "w", "flax": "kernel", "equinox": "weight"}[layout]
  rng = np.random.default_rng(0)
  w = rng.normal(size=(2, 4, 4)).astype(np.float32)
  w[0] *= 100
  g = (rng.normal(size=(2, 4, 4)) * 0.05).astype(np.float32)
  params, grads = {"blocks": {name: w}}, {"blocks": {name: g}}
  keep = unit_axes(layout, f"blocks/{name}", w.shape, stacked=1)
  stacked = run(agc.adaptive_grad_clip(CLIP, EPS, layout=layout,
                                       stacked_axes=1), grads, params)[0]
  n_clipped, n_kept = check_leaf(stacked["blocks"][name], g, w, keep, name)
  assert (n_clipped, n_kept) == (4, 4)
  merged = run(agc.adaptive_grad_clip(CLIP, EPS, layout=layout), grads,
               params)[0]["blocks"][name]
  assert not np.allclose(merged, stacked["blocks"][name], rtol=1e-3)
  if layout != "equinox":
    np.testing.assert_array_equal(merged, g)  # Nothing clipped.
  # Per layer, the same as clipping each layer on its own.
  for i in range(2):
    alone = run(agc.adaptive_grad_clip(CLIP, EPS, layout=layout),
                {"blocks": {name: g[i]}}, {"blocks": {name: w[i]}})[0]
    np.testing.assert_array_equal(stacked["blocks"][name][i],
                                  alone["blocks"][name])


def test_callables_see_one_layer():
  seen = []

  def layout(name, param):
    seen.append((name, param.shape))
    return (0,) if name.endswith("qkv") else None

  w = np.random.default_rng(0).normal(size=(3, 4, 2, 5)).astype(np.float32)
  params = {"qkv": w, "b": np.ones((3, 5), np.float32)}
  grads, keeps = manufactured(params, "haiku", lambda name: 1)
  keeps["qkv"] = [0, 2, 3]  # Layers, then (head, dim) pairs.
  grads["qkv"] = make_grad(np.random.default_rng(1), w, keeps["qkv"], [0])
  tx = agc.adaptive_grad_clip(CLIP, EPS, layout=layout, stacked_axes=1)
  out = run(tx, grads, params)[0]
  assert sorted(seen) == [("b", (5,)), ("qkv", (4, 2, 5))]
  check_tree(out, grads, params, keeps)


# --- End to end, with `exclude` -----------------------------------------------


def test_nnx_optimizer_step_and_exclude(nnx_model):
  model = nnx.clone(nnx_model)  # The optimizer updates it in place.
  before = nnx.as_pure(nnx.state(model, nnx.Param))
  x = jnp.ones((2, 4, 4, 2))
  # What nnx.grad returns: a State of Params (its shapes, not its values).
  real = nnx.eval_shape(
      lambda m: nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m), model)
  fake, keeps = manufactured(before, "flax")
  grads = jax.tree.unflatten(jax.tree.structure(real), jax.tree.leaves(fake))
  tx = optax.chain(
      agc.adaptive_grad_clip(CLIP, EPS, layout="flax", exclude=r"^head/kernel$",
                             track_clip_stats=True),
      optax.sgd(1.0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, grads):
    optimizer.update(model, grads)

  step(model, optimizer, grads)
  after = nnx.as_pure(nnx.state(model, nnx.Param))
  names = names_of(before)
  applied = jax.tree.map(lambda b, a: np.asarray(b) - np.asarray(a), before,
                         after)
  # The classifier's kernel is excluded: its step is the raw gradient.
  i = names.index("head/kernel")
  np.testing.assert_allclose(jax.tree.leaves(applied)[i],
                             jax.tree.leaves(fake)[i], rtol=1e-6, atol=1e-7)
  # Every other parameter moved by its clipped gradient (1 step of lr 1:
  # a float32 subtraction, so compared to rounding, unit by unit).
  fracs = {}
  for name, d, g, w in zip(names, jax.tree.leaves(applied),
                           jax.tree.leaves(fake),
                           map(np.asarray, jax.tree.leaves(before))):
    if name == "head/kernel":
      continue
    want = np.zeros_like(g)
    for sl in units(g.shape, keeps[name]):
      bound = CLIP * max(np.linalg.norm(np.float64(w[sl])), EPS)
      g_norm = np.linalg.norm(np.float64(g[sl]))
      want[sl] = g[sl] * min(1.0, bound / g_norm)
    scale = np.abs(np.asarray(w)).max() + np.abs(want).max()
    np.testing.assert_allclose(d, want, rtol=0, atol=2e-7 * scale,
                               err_msg=name)
    flags = [np.linalg.norm(np.float64(g[sl])) > CLIP * max(
        np.linalg.norm(np.float64(w[sl])), EPS)
             for sl in units(g.shape, keeps[name])]
    fracs[name] = np.mean(flags)
  # clip_stats reads the optimizer's state (arrays held in NNX Variables).
  check_stats(agc.clip_stats(optimizer.opt_state), fracs)


def test_equinox_optax_step_with_none_leaves_and_exclude(eqx_model):
  model = eqx_model
  params = eqx.filter(model, eqx.is_array)
  # What filter_grad returns (its shapes, not its values): None leaves where
  # `params` has them.
  loss = lambda m: jnp.sum(m(jnp.ones((2, 5, 5))) ** 2)
  real = eqx.filter_eval_shape(eqx.filter_grad(loss), model)
  assert jax.tree.structure(real) == jax.tree.structure(params)
  fake, keeps = manufactured(params, "equinox", _eqx_stacked)
  grads = jax.tree.unflatten(jax.tree.structure(real), jax.tree.leaves(fake))
  tx = optax.chain(
      agc.adaptive_grad_clip(CLIP, EPS, layout="equinox", exclude="^head/",
                             stacked_axes=lambda n, p: _eqx_stacked(n),
                             track_clip_stats=True),
      optax.sgd(1.0))
  state = tx.init(params)
  updates, state = eqx.filter_jit(tx.update)(grads, state, params)
  new_model = eqx.apply_updates(model, updates)
  assert isinstance(new_model, EqxNet)
  names = names_of(params)
  # The classifier (weight and bias) is excluded: its update is -grad.
  for name, u, g in zip(names, jax.tree.leaves(updates),
                        jax.tree.leaves(grads)):
    if name.startswith("head/"):
      np.testing.assert_array_equal(u, -g)
  clipped = jax.tree.map(jnp.negative, updates)
  kept = [n for n in names if not n.startswith("head/")]
  pick = lambda t: [x for n, x in zip(names, jax.tree.leaves(t)) if n in kept]
  fracs = check_tree(dict(zip(kept, pick(clipped))),
                     dict(zip(kept, pick(grads))),
                     dict(zip(kept, pick(params))), keeps)
  check_stats(agc.clip_stats(state), fracs)


# --- Errors -------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"layout": "torch"}, re.escape(
        "layout must be one of 'haiku', 'flax', 'equinox' or a callable "
        "(name, param) -> axes to reduce, got 'torch'.")),
    ({"layout": 3}, "layout must be one of .*, got 3"),
    ({"stacked_axes": -1}, "stacked_axes must be >= 0, got -1"),
    ({"stacked_axes": True}, "stacked_axes must be None, an int >= 0 or a "
                             "callable .* got True"),
    ({"stacked_axes": "1"}, "stacked_axes must be None, .* got '1'"),
    ({"exclude": "head/(kernel"}, "exclude='head/\\(kernel' is not a valid "
                                  "regular expression"),
    ({"exclude": 3}, "exclude must be None or a regular expression .* got 3"),
])
def test_rejects_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match="adaptive_grad_clip: " + message):
    agc.adaptive_grad_clip(CLIP, **kwargs)


def test_rejects_bad_values_at_update():
  params = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
  with pytest.raises(ValueError, match=re.escape(
      "stacked_axes=2 for parameter 'b' of shape (3,); it must be between 0 "
      "and the parameter's rank 1")):
    run(agc.adaptive_grad_clip(CLIP, stacked_axes=2), params, params)
  with pytest.raises(ValueError, match=re.escape(
      "layout (2,) out of range for parameter 'b' of shape (3,)")):
    run(agc.adaptive_grad_clip(CLIP, layout=lambda n, p: 2), params, params)
  with pytest.raises(ValueError, match="exclude='head' matches no parameter; "
                     "the names are 'b', 'w'"):
    run(agc.adaptive_grad_clip(CLIP, exclude="head"), params, params)
