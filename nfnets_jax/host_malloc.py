"""glibc malloc settings that stop XLA:CPU re-faulting its buffers every step.

XLA:CPU allocates a train step's temporaries with `malloc` and frees them
when the step ends. glibc serves blocks over 32 MB with a fresh `mmap`,
returns them with `munmap` and trims its heaps back to the kernel, so every
step page-faults that memory in again: for NFNet-F0 at 192 px, batch 8,
about 320,000 minor faults (1.3 GB) and 0.5-1 s of kernel time per step on a
2-core machine. Keeping freed memory in the process, as tcmalloc and
jemalloc do, removes the faults (numbers are unchanged; speed-ups measured
in `benchmarks/throughput.py`, see README "Performance").

`tune()` sets, with `mallopt(3)`:
  - `M_MMAP_MAX = 0`: large blocks come from the heap, not from `mmap`;
  - `M_TRIM_THRESHOLD = -1`: freed heap memory is kept, never trimmed;
  - `M_ARENA_MAX = 1`: one arena for all threads, so a block freed on one
    thread is reused on another (per-thread arenas are `mmap`ed heaps of at
    most 64 MB, which large blocks cannot use).
It is a trade-off, so it is opt-in: `NFNETS_JAX_MALLOC=1` in the environment
makes `import nfnets_jax` call `tune()` (child processes inherit it). On a
quiet 2-core machine (load 0.5 before), with timm's step alternating in
another process as `benchmarks/throughput.py` runs it, the F0 train step
went 2.02 -> 2.39 img/s and inference 7.69 -> 9.19 img/s (batch 8); alone,
the F0 step ran as fast without it (2.28-2.38 vs 2.31-2.38 img/s), and the
single arena made the small `experiments.agc_batch_size --quick` run 6-12%
slower (16.3 -> 18.2 s, back-to-back runs at load 1.2-2.2; threads
contending for the one arena's lock, probably: not profiled). The process
also keeps its peak heap until it exits, and glibc's aligned blocks can
leave gaps in it (a jitted function with one 256 MB temporary: peak RSS
1.9 GB instead of 0.6 GB). Other C libraries (musl, macOS) are left alone.
"""
from __future__ import annotations

from collections.abc import Mapping
import ctypes
import os
import platform

ENV = "NFNETS_JAX_MALLOC"
# mallopt(3) parameter numbers (glibc's malloc.h) -> value.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS: dict[str, tuple[int, int]] = {
    "M_MMAP_MAX": (M_MMAP_MAX, 0),
    "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, -1),
    "M_ARENA_MAX": (M_ARENA_MAX, 1),
}


def tune(environ: Mapping[str, str] = os.environ) -> dict[str, int]:
  """Applies `SETTINGS` with glibc's `mallopt`; returns what it set.

  Returns an empty dict (and changes nothing) unless `environ[ENV]` is '1'
  and the C library is glibc. Raises RuntimeError if glibc rejects a
  setting.
  """
  if environ.get(ENV) != "1" or platform.libc_ver()[0] != "glibc":
    return {}
  mallopt = ctypes.CDLL(None).mallopt
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  applied = {}
  for name, (param, value) in SETTINGS.items():
    if mallopt(param, value) != 1:
      raise RuntimeError(f"glibc mallopt({name}={value}) failed; unset "
                         f"{ENV} to keep glibc's defaults")
    applied[name] = value
  return applied
