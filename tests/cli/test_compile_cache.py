"""The command-line programs' persistent compilation cache (cli/compile_cache)."""
import os
import subprocess
import sys

import pytest

from nfnets_jax.cli import compile_cache
import train_harness as testing

_PROBE = """
import jax
from nfnets_jax.cli import compile_cache
print(compile_cache.enable())
print(jax.config.jax_compilation_cache_dir)
jax.jit(lambda x: x * 2)(1.0).block_until_ready()
"""


def test_cache_dir_from_the_environment(tmp_path):
  home = str(tmp_path)
  assert compile_cache.cache_dir({"XDG_CACHE_HOME": home}) == os.path.join(
      home, "nfnets_jax", "jax")
  assert compile_cache.cache_dir({compile_cache.ENV: "0"}) is None
  assert compile_cache.cache_dir(
      {compile_cache.ENV: "1", "XDG_CACHE_HOME": home}) == os.path.join(
          home, "nfnets_jax", "jax")
  assert compile_cache.cache_dir({compile_cache.ENV: home + "/c"}) == (
      home + "/c")


def _probe(env):
  base = {k: v for k, v in testing.subprocess_env().items()
          if k not in (compile_cache.ENV, "JAX_COMPILATION_CACHE_DIR")}
  proc = subprocess.run([sys.executable, "-c", _PROBE], env={**base, **env},
                        capture_output=True, text=True, timeout=120,
                        check=True)
  return proc.stdout.split()


@pytest.mark.parametrize("setting", ["default", "jax"])
def test_enable_in_a_fresh_process(setting, tmp_path):
  home, own = str(tmp_path / "home"), str(tmp_path / "own")
  env = {"XDG_CACHE_HOME": home}
  if setting == "jax":
    env["JAX_COMPILATION_CACHE_DIR"] = own
  enabled, configured = _probe(env)
  expected = {"default": os.path.join(home, "nfnets_jax", "jax"),
              "jax": own}[setting]
  assert enabled == configured == expected
  # The jitted function was written there, though it compiled in well under
  # JAX's default threshold of 1 s.
  assert os.listdir(expected)
