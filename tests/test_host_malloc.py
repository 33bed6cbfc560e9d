"""nfnets_jax keeps XLA's freed buffers in the process (glibc only)."""
import os
import platform
import subprocess
import sys

import pytest

from nfnets_jax import host_malloc

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                                reason="mallopt settings are glibc's")

# A jitted function whose 256 MB temporary is freed after every call; prints
# the minor page faults of calls 6-25. glibc's heap takes a few calls to
# settle (its aligned blocks leave gaps, so it grows now and then at first).
_PROBE = """
import resource, nfnets_jax, jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.max(x @ x.T))  # [8192, 8192] temporary.
x = jnp.ones((8192, 64))
for _ in range(5):
  f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
  f(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
# Pages of 4 KiB in twenty calls' 256 MB temporaries.
_PAGES = 20 * (256 << 20) // 4096


def _faults(**env) -> int:
  child = {k: v for k, v in os.environ.items()
           if k != host_malloc.OPT_OUT_ENV}
  child.update(env, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _PROBE], env=child, check=True,
                       capture_output=True, text=True).stdout
  return int(out.strip().splitlines()[-1])


def test_tune_sets_all_settings_and_honours_opt_out():
  assert host_malloc.tune({}) == {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": -1,
                                  "M_ARENA_MAX": 1}
  assert host_malloc.tune({host_malloc.OPT_OUT_ENV: "0"}) == {}


def test_freed_xla_buffers_are_reused_without_page_faults():
  assert _faults() < _PAGES // 5  # At most 4 of 20 calls grow the heap.
  thp = "/sys/kernel/mm/transparent_hugepage/enabled"
  if os.path.exists(thp) and "[always]" in open(thp).read():
    pytest.skip("huge pages make glibc's own faults few too")
  assert _faults(**{host_malloc.OPT_OUT_ENV: "0"}) > _PAGES * 9 // 10
