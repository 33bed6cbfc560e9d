"""AGC's cost in a jitted NFNet train step: the same step with and without AGC.

Both steps run the paper's recipe (`nfnets_jax.optim.make_optimizer`: SGD,
Nesterov momentum 0.9, weight decay 2e-5, warmup + cosine) and differ only in
`agc.clipping` (0.01 vs None). Repetitions alternate between the two steps so
that machine noise hits both alike; the table reports medians. A third row
times the AGC transformation alone (jitted, on the model's gradients), which
is a steadier estimate of the overhead than the difference of two noisy steps.

Run (CPU, 2 cores: about 5 minutes, most of it compiling):

    python benchmarks/agc_overhead.py --variant F0 --batch 8 --image-size 192

Target: overhead <= 2% of the step.
"""

import argparse
import statistics
import time
from typing import Callable

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import optax

import nfnets_jax as nj
from nfnets_jax import agc
from nfnets_jax import optim


def recipe(clipping: float | None) -> ml_collections.ConfigDict:
  """The NFNet optimizer config, with AGC at `clipping` (None: off)."""
  return ml_collections.ConfigDict(dict(
      name="sgd", kwargs={"momentum": 0.9, "nesterov": True},
      weight_decay=2e-5, agc=dict(clipping=clipping, eps=1e-3),
      lr=dict(base_lr=0.1, base_batch_size=256, warmup_epochs=5.0,
              schedule="cosine", end_lr_factor=0.0),
      track_clip_stats=False))


def make_train_step(net: hk.TransformedWithState,
                    tx: optax.GradientTransformation) -> Callable:
  """A jitted train step donating params, model state and optimizer state."""
  def loss_fn(params, state, rng, images, labels):
    out, state = net.apply(params, state, rng, images, is_training=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(
        out["logits"], labels).mean()
    return loss, state

  def step(params, state, opt_state, rng, images, labels):
    grads, state = jax.grad(loss_fn, has_aux=True)(params, state, rng, images,
                                                   labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state

  return jax.jit(step, donate_argnums=(0, 1, 2))


def timed(fn: Callable, *args) -> tuple[float, object]:
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return time.perf_counter() - start, out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="F0")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--image-size", type=int, default=192)
  parser.add_argument("--reps", type=int, default=5,
                      help="timed steps per setting, interleaved")
  args = parser.parse_args()

  net = hk.transform_with_state(
      lambda x, is_training: nj.NFNet(num_classes=1000, variant=args.variant)(
          x, is_training=is_training))
  rng = jax.random.PRNGKey(0)
  images = jax.random.normal(rng, (args.batch, args.image_size,
                                   args.image_size, 3))
  labels = jnp.arange(args.batch) % 1000
  params, state = net.init(rng, images, is_training=True)
  n_params = sum(x.size for x in jax.tree.leaves(params))

  settings = {}
  for label, clipping in (("without AGC", None), ("with AGC", 0.01)):
    # A long schedule so the learning rate is non-zero from the second step.
    tx, _ = optim.make_optimizer(recipe(clipping), batch_size=args.batch,
                                 steps_per_epoch=1000, total_epochs=100,
                                 params=params)
    p, s = jax.tree.map(jnp.copy, (params, state))
    settings[label] = dict(step=make_train_step(net, tx),
                           carry=(p, s, tx.init(p)), times=[])

  print(f"NFNet-{args.variant}, {n_params:,} params, batch {args.batch}, "
        f"{args.image_size}px, {jax.devices()[0].platform}, "
        f"{jax.device_count()} device(s)")
  for label, st in settings.items():
    compile_s, st["carry"] = timed(st["step"], *st["carry"], rng, images,
                                   labels)
    print(f"  compile + first step {label}: {compile_s:.1f} s", flush=True)

  for rep in range(args.reps):
    # Alternate the order so neither setting always runs first.
    order = list(settings) if rep % 2 == 0 else list(settings)[::-1]
    for label in order:
      st = settings[label]
      step_rng = jax.random.fold_in(rng, rep)
      dt, st["carry"] = timed(st["step"], *st["carry"], step_rng, images,
                              labels)
      st["times"].append(dt)
    print(f"  rep {rep}: " + ", ".join(
        f"{k} {v['times'][-1]:.2f} s" for k, v in settings.items()),
          flush=True)

  # AGC alone, on gradients of the model's shape and the recipe's mask.
  grads = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params)
  clip = optax.masked(agc.adaptive_grad_clip(0.01), optim.agc_mask(params))
  clip_fn = jax.jit(lambda g, p: clip.update(g, clip.init(p), p)[0])
  timed(clip_fn, grads, params)
  agc_times = [timed(clip_fn, grads, params)[0] for _ in range(args.reps)]

  rows = [(label, st["times"]) for label, st in settings.items()]
  rows.append(("AGC transformation alone", agc_times))
  base_med, base_min = statistics.median(rows[0][1]), min(rows[0][1])
  print()
  print(f"| {'median / min of ' + str(args.reps):<26} | {'median':>9} | "
        f"{'overhead':>8} | {'min':>9} | {'overhead':>8} |")
  print(f"|{'-' * 28}|{'-' * 11}|{'-' * 10}|{'-' * 11}|{'-' * 10}|")
  for i, (label, times) in enumerate(rows):
    med, low = statistics.median(times), min(times)
    if i == 0:
      over_med = over_min = ""
    elif i == 1:
      over_med = f"{100 * (med - base_med) / base_med:+.2f}%"
      over_min = f"{100 * (low - base_min) / base_min:+.2f}%"
    else:  # the transformation's own time as a share of the step
      over_med = f"{100 * med / base_med:+.2f}%"
      over_min = f"{100 * low / base_min:+.2f}%"
    print(f"| {label:<26} | {med * 1e3:>6.0f} ms | {over_med:>8} | "
          f"{low * 1e3:>6.0f} ms | {over_min:>8} |")
  spread = (max(rows[0][1]) - base_min) / base_med
  print(f"\nStep-to-step spread without AGC: {100 * spread:.1f}% of the "
        "median; a step-time difference below it is noise, and the AGC-alone "
        "row is then the better estimate.")


if __name__ == "__main__":
  main()
