"""Tests for nfnets_jax.agc: AGC against a brute-force NumPy reference."""

import textwrap

from absl.testing import parameterized
import chex
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nfnets_jax.optim import agc
import train_harness as testing

# An "odd layout": a multi-head kernel (in, heads, head_dim) whose units are
# (head, head_dim) pairs, i.e. only axis 0 is reduced.
_ODD = "odd/w"
_ODD_AXES = lambda name, p: (0,) if name == _ODD else None


def _reduce_axes(shape, name=""):
  """The documented unit rule, written independently of the module."""
  if name == _ODD:
    return (0,)
  if len(shape) <= 1:
    return tuple(range(len(shape)))
  return tuple(range(len(shape) - 1))


def np_agc_leaf(g, p, clipping, eps, reduce_axes):
  """Brute-force AGC of one tensor: loops over units, float64 norms.

  Returns the clipped gradient and a list of per-unit clipped flags.
  """
  g = np.asarray(g, np.float64)
  p = np.asarray(p, np.float64)
  keep = [a for a in range(g.ndim) if a not in reduce_axes]
  out, flags = g.copy(), []
  for idx in np.ndindex(*[g.shape[a] for a in keep]):
    sl = [slice(None)] * g.ndim
    for a, i in zip(keep, idx):
      sl[a] = i
    sl = tuple(sl)
    g_norm = np.sqrt(np.sum(g[sl] ** 2))
    p_norm = max(np.sqrt(np.sum(p[sl] ** 2)), eps)
    clipped = g_norm > clipping * p_norm
    if clipped:
      out[sl] = g[sl] * (clipping * p_norm / g_norm)
    flags.append(clipped)
  return out, flags


def np_agc(grads, params, clipping, eps=1e-3):
  """Brute-force AGC of a {name: array} dict; returns (clipped, flags)."""
  out, flags = {}, {}
  for k in grads:
    out[k], flags[k] = np_agc_leaf(grads[k], params[k], clipping, eps,
                                   _reduce_axes(np.shape(params[k]), k))
  return out, flags


def random_tree(seed, odd=True):
  """Params and grads: dense, conv, bias, scalar, 5-D, odd layout, zeros.

  Each unit's gradient scale is spread over 4 decades so that, for clipping in
  [1e-3, 1], some units are clipped and some are not.
  """
  rng = np.random.default_rng(seed)
  shapes = {"dense/w": (5, 3), "conv/w": (3, 3, 2, 4), "conv/bias": (4,),
            "block/skip_gain": (), "conv3d/w": (2, 2, 2, 2, 3),
            "zero_init/w": (4, 3)}
  if odd:
    shapes[_ODD] = (6, 2, 3)
  params, grads = {}, {}
  for k, shape in shapes.items():
    p = rng.normal(size=shape).astype(np.float32)
    if k == "zero_init/w":
      p[:] = 0
    unit_scale = 10.0 ** rng.uniform(-4, 0, size=shape[-1:] or ())
    if k == _ODD:
      unit_scale = 10.0 ** rng.uniform(-4, 0, size=shape[1:])
    params[k] = np.asarray(p)
    grads[k] = np.asarray(rng.normal(size=shape) * unit_scale, np.float32)
  return params, grads


def _update(tx, grads, params):
  return tx.update(grads, tx.init(params), params)


class ReferenceTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_reference(self):
    # clipping is an argument, so under jit one compilation serves all four.
    update = self.variant(lambda g, p, c: _update(
        agc.adaptive_grad_clip(c, unitwise_axes=_ODD_AXES), g, p)[0])
    for seed, clipping in enumerate([0.001, 0.01, 0.1, 1.0]):
      params, grads = random_tree(seed)
      got = update(grads, params, clipping)
      want, flags = np_agc(grads, params, clipping)
      n_units = sum(map(len, flags.values()))
      n_clipped = sum(map(sum, flags.values()))
      self.assertTrue(0 < n_clipped < n_units)  # both cases are exercised
      for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-6, atol=1e-12,
                                   err_msg=f"{k}, clipping={clipping}")


def test_default_unitwise_axes():
  assert agc.default_unitwise_axes(()) == ()
  assert agc.default_unitwise_axes((7,)) == (0,)
  assert agc.default_unitwise_axes((5, 3)) == (0,)
  assert agc.default_unitwise_axes((1, 3)) == (0,)
  assert agc.default_unitwise_axes((3, 2, 4)) == (0, 1)
  assert agc.default_unitwise_axes((3, 3, 2, 4)) == (0, 1, 2)
  assert agc.default_unitwise_axes((1, 2, 3, 4, 5, 6)) == (0, 1, 2, 3, 4)


def test_ratio_exactly_at_clipping_is_unchanged():
  # Column 0: ||W|| = 5, ||G|| = 2.5, ratio exactly 0.5: untouched.
  # Column 1: ||W|| = 5, ||G|| = 3: clipped to norm 2.5.
  w = np.array([[3.0, 0.0], [4.0, 5.0]], np.float32)
  g = np.array([[1.5, 0.0], [2.0, 3.0]], np.float32)
  tx = agc.adaptive_grad_clip(0.5, track_clip_stats=True)
  out, state = _update(tx, {"w": g}, {"w": w})
  np.testing.assert_array_equal(out["w"][:, 0], g[:, 0])
  # rtol: a few float32 ulps (the rescale's division and product may each
  # round either way; 1e-7 is less than one ulp at 2.5).
  np.testing.assert_allclose(out["w"][:, 1], [0.0, 2.5], rtol=1e-6)
  assert float(state.param_clip_frac["w"]) == 0.5
  assert int(state.num_clipped) == 1 and int(state.num_units) == 2


@pytest.mark.parametrize("eps", [1e-3, 0.0])
def test_zero_params_and_zero_grads(eps):
  zeros = np.zeros((3, 4), np.float32)
  ones = np.ones((3, 4), np.float32)
  params = {"zp": zeros, "zg": ones, "both": zeros, "scalar": np.float32(0)}
  grads = {"zp": ones, "zg": zeros, "both": zeros, "scalar": np.float32(0)}
  out, _ = _update(agc.adaptive_grad_clip(0.01, eps), grads, params)
  for v in jax.tree.leaves(out):
    assert np.all(np.isfinite(v))
  np.testing.assert_array_equal(out["zg"], zeros)
  np.testing.assert_array_equal(out["both"], zeros)
  # A zero-norm parameter counts as norm eps: each unit of 3 ones rescaled to
  # norm 0.01 * eps (and to zero when eps == 0).
  np.testing.assert_allclose(out["zp"], np.full((3, 4), 0.01 * eps / 3**0.5),
                             rtol=1e-6)


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
    shape=st.lists(st.integers(1, 3), min_size=0, max_size=5).map(tuple),
    log_clip=st.floats(-3, 1),
    log_eps=st.floats(-6, 0),
    seed=st.integers(0, 2**31 - 1),
)
# A bound under 1e-6, where a divisor floored at 1e-6 clipped a clipped
# gradient again (2.8e-7 -> 7.9e-8; found by hypothesis in a fresh clone).
@hypothesis.example(shape=(), log_clip=-3.0, log_eps=-4.0, seed=0)
def test_properties(shape, log_clip, log_eps, seed):
  clipping, eps = 10.0**log_clip, 10.0**log_eps
  rng = np.random.default_rng(seed)
  p = (rng.normal(size=shape) * 10.0 ** rng.uniform(-4, 1)).astype(np.float32)
  g = (rng.normal(size=shape) * 10.0 ** rng.uniform(-4, 1)).astype(np.float32)
  update = jax.jit(lambda g, p: _update(agc.adaptive_grad_clip(clipping, eps),
                                        {"w": g}, {"w": p})[0]["w"])
  out = np.asarray(update(g, p))
  axes = _reduce_axes(shape)
  norm = lambda x: np.sqrt(np.sum(np.float64(x) ** 2, axis=axes, keepdims=True))
  max_norm = clipping * np.maximum(norm(p), eps)
  # Clipped units never exceed clipping * max(||W||, eps).
  assert np.all(norm(out) <= max_norm * (1 + 1e-5))
  # Units clearly below the threshold are bit-for-bit unchanged.
  below = np.broadcast_to(norm(g) < max_norm * (1 - 1e-5), shape)
  np.testing.assert_array_equal(out[below], g[below])
  # Clipping only shrinks, never turns: out = s * g with 0 < s <= 1.
  np.testing.assert_allclose(out, g * np.clip(max_norm / np.maximum(
      norm(g), 1e-30), 0, 1), rtol=1e-5, atol=1e-30)
  # Idempotent: clipping a clipped gradient changes it by at most rounding.
  again = update(out, p)
  np.testing.assert_allclose(again, out, rtol=1e-5)


@pytest.mark.parametrize("grad_dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_low_precision_grads(grad_dtype, param_dtype):
  params, grads = random_tree(4)
  params = jax.tree.map(lambda x: jnp.asarray(x, param_dtype), params)
  grads = jax.tree.map(lambda x: jnp.asarray(x, grad_dtype), grads)
  out = jax.jit(lambda g, p: _update(
      agc.adaptive_grad_clip(0.01, unitwise_axes=_ODD_AXES), g, p)[0])(
          grads, params)
  up = lambda t: {k: np.asarray(v, np.float32) for k, v in t.items()}
  want, _ = np_agc(up(grads), up(params), 0.01)
  for k in want:
    assert out[k].dtype == grad_dtype
    # One rounding to the gradient's dtype, relative to the unit's norm.
    np.testing.assert_allclose(np.float32(out[k]), want[k], rtol=1e-2,
                               atol=1e-2 * np.abs(want[k]).max(), err_msg=k)


def test_float16_norms_do_not_overflow():
  # The sum of squares (9e7) overflows float16 (max 65504). optax computes the
  # norm in float16, gets inf and zeroes the gradient; AGC here clips to the
  # right value because its norms are float32.
  g = {"w": jnp.full((1000, 2), 300.0, jnp.float16)}
  p = {"w": jnp.ones((1000, 2), jnp.float16)}
  ours = _update(agc.adaptive_grad_clip(0.01), g, p)[0]["w"]
  theirs = _update(optax.adaptive_grad_clip(0.01), g, p)[0]["w"]
  np.testing.assert_allclose(np.float32(ours), 0.01, rtol=1e-3)
  np.testing.assert_array_equal(np.float32(theirs), 0.0)


class OptaxAgreementTest(parameterized.TestCase):
  """Same as `optax.adaptive_grad_clip` where the unit conventions agree."""

  @parameterized.parameters(0.001, 0.01, 0.1)
  def test_agrees_on_common_layouts(self, clipping):
    # Dense, HWIO conv, 5-D conv, vectors, scalars, zero params: the rules
    # coincide whenever a tensor has >= 2 dims of size > 1 or rank <= 1.
    params, grads = random_tree(5, odd=False)
    ours = _update(agc.adaptive_grad_clip(clipping), grads, params)[0]
    theirs = _update(optax.adaptive_grad_clip(clipping), grads, params)[0]
    for k in params:
      np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-6, err_msg=k)

  @parameterized.parameters((1, 2), (1, 1, 1, 2))
  def test_differs_on_singleton_input_dims(self, *shape):
    # optax squeezes, so a (1, out) dense or (1, 1, 1, out) conv kernel is one
    # unit; here it has `out` units. Unit 0 (ratio 1) is clipped here, unit 1
    # (ratio 0.01) is not; as one unit the ratio is ~0.014 < 0.1: no clipping.
    w = np.array([1.0, 100.0], np.float32).reshape(shape)
    g = np.ones(shape, np.float32)
    ours = _update(agc.adaptive_grad_clip(0.1), {"w": g}, {"w": w})[0]["w"]
    theirs = _update(optax.adaptive_grad_clip(0.1), {"w": g}, {"w": w})[0]
    np.testing.assert_allclose(np.ravel(ours), [0.1, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(theirs["w"], g)
    # optax with the axes spelled out agrees.
    axes = tuple(range(len(shape) - 1))
    explicit = _update(optax.adaptive_grad_clip(0.1, axis=axes), {"w": g},
                       {"w": w})[0]["w"]
    np.testing.assert_allclose(ours, explicit, rtol=1e-6)

  def test_differs_on_rank_3(self):
    # optax reduces axis 0 only (multi-head (in, heads, dim)); here all but the
    # last (Conv1D (width, in, out)). Each convention is one option away.
    params, grads = random_tree(6)
    p, g = {"w": params[_ODD]}, {"w": grads[_ODD]}
    ours = _update(agc.adaptive_grad_clip(0.01), g, p)[0]["w"]
    ours_mh = _update(agc.adaptive_grad_clip(0.01, unitwise_axes=0), g, p)[0]
    theirs = _update(optax.adaptive_grad_clip(0.01), g, p)[0]["w"]
    theirs_conv = _update(optax.adaptive_grad_clip(0.01, axis=(0, 1)), g, p)[0]
    assert not np.allclose(ours, theirs)
    np.testing.assert_allclose(ours_mh["w"], theirs, rtol=1e-6)
    np.testing.assert_allclose(ours, theirs_conv["w"], rtol=1e-6)

  def test_differs_on_rank_6(self):
    params, grads = random_tree(7)
    p = {"w": params["conv3d/w"][None]}
    g = {"w": grads["conv3d/w"][None]}
    with self.assertRaises(ValueError):
      _update(optax.adaptive_grad_clip(0.01), g, p)
    ours = _update(agc.adaptive_grad_clip(0.01), g, p)[0]["w"]
    want, _ = np_agc_leaf(g["w"], p["w"], 0.01, 1e-3, (0, 1, 2, 3, 4))
    np.testing.assert_allclose(ours, want, rtol=2e-6)


@pytest.mark.parametrize("clipping", [0.0, -0.01, float("nan")])
def test_rejects_non_positive_clipping(clipping):
  with pytest.raises(ValueError, match="clipping must be > 0"):
    agc.adaptive_grad_clip(clipping)


def test_rejects_negative_eps():
  with pytest.raises(ValueError, match="eps must be >= 0"):
    agc.adaptive_grad_clip(0.01, eps=-1e-3)


def test_requires_params():
  tx = agc.adaptive_grad_clip(0.01)
  with pytest.raises(ValueError, match="needs the current parameters"):
    tx.update({"w": jnp.ones(3)}, tx.init({"w": jnp.ones(3)}))


def test_rejects_mismatched_trees():
  tx = agc.adaptive_grad_clip(0.01)
  p = {"a": jnp.ones(3), "b": jnp.ones(2)}
  with pytest.raises(ValueError, match="different tree structures"):
    tx.update({"a": jnp.ones(3), "c": jnp.ones(2)}, tx.init(p), p)
  with pytest.raises(ValueError, match="'b' has shape \\(3,\\)"):
    tx.update({"a": jnp.ones(3), "b": jnp.ones(3)}, tx.init(p), p)


def test_rejects_bad_unitwise_axes():
  tx = agc.adaptive_grad_clip(0.01, unitwise_axes=lambda n, p: (2,))
  p = {"w": jnp.ones((2, 3))}
  with pytest.raises(ValueError, match="out of range for parameter 'w'"):
    tx.update(p, tx.init(p), p)


def test_in_chain_masked_and_multisteps():
  params, grads = random_tree(8, odd=False)
  want, _ = np_agc(grads, params, 0.01)
  # chain: AGC then plain SGD with lr 1 gives -clipped.
  tx = optax.chain(agc.adaptive_grad_clip(0.01), optax.sgd(1.0))
  out = jax.jit(lambda g, p: _update(tx, g, p)[0])(grads, params)
  for k in want:
    np.testing.assert_allclose(out[k], -want[k], rtol=2e-6, err_msg=k)
  # masked: masked-out leaves pass through untouched.
  mask = {k: k != "dense/w" for k in params}
  out = _update(optax.masked(agc.adaptive_grad_clip(0.01), mask), grads,
                params)[0]
  np.testing.assert_array_equal(out["dense/w"], grads["dense/w"])
  np.testing.assert_allclose(out["conv/w"], want["conv/w"], rtol=2e-6)
  # MultiSteps(2): AGC sees the mean of the two gradients.
  tx = optax.MultiSteps(agc.adaptive_grad_clip(0.01), every_k_schedule=2)
  state = tx.init(params)
  grads2 = jax.tree.map(lambda g: -3 * g, grads)
  first, state = tx.update(grads, state, params)
  second, state = tx.update(grads2, state, params)
  mean_want, _ = np_agc(jax.tree.map(lambda g: -g, grads), params, 0.01)
  for k in want:
    np.testing.assert_array_equal(first[k], 0.0)
    np.testing.assert_allclose(second[k], mean_want[k], rtol=2e-6, err_msg=k)


def test_inject_hyperparams():
  params, grads = random_tree(9, odd=False)
  tx = optax.inject_hyperparams(agc.adaptive_grad_clip,
                                static_args=("track_clip_stats",))(
                                    clipping=0.01, track_clip_stats=True)
  state = tx.init(params)
  update = jax.jit(tx.update)
  out, state = update(grads, state, params)
  want, _ = np_agc(grads, params, 0.01)
  np.testing.assert_allclose(out["conv/w"], want["conv/w"], rtol=2e-6)
  # Change clipping at run time, without recompiling the transformation.
  state.hyperparams["clipping"] = jnp.asarray(0.1)
  out, state = update(grads, state, params)
  want, flags = np_agc(grads, params, 0.1)
  for k in want:
    np.testing.assert_allclose(out[k], want[k], rtol=2e-6, err_msg=k)
  assert set(agc.clip_stats(state)) == {"agc_clip_frac"} | {
      f"agc_clip_frac/{k}" for k in params}


def test_clip_stats_values_and_nesting():
  params, grads = random_tree(10)
  _, flags = np_agc(grads, params, 0.01)
  clip = agc.adaptive_grad_clip(0.01, unitwise_axes=_ODD_AXES,
                                track_clip_stats=True)
  mask = {k: k != "dense/w" for k in params}
  tx = optax.chain(
      optax.masked(clip, mask),
      optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9))
  tx = optax.MultiSteps(tx, every_k_schedule=1)
  state = tx.init(params)
  assert float(agc.clip_stats(state)["agc_clip_frac"]) == 0.0
  _, state = jax.jit(tx.update)(grads, state, params)
  stats = agc.clip_stats(state)
  kept = [k for k in params if k != "dense/w"]
  assert set(stats) == {"agc_clip_frac"} | {f"agc_clip_frac/{k}" for k in kept}
  for k in kept:
    assert float(stats[f"agc_clip_frac/{k}"]) == pytest.approx(
        np.mean(flags[k]))
  overall = sum(sum(flags[k]) for k in kept) / sum(len(flags[k]) for k in kept)
  assert float(stats["agc_clip_frac"]) == pytest.approx(overall)


def test_clip_stats_pools_several_agc_states():
  params, grads = random_tree(11, odd=False)
  _, flags = np_agc(grads, params, 0.01)
  half = {k: i % 2 == 0 for i, k in enumerate(params)}
  other = {k: not v for k, v in half.items()}
  clip = agc.adaptive_grad_clip(0.01, track_clip_stats=True)
  tx = optax.chain(optax.masked(clip, half), optax.masked(clip, other))
  _, state = _update(tx, grads, params)
  stats = agc.clip_stats(state)
  overall = sum(map(sum, flags.values())) / sum(map(len, flags.values()))
  assert float(stats["agc_clip_frac"]) == pytest.approx(overall)
  assert len(stats) == len(params) + 1


def test_clip_stats_empty_without_tracking():
  params, grads = random_tree(12, odd=False)
  tx = optax.chain(agc.adaptive_grad_clip(0.01), optax.sgd(0.1))
  assert agc.clip_stats(_update(tx, grads, params)[1]) == {}
  assert agc.clip_stats(optax.adam(1e-3).init(params)) == {}


_PMAP_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from nfnets_jax.optim import agc

    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    params = {"hidden": {"w": rng.normal(size=(6, 8)).astype(np.float32),
                         "gain": np.ones(8, np.float32)},
              "linear": {"w": rng.normal(size=(8, 5)).astype(np.float32),
                         "b": np.zeros(5, np.float32)}}
    x = rng.normal(size=(8, 6)).astype(np.float32)
    y = rng.integers(0, 5, size=8)

    def loss_fn(p, x, y):
      h = jax.nn.relu(x @ p["hidden"]["w"]) * p["hidden"]["gain"]
      logits = h @ p["linear"]["w"] + p["linear"]["b"]
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, y).mean()

    tx = optax.chain(agc.adaptive_grad_clip(0.05, track_clip_stats=True),
                     optax.sgd(0.5, momentum=0.9, nesterov=True))

    def step(p, s, x, y, axis_name=None):
      g = jax.grad(loss_fn)(p, x, y)
      if axis_name:
        g = jax.lax.pmean(g, axis_name)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    jit_step = jax.jit(step)
    pmap_step = jax.pmap(lambda p, s, x, y: step(p, s, x, y, "i"),
                         axis_name="i")
    rep = lambda t: jax.tree.map(lambda a: jnp.stack([a] * 4), t)
    p1, s1 = params, tx.init(params)
    p4, s4 = rep(params), rep(tx.init(params))
    xs, ys = x.reshape(4, 2, 6), y.reshape(4, 2)
    out = {"max_abs_diff": 0.0, "max_abs_update": 0.0, "device_spread": 0.0}
    for _ in range(3):
      new1, s1 = jit_step(p1, s1, x, y)
      p4, s4 = pmap_step(p4, s4, xs, ys)
      for a, b, c in zip(jax.tree.leaves(p1), jax.tree.leaves(new1),
                         jax.tree.leaves(p4)):
        c = np.asarray(c)
        out["max_abs_update"] = max(out["max_abs_update"],
                                    float(np.abs(b - a).max()))
        out["max_abs_diff"] = max(out["max_abs_diff"],
                                  float(np.abs(c[0] - b).max()))
        out["device_spread"] = max(out["device_spread"],
                                   float(np.abs(c - c[:1]).max()))
      p1 = new1
    out["clip_frac_jit"] = float(agc.clip_stats(s1)["agc_clip_frac"])
    out["clip_frac_pmap"] = np.asarray(
        agc.clip_stats(s4)["agc_clip_frac"]).tolist()
    print(json.dumps(out))
""")


def test_jit_one_device_equals_pmap_four_devices():
  out = testing.run_script(_PMAP_SCRIPT, devices=4)
  assert out["max_abs_update"] > 1e-3  # the parameters do move
  assert out["device_spread"] == 0.0  # replicas stay identical
  # Same updates up to float reassociation of the batch mean.
  assert out["max_abs_diff"] < 1e-6 * max(1.0, out["max_abs_update"])
  assert 0.0 < out["clip_frac_jit"] < 1.0  # some units clipped, some not
  assert out["clip_frac_pmap"] == [out["clip_frac_jit"]] * 4
