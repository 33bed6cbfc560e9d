"""The convolutions of NFNet-F0, one at a time: forward and forward+backward.

For each distinct 3x3 / 1x1 convolution of F0 at 192 px it times, in ms
(median of `--repeats`), the forward and the gradient of `sum(out**2)` with
respect to input and kernel, for the models' convolution
(`nfnets_jax.cpu.lowering.conv2d`) under each lowering, 'onednn', 'split' and
'native' (`nfnets_jax.conv_impl`), compiled with the package's CPU compiler
options, and for `torch.nn.functional.conv2d` (same threads). Run it twice
to see what the options do:

  python benchmarks/conv_layers.py                             # with them
  NFNETS_JAX_CPU_OPTIONS=0 python benchmarks/conv_layers.py    # XLA defaults
  python benchmarks/conv_layers.py --batch 32 --impls onednn split  # no native

Prints the 1-minute load before and after: figures taken with a load above
1 per core are not worth comparing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

import nfnets_jax as nj
from nfnets_jax.cpu import lowering

# name, kernel, in, out, groups, input side, stride (F0 at 192 px).
F0_CONVS = [
    ("stem 16->32", 3, 16, 32, 1, 96, 1),
    ("stem 32->64", 3, 32, 64, 1, 96, 1),
    ("stem 64->128 s2", 3, 64, 128, 1, 96, 2),
    ("stage1 128 g1", 3, 128, 128, 1, 48, 1),
    ("stage2 256 g2 s2", 3, 256, 256, 2, 48, 2),
    ("stage2 256 g2", 3, 256, 256, 2, 24, 1),
    ("stage3 768 g6 s2", 3, 768, 768, 6, 24, 2),
    ("stage3 768 g6", 3, 768, 768, 6, 12, 1),
    ("stage4 768 g6 s2", 3, 768, 768, 6, 12, 2),
    ("stage4 768 g6", 3, 768, 768, 6, 6, 1),
    ("1x1 1536->768", 1, 1536, 768, 1, 12, 1),
    ("1x1 768->1536", 1, 768, 1536, 1, 12, 1),
    ("1x1 128->128", 1, 128, 128, 1, 48, 1),
    ("1x1 256->128", 1, 256, 128, 1, 48, 1),
]


def median_ms(fn: Callable[[], object], repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def time_ours(impl: str, k: int, cin: int, cout: int, groups: int, hw: int,
              stride: int, batch: int, repeats: int) -> tuple[float, float]:
  """(forward ms, forward+backward ms) of the models' convolution."""
  x = jax.random.normal(jax.random.key(0), (batch, hw, hw, cin))
  w = 0.05 * jax.random.normal(jax.random.key(1), (k, k, cin // groups, cout))
  conv = lambda x, w: lowering.conv2d(
      x, w, stride=(stride, stride), padding="SAME", groups=groups)
  with nj.conv_impl(impl):  # Read when the programs are traced.
    fwd = nj.cpu.jit(conv).lower(x, w).compile()
    grad = nj.cpu.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2),
                               (0, 1))).lower(x, w).compile()
  return (median_ms(lambda: fwd(x, w).block_until_ready(), repeats),
          median_ms(lambda: jax.block_until_ready(grad(x, w)), repeats))


def time_torch(k: int, cin: int, cout: int, groups: int, hw: int, stride: int,
               batch: int, repeats: int) -> tuple[float, float]:
  """(forward ms, forward+backward ms) of torch's conv2d, NCHW."""
  import torch  # pylint: disable=g-import-not-at-top
  x = torch.randn(batch, cin, hw, hw, requires_grad=True)
  w = (0.05 * torch.randn(cout, cin // groups, k, k)).requires_grad_()
  conv = lambda: torch.nn.functional.conv2d(x, w, stride=stride,
                                            padding=k // 2, groups=groups)

  def fwd():
    with torch.no_grad():
      conv()

  def fwd_bwd():
    (conv() ** 2).sum().backward()

  return median_ms(fwd, repeats), median_ms(fwd_bwd, repeats)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--impls", nargs="+",
                      default=["onednn", "split", "native"],
                      choices=["onednn", "split", "native"],
                      help="our lowerings to time ('native' grouped kernel "
                      "gradients take seconds at batch 32)")
  parser.add_argument("--no-torch", action="store_true")
  args = parser.parse_args()
  print(f"load before: {os.getloadavg()[0]:.2f}; batch {args.batch}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}; ms, fwd / fwd+bwd",
        flush=True)
  if not args.no_torch:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(len(os.sched_getaffinity(0)))
  cols = args.impls + ([] if args.no_torch else ["torch"])
  print("| conv | " + " | ".join(cols) + " |")
  print("|---" * (len(cols) + 1) + "|")
  for name, *shape in F0_CONVS:
    cells = [time_ours(impl, *shape, args.batch, args.repeats)
             for impl in args.impls]
    if not args.no_torch:
      cells.append(time_torch(*shape, args.batch, args.repeats))
    print(f"| {name} | " + " | ".join(f"{a:.1f} / {b:.1f}" for a, b in cells)
          + " |", flush=True)
  print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
