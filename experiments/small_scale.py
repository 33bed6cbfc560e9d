"""Small training runs on the embedded digits, for the AGC experiments.

Shared by `experiments.agc_batch_size` and `experiments.clipping_threshold`.
Everything is the library's: the config schema and its validation (step
counts, and the optimizer `optimizers.make_optimizer`: SGD + Nesterov, weight
decay, warmup + cosine schedule, lr = base_lr x batch / 256), the network
(`families.make_network`), `train_state` (state, the pmapped train step that
refuses non-finite updates), `evaluation`, `agc.adaptive_grad_clip` with
`optimizers.agc_mask`, the NaN debug hook `loop.poisoned`, and the digits of
`nfnets_jax.data`. What this module adds:

- **Traced hyperparameters.** The clipping threshold lambda and a learning
  rate multiplier live in the optimizer state (`optax.inject_hyperparams`),
  so one compiled train step per (model, batch size) serves every lambda
  and learning rate: XLA:CPU compiles take ~10 s, a run a few seconds. The
  chain is `masked(AGC(lambda), agc_mask)` -> `make_optimizer` without AGC
  -> `scale(lr multiplier)`, which equals `make_optimizer` with AGC at
  `lambda` and `base_lr * multiplier` (tested); lambda = inf is no clipping.
- **Quick compiles.** Steps are traced with one XLA convolution per
  convolution (`nfnets_jax.conv_impl(CONV_IMPL)`), which compiles fastest
  for these small networks, whatever `$NFNETS_JAX_CONV` says.
- **In-memory data.** The digits go through the library's pipeline once
  (`data.load`, evaluation mode: without augmentation, train and eval
  preprocessing are the same) and batches are drawn by the pipeline's own
  epoch-spanning shuffler (`pipeline.ExampleBatches`), seeded per run: the
  grain pipeline re-preprocesses every example per batch, slower than the
  train step of these small networks.
- **Divergence is reported, not hidden.** The library's step keeps the old
  state when a loss or gradient is non-finite; carrying on from there would
  skip the bad steps. A run stops at its first non-finite step (as
  `loop.train_loop` does) and is reported as diverged (accuracy NaN).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
import dataclasses
import functools
import math
import os
import time
from typing import Any

import haiku as hk
import jax
import ml_collections
import numpy as np
import optax

import nfnets_jax
from nfnets_jax import data
from nfnets_jax.data import pipeline
from nfnets_jax.experiment import config_schema
from nfnets_jax.experiment import config_validation
from nfnets_jax.experiment import evaluation
from nfnets_jax.experiment import loop
from nfnets_jax.experiment import parallel
from nfnets_jax.experiment import train_state as ts
from nfnets_jax.models import families
from nfnets_jax.models import stats
from nfnets_jax.optim import agc
from nfnets_jax.optim import optimizers

NO_CLIPPING = math.inf  # lambda = inf: AGC leaves every finite gradient as is.
NUM_CLASSES = 10
# The convolution lowering the steps are traced with (see the module doc).
CONV_IMPL = "native"


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What every run of an experiment shares.

  Attributes:
    model: a key of `nfnets_jax.models.MODELS`.
    model_kwargs: its constructor arguments.
    image_size: train and test resolution (digits are 8x8, upsampled).
    epochs: training epochs (steps: `1437 * epochs // batch`, as the loop).
    warmup_epochs: linear warmup, then cosine decay to zero.
    base_lr: learning rate at `base_batch_size` (scaled linearly).
    base_batch_size: see `base_lr` (the paper: 0.1 at 256).
    momentum: SGD Nesterov momentum.
    weight_decay: not on gains and biases (`optimizers.weight_decay_mask`).
    agc_eps: AGC's lower bound on parameter norms.
    fast_compile: compile without LLVM's expensive passes
      (`nfnets_jax.cpu.compiler.FAST_OPTIONS`; quick runs: ~2x faster
      compiles, ~5-10x slower steps).
  """
  model: str
  model_kwargs: Mapping[str, Any]
  image_size: int = 16
  epochs: float = 20.0
  warmup_epochs: float = 1.0
  base_lr: float = 0.1
  base_batch_size: int = 256
  momentum: float = 0.9
  weight_decay: float = 2e-5
  agc_eps: float = 1e-3
  fast_compile: bool = False


def make_config(recipe: Recipe, batch_size: int, *, seed: int = 0,
                clipping: float = 0.0) -> ml_collections.ConfigDict:
  """The experiment config (`config_schema`) of one run of `recipe`.

  `clipping` is AGC's threshold as `make_optimizer` reads it (0: off); the
  runs here leave it off and take it from the optimizer state instead (see
  `make_tx`).
  """
  config = config_schema.base_config()
  config.seed = seed
  config.workdir = "unused"  # Nothing is written; validation wants one.
  config.model.name = recipe.model
  config.model.kwargs = dict(recipe.model_kwargs)
  config.dataset.name = data.DIGITS
  config.train.global_batch_size = batch_size
  config.train.num_epochs = float(recipe.epochs)
  config.train.image_size = recipe.image_size
  config.eval.image_size = recipe.image_size
  config.eval.crop_padding = 0  # The digits touch the border.
  config.eval.batch_size = 360
  o = config.optimizer
  o.name = "sgd"
  o.kwargs = {"momentum": recipe.momentum, "nesterov": True}
  o.weight_decay = recipe.weight_decay
  o.agc.clipping = clipping
  o.agc.eps = recipe.agc_eps
  o.lr.base_lr = recipe.base_lr
  o.lr.base_batch_size = recipe.base_batch_size
  o.lr.warmup_epochs = recipe.warmup_epochs
  o.lr.schedule = "cosine"
  o.lr.end_lr_factor = 0.0
  return config


def make_tx(base: optax.GradientTransformation, params: hk.Params, *,
            clipping: float, eps: float, lr_scale: float
            ) -> optax.GradientTransformation:
  """An optimizer with AGC's threshold and an lr multiplier in its state.

  Args:
    base: the config's optimizer without AGC (`validate(config).tx` of a
      `make_config` config with `clipping=0`).
    params: the network's parameters (for `optimizers.agc_mask`).
    clipping: AGC threshold lambda; `NO_CLIPPING` (inf) for none.
    eps: AGC's lower bound on parameter norms.
    lr_scale: the learning rate is `lr_scale` times `base`'s.

  Returns:
    `masked(AGC(clipping, eps), agc_mask) -> base -> scale(lr_scale)`.
  """
  clip = optax.inject_hyperparams(agc.adaptive_grad_clip)(clipping=clipping,
                                                          eps=eps)
  scale = optax.inject_hyperparams(optax.scale)(step_size=lr_scale)
  return optax.chain(optax.masked(clip, optimizers.agc_mask(params)), base,
                     scale)


@functools.lru_cache(maxsize=4)
def digits_arrays(image_size: int) -> dict[str, dict[str, np.ndarray]]:
  """Train and test digits, preprocessed by the library's pipeline, in order.

  Returns:
    `{'train': {'images', 'labels', 'soft_labels', 'mask'}, 'test': ...}`,
    NumPy arrays of all 1,437 / 360 examples.
  """
  out = {}
  for name, split in (("train", data.Split.TRAIN), ("test", data.Split.TEST)):
    n = split.num_examples(data.DIGITS)
    it = data.load(split, dataset=data.DIGITS, batch_size=n,
                   image_size=image_size, is_training=False, seed=0,
                   eval_crop_padding=0)
    out[name] = {k: np.asarray(v) for k, v in next(it).items()}
  return out


def train_batches(arrays: Mapping[str, np.ndarray], batch_size: int,
                  num_steps: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
  """`num_steps` batches of a stream reshuffled every epoch (seeded).

  The pipeline's `ExampleBatches` over example indices: batch `b` holds
  stream positions `[b B, (b + 1) B)`, across epoch boundaries.
  """
  n = len(arrays["labels"])
  index_batches = pipeline.ExampleBatches(np.arange(n), batch_size, num_steps,
                                          shuffle_seed=seed)
  for b in range(num_steps):
    idx = np.asarray(index_batches[b])
    yield {k: arrays[k][idx] for k in ("images", "labels", "soft_labels")}


class Setup:
  """One recipe: its network, data, initial parameters and eval step.

  Parameters depend on the seed only, the compiled evaluation on the network
  only, so both are shared by the `Trainer`s of every batch size.
  """

  def __init__(self, recipe: Recipe):
    self.recipe = recipe
    config = make_config(recipe, recipe.base_batch_size)
    self.net = families.make_network(config.model.name, config.model.kwargs,
                                     NUM_CLASSES)
    self.loss = config.train.loss
    self.mesh = parallel.local_mesh()
    self.arrays = digits_arrays(recipe.image_size)
    self._states: dict[int, ts.TrainState] = {}
    self._eval_step = None
    self._params_shape = None
    self.compile_seconds = 0.0

  def params_shape(self) -> Any:
    """The parameter tree as `jax.ShapeDtypeStruct`s (nothing computed)."""
    if self._params_shape is None:
      self._params_shape, _ = stats.init_shapes(self.net,
                                                self.recipe.image_size)
    return self._params_shape

  def init_state(self, seed: int) -> ts.TrainState:
    """`ts.init_train_state(seed)` (host, cached per seed; no EMA).

    Its optimizer state is empty: each run puts in its own (`Trainer`).
    """
    if seed not in self._states:
      with nfnets_jax.conv_impl(CONV_IMPL):
        self._states[seed] = ts.init_train_state(
            self.net, optax.identity(), seed=seed,
            image_size=self.recipe.image_size, use_ema=False)
    return self._states[seed]

  def evaluate(self, state: ts.TrainState) -> dict[str, float]:
    """Top-1 and loss on the 360 test digits (state replicated)."""
    if self._eval_step is None:
      start = time.time()
      eval_step = evaluation.make_eval_step(
          self.net, self.loss, fast_compile=self.recipe.fast_compile)
      test = parallel.shard(self.arrays["test"], self.mesh)
      with nfnets_jax.conv_impl(CONV_IMPL):
        self._eval_step = eval_step.compile(state.params, state.model_state,
                                            test)
      self.compile_seconds += time.time() - start
    return evaluation.evaluate(self._eval_step, state.params,
                               state.model_state, [self.arrays["test"]],
                               self.mesh)


class Trainer:
  """The compiled train step of one (recipe, batch size); runs any seed,
  lambda and learning rate multiplier.

  Attributes:
    config: the `make_config` config (seed 0, AGC off: the run's seed,
      lambda and lr multiplier are arguments of `run`).
    plan: its `config_validation.validate` (step counts, optimizer).
    spec: `plan.spec`.
  """

  def __init__(self, setup: Setup, batch_size: int):
    self.setup = setup
    self.recipe = setup.recipe
    self.batch_size = batch_size
    self.config = make_config(self.recipe, batch_size)
    self.plan = config_validation.validate(self.config, check_model=False)
    self.spec = self.plan.spec
    self._train_step = None

  def initial_state(self, seed: int, *, clipping: float, lr_scale: float
                    ) -> tuple[ts.TrainState, optax.Schedule]:
    """The seed's initial state, its optimizer state for lambda and lr."""
    state = self.setup.init_state(seed)
    tx = self._tx(clipping, lr_scale)
    # Op by op: a jitted init would compile again for every new value.
    opt_state = jax.tree.map(np.asarray, tx.init(state.params))
    return state._replace(opt_state=opt_state), self.plan.schedule

  def _tx(self, clipping: float, lr_scale: float
          ) -> optax.GradientTransformation:
    return make_tx(self.plan.tx, self.setup.params_shape(), clipping=clipping,
                   eps=self.recipe.agc_eps, lr_scale=lr_scale)

  def compiled_step(self, state: Any, batch: Any) -> Any:
    """The compiled train step for `state` and `batch`'s shapes (compiled on
    first use, then reused): `(state, batch) -> (state, metrics)`."""
    if self._train_step is None:
      start = time.time()
      # The hyperparameters are read from the state: any template values.
      # The schedule only feeds the step's `learning_rate` metric (unused).
      step = ts.make_train_step(
          self.setup.net, self._tx(NO_CLIPPING, 1.0), self.plan.schedule,
          self.config.train, fast_compile=self.recipe.fast_compile)
      with nfnets_jax.conv_impl(CONV_IMPL):
        self._train_step = step.compile(state, batch)
      self.setup.compile_seconds += time.time() - start
    return self._train_step

  def run(self, *, seed: int, clipping: float, lr_scale: float = 1.0,
          nan_at_step: int | None = None) -> dict[str, Any]:
    """Trains one run from scratch and evaluates it on the 360 test digits.

    Args:
      seed: initialization and data order.
      clipping: AGC threshold lambda (`NO_CLIPPING`: no AGC).
      lr_scale: multiplier of the recipe's learning rate.
      nan_at_step: debug hook (as `config.train.debug_nan_at_step`): the
        images of this 1-based step become NaN, so its loss does.

    Returns:
      A dict: `test_top1`, `test_loss` (NaN if diverged), `train_loss`
      (mean over the last epoch's steps before any divergence),
      `diverged_step` (first non-finite step, 1-based, or None), `steps`,
      `peak_lr`, `seconds` (compilation excluded).
    """
    host_state, _ = self.initial_state(seed, clipping=clipping,
                                       lr_scale=lr_scale)
    mesh = self.setup.mesh
    state = parallel.replicate(host_state, mesh)
    total = self.spec.total_steps
    # `(batch, position)` pairs, as the library's loop streams them.
    batches = ((b, None) for b in train_batches(
        self.setup.arrays["train"], self.batch_size, total, seed))
    if nan_at_step is not None:
      batches = loop.poisoned(batches, 0, nan_at_step)
    device_batches = parallel.prefetch_to_device(batches, mesh)
    batch, _ = next(device_batches)
    train_step = self.compiled_step(state, batch)
    compile_before = self.setup.compile_seconds
    start = time.time()
    losses, diverged, pending, t = [], None, None, 0
    while batch is not None:
      t += 1
      state, metrics = train_step(state, batch)
      batch = next(device_batches, (None, None))[0]
      # Read step t - 1 while step t runs.
      if pending is not None:
        diverged = _check(pending, losses)
        if diverged is not None:
          break
      pending = (t, metrics)
    if diverged is None and pending is not None:
      diverged = _check(pending, losses)
    n = len(self.setup.arrays["train"]["labels"])
    per_epoch = max(1, math.ceil(n / self.batch_size))
    result = {
        "train_loss": (float(np.mean(losses[-per_epoch:])) if losses
                       else math.nan),
        "diverged_step": diverged, "steps": total,
        "peak_lr": peak_lr(self.recipe, self.batch_size, lr_scale),
    }
    if diverged is None:
      metrics = self.setup.evaluate(state)
      result.update(test_top1=metrics["top1"], test_loss=metrics["loss"])
    else:
      result.update(test_top1=math.nan, test_loss=math.nan)
    result["seconds"] = (time.time() - start
                         - (self.setup.compile_seconds - compile_before))
    return result


def _check(pending: tuple[int, Mapping[str, jax.Array]],
           losses: list[float]) -> int | None:
  """Appends the step's loss; returns the step if it was not finite."""
  step, metrics = pending
  host = parallel.unreplicate({k: metrics[k] for k in ("loss", "finite")})
  if not bool(host["finite"]):
    return step
  losses.append(float(host["loss"]))
  return None


def peak_lr(recipe: Recipe, batch_size: int, lr_scale: float) -> float:
  """`lr_scale * base_lr * batch / base_batch_size` (the schedule's peak)."""
  return lr_scale * recipe.base_lr * batch_size / recipe.base_batch_size


def summarize(values: Sequence[float]) -> dict[str, Any]:
  """Seeds of one cell: `mean` (NaN if any run diverged, so a cell with a
  diverged run never ranks first), and over the finite runs `finite_mean`,
  `min`, `max`; `n` runs, `diverged` of them NaN."""
  finite = [v for v in values if not math.isnan(v)]
  stat = lambda f: float(f(finite)) if finite else math.nan
  return {
      "mean": float(np.mean(values)) if len(finite) == len(values)
              else math.nan,
      "finite_mean": stat(np.mean), "min": stat(np.min), "max": stat(np.max),
      "n": len(values), "diverged": len(values) - len(finite),
  }


def fmt_acc_cell(s: Mapping[str, Any]) -> str:
  """A Markdown cell: mean top-1 in % [min, max over seeds], or NaN with
  the number of diverged seeds (and the other seeds' mean)."""
  if s["diverged"] == s["n"]:
    return f"NaN ({s['n']}/{s['n']} diverged)"
  if s["diverged"]:
    return (f"NaN ({s['diverged']}/{s['n']} diverged; others "
            f"{100 * s['finite_mean']:.1f})")
  cell = f"{100 * s['mean']:.1f}"
  if s["n"] > 1:
    cell += f" [{100 * s['min']:.1f}, {100 * s['max']:.1f}]"
  return cell


def devices_description() -> str:
  """What the runs ran on, for the results' runtime line."""
  return (f"{jax.device_count()} {jax.default_backend().upper()} device(s), "
          f"{os.cpu_count()} cores")
