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
The cost: the process keeps its peak heap until it exits. `nfnets_jax` calls
`tune()` at import; `NFNETS_JAX_MALLOC=0` keeps glibc's defaults. Other
C libraries (musl, macOS) are left alone.
"""
from __future__ import annotations

from collections.abc import Mapping
import ctypes
import os
import platform

OPT_OUT_ENV = "NFNETS_JAX_MALLOC"
# mallopt(3) parameter numbers (glibc's malloc.h) -> value.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS: dict[str, tuple[int, int]] = {
    "M_MMAP_MAX": (M_MMAP_MAX, 0),
    "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, -1),
    "M_ARENA_MAX": (M_ARENA_MAX, 1),
}


def tune(environ: Mapping[str, str] = os.environ) -> dict[str, int]:
  """Applies `SETTINGS` with glibc's `mallopt`; returns what it set.

  Returns an empty dict (and changes nothing) when `environ[OPT_OUT_ENV]`
  is '0' or the C library is not glibc. Raises RuntimeError if glibc
  rejects a setting.
  """
  if environ.get(OPT_OUT_ENV, "1") == "0" or platform.libc_ver()[0] != "glibc":
    return {}
  mallopt = ctypes.CDLL(None).mallopt
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  applied = {}
  for name, (param, value) in SETTINGS.items():
    if mallopt(param, value) != 1:
      raise RuntimeError(f"glibc mallopt({name}={value}) failed; set "
                         f"{OPT_OUT_ENV}=0 to keep glibc's defaults")
    applied[name] = value
  return applied
