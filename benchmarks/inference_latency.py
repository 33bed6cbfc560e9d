"""Batch-1 inference latency: `nj.create_model("dm_nfnet_f0")` against timm.

Three contenders, each in its own process (`throughput.Worker`), called in
turn with a pause before each timed call, the order reversed every other
round; the median over rounds:

  ours[ws-once]   `model(images)`: `Model.__call__`, the weights standardized
                  once (`Model.kernels`), what `create_model` users get;
  ours[per-call]  the same model's `Model.logits` without kernels, jitted with
                  the package's compiler options: every call standardizes
                  every kernel again (the forward before WS-once);
  timm            `timm.create_model('dm_nfnet_f0')`, eval, `no_grad`,
                  float32, torch threads = cores.

Random weights (nothing is downloaded); both sides compute the same network
(`pretrained/timm.py`). The 1-minute load average is printed before and
after, and the figure is marked INVALID when the load before exceeded one
per core or a row's interquartile spread ((q3 - q1) / median; a single slow
call barely moves it, unlike max - min) exceeds `--max-spread`.

Usage:
  python benchmarks/inference_latency.py                    # F0, 256 px
  python benchmarks/inference_latency.py --variant F1 --size 320 --repeats 21
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
import statistics
import sys
import time

import throughput  # benchmarks/throughput.py: workers, load, steal.
from throughput import Contender

import jax  # pylint: disable=g-import-not-at-top,wrong-import-order


def iqr_spread(times: Sequence[float]) -> float:
  """(q3 - q1) / median of `times`."""
  q1, _, q3 = statistics.quantiles(times, n=4)
  return (q3 - q1) / statistics.median(times)


def make_ours(variant: str, size: int, ws_once: bool) -> Contender:
  """`create_model("dm_nfnet_<variant>")` at batch 1, one of two forwards."""
  import nfnets_jax as nj  # pylint: disable=g-import-not-at-top
  model = nj.create_model(throughput.TIMM_NAMES[variant], pretrained=False)
  images = jax.random.normal(jax.random.key(0), (1, size, size, 3))
  if ws_once:
    forward = lambda: model(images)
  else:
    logits = nj.cpu.jit(model.logits)
    forward = lambda: logits(model.params, model.state, images)
  return Contender(f"ours[{'ws-once' if ws_once else 'per-call'}]",
                   lambda: jax.block_until_ready(forward()), lambda: None)


def make_timm(variant: str, size: int, threads: int) -> Contender:
  """timm's `dm_nfnet_<variant>` at batch 1, eval, `no_grad`."""
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  model = timm.create_model(throughput.TIMM_NAMES[variant],
                            pretrained=False).eval()
  images = torch.randn(1, 3, size, size)

  def forward():
    with torch.no_grad():
      model(images)

  return Contender("timm", forward, lambda: None)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="\n".join(__doc__.splitlines()[2:]))
  parser.add_argument("--variant", default="F0",
                      choices=sorted(throughput.TIMM_NAMES))
  parser.add_argument("--size", type=int, default=256, help="image side, px")
  parser.add_argument("--repeats", type=int, default=15,
                      help="timed rounds (each contender once per round)")
  parser.add_argument("--warmup", type=int, default=3,
                      help="untimed calls per contender first")
  parser.add_argument("--pause", type=float, default=1.0,
                      help="seconds of idle before each timed call")
  parser.add_argument("--max-spread", type=float, default=0.15)
  parser.add_argument("--no-timm", action="store_true")
  args = parser.parse_args(argv)
  if args.repeats < 2:
    parser.error(f"--repeats must be >= 2, got {args.repeats}")
  cores = throughput.cores_used()
  load_before = throughput.load1()
  cpu0 = throughput.cpu_times()
  print(f"{throughput.TIMM_NAMES[args.variant]}, batch 1, {args.size} px, "
        f"float32, {cores} cores, jax {jax.__version__}; load before: "
        f"{load_before:.2f}", flush=True)
  workers = [throughput.Worker(make_ours, args.variant, args.size, True),
             throughput.Worker(make_ours, args.variant, args.size, False)]
  if not args.no_timm:
    workers.append(throughput.Worker(make_timm, args.variant, args.size,
                                     cores))
  times: dict[str, list[float]] = {w.name: [] for w in workers}
  try:
    for w in workers:
      first = w.run("infer")
      for _ in range(args.warmup - 1):
        w.run("infer")
      print(f"  {w.name}: first call {first:.1f} s", flush=True)
    for rep in range(args.repeats):
      for w in (workers if rep % 2 == 0 else workers[::-1]):
        time.sleep(args.pause)
        times[w.name].append(w.run("infer"))
  finally:
    for w in workers:
      w.close()
  steal = throughput.steal_since(cpu0)
  load_after = throughput.load1()
  medians = {name: statistics.median(t) for name, t in times.items()}
  invalid = []
  if load_before > cores:
    invalid.append(f"load before {load_before:.2f} > {cores} cores")
  invalid += [f"{name} spread {iqr_spread(t):.0%}"
              for name, t in times.items()
              if iqr_spread(t) > args.max_spread]
  print("\n| contender | median ms | q1-q3 ms | spread | speed vs timm | "
        "vs per-call |")
  print("|---|---:|---:|---:|---:|---:|")
  for name, t in times.items():
    vs_timm = (f"{medians['timm'] / medians[name]:.2f}x" if "timm" in medians
               else "-")
    vs_per_call = f"{medians['ours[per-call]'] / medians[name]:.2f}x"
    q1, _, q3 = statistics.quantiles(t, n=4)
    print(f"| {name} | {1e3 * medians[name]:.1f} | {1e3 * q1:.0f}-"
          f"{1e3 * q3:.0f} | {iqr_spread(t):.0%} | {vs_timm} | "
          f"{vs_per_call} |")
  print(f"\nmedian of {args.repeats} rounds; speed = the other's latency / "
        f"this one's. Load before {load_before:.2f}, after {load_after:.2f};"
        f" CPU time stolen {steal:.1%}.")
  if invalid:
    print("INVALID: " + "; ".join(invalid))
  return 0


if __name__ == "__main__":
  sys.exit(main())
