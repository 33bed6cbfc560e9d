"""Random weights drawn by NumPy from each leaf's initializer (models/host_init)."""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax.cpu import compiler
from nfnets_jax.models import families
from nfnets_jax.models import host_init
from nfnets_jax.models import stats

TINY_NFNET = {"variant": "F0", "width": 0.125}


def test_drawn_trees_match_init():
  family, kwargs = "NFNet", TINY_NFNET
  traced = stats.traced(family, kwargs)
  params, state = host_init.draw(
      traced.initializers, *stats.param_shapes(family, kwargs, 7), seed=3)
  net = families.make_network(family, kwargs, 7)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  want = jax.eval_shape(lambda x: net.init(jax.random.key(0), x,
                                           is_training=True), x)
  got = (params, state)
  assert (jax.tree.structure(got) == jax.tree.structure(want))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.shape == w.shape and g.dtype == w.dtype


def test_leaves_follow_their_initializers():
  kwargs = {"variant": "F0", "width": 0.25}
  traced = stats.traced("NFNet", kwargs)
  params, _ = host_init.draw(traced.initializers,
                             *stats.param_shapes("NFNet", kwargs, 1000),
                             seed=0)
  head = params["NFNet/~/linear"]
  np.testing.assert_allclose(head["w"].std(), 0.01, rtol=0.02)  # N(0, .01)
  np.testing.assert_array_equal(head["b"], 0)
  for module, leaves in params.items():
    if "skip_gain" in leaves:
      np.testing.assert_array_equal(leaves["skip_gain"], 0)
    if "w" in leaves and leaves["w"].ndim == 4 and leaves["w"].size > 2e4:
      # WS convolutions: VarianceScaling(1, fan_in, normal).
      fan_in = np.prod(leaves["w"].shape[:-1])
      np.testing.assert_allclose(leaves["w"].std(), fan_in ** -0.5,
                                 rtol=0.05, err_msg=module)


@pytest.mark.parametrize("init, check", [
    (hk.initializers.VarianceScaling(2.0, "fan_in", "truncated_normal"),
     lambda x: (np.abs(x).max() <= 2 * np.sqrt(2 / 576) / .87962566103423978
                and abs(x.std() / np.sqrt(2 / 576) - 1) < 0.02)),
    (hk.initializers.VarianceScaling(1.0, "fan_avg", "uniform"),
     lambda x: (np.abs(x).max() <= np.sqrt(3 / 1440)
                and abs(x.std() / np.sqrt(1 / 1440) - 1) < 0.02)),
    (hk.initializers.TruncatedNormal(0.5, mean=1.0, lower=-1.0, upper=1.5),
     lambda x: x.min() >= 0.5 and x.max() <= 1.75),
    (hk.initializers.RandomUniform(-3.0, -1.0),
     lambda x: x.min() >= -3 and x.max() <= -1 and abs(x.mean() + 2) < 0.02),
    (hk.initializers.Constant(0.25), lambda x: np.all(x == 0.25)),
    (jnp.ones, lambda x: np.all(x == 1)),
])
def test_samplers(init, check):
  shape = (3, 3, 64, 256)  # fan_in 576, fan_out 2304.
  x = host_init.sampler(init, shape)(np.random.default_rng(0), shape)
  assert x.shape == shape and check(np.asarray(x))


def test_truncated_normal_matches_jax_distribution():
  init = hk.initializers.TruncatedNormal(1.0)
  ours = host_init.sampler(init, (200_000,))(np.random.default_rng(1),
                                             (200_000,))
  theirs = np.asarray(jax.random.truncated_normal(jax.random.key(1), -2., 2.,
                                                  (200_000,)))
  for q in (0.01, 0.1, 0.5, 0.9, 0.99):
    assert abs(np.quantile(ours, q) - np.quantile(theirs, q)) < 0.02


def test_seeded_and_reproducible():
  traced = stats.traced("NFNet", TINY_NFNET)
  shapes = stats.param_shapes("NFNet", TINY_NFNET, 10)
  a, _ = host_init.draw(traced.initializers, *shapes, seed=5)
  b, _ = host_init.draw(traced.initializers, *shapes, seed=5)
  c, _ = host_init.draw(traced.initializers, *shapes, seed=6)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  w = "NFNet/~/stem_conv0"
  assert not np.array_equal(a[w]["w"], c[w]["w"])


def test_state_set_without_initializer_is_left_to_jax():
  # Batch norm's moving averages are written by hk.set_state.
  kwargs = {"depth": 26, "width": 0.25}
  traced = stats.traced("ResNet", kwargs)
  assert host_init.draw(traced.initializers,
                        *stats.param_shapes("ResNet", kwargs, 10),
                        seed=0) is None


def test_unknown_initializer_is_left_to_jax():
  def forward(x):
    return hk.Linear(3, w_init=hk.initializers.Orthogonal())(x)

  record = {}

  def recorded(x):
    with host_init.recording_initializers(record):
      return forward(x)

  x = jnp.ones((1, 4))
  shapes = stats.as_shapes(compiler.run_once(
      hk.transform(recorded).init, jax.random.key(0), x))
  assert host_init.draw(record, shapes, {}, seed=0) is None
