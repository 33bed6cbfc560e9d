"""AGC's cost in a jitted NFNet train step: the same step with and without AGC.

Both steps run the paper's recipe (`nfnets_jax.optim.make_optimizer`: SGD,
Nesterov momentum 0.9, weight decay 2e-5, warmup + cosine) and differ only in
`agc.clipping` (0.01 vs None). Repetitions alternate between the two steps so
that machine noise hits both alike; the table reports medians. Further rows
time the jitted optimizer update alone (AGC, weight decay, momentum, apply)
with and without AGC over many cheap interleaved repetitions: their
difference, as a share of the step, is a steadier estimate of AGC's overhead
than the difference of two noisy 10-second steps.

Run (CPU, 2 cores: about 6 minutes, half of it compiling):

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
from nfnets_jax.optim import optimizers as optim


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

  return nj.cpu.jit(step, donate_argnums=(0, 1, 2))


def timed(fn: Callable, *args) -> tuple[float, object]:
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return time.perf_counter() - start, out


def interleaved(fns: dict[str, Callable[[], None]], reps: int
                ) -> dict[str, list[float]]:
  """Seconds per call of each fn, alternating their order every repetition."""
  times = {label: [] for label in fns}
  for rep in range(reps):
    for label in list(fns)[::1 if rep % 2 == 0 else -1]:
      start = time.perf_counter()
      fns[label]()
      times[label].append(time.perf_counter() - start)
  return times


def time_train_steps(net, params, state, images, labels, txs, reps):
  """Per-step seconds of the jitted train step for each optimizer in txs."""
  rng = jax.random.PRNGKey(1)
  carries, calls = {}, {}
  for label, tx in txs.items():
    step = make_train_step(net, tx)
    p, s = jax.tree.map(jnp.copy, (params, state))
    compile_s, carries[label] = timed(step, p, s, tx.init(p), rng, images,
                                      labels)
    print(f"  compile + first step {label}: {compile_s:.1f} s", flush=True)

    def call(label=label, step=step):
      carries[label] = jax.block_until_ready(
          step(*carries[label], rng, images, labels))
    calls[label] = call
  return interleaved(calls, reps)


def time_updates(params, txs, reps):
  """Per-call seconds of the jitted optimizer update alone (+ apply)."""
  grads = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params)
  calls = {}
  for label, tx in txs.items():
    fn = jax.jit(lambda g, s, p, tx=tx: optax.apply_updates(
        p, tx.update(g, s, p)[0]))
    opt_state = tx.init(params)
    timed(fn, grads, opt_state, params)
    calls[label] = (lambda fn=fn, opt_state=opt_state: jax.block_until_ready(
        fn(grads, opt_state, params)))
  return interleaved(calls, reps)


def print_table(steps, updates) -> None:
  """Medians and minima; overheads relative to the step without AGC."""
  base_med = statistics.median(steps["without AGC"])
  base_min = min(steps["without AGC"])
  diff = [w - wo for w, wo in zip(updates["with AGC"],
                                  updates["without AGC"])]
  rows = [
      ("train step, no AGC", steps["without AGC"], None),
      ("train step, AGC", steps["with AGC"], "step"),
      ("optimizer update, no AGC", updates["without AGC"], None),
      ("optimizer update, AGC", updates["with AGC"], None),
      ("AGC in the update (diff.)", diff, "share"),
  ]
  print(f"\n| {'':<26} | {'median':>11} | {'overhead':>8} | {'min':>11} | "
        f"{'overhead':>8} |")
  print(f"|{'-' * 28}|{'-' * 13}|{'-' * 10}|{'-' * 13}|{'-' * 10}|")
  for label, times, kind in rows:
    t_med, t_min = statistics.median(times), min(times)
    if kind == "step":
      over = (t_med - base_med) / base_med, (t_min - base_min) / base_min
    elif kind == "share":
      t_min = min(updates["with AGC"]) - min(updates["without AGC"])
      over = t_med / base_med, t_min / base_min
    cells = [f"{100 * o:+.2f}%" for o in over] if kind else ["", ""]
    print(f"| {label:<26} | {t_med * 1e3:>8.1f} ms | {cells[0]:>8} | "
          f"{t_min * 1e3:>8.1f} ms | {cells[1]:>8} |")
  spread = (max(steps["without AGC"]) - base_min) / base_med
  print(f"\n{len(steps['without AGC'])} steps and {len(diff)} updates per "
        f"setting. Step-to-step spread without AGC: {100 * spread:.1f}% of "
        "the median; a step-time difference below it is noise, and the last "
        "row (AGC's share, measured on the update alone) is the estimate.")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="F0")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--image-size", type=int, default=192)
  parser.add_argument("--reps", type=int, default=5,
                      help="timed train steps per setting, interleaved; "
                      "4x as many optimizer updates")
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
  # A long schedule so the learning rate is non-zero from the second step.
  txs = {label: optim.make_optimizer(
      recipe(clipping), batch_size=args.batch, steps_per_epoch=1000,
      total_epochs=100, params=params)[0]
         for label, clipping in (("without AGC", None), ("with AGC", 0.01))}

  print(f"NFNet-{args.variant}, {n_params:,} params, batch {args.batch}, "
        f"{args.image_size}px, {jax.devices()[0].platform}, "
        f"{jax.device_count()} device(s)", flush=True)
  updates = time_updates(params, txs, 4 * args.reps)
  steps = time_train_steps(net, params, state, images, labels, txs, args.reps)
  print_table(steps, updates)


if __name__ == "__main__":
  main()
