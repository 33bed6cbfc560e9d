"""The typed training state and the data-parallel train step.

`train_step(state, batch)` is a `jax.pmap` over the local devices that
donates its state: every device holds a replica of the state and a slice of
the global batch; gradients, model state and metrics are averaged with
`lax.pmean` across all devices of all hosts (pmap's collectives span hosts),
so the update equals the single-device update on the whole global batch.
It is compiled with the package's CPU compiler options (`cpu.compiler`).

Randomness: the state's `rng` is split once from the seed and never advanced;
step `t` uses `fold_in(rng, t)` and device `d` then `fold_in(., d)`, so no
key is used twice and a resumed run replays the same keys.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
import functools
from typing import Any, NamedTuple

import haiku as hk
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

from nfnets_jax.cpu import compiler
from nfnets_jax.data import device_augment
from nfnets_jax.experiment import losses
from nfnets_jax.experiment import parallel
from nfnets_jax.models import stats
from nfnets_jax.optim import optimizers

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


class TrainState(NamedTuple):
  """Everything a resumed run needs, besides the data position.

  Attributes:
    params: model parameters (float32).
    model_state: Haiku state (e.g. BatchNorm statistics of baselines; empty
      for normalizer-free models).
    opt_state: optax state.
    ema_params: exponential moving average of `params` (None: no EMA).
    ema_model_state: moving average of `model_state` (None: no EMA).
    step: int32 scalar, updates applied so far.
    rng: uint32 `[2]` base key; per-step keys are folded from it.
  """
  params: hk.Params
  model_state: hk.State
  opt_state: optax.OptState
  ema_params: hk.Params | None
  ema_model_state: hk.State | None
  step: Any
  rng: Any


def _assemble(tx: optax.GradientTransformation, params: hk.Params,
              model_state: hk.State, use_ema: bool, rng: jax.Array
              ) -> TrainState:
  return TrainState(
      params=params, model_state=model_state, opt_state=tx.init(params),
      ema_params=params if use_ema else None,
      ema_model_state=model_state if use_ema else None,
      step=jnp.zeros((), jnp.int32), rng=rng)


def _keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """`(init key, train key)`, both split from the run's one seed."""
  init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
  return init_key, train_key


def init_train_state(net: hk.TransformedWithState,
                     tx: optax.GradientTransformation, *, seed: int,
                     image_size: int, use_ema: bool,
                     params: hk.Params | None = None,
                     model_state: hk.State | None = None) -> TrainState:
  """Initializes the state on the host (NumPy leaves, not replicated).

  Args:
    net: from `models.families.make_network`.
    tx: the optimizer.
    seed: the run's one seed; init and training keys are split from it.
    image_size: training resolution (parameter shapes may depend on it).
    use_ema: whether to keep an EMA copy of params and model state.
    params, model_state: start from these (fine-tuning) instead of a fresh
      initialization.
  """
  init_key, train_key = _keys(seed)
  if params is None:
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    params, fresh_state = compiler.run_once(
        lambda k, x: net.init(k, x, is_training=True), init_key, images)
    model_state = fresh_state if model_state is None else model_state
  model_state = {} if model_state is None else model_state
  state = compiler.run_once(
      lambda p, s, k: _assemble(tx, p, s, use_ema, k), params, model_state,
      train_key)
  return jax.tree.map(np.asarray, jax.device_get(state))


def train_state_template(net: hk.TransformedWithState,
                         tx: optax.GradientTransformation, *,
                         image_size: int, use_ema: bool) -> TrainState:
  """The shapes and dtypes of `init_train_state`'s state, nothing computed.

  `jax.ShapeDtypeStruct` leaves (traced with `jax.eval_shape`: no weights
  read, no initializer run), the template a checkpoint restores into.
  """
  params, model_state = stats.init_shapes(net, image_size)
  _, train_key = jax.eval_shape(_keys, 0)
  return jax.eval_shape(
      lambda p, s, k: _assemble(tx, p, s, use_ema, k), params, model_state,
      train_key)


def ema_decay_at(decay: float, step: jax.Array, warmup: bool) -> jax.Array:
  """The official `tf1_ema` decay: `min(decay, (1 + t) / (10 + t))`."""
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def _ema(old: Any, new: Any, decay: jax.Array) -> Any:
  def update(o, n):
    if not jnp.issubdtype(o.dtype, jnp.floating):
      return n
    return (o * decay + n * (1.0 - decay)).astype(o.dtype)
  return jax.tree.map(update, old, new)


def _pmean_floats(tree: Any) -> Any:
  return jax.tree.map(
      lambda x: lax.pmean(x, parallel.AXIS)
      if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def device_augmentation(train_config: Any) -> Callable[[Batch], Batch] | None:
  """`data.device_augment.augment` with `config.train.augment`'s settings
  when `augment.on_device`, else None (the host made the batch)."""
  a = train_config.augment
  if not a.get("on_device", False):
    return None
  return functools.partial(
      device_augment.augment, num_layers=int(a.randaugment_layers),
      magnitude=float(a.randaugment_magnitude),
      mode=str(a.randaugment_mode))


def make_train_step(
    net: hk.TransformedWithState, tx: optax.GradientTransformation,
    schedule: optax.Schedule, train_config: Any, *,
    clip_stats: Callable[[optax.OptState], Metrics] | None = None,
    sam_perturbation: str | None = None,
    fast_compile: bool = False,
    augment: Callable[[Batch], Batch] | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """Builds the pmapped `train_step(state, batch) -> (state, metrics)`.

  The batch is laid out `[local_devices, per_device_batch, ...]` with
  `images` float32, `labels` int32 and `soft_labels` float32 (mixed one-hot).
  The state is donated. An update whose loss or gradient is not finite is
  not applied (the state comes back unchanged) and `metrics['finite']` is
  False, so the caller can stop with the last good state.

  Args:
    net: from `models.families.make_network`.
    tx: the optimizer (its `update` receives the params, for AGC).
    schedule: learning rate as a function of the step (for logging).
    train_config: `config.train` (`accumulation_steps` micro-batches per
      device and step, their gradients averaged before one update).
    clip_stats: optional `opt_state -> metrics` (AGC clip statistics).
    sam_perturbation: for a SAM optimizer (`optimizers.with_sam`), the
      gradient its ascent step takes: `optimizers.PER_DEVICE` (each device's
      own, the SAM paper's m-sharpness) or `optimizers.GLOBAL` (the mean
      over devices). The gradient at the perturbed weights is computed on
      the same images with the same random key and averaged over devices
      before the outer update. None: `tx` is not SAM.
    fast_compile: compile without LLVM's expensive passes (a run of a few
      steps, where compiling dominates; `cpu.compiler.FAST_OPTIONS`).
    augment: the first thing the step does to each device's batch
      (`device_augmentation`); None: the batch is ready.
  """
  compute_dtype = jnp.dtype(train_config.compute_dtype)
  smoothing = float(train_config.label_smoothing)
  loss_kind = train_config.loss
  ema_decay = train_config.ema_decay
  ema_warmup = bool(train_config.ema_warmup)
  accumulation = int(train_config.accumulation_steps)

  def loss_fn(params, model_state, batch, key):
    images = batch["images"].astype(compute_dtype)
    outputs, model_state = net.apply(params, model_state, key, images,
                                     is_training=True)
    logits = outputs["logits"].astype(jnp.float32)
    targets = losses.smooth_labels(batch["soft_labels"], smoothing)
    loss = jnp.mean(losses.cross_entropy(logits, targets, loss_kind))
    return loss, (logits, model_state)

  def loss_and_grads(params, model_state, batch, key):
    """`((loss, (logits, model_state)), grads)` of this device's batch.

    With accumulation, the batch is split into `accumulation` micro-batches
    (consecutive examples) run one after another (`lax.scan`: one
    micro-batch's activations in memory at a time); loss and gradients are
    their means, the model state (batch-norm statistics) is carried from
    one to the next, each micro-batch draws its own random key.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accumulation == 1:
      return grad_fn(params, model_state, batch, key)
    micro = jax.tree.map(
        lambda x: x.reshape((accumulation, x.shape[0] // accumulation)
                            + x.shape[1:]), batch)

    def one(carry, xs):
      model_state, grad_sum, loss_sum = carry
      micro_batch, index = xs
      (loss, (logits, model_state)), grads = grad_fn(
          params, model_state, micro_batch, jax.random.fold_in(key, index))
      grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
      return (model_state, grad_sum, loss_sum + loss), logits

    zeros = jax.tree.map(jnp.zeros_like, params)
    (model_state, grad_sum, loss_sum), logits = lax.scan(
        one, (model_state, zeros, jnp.zeros((), jnp.float32)),
        (micro, jnp.arange(accumulation)))
    grads = jax.tree.map(lambda g: g / accumulation, grad_sum)
    logits = logits.reshape((-1,) + logits.shape[2:])
    return (loss_sum / accumulation, (logits, model_state)), grads

  def train_step(state: TrainState, batch: Batch
                 ) -> tuple[TrainState, Metrics]:
    if augment is not None:
      batch = augment(batch)
    step_key = jax.random.fold_in(state.rng, state.step)
    key = jax.random.fold_in(step_key, lax.axis_index(parallel.AXIS))
    (loss, (logits, model_state)), local_grads = loss_and_grads(
        state.params, state.model_state, batch, key)
    grads = lax.pmean(local_grads, parallel.AXIS)
    tx_grads, extra = grads, {}
    if sam_perturbation is not None:
      def perturbed_grads(params, _):
        _, g = loss_and_grads(params, state.model_state, batch, key)
        return lax.pmean(g, parallel.AXIS)
      extra["grad_fn"] = perturbed_grads
      if sam_perturbation == optimizers.PER_DEVICE:
        tx_grads = local_grads  # The ascent's; the update's is averaged.
    model_state = _pmean_floats(model_state)
    updates, opt_state = tx.update(tx_grads, state.opt_state, state.params,
                                   **extra)
    params = optax.apply_updates(state.params, updates)
    ema_params, ema_model_state = state.ema_params, state.ema_model_state
    if ema_decay is not None:
      decay = ema_decay_at(ema_decay, state.step, ema_warmup)
      ema_params = _ema(ema_params, params, decay)
      ema_model_state = _ema(ema_model_state, model_state, decay)

    correct = losses.topk_correct(logits, batch["labels"])
    metrics = {"loss": loss, **{k: jnp.mean(v) for k, v in correct.items()}}
    metrics = lax.pmean(metrics, parallel.AXIS)
    metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    metrics["grad_norm"] = optax.tree.norm(grads)
    if clip_stats is not None:
      metrics.update(clip_stats(opt_state))
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    if sam_perturbation is not None:  # The perturbed gradient's too.
      finite &= jnp.isfinite(optax.tree.norm(updates))
    metrics["finite"] = finite

    new_state = TrainState(params=params, model_state=model_state,
                           opt_state=opt_state, ema_params=ema_params,
                           ema_model_state=ema_model_state,
                           step=state.step + 1, rng=state.rng)
    new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o),
                             new_state, state)
    return new_state, metrics

  return compiler.Compiled(
      jax.pmap(train_step, axis_name=parallel.AXIS, donate_argnums=0),
      fast=fast_compile)
