"""nfnets_jax sets its XLA:CPU flags at import, unless told not to."""
import os
import subprocess
import sys

from nfnets_jax import cpu_flags

_PROBE = """
import nfnets_jax, jax, jax.numpy as jnp, os
x, w = jnp.ones((8, 48, 48, 128)), jnp.ones((3, 3, 128, 128))
conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
dot = jax.jit(lambda x, w: x.reshape(-1, 128) @ w[0, 0])
print("flags=" + os.environ.get("XLA_FLAGS", ""))
print("ynn" in conv.lower(x, w).compile().as_text(),
      "ynn" in dot.lower(x, w).compile().as_text())
"""


def _probe(**env) -> list[str]:
  """`[XLA_FLAGS, 'conv dot']` in a new process: whether a big conv and a
  big dot went to YNNPACK, e.g. 'False True'."""
  child = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", cpu_flags.OPT_OUT_ENV)}
  child.update(env, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _PROBE], env=child, check=True,
                       capture_output=True, text=True).stdout
  flags, uses_ynn = out.strip().splitlines()[-2:]
  return [flags.removeprefix("flags="), uses_ynn]


def test_flags_to_add_keeps_what_the_user_set():
  flags = {"xla_a": "", "xla_b": "2"}
  assert cpu_flags.flags_to_add("", flags) == ["--xla_a=", "--xla_b=2"]
  assert cpu_flags.flags_to_add("--xla_b=7 --other", flags) == ["--xla_a="]


def test_apply_appends_once_and_honours_opt_out():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  added = cpu_flags.apply(env)
  flag = "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce"
  assert added == [flag]
  assert env["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=4 "
                              + flag)
  assert cpu_flags.apply(env) == []  # Already there.
  env = {cpu_flags.OPT_OUT_ENV: "0"}
  assert cpu_flags.apply(env) == [] and "XLA_FLAGS" not in env


def test_import_keeps_ynnpack_for_dots_not_convolutions_in_a_fresh_process():
  flags, uses_ynn = _probe()
  assert "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce" in flags
  assert uses_ynn == "False True"
  flags, uses_ynn = _probe(**{cpu_flags.OPT_OUT_ENV: "0"})
  assert flags == "" and uses_ynn == "True True"  # XLA's default: both.
