"""`cpu.malloc.tune()` with NFNETS_JAX_MALLOC=1 keeps XLA's freed buffers in
the process (the command-line programs call it; importing never does)."""
import os
import platform
import subprocess
import sys

import pytest

from nfnets_jax.cpu import malloc

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                                reason="mallopt settings are glibc's")

# A jitted function whose 64 MB temporary (over glibc's largest mmap
# threshold, 32 MB) is freed after every call; prints the minor page faults
# of calls 3-42 and whether dispatch is asynchronous. With the settings
# glibc's heap still grows now and then while it settles (its aligned blocks
# leave gaps): seen here, 0.2 to 2.2 of the 40 calls' worth of pages faulted
# in (3 runs; with 256 MB temporaries, 3-7 calls' worth in 6 runs); with
# glibc's defaults every call faults its temporary in.
_CALLS = 40
_PROBE = f"""
import resource
from nfnets_jax.cpu import malloc
malloc.tune()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.max(x @ x.T))  # [4096, 4096] temporary.
x = jnp.ones((4096, 64))
for _ in range(2):
  f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({_CALLS}):
  f(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(jax.config.read("jax_cpu_enable_async_dispatch"))
"""
# Pages of 4 KiB in the measured calls' 64 MB temporaries.
_PAGES = _CALLS * (64 << 20) // 4096
_TUNED = {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": -1,
          "jax_cpu_enable_async_dispatch": False}


def _run(code: str, **env) -> list[str]:
  """Stdout lines of `code` in a new CPU process with `env` added."""
  child = {k: v for k, v in os.environ.items()
           if k not in (malloc.ENV, malloc.ASYNC_ENV)}
  # Dots on Eigen: YNNPACK (XLA's default) fuses the probe's dot and max and
  # never materializes the temporary this measures.
  child.update(env, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=")
  return subprocess.run([sys.executable, "-c", code], env=child, check=True,
                        capture_output=True, text=True).stdout.splitlines()


def test_tune_is_opt_in():
  # Only these: tune() on would change this test process for the suite.
  assert malloc.tune({}) == {}
  assert malloc.tune({malloc.ENV: "0"}) == {}


def test_tuned_process_reuses_freed_xla_buffers_without_page_faults():
  faults, dispatch_async = _run(_PROBE, **{malloc.ENV: "1"})[-2:]
  assert dispatch_async == "False"
  assert int(faults) < _PAGES // 2  # Fewer than half the calls grow the heap.
  thp = "/sys/kernel/mm/transparent_hugepage/enabled"
  if os.path.exists(thp) and "[always]" in open(thp).read():
    pytest.skip("huge pages make glibc's own faults few too")
  faults, dispatch_async = _run(_PROBE)[-2:]
  assert dispatch_async == "True" and int(faults) > _PAGES * 9 // 10


def test_tune_reports_its_settings_and_leaves_a_chosen_dispatch():
  code = ("from nfnets_jax.cpu import malloc; import jax, os; "
          "print(malloc.tune(os.environ)); "
          "print(jax.config.read('jax_cpu_enable_async_dispatch'))")
  settings, dispatch_async = _run(code, **{malloc.ENV: "1"})[-2:]
  assert settings == str(_TUNED) and dispatch_async == "False"
  settings, dispatch_async = _run(code, **{malloc.ENV: "1",
                                           malloc.ASYNC_ENV: "1"})[-2:]
  assert settings == str({"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": -1})
  assert dispatch_async == "True"
