"""NFNet-F0 throughput: nfnets_jax against timm's `dm_nfnet_f0`, side by side.

Measures, in one process and interleaved so both see the same machine load:
  - inference: jitted forward in eval mode, images/s;
  - training: one SGD-Nesterov step (forward, backward, update), images/s;
for ours and for timm, and prints ours/timm ratios. On CPU both run float32
with every core (torch's thread count is set to the CPU count). On a GPU ours
runs bfloat16 activations with float32 params and timm runs under AMP.

Usage:
  python benchmarks/throughput.py                 # F0, 192 px, batch 8
  python benchmarks/throughput.py --repeats 5 --conv-impl native split
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable

import haiku as hk
import jax
import jax.numpy as jnp
import optax

import nfnets_jax as nj

NUM_CLASSES = 1000


def _time(fn: Callable[[], object]) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def make_ours(variant: str, batch: int, size: int, conv_impl: str,
              dtype: jnp.dtype):
  """Returns (infer, train_step) closures for our NFNet; each runs once."""
  model = hk.transform_with_state(lambda x, training: nj.NFNet(
      NUM_CLASSES, variant, conv_impl=conv_impl, stochdepth_rate=0.1)(
          x, is_training=training))
  rng = jax.random.key(0)
  images = jax.random.normal(rng, (batch, size, size, 3), dtype)
  labels = jax.nn.one_hot(jnp.arange(batch) % NUM_CLASSES, NUM_CLASSES)
  params, state = model.init(rng, images, True)
  opt = optax.sgd(0.1, momentum=0.9, nesterov=True)
  opt_state = opt.init(params)

  @jax.jit
  def infer(params, state, images):
    return model.apply(params, state, None, images, False)[0]["logits"]

  def loss_fn(params, state, rng, images, labels):
    out, state = model.apply(params, state, rng, images, True)
    loss = optax.softmax_cross_entropy(out["logits"].astype(jnp.float32),
                                       labels).mean()
    return loss, state

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def train_step(params, state, opt_state, rng, images, labels):
    grads, state = jax.grad(loss_fn, has_aux=True)(params, state, rng, images,
                                                   labels)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state

  carry = [params, state, opt_state]

  def run_infer():
    jax.block_until_ready(infer(carry[0], carry[1], images))

  def run_train():
    carry[:] = train_step(*carry, rng, images, labels)
    jax.block_until_ready(carry)

  return run_infer, run_train


def make_timm(batch: int, size: int):
  """Returns (infer, train_step) closures for timm's dm_nfnet_f0."""
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  if not cuda:
    torch.set_num_threads(os.cpu_count())
  model = timm.create_model("dm_nfnet_f0", pretrained=False,
                            drop_path_rate=0.1).to(device)
  images = torch.randn(batch, 3, size, size, device=device)
  labels = torch.arange(batch, device=device) % NUM_CLASSES
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9,
                        nesterov=True)
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

  def run_infer():
    model.eval()
    with torch.no_grad(), amp:
      model(images)
    sync()

  def run_train():
    model.train()
    opt.zero_grad(set_to_none=True)
    with amp:
      loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    opt.step()
    sync()

  return run_infer, run_train


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="F0")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--size", type=int, default=192)
  parser.add_argument("--repeats", type=int, default=5,
                      help="timed repetitions of each measurement")
  parser.add_argument("--conv-impl", nargs="+", default=["auto"],
                      help="our grouped-conv lowerings to compare")
  parser.add_argument("--no-timm", action="store_true")
  args = parser.parse_args()

  backend = jax.default_backend()
  dtype = jnp.float32 if backend == "cpu" else jnp.bfloat16
  print(f"backend={backend} devices={jax.devices()} cpus={os.cpu_count()} "
        f"variant={args.variant} batch={args.batch} size={args.size} "
        f"dtype={jnp.dtype(dtype).name}", flush=True)

  contenders = {}
  for impl in args.conv_impl:
    contenders[f"ours[{impl}]"] = make_ours(args.variant, args.batch,
                                            args.size, impl, dtype)
  if not args.no_timm:
    contenders["timm"] = make_timm(args.batch, args.size)

  times = {name: {"infer": [], "train": []} for name in contenders}
  for name, (infer, train) in contenders.items():  # Compile and warm up.
    t_infer, t_train = _time(infer), _time(train)
    print(f"warm-up {name}: infer {t_infer:.1f}s, train {t_train:.1f}s",
          flush=True)
    infer(), train()
  for rep in range(args.repeats):
    for name, (infer, train) in contenders.items():
      times[name]["infer"].append(_time(infer))
      times[name]["train"].append(_time(train))
    print(f"repeat {rep + 1}/{args.repeats} done", flush=True)

  def ips(name, kind):
    return args.batch / statistics.median(times[name][kind])

  print(f"\n| model | inference img/s | train-step img/s |"
        f"{' inference vs timm | train vs timm |' if 'timm' in times else ''}")
  print(f"|---|---|---|{'---|---|' if 'timm' in times else ''}")
  for name in contenders:
    row = f"| {name} | {ips(name, 'infer'):.2f} | {ips(name, 'train'):.2f} |"
    if "timm" in times:
      row += (f" {ips(name, 'infer') / ips('timm', 'infer'):.2f}x |"
              f" {ips(name, 'train') / ips('timm', 'train'):.2f}x |")
    print(row)
  print("\n(medians of", args.repeats, "interleaved repetitions; train step = "
        "forward + backward + SGD Nesterov update, dropout 0.2, stochastic "
        "depth 0.1)")


if __name__ == "__main__":
  main()
