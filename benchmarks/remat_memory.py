"""Rematerialization's memory saving and time cost on the NFNet train step.

For `--config.model.remat` False and True, each in its own fresh process,
one after the other: the recipe's train step (`configs/nfnet.py:F0` by
default: SGD + AGC, EMA, label smoothing; the package's compiled pmapped
step, as `nfnets-train` runs it) at `--size` px and `--batch` images on one
device, compiled, then run `--steps` times on random images. It prints:
  - XLA's peak memory of the compiled step (arguments + outputs not written
    in place + temporaries) and its temporaries alone;
  - the process's peak resident memory while the steps run (VmHWM, reset
    after compiling and initializing: `/proc/self/clear_refs`), and the
    resident memory before them;
  - the median step time after the first step;
and each remat / plain ratio, with the 1-minute load before and after.

Usage:
  python benchmarks/remat_memory.py                  # F0, 192 px, batch 32
  python benchmarks/remat_memory.py --variant F1 --batch 16 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence


def _rss_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(f"no {field} in /proc/self/status")


def child(variant: str, size: int, batch: int, dtype: str, steps: int,
          remat: bool) -> dict:
  """Compiles and runs the train step; returns its measurements."""
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from nfnets_jax.experiment import parallel
  from nfnets_jax.experiment import recipes
  from nfnets_jax.experiment import train_state as ts
  from nfnets_jax.models import families
  from nfnets_jax.optim import optimizers
  # pylint: enable=g-import-not-at-top
  config = recipes.nfnet_imagenet(variant)
  with config.unlocked():
    config.train.compute_dtype = dtype
  net = families.make_network("NFNet", config.model.kwargs, 1000,
                              remat=remat)
  tx, schedule = optimizers.make_optimizer(
      config.optimizer, batch_size=batch, steps_per_epoch=100,
      total_epochs=config.optimizer.lr.warmup_epochs + 1.0)
  step = ts.make_train_step(net, tx, schedule, config.train)
  mesh = parallel.local_mesh()
  state = parallel.replicate(ts.init_train_state(
      net, tx, seed=0, image_size=size, use_ema=True), mesh)
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 1000, batch)
  batch_dev = parallel.shard({
      "images": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
      "labels": labels.astype(np.int32),
      "soft_labels": np.eye(1000, dtype=np.float32)[labels]}, mesh)
  start = time.perf_counter()
  memory = step.compile(state, batch_dev).memory_analysis()
  compile_s = time.perf_counter() - start
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # Resets VmHWM to the current resident memory.
  rss_before = _rss_kib("VmRSS")
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, batch_dev)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return {
      "remat": remat, "compile_s": compile_s,
      "xla_peak": (memory.argument_size_in_bytes + memory.output_size_in_bytes
                   - memory.alias_size_in_bytes + memory.temp_size_in_bytes),
      "xla_temp": memory.temp_size_in_bytes,
      "rss_before": rss_before * 1024, "rss_peak": _rss_kib("VmHWM") * 1024,
      "step_s": statistics.median(times[1:]), "times": times,
      "loss": float(np.asarray(metrics["loss"]).ravel()[0])}


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f}"


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--variant", default="F0")
  parser.add_argument("--size", type=int, default=192)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--dtype", default="float32",
                      choices=("float32", "bfloat16"))
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--child", choices=("plain", "remat"),
                      help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(child(args.variant, args.size, args.batch, args.dtype,
                           args.steps, args.child == "remat")))
    return
  load_before = os.getloadavg()[0]
  results = {}
  for name in ("plain", "remat"):
    out = subprocess.run(
        [sys.executable, __file__, *(argv or sys.argv[1:]), "--child", name],
        check=True, capture_output=True, text=True).stdout
    results[name] = json.loads(out.strip().splitlines()[-1])
    print(f"{name}: {results[name]}", file=sys.stderr)
  load_after = os.getloadavg()[0]
  plain, remat = results["plain"], results["remat"]
  print(f"{args.variant} train step, {args.size} px, batch {args.batch}, "
        f"{args.dtype}, one device; load {load_before:.2f} before, "
        f"{load_after:.2f} after\n")
  print("| | plain | remat | remat / plain |")
  print("|---|---:|---:|---:|")
  for key, label, fmt in (
      ("xla_peak", "XLA peak GiB", _gib), ("xla_temp", "XLA temporaries GiB",
                                           _gib),
      ("rss_peak", "peak RSS while stepping GiB", _gib),
      ("rss_before", "RSS before stepping GiB", _gib),
      ("step_s", "step time s (median)", lambda v: f"{v:.2f}"),
      ("compile_s", "compile s", lambda v: f"{v:.1f}")):
    print(f"| {label} | {fmt(plain[key])} | {fmt(remat[key])} | "
          f"{remat[key] / plain[key]:.3f} |")
  print(f"\nloss after {args.steps} steps: plain {plain['loss']:.6f}, "
        f"remat {remat['loss']:.6f}")


if __name__ == "__main__":
  main()
