"""What normalization costs: a BN-ResNet-50 train step against NF-ResNet-50.

"No BN layer = faster forward/backward pass" (the NFNets talk). This times
one jitted train step (forward, backward, SGD + Nesterov update; the same
loss and optimizer for every network) of four networks of the same layout
and widths (ResNet-50, stage widths 256-2048, 224 px, float32), in one
process, interleaved round-robin (order reversed every other round), median
over rounds, at batch 8 and 32:

  BN         `nj.ResNet(normalization='batchnorm')`: the normalized baseline.
  BN -> id   `nj.ResNet(normalization='none')`: the same with every batch
             norm replaced by the identity (scale and offset gone too).
  NF         `nj.NFResNet()`: Scaled WS convolutions, no normalization.
  NF - WS    `nj.NFResNet(use_ws=False)`: the same with plain convolutions
             (weights used as they are: no standardization, no gain).

Stochastic depth and dropout are off in both families (the BN baseline has
none), so the NF step does no random draws. The difference of the BN and NF
steps splits exactly into three measured terms:

  T(BN) - T(NF) = [T(BN) - T(BN -> id)]      the normalization ops
                - [T(NF) - T(NF - WS)]       weight standardization
                + [T(BN -> id) - T(NF - WS)] the rest (NF's scalar gains,
                                             conv biases, no final norm)

The first term scales with the activations (batch x pixels), the second with
the weights only (the same at every batch size), so their balance moves with
the batch. Each compiled step's memory comes from XLA's
`compiled.memory_analysis()`: temporaries, arguments (parameters, optimizer
and model state, batch; donated, so aliased by the outputs) and outputs.

The 1-minute load average (as `uptime` prints it) is shown before and after;
absolute times and small ratios mean little on a loaded machine (load above
the core count). Run it on a quiet machine.

Usage:
  python benchmarks/normalization_cost.py                 # batch 8 and 32
  python benchmarks/normalization_cost.py --batches 8 --repeats 7 --out r.md
  python benchmarks/normalization_cost.py --quick         # format check only

`--quick` is batch 2, 64 px, 1 repeat, a one-block-per-stage network (width
1) compiled without LLVM optimization: seconds, for the tests.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import dataclasses
import os
import pathlib
import statistics
import sys
import time
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import optax

import nfnets_jax as nj
from nfnets_jax.cpu import compiler

NUM_CLASSES = 1000
MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Network:
  """One row: a label and the Haiku module it builds."""
  label: str
  build: Callable[[], hk.Module]


def networks(depth: Any, width: float) -> list[Network]:
  """The four networks of one layout (see the module doc)."""
  resnet = lambda norm: lambda: nj.ResNet(
      NUM_CLASSES, depth=depth, width=width, normalization=norm)
  nf = lambda use_ws: lambda: nj.NFResNet(
      NUM_CLASSES, depth=depth, width=width, stochdepth_rate=0.0,
      use_ws=use_ws)
  return [Network("BN", resnet("batchnorm")),
          Network("BN -> id", resnet("none")),
          Network("NF", nf(True)),
          Network("NF - WS", nf(False))]


@dataclasses.dataclass
class Step:
  """A compiled train step and its carried state."""
  call: Callable[[], None]
  compile_seconds: float
  memory: Any  # jaxlib CompiledMemoryStats.


def make_step(net: Network, batch: int, size: int, fast: bool) -> Step:
  """Initializes `net`, compiles its donated train step, returns a closure
  that runs one step (and waits for it)."""
  f = hk.transform_with_state(
      lambda x, is_training: net.build()(x, is_training)["logits"])
  images = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
  labels = jnp.arange(batch) % NUM_CLASSES
  params, state = compiler.run_once(lambda k, x: f.init(k, x, True),
                                    jax.random.key(1), images)
  tx = optax.sgd(0.1, momentum=0.9, nesterov=True)

  def loss_fn(params, state, images, labels):
    logits, state = f.apply(params, state, None, images, True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return loss.mean(), state

  def step(params, state, opt_state, images, labels):
    grads, state = jax.grad(loss_fn, has_aux=True)(params, state, images,
                                                   labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state

  carry = (params, state, tx.init(params))
  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(
      *carry, images, labels).compile(
          compiler_options=compiler.compiler_options(fast=fast))
  compile_seconds = time.perf_counter() - start
  box = {"carry": carry}

  def call():
    box["carry"] = jax.block_until_ready(compiled(*box["carry"], images,
                                                  labels))
  call()  # Warm up: first-run allocations.
  return Step(call, compile_seconds, compiled.memory_analysis())


def interleaved(steps: dict[str, Step], repeats: int) -> dict[str, list[float]]:
  """Seconds per step of each network, round-robin, order reversed every
  other round, so that machine noise hits all alike."""
  times = {label: [] for label in steps}
  for rep in range(repeats):
    for label in list(steps)[:: 1 if rep % 2 == 0 else -1]:
      start = time.perf_counter()
      steps[label].call()
      times[label].append(time.perf_counter() - start)
  return times


def load_line() -> str:
  """The load averages (1, 5, 15 min) and the core count."""
  return (f"load average: {', '.join(f'{v:.2f}' for v in os.getloadavg())}"
          f" ({os.cpu_count()} cores)")


def table(batch: int, steps: dict[str, Step],
          times: dict[str, list[float]]) -> list[str]:
  """Markdown rows: time and memory per network, ratios to BN."""
  med = {k: statistics.median(v) for k, v in times.items()}
  mem = {k: s.memory for k, s in steps.items()}
  lines = [
      f"### Batch {batch}", "",
      "| network | median ms / step | ms / image | × BN time | spread | "
      "temp MiB | argument MiB | output MiB | × BN temp | compile s |",
      "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for k in steps:
    spread = (max(times[k]) - min(times[k])) / med[k]
    lines.append(
        f"| {k} | {1e3 * med[k]:.1f} | {1e3 * med[k] / batch:.2f} | "
        f"{med[k] / med['BN']:.3f} | {100 * spread:.0f}% | "
        f"{mem[k].temp_size_in_bytes / MIB:.1f} | "
        f"{mem[k].argument_size_in_bytes / MIB:.1f} | "
        f"{mem[k].output_size_in_bytes / MIB:.1f} | "
        f"{mem[k].temp_size_in_bytes / max(mem['BN'].temp_size_in_bytes, 1):.3f}"
        f" | {steps[k].compile_seconds:.1f} |")
  ms = {k: 1e3 * v for k, v in med.items()}
  norm = ms["BN"] - ms["BN -> id"]
  ws = ms["NF"] - ms["NF - WS"]
  rest = ms["BN -> id"] - ms["NF - WS"]
  lines += [
      "",
      f"NF / BN step time: {med['NF'] / med['BN']:.3f}; NF / BN temporary "
      f"memory: {mem['NF'].temp_size_in_bytes / max(mem['BN'].temp_size_in_bytes, 1):.3f}.",
      f"T(BN) - T(NF) = {ms['BN'] - ms['NF']:+.1f} ms = normalization ops "
      f"{norm:+.1f} ms - weight standardization {ws:+.1f} ms + rest "
      f"{rest:+.1f} ms.", ""]
  return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python benchmarks/normalization_cost.py",
      description=__doc__.split("\n")[0])
  parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--repeats", type=int, default=5,
                      help="round-robin rounds (one step per network each)")
  parser.add_argument("--quick", action="store_true",
                      help="batch 2, 64 px, 1 repeat, a 4-block network: "
                      "checks the output, measures nothing")
  parser.add_argument("--out", type=pathlib.Path,
                      help="also write the report (Markdown) here")
  args = parser.parse_args(argv)
  args.depth, args.width, args.fast = 50, 4.0, False
  if args.quick:
    args.batches, args.image_size, args.repeats = [2], 64, 1
    args.depth, args.width, args.fast = (1, 1, 1, 1), 1.0, True
  return args


def main(argv: Sequence[str] | None = None) -> str:
  """Prints (and with `--out` writes) the report; returns it."""
  args = parse_args(argv)
  depth = (f"ResNet-{args.depth}" if isinstance(args.depth, int)
           else f"depth {args.depth}")
  header = [
      "# What normalization costs: BN- against NF-ResNet train step", "",
      f"{depth}, width {args.width:g}, {args.image_size} px, float32, "
      f"{jax.devices()[0].platform}, {jax.device_count()} device(s), jax "
      f"{jax.__version__}; {args.repeats} interleaved round(s), median.", ""]
  print("\n".join(header), flush=True)
  before = load_line()
  print(f"before: {before}", flush=True)
  lines = []
  for batch in args.batches:
    steps = {}
    for net in networks(args.depth, args.width):
      steps[net.label] = make_step(net, batch, args.image_size, args.fast)
      print(f"  batch {batch}: {net.label} compiled in "
            f"{steps[net.label].compile_seconds:.1f} s", file=sys.stderr,
            flush=True)
    times = interleaved(steps, args.repeats)
    rows = table(batch, steps, times)
    print("\n".join(rows), flush=True)
    lines += rows
    del steps  # Free this batch's buffers before the next.
  after = load_line()
  print(f"after: {after}", flush=True)
  report = "\n".join(header + [f"Before: {before}.", f"After: {after}.", ""]
                     + lines)
  if args.out:
    args.out.write_text(report)
  return report


if __name__ == "__main__":
  main()
