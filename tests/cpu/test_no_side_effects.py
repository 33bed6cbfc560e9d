"""Importing nfnets_jax changes nothing in the process; its programs still
get their CPU compiler options.

A fresh process records its environment, every `jax.config` value, whether
glibc hands a freed 64 MB block back to the system, and the compiled text
of a jitted function of its own; then it imports every module of the
package and records them again. A second process that never imports the
package compiles the same function: the texts must be equal.
"""
import json
import os
import platform
import subprocess
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nfnets_jax as nj
from nfnets_jax.cpu import compiler
from nfnets_jax.experiment import train_state
import train_harness as testing

# A user's function: a convolution and a dot. XLA's default puts both on
# YNNPACK; the package's options keep its convolutions on Eigen.
_USER_FN = """
import jax, jax.numpy as jnp
x, w = jnp.ones((8, 24, 24, 64)), jnp.ones((3, 3, 64, 64))
user_fn = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
).reshape(-1, 64) @ w[0, 0])
"""

_PROBE = _USER_FN + """
import ctypes, importlib, json, os, pkgutil, platform, sys

def freed_block_returned():
  # glibc by default mmaps a 64 MB block and unmaps it on free (RSS falls);
  # with M_MMAP_MAX=0 and no trimming it stays in the heap.
  if platform.libc_ver()[0] != "glibc":
    return None
  libc = ctypes.CDLL(None)
  libc.malloc.restype = ctypes.c_void_p
  libc.free.argtypes = (ctypes.c_void_p,)
  rss = lambda: int(open("/proc/self/statm").read().split()[1])
  size = 64 << 20
  p = libc.malloc(size)
  ctypes.memset(p, 1, size)
  held = rss()
  libc.free(p)
  return rss() < held - (size // 4096) // 2

def snapshot():
  return {"env": dict(os.environ),
          "config": {k: repr(v) for k, v in jax.config.values.items()},
          "freed_block_returned": freed_block_returned()}

before = snapshot()
if sys.argv[1] == "import":
  import nfnets_jax
  for m in pkgutil.walk_packages(nfnets_jax.__path__, "nfnets_jax."):
    importlib.import_module(m.name)
  if len(sys.argv) > 2:  # What the command-line programs do first.
    from nfnets_jax.cpu import malloc
    malloc.tune()
after = snapshot()
print(json.dumps({"before": before, "after": after,
                  "hlo": user_fn.lower(x, w).compile().as_text()}))
"""


def _probe(mode: str, *extra: str, **env: str) -> dict:
  child = {k: v for k, v in os.environ.items()
           if not k.startswith(("XLA_", "JAX_", "NFNETS_JAX_"))}
  child.update(env, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _PROBE, mode, *extra],
                        env=child, cwd=testing.REPO, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("xla_flags", [None, "--xla_cpu_enable_fast_math=false"])
def test_import_changes_no_env_config_allocator_or_user_program(xla_flags):
  env = {} if xla_flags is None else {"XLA_FLAGS": xla_flags}
  imported = _probe("import", **env)
  assert imported["after"]["env"] == imported["before"]["env"]
  assert imported["after"]["config"] == imported["before"]["config"]
  # glibc's default: a freed 64 MB block goes back to the system (None
  # elsewhere); `test_allocator_probe_sees_...` shows the probe can tell.
  glibc = platform.libc_ver()[0] == "glibc"
  assert imported["before"]["freed_block_returned"] is (True if glibc
                                                        else None)
  assert (imported["after"]["freed_block_returned"]
          == imported["before"]["freed_block_returned"])
  # The user's function compiles exactly as in a process without the package.
  assert imported["hlo"] == _probe("none", **env)["hlo"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_allocator_probe_sees_the_opt_in_malloc_settings():
  """The allocator check above can fail: `malloc.tune()` keeps the block."""
  tuned = _probe("import", "tune", NFNETS_JAX_MALLOC="1")
  assert tuned["before"]["freed_block_returned"]
  assert not tuned["after"]["freed_block_returned"]
  assert tuned["after"]["config"] != tuned["before"]["config"]  # Sync dispatch.


def _on_ynnpack(hlo: str) -> tuple[bool, bool]:
  """Whether a compiled program runs a convolution / a dot on YNNPACK.

  YNNPACK's ops are fusions named `%ynn_fusion...`, whose metadata names the
  JAX op they came from.
  """
  fused = " ".join(l for l in hlo.splitlines()
                   if "ynn_fusion" in l.split("=", 1)[0])
  return "conv_general_dilated" in fused, "dot_general" in fused


def test_package_programs_keep_convolutions_off_ynnpack():
  x, w = jnp.ones((8, 24, 24, 64)), jnp.ones((3, 3, 64, 64))
  f = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  ).reshape(-1, 64) @ w[0, 0]
  assert _on_ynnpack(jax.jit(f).lower(x, w).compile().as_text()) == (
      True, True)  # XLA's default.
  assert _on_ynnpack(compiler.jit(f).lower(x, w).compile().as_text()) == (
      False, True)


def test_train_step_is_compiled_with_the_options():
  net = hk.transform_with_state(lambda x, is_training: {
      "logits": hk.Linear(3)(hk.Conv2D(64, 3)(x).reshape(x.shape[0], -1))})
  tx = optax.sgd(0.1)
  state = train_state.init_train_state(net, tx, seed=0, image_size=8,
                                       use_ema=False)
  config = testing.load_config(testing.DEFAULT_CONFIG).train
  config.ema_decay = None
  step = train_state.make_train_step(net, tx, optax.constant_schedule(0.1),
                                     config)
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("batch",))
  from nfnets_jax.experiment import parallel  # pylint: disable=g-import-not-at-top
  batch = parallel.shard({
      "images": np.ones((8, 8, 8, 3), np.float32),
      "labels": np.zeros((8,), np.int32),
      "soft_labels": np.eye(3, dtype=np.float32)[np.zeros(8, int)]}, mesh)
  hlo = step.compile(parallel.replicate(state, mesh), batch).as_text()
  assert _on_ynnpack(hlo)[0] is False


def test_compiler_options_respect_the_user():
  flag = "xla_cpu_experimental_ynn_fusion_type"
  assert flag in compiler.compiler_options(environ={})
  assert compiler.compiler_options(
      environ={"XLA_FLAGS": f"--{flag}=dot"}) == {
          "xla_disable_hlo_passes": "cse_barrier_expander"}
  assert compiler.compiler_options(environ={
      "XLA_FLAGS": f"--{flag}=dot --xla_disable_hlo_passes=foo"}) == {}
  assert compiler.compiler_options(
      environ={compiler.OPT_OUT_ENV: "0"}) == {}
  fast = compiler.compiler_options(fast=True, environ={compiler.OPT_OUT_ENV: "0"})
  assert fast == compiler.FAST_OPTIONS


def test_conv_impl_is_a_context_and_an_environment_setting(monkeypatch):
  monkeypatch.delenv("NFNETS_JAX_CONV", raising=False)
  assert nj.cpu.current_conv_impl() == "auto"
  with nj.conv_impl("split"):
    assert nj.cpu.current_conv_impl() == "split"
    with nj.conv_impl("native"):
      assert nj.cpu.resolved_conv_impl() == "native"
    assert nj.cpu.current_conv_impl() == "split"
  monkeypatch.setenv("NFNETS_JAX_CONV", "native")
  assert nj.cpu.current_conv_impl() == "native"
  monkeypatch.setenv("NFNETS_JAX_CONV", "winograd")
  with pytest.raises(ValueError, match="NFNETS_JAX_CONV='winograd'.*allowed"):
    nj.cpu.current_conv_impl()
  with pytest.raises(ValueError, match="conv_impl='fft'.*allowed"):
    with nj.conv_impl("fft"):
      pass
