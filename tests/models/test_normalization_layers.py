"""The baseline ResNet's normalizers (`nfnets_jax.models.normalizers`).

- The running batch norm against a NumPy transcription of the fast.ai
  notebook's `RunningBatchNorm` (course-v3 `nbs/dl2/07_batchnorm.ipynb`) over
  several training steps of varying batch size, then in evaluation.
- Batch independence: the output for one example computed alone and inside a
  batch of others. In training mode batch norm and running batch norm (the
  current batch enters its running sums) differ; the normalizer-free
  NF-ResNet, the unnormalized ResNet, layer, instance and group norm agree to
  float rounding. In evaluation mode all agree.
- Cross-replica statistics (batch norm's `cross_replica_axis`, and the running
  batch norm's) equal one batch's, under a named `vmap` axis.
- An unknown normalization is refused by name.
"""
import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax.cpu import compiler
from nfnets_jax.models import families
from nfnets_jax.models import nf_resnet
from nfnets_jax.models import normalizers
from nfnets_jax.models import resnet

# Float rounding of the same example computed in batches of 1 and 5 (XLA may
# tile and reduce differently); a batch dependence moves outputs far more.
RTOL, ATOL = 1e-4, 1e-5
TINY = dict(depth=(1,), width=0.25)  # Channels 4 (stem, bottleneck), 16.
IMAGE = 16  # 4x4 feature maps after the stem.


class NumpyRunningBatchNorm:
  """The notebook's `RunningBatchNorm`, line by line, in float64 NumPy (NHWC).

  One extension, as the module: at batch size 1 `sqrt(bs - 1)` is taken as 1
  (the notebook divides by zero there).
  """

  def __init__(self, nf, mom=0.1, eps=1e-5):
    self.mom, self.eps = mom, eps
    self.mults, self.adds = np.ones(nf), np.zeros(nf)
    self.sums, self.sqrs = np.zeros(nf), np.zeros(nf)
    self.batch = self.count = self.step = self.dbias = 0.0

  def update_stats(self, x):
    bs, nc = x.shape[0], x.shape[-1]
    dims = (0, 1, 2)
    s = x.sum(dims)
    ss = (x * x).sum(dims)
    c = x.size / nc
    mom1 = 1 - (1 - self.mom) / math.sqrt(max(bs - 1, 1))
    self.sums += mom1 * (s - self.sums)  # lerp_(s, mom1)
    self.sqrs += mom1 * (ss - self.sqrs)
    self.count += mom1 * (c - self.count)
    self.dbias = self.dbias * (1 - mom1) + mom1
    self.batch += bs
    self.step += 1

  def forward(self, x, training):
    if training:
      self.update_stats(x)
    sums, sqrs, c = self.sums, self.sqrs, self.count
    if self.step < 100:
      sums, sqrs, c = sums / self.dbias, sqrs / self.dbias, c / self.dbias
    means = sums / c
    var = sqrs / c - means * means
    if self.batch < 20:
      var = np.maximum(var, 0.01)
    x = (x - means) / np.sqrt(var + self.eps)
    return x * self.mults + self.adds


def _running_bn():
  return hk.transform_with_state(
      lambda x, t: normalizers.RunningBatchNorm(name="rbn")(x, t))


def test_running_batchnorm_matches_numpy_reference():
  channels = 3
  f = _running_bn()
  rng = np.random.default_rng(0)
  # Per-channel means and scales, so statistics differ between channels.
  draw = lambda b: (rng.normal(size=(b, 4, 4, channels)) * [0.5, 1.0, 2.0]
                    + [-1.0, 0.0, 3.0])
  ref = NumpyRunningBatchNorm(channels)
  # Batch sizes 1 (mom1 = mom) to 8; the examples seen pass 20 (the variance
  # floor lifts) at the last step.
  batches = [draw(b) for b in (2, 1, 5, 3, 8, 2)]
  params, state = f.init(None, jnp.asarray(batches[0], jnp.float32), True)
  state = jax.tree.map(jnp.zeros_like, state)  # Init took a step.
  apply = jax.jit(f.apply, static_argnums=4)
  for x in batches:
    out, state = apply(params, state, None, jnp.asarray(x, jnp.float32), True)
    expected = ref.forward(x, training=True)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    s = state["rbn"]
    np.testing.assert_allclose(s["sums"], ref.sums, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s["sqrs"], ref.sqrs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s["count"], ref.count, rtol=1e-6)
    np.testing.assert_allclose(s["dbias"], ref.dbias, rtol=1e-6)
    assert int(s["step"]) == ref.step and int(s["batch"]) == ref.batch
  assert ref.batch > 20 and ref.step == len(batches)
  # Evaluation: the stored statistics, nothing updated.
  x = draw(4)
  out, after = apply(params, state, None, jnp.asarray(x, jnp.float32), False)
  np.testing.assert_allclose(out, ref.forward(x, training=False), rtol=1e-4,
                             atol=1e-4)
  jax.tree.map(np.testing.assert_array_equal, after, state)
  # Past 100 steps the notebook stops debiasing (which cancels anyway).
  state = {"rbn": dict(state["rbn"], step=jnp.asarray(100, jnp.int32))}
  ref.step = 100
  out, _ = apply(params, state, None, jnp.asarray(x, jnp.float32), False)
  np.testing.assert_allclose(out, ref.forward(x, training=False), rtol=1e-4,
                             atol=1e-4)


def test_running_batchnorm_first_step_is_batch_statistics():
  """At the first step the debiased averages are the batch's own sums."""
  x = jax.random.normal(jax.random.key(0), (6, 4, 4, 5)) * 2.0 + 1.0
  stats = normalizers.RunningStats(
      sums=jnp.zeros(5), sqrs=jnp.zeros(5), count=jnp.zeros(()),
      dbias=jnp.zeros(()), step=jnp.zeros((), jnp.int32),
      batch=jnp.zeros((), jnp.int32))
  stats = normalizers.running_update(
      stats, x.sum((0, 1, 2)), (x * x).sum((0, 1, 2)), 6 * 16, 6, 0.1)
  mean, var = normalizers.running_moments(stats)
  np.testing.assert_allclose(mean, x.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var, x.var((0, 1, 2)), rtol=1e-4)
  # mom1 grows with the batch: 0.1 at B = 1, 2; 1 - 0.9 / 3 at B = 10.
  for b, mom1 in ((1, 0.1), (2, 0.1), (10, 0.7), (82, 0.9)):
    assert float(normalizers.running_momentum(b, 0.1)) == pytest.approx(mom1)


def _network(kind):
  """forward(x, is_training) -> pooled features and logits, of a tiny net."""
  if kind == "nf":
    ctor = lambda: nf_resnet.NFResNet(10, **TINY, stochdepth_rate=0.0)
  else:
    norm_kwargs = {"groups": 2} if kind == "groupnorm" else None
    ctor = lambda: resnet.ResNet(
        10, **TINY, normalization=kind, norm_kwargs=norm_kwargs,
        fc_init=hk.initializers.RandomNormal(1.0))
  def forward(x, is_training):
    out = ctor()(x, is_training)
    return jnp.concatenate([out["pool"], out["logits"]], axis=-1)
  return hk.transform_with_state(forward)


@pytest.mark.parametrize("kind", [*normalizers.NORMALIZATIONS, "nf"])
def test_batch_independence(kind):
  """One example alone and first in a batch of 5: equal unless batch norm
  (or running batch norm) in training mode."""
  f = _network(kind)
  x = jax.random.normal(jax.random.key(0), (5, IMAGE, IMAGE, 3))
  params, state = compiler.run_once(
      lambda k, x: f.init(k, x, True), jax.random.key(1), x)
  others = [jax.random.normal(jax.random.key(i), x.shape) + 0.5
            for i in (2, 3)]

  def outputs(params, state, x, others):
    for other in others:  # A trained-looking state: two steps on others.
      _, state = f.apply(params, state, None, other, True)
    return {(mode, n): f.apply(params, state, None, x[:n], mode == "train")[0]
            for mode in ("train", "eval") for n in (1, len(x))}
  out = compiler.run_once(outputs, params, state, x, others)
  for mode in ("train", "eval"):
    alone, in_batch = out[(mode, 1)][0], out[(mode, 5)][0]
    if mode == "train" and kind in normalizers.BATCH_DEPENDENT:
      gap = float(jnp.max(jnp.abs(alone - in_batch)))
      assert gap > 1e3 * ATOL, (kind, mode, gap)
    else:
      np.testing.assert_allclose(alone, in_batch, rtol=RTOL, atol=ATOL,
                                 err_msg=f"{kind} {mode}")


@pytest.mark.parametrize("kind", ["batchnorm", "running_batchnorm"])
def test_cross_replica_statistics_are_one_batch(kind):
  """Two replicas of 3 examples sharing statistics = one batch of 6."""
  def forward(x, is_training, axis=None):
    kwargs = {"cross_replica_axis": axis} if axis else None
    out = resnet.ResNet(10, **TINY, normalization=kind, norm_kwargs=kwargs)(
        x, is_training)
    return out["pool"]
  single = hk.transform_with_state(forward)
  sharded = hk.transform_with_state(lambda x, t: forward(x, t, "replica"))
  x = jax.random.normal(jax.random.key(0), (6, IMAGE, IMAGE, 3))
  params, state = single.init(jax.random.key(1), x, True)

  def both(params, state, x):
    one, one_state = single.apply(params, state, None, x, True)
    two, two_state = jax.vmap(
        lambda xs: sharded.apply(params, state, None, xs, True),
        axis_name="replica")(x.reshape(2, 3, *x.shape[1:]))
    return one, one_state, two.reshape(one.shape), two_state
  one, one_state, two, two_state = compiler.run_once(both, params, state, x)
  np.testing.assert_allclose(two, one, rtol=RTOL, atol=ATOL)
  # Both replicas hold the statistics of the whole batch.
  for a, b in zip(jax.tree.leaves(one_state), jax.tree.leaves(two_state)):
    np.testing.assert_allclose(b[0], a, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(b[1], a, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("bad", ["weightnorm", "BatchNorm", ""])
def test_unknown_normalization_is_refused_by_name(bad):
  allowed = ("allowed: 'batchnorm', 'running_batchnorm', 'layernorm', "
             "'instancenorm', 'groupnorm', 'none'")
  with pytest.raises(ValueError, match=f"normalization='{bad}'") as err:
    hk.transform(lambda: resnet.ResNet(10, normalization=bad)).init(None)
  assert allowed in str(err.value)
  with pytest.raises(ValueError, match=f"'{bad}'"):
    hk.transform(lambda: families.build_model(
        "ResNet", 10, normalization=bad)).init(None)
  with pytest.raises(ValueError, match=allowed):
    normalizers.make_norm(bad, {}, "bn0")


def test_every_normalizer_has_the_batchnorm_parameter_tree():
  """Per-channel scale and offset in the same slots (shaped [1, 1, 1, C] by
  the batch norms, [C] by Haiku's per-example norms); state only for the
  batch norms, the official batch norm's state names unchanged."""
  x = jnp.zeros((2, IMAGE, IMAGE, 3))
  trees = {}
  for kind in normalizers.NORMALIZATIONS:
    f = _network(kind)
    trees[kind] = jax.eval_shape(lambda x: f.init(jax.random.key(0), x, True),
                                 x)
  shapes = lambda tree: jax.tree.map(lambda a: a.shape, tree)
  sizes = lambda tree: jax.tree.map(lambda a: a.size, tree)
  bn_params, bn_state = trees["batchnorm"]
  assert shapes(trees["running_batchnorm"][0]) == shapes(bn_params)
  for kind, (params, state) in trees.items():
    if kind == "none":
      assert set(params) == {k for k in bn_params if "bn" not in k}
    else:
      assert sizes(params) == sizes(bn_params), kind
    assert bool(state) == (kind in normalizers.BATCH_DEPENDENT), kind
  assert set(bn_state["ResNet/~/final_bn/~/mean_ema"]) == {
      "average", "counter", "hidden"}
  assert set(trees["running_batchnorm"][1]["ResNet/~/final_bn"]) == {
      "sums", "sqrs", "count", "dbias", "step", "batch"}


@pytest.mark.parametrize("channels,groups,expected", [
    (64, 32, 32), (256, 32, 32), (16, 32, 16), (48, 32, 24), (4, 32, 4),
    (16, 2, 2), (6, 4, 3), (7, 32, 7), (1, 32, 1)])
def test_num_groups(channels, groups, expected):
  got = normalizers.num_groups(channels, groups)
  assert got == expected and channels % got == 0 and got <= groups


def test_group_norm_follows_channels():
  """One `groups` setting for every layer; 1 group is layer norm over
  (H, W, C), as many groups as channels is instance norm."""
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 6)) * jnp.arange(1, 7)
  def norms(x):
    return (normalizers.GroupNorm(1, create_scale=False,
                                  create_offset=False)(x),
            hk.LayerNorm((1, 2, 3), False, False)(x),
            normalizers.GroupNorm(32, create_scale=False,
                                  create_offset=False)(x),
            hk.InstanceNorm(False, False)(x))
  gn1, ln, gn_all, inorm = hk.transform(norms).apply({}, None, x)
  np.testing.assert_allclose(gn1, ln, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gn_all, inorm, rtol=1e-5, atol=1e-5)
