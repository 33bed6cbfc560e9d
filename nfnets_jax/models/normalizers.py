"""The activation normalizers of the baseline ResNet, and a running batch norm.

`make_norm(normalization, norm_kwargs, name)` builds one normalization layer
of `resnet.ResNet` and `apply_norm` applies it in float32. Every normalizer
but the running batch norm is Haiku's own module:

| normalization       | module               | statistics over (NHWC)        |
|---------------------|----------------------|-------------------------------|
| 'batchnorm'         | `hk.BatchNorm`       | N, H, W (the batch)           |
| 'running_batchnorm' | `RunningBatchNorm`   | N, H, W, running (see below)  |
| 'layernorm'         | `hk.LayerNorm`       | H, W, C (one example)         |
| 'instancenorm'      | `hk.InstanceNorm`    | H, W (one example, channel)   |
| 'groupnorm'         | `GroupNorm`          | H, W, C/G (one example, group)|
| 'none'              | no module            | -                             |

Each has a per-channel `scale` and `offset` (with the default
`create_scale=True, create_offset=True`), so every normalizer has the same
parameter names and sizes (the batch norms shape them [1, 1, 1, C] as
`hk.BatchNorm`, Haiku's per-example norms [C]); only 'batchnorm' and
'running_batchnorm' keep state.

In training mode the output for one example depends on the other examples of
its batch under 'batchnorm' and 'running_batchnorm' (the current batch enters
the running sums), and under no other normalizer; in evaluation mode (stored
statistics) under none.

References:
  [Ioffe, Szegedy 2015] Batch Normalization (ICML).
  [Ba, Kiros, Hinton 2016] Layer Normalization (arXiv:1607.06450).
  [Ulyanov, Vedaldi, Lempitsky 2016] Instance Normalization
    (arXiv:1607.08022).
  [Wu, He 2018] Group Normalization (ECCV): G = 32 groups by default.
  [fast.ai course-v3, lesson 10] `nbs/dl2/07_batchnorm.ipynb`, class
    `RunningBatchNorm`: the running batch norm's rule (see `RunningBatchNorm`).
"""
from __future__ import annotations

from collections.abc import Mapping
import math
from typing import Any, Literal, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp

Normalization = Literal["batchnorm", "running_batchnorm", "layernorm",
                        "instancenorm", "groupnorm", "none"]
NORMALIZATIONS: tuple[str, ...] = ("batchnorm", "running_batchnorm",
                                   "layernorm", "instancenorm", "groupnorm",
                                   "none")
# Those whose training-mode output for an example depends on its batch.
BATCH_DEPENDENT: frozenset[str] = frozenset({"batchnorm", "running_batchnorm"})
# Wu & He's default number of groups.
DEFAULT_GROUPS = 32
# Constructor arguments of each normalizer that `norm_kwargs` overrides.
# 'batchnorm' is the official baseline's `hk.BatchNorm` (decay 0.9).
DEFAULT_KWARGS: dict[str, dict[str, Any]] = {
    "batchnorm": {"create_scale": True, "create_offset": True,
                  "decay_rate": 0.9},
    "running_batchnorm": {"create_scale": True, "create_offset": True,
                          "momentum": 0.1},
    "layernorm": {"create_scale": True, "create_offset": True},
    "instancenorm": {"create_scale": True, "create_offset": True},
    "groupnorm": {"create_scale": True, "create_offset": True,
                  "groups": DEFAULT_GROUPS},
    "none": {},
}

Norm = Any  # One of the modules above, or None for 'none'.


def check_normalization(normalization: str) -> None:
  """Raises ValueError naming `normalization` and the allowed values."""
  if normalization not in NORMALIZATIONS:
    allowed = ", ".join(repr(n) for n in NORMALIZATIONS)
    raise ValueError(f"normalization={normalization!r} is unknown; allowed: "
                     f"{allowed}")


def num_groups(channels: int, groups: int = DEFAULT_GROUPS) -> int:
  """Groups of a group norm over `channels`: the largest divisor of
  `channels` that is at most `groups` (32 for 64+ channels that are a
  multiple of 32, as Wu & He; fewer for narrow layers, e.g. 16 for 16 or 48).
  """
  if channels < 1 or groups < 1:
    raise ValueError(f"channels={channels} and groups={groups} must be >= 1")
  return max(d for d in range(1, min(groups, channels) + 1)
             if channels % d == 0)


class GroupNorm(hk.GroupNorm):
  """`hk.GroupNorm` whose group count follows the input's channels.

  `groups` is the most groups a layer gets: a layer of C channels uses
  `num_groups(C, groups)`, so one setting serves every width of a network.
  """

  def __init__(self, groups: int = DEFAULT_GROUPS, **kwargs: Any):
    super().__init__(groups=groups, **kwargs)
    self.max_groups = groups

  def __call__(self, x: jax.Array, scale: jax.Array | None = None,
               offset: jax.Array | None = None) -> jax.Array:
    """Normalizes `x` [N, H, W, C] over (H, W, C / G) per example and group."""
    self.groups = num_groups(x.shape[-1], self.max_groups)
    return super().__call__(x, scale, offset)


class RunningStats(NamedTuple):
  """The state of a running batch norm (per channel unless scalar).

  Attributes:
    sums, sqrs: exponential moving averages of the per-batch sums of x and
      x^2 over (N, H, W), [C].
    count: the same average of the per-batch element count N * H * W.
    dbias: `1 - prod(1 - mom1)`: the weight the averages have gathered.
    step: training steps taken (int32).
    batch: examples seen (int32).
  """
  sums: jax.Array
  sqrs: jax.Array
  count: jax.Array
  dbias: jax.Array
  step: jax.Array
  batch: jax.Array


def running_momentum(batch_size: int | jax.Array, momentum: float
                     ) -> jax.Array:
  """The notebook's per-step weight `mom1 = 1 - (1 - mom) / sqrt(B - 1)`.

  Larger batches give their statistics more weight. The notebook's rule
  divides by zero at B = 1 (its batches are 2 or more); here `B - 1` is
  taken as at least 1, so B = 1 gets `momentum` like B = 2.
  """
  return 1.0 - (1.0 - momentum) / jnp.sqrt(
      jnp.maximum(jnp.asarray(batch_size, jnp.float32) - 1.0, 1.0))


def running_update(stats: RunningStats, sums: jax.Array, sqrs: jax.Array,
                   count: float | jax.Array, batch_size: int | jax.Array,
                   momentum: float) -> RunningStats:
  """One training step of the running statistics (the notebook's
  `update_stats`): `avg <- avg + mom1 (batch - avg)` for the sums, squares
  and count; `dbias <- dbias (1 - mom1) + mom1`.

  Args:
    stats: the state before the step.
    sums, sqrs: this batch's sums of x and x^2 over (N, H, W), [C].
    count: this batch's N * H * W.
    batch_size: this batch's N (sets `mom1`, `running_momentum`).
    momentum: the notebook's `mom` (0.1).
  """
  mom1 = running_momentum(batch_size, momentum)
  lerp = lambda old, new: old + mom1 * (new - old)
  return RunningStats(
      sums=lerp(stats.sums, sums), sqrs=lerp(stats.sqrs, sqrs),
      count=lerp(stats.count, count),
      dbias=stats.dbias * (1.0 - mom1) + mom1,
      step=stats.step + 1, batch=stats.batch + batch_size)


def running_moments(stats: RunningStats) -> tuple[jax.Array, jax.Array]:
  """Mean and variance [C] from running statistics (the notebook's `forward`).

  For the first 100 steps sums, squares and count are divided by `dbias`
  (debiased, as Adam's moments); they are divided alike, so the debias
  cancels in `sums / count` up to rounding. The variance is
  `sqrs / count - mean^2`, at least 0.01 until 20 examples have been seen.
  """
  debias = jnp.where(stats.step < 100, stats.dbias, 1.0)
  count = stats.count / debias
  mean = (stats.sums / debias) / count
  var = (stats.sqrs / debias) / count - mean * mean
  var = jnp.where(stats.batch < 20, jnp.maximum(var, 0.01), var)
  return mean, var


class RunningBatchNorm(hk.Module):
  """Batch norm that normalizes with running statistics in training too.

  The rule of `RunningBatchNorm` in the fast.ai course notebook
  `nbs/dl2/07_batchnorm.ipynb` (course-v3, part 2, lesson 10; read from
  github.com/fastai/course-v3 at commit 3b588bc4, the same in 75897130). Per
  channel, each training step folds the batch's sums of x and x^2 and its
  element count into exponential moving averages with weight
  `mom1 = 1 - (1 - mom) / sqrt(B - 1)` (`running_update`), then normalizes
  with the debiased running mean and variance (`running_moments`):

    y = (x - mean) / sqrt(var + eps) * scale + offset.

  Evaluation uses the stored statistics without updating them. Gradients
  flow through the current batch's share of the statistics (the notebook
  detaches only the previous averages), so in training mode an example's
  output still depends on its batch (and `mom1` on the batch size). The
  notebook's `mom` is `momentum` (0.1); `mults`/`adds` are
  `scale`/`offset`. Two additions: B = 1 takes `mom1 = momentum`
  (`running_momentum`), and `cross_replica_axis` sums the statistics over
  devices as `hk.BatchNorm` does.

  The notebook's debias divides sums, squares and count by the same number,
  so it cancels in the moments (noted on the fast.ai forum,
  forums.fast.ai/t/lesson-10-discussion-wiki-2019/42781/339): it is kept for
  fidelity.
  """

  def __init__(self, create_scale: bool = True, create_offset: bool = True,
               momentum: float = 0.1, eps: float = 1e-5,
               cross_replica_axis: str | None = None,
               name: str | None = None):
    """Builds the module.

    Args:
      create_scale, create_offset: learn a per-channel scale (init 1) and
        offset (init 0).
      momentum: the notebook's `mom`; `mom1` grows from it with the batch.
      eps: added to the variance.
      cross_replica_axis: a `pmap`/`vmap` axis name whose replicas share
        statistics (their batches count as one).
      name: module name.
    """
    super().__init__(name=name)
    if not 0.0 < momentum <= 1.0:
      raise ValueError(f"momentum={momentum!r}; allowed: 0 < momentum <= 1")
    self.create_scale = create_scale
    self.create_offset = create_offset
    self.momentum = momentum
    self.eps = eps
    self.cross_replica_axis = cross_replica_axis

  def _state(self, channels: int) -> RunningStats:
    f32, i32 = jnp.float32, jnp.int32
    get = lambda name, shape, dtype: hk.get_state(name, shape, dtype,
                                                  init=jnp.zeros)
    return RunningStats(
        sums=get("sums", (channels,), f32), sqrs=get("sqrs", (channels,), f32),
        count=get("count", (), f32), dbias=get("dbias", (), f32),
        step=get("step", (), i32), batch=get("batch", (), i32))

  def __call__(self, x: jax.Array, is_training: bool,
               test_local_stats: bool = False) -> jax.Array:
    """Normalizes x [N, ..., C] per channel.

    Args:
      x: channels-last input.
      is_training: fold this batch into the statistics and store them.
      test_local_stats: in evaluation, fold this batch into the statistics
        as training would, without storing them.
    """
    channels = x.shape[-1]
    stats = self._state(channels)
    if is_training or test_local_stats:
      axes = tuple(range(x.ndim - 1))
      sums, sqrs = jnp.sum(x, axes), jnp.sum(x * x, axes)
      count = math.prod(x.shape[:-1])
      batch_size = x.shape[0]
      if self.cross_replica_axis is not None:
        sums, sqrs = jax.lax.psum((sums, sqrs), self.cross_replica_axis)
        replicas = jax.lax.psum(1, self.cross_replica_axis)
        count, batch_size = count * replicas, batch_size * replicas
      stats = running_update(stats, sums, sqrs, count, batch_size,
                             self.momentum)
      if is_training:
        for name, value in stats._asdict().items():
          hk.set_state(name, value)
    mean, var = running_moments(stats)
    out = (x - mean) * jax.lax.rsqrt(var + self.eps)
    # Shaped as `hk.BatchNorm`'s, so the two trees match.
    shape = (1,) * (x.ndim - 1) + (channels,)
    if self.create_scale:
      out = out * hk.get_parameter("scale", shape, x.dtype, init=jnp.ones)
    if self.create_offset:
      out = out + hk.get_parameter("offset", shape, x.dtype, init=jnp.zeros)
    return out


def make_norm(normalization: Normalization, norm_kwargs: Mapping[str, Any],
              name: str) -> Norm | None:
  """One normalization layer named `name`, or None for 'none'.

  Args:
    normalization: a value of `NORMALIZATIONS`.
    norm_kwargs: the layer's constructor arguments, over
      `DEFAULT_KWARGS[normalization]` (e.g. `cross_replica_axis` for
      'batchnorm', `groups` for 'groupnorm').
    name: module name (the ResNet's slot: 'bn0', ..., 'final_bn').

  Raises:
    ValueError: unknown normalization.
  """
  check_normalization(normalization)
  kwargs = {**DEFAULT_KWARGS[normalization], **norm_kwargs}
  if normalization == "batchnorm":
    return hk.BatchNorm(name=name, **kwargs)
  if normalization == "running_batchnorm":
    return RunningBatchNorm(name=name, **kwargs)
  if normalization == "layernorm":
    # Statistics over (H, W, C) of each example; a scale and offset per
    # channel (as the other normalizers), not one per element.
    return hk.LayerNorm(axis=(1, 2, 3), param_axis=-1, name=name, **kwargs)
  if normalization == "instancenorm":
    return hk.InstanceNorm(name=name, **kwargs)
  if normalization == "groupnorm":
    return GroupNorm(name=name, **kwargs)
  return None


def apply_norm(norm: Norm | None, x: jax.Array, is_training: bool,
               test_local_stats: bool) -> jax.Array:
  """The layer computed in float32 (statistics and parameters), or identity.

  Under normalization 'none' no module exists, so the parameter tree is the
  normalized tree minus the norms. The per-example normalizers ignore the
  flags (they have no state).
  """
  if norm is None:
    return x
  x32 = x.astype(jnp.float32)
  if isinstance(norm, (hk.BatchNorm, RunningBatchNorm)):
    return norm(x32, is_training, test_local_stats).astype(x.dtype)
  return norm(x32).astype(x.dtype)
