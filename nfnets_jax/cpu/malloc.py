"""Host memory settings that stop XLA:CPU re-faulting its buffers every step.

XLA:CPU allocates a train step's temporaries with `malloc` on the thread
that runs the step and frees them when the step ends. Under glibc's defaults
blocks over 32 MB come from a fresh `mmap` and go back with `munmap`, so
every step page-faults that memory in again: for NFNet-F0 at 192 px, batch
8, about 290,000 minor faults (1.2 GB) and 0.45 s of kernel time per step on
a 2-core machine.

`tune()` keeps freed memory in the process:
  - `M_MMAP_MAX = 0` and `M_TRIM_THRESHOLD = -1` (`mallopt(3)`): large blocks
    come from the main heap, and freed heap memory is never given back;
  - `jax_cpu_enable_async_dispatch = False`: the CPU backend runs a jitted
    call on the calling thread instead of on a worker. Only the main thread
    allocates from that heap; every other thread has its own glibc arena,
    whose heaps hold at most 64 MB, so a larger block there is `mmap`ed and
    unmapped whatever `M_MMAP_MAX` says. Run asynchronously, F0's 1.2 GB of
    temporaries were faulted in every step even with the two settings above.
The earlier way, one arena for all threads (`M_ARENA_MAX = 1`), had no
faults but made the two Eigen threads queue on one lock: oneDNN's sgemm,
inside XLA's convolutions, allocates a workspace per call (6,300-7,300
voluntary context switches per step; `_int_malloc` 8% of the samples).

F0 at 192 px, batch 8, 2-core Zen 5 EPYC, each setting in its own process,
two alternating rounds: train step 5.73 / 5.77 img/s with glibc's defaults,
6.16 / 6.15 with one arena, 7.12 / 7.13 with `tune()`; inference 22.0 /
18.8, 20.6 / 19.5, 25.0 / 24.2 (a third round, at higher load: one arena
6.09, 5.98, 6.17; `tune()` 6.71, 6.07, 6.04). Numbers are unchanged (the
same programs run); the process keeps its peak heap until it exits, and
glibc's aligned blocks can leave gaps in it. Calls from threads other than
the main one still fault (their arenas).

It is a trade-off, so it is opt-in, and it changes the whole process, so
the library never calls it on import: the package's command-line programs
(`nfnets-train`, `nfnets-predict`) call `tune()` before JAX starts when
`NFNETS_JAX_MALLOC=1` is in the environment; a script of yours can call it
first thing. Synchronous dispatch costs Python's overlap with small steps:
on the same machine, one run each, `experiments.agc_batch_size` took 277 s
with `tune()` and 238 s without (`experiments.clipping_threshold` 170 s and
177 s, the digits default run 27.0 s and 29.4 s). A
`JAX_CPU_ENABLE_ASYNC_DISPATCH` you set yourself wins. C libraries other than
glibc (musl, macOS) are left alone.
"""
from __future__ import annotations

from collections.abc import MutableMapping
import ctypes
import os
import platform

import jax

ENV = "NFNETS_JAX_MALLOC"
ASYNC_ENV = "JAX_CPU_ENABLE_ASYNC_DISPATCH"
# mallopt(3) parameter numbers (glibc's malloc.h) -> value.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
SETTINGS: dict[str, tuple[int, int]] = {
    "M_MMAP_MAX": (M_MMAP_MAX, 0),
    "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, -1),
}


def tune(environ: MutableMapping[str, str] = os.environ
         ) -> dict[str, int | bool]:
  """Applies `SETTINGS` and synchronous CPU dispatch; returns what it set.

  Changes nothing (and returns an empty dict) unless `environ[ENV]` is '1'
  and the C library is glibc. Leaves the dispatch mode alone when
  `environ[ASYNC_ENV]` is set. Call it before the first JAX computation:
  the dispatch mode applies to backends started afterwards.

  Raises:
    RuntimeError: if glibc rejects a setting.
  """
  if environ.get(ENV) != "1" or platform.libc_ver()[0] != "glibc":
    return {}
  mallopt = ctypes.CDLL(None).mallopt
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  applied: dict[str, int | bool] = {}
  for name, (param, value) in SETTINGS.items():
    if mallopt(param, value) != 1:
      raise RuntimeError(f"glibc mallopt({name}={value}) failed; unset "
                         f"{ENV} to keep glibc's defaults")
    applied[name] = value
  if ASYNC_ENV not in environ:
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    applied["jax_cpu_enable_async_dispatch"] = False
  return applied
