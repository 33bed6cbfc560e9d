"""XLA:CPU flags that make NFNets train faster, set when nfnets_jax is imported.

jaxlib 0.10.2 hands convolutions, dots, reductions and elementwise fusions on
CPU to YNNPACK. We keep YNNPACK for plain dots and reductions only
(`--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce`):
- Convolutions stay on Eigen: YNNPACK's NHWC convolution gradients are slower
  (a 3x3 32->64 conv at 96x96, batch 8: forward + backward 587 ms with
  YNNPACK, 120 ms on Eigen on a 2-core AVX2 EPYC; kernel gradient of a 3x3
  128->128 conv at 48x48 24.6 against 19.1 ms on a Zen 5 EPYC).
- Dots go to YNNPACK: Eigen ran the input gradient of a 1x1 conv (a dot with
  a transposed kernel) slowly, `[288, 3072] x [1536, 3072]^T` 21.8 ms against
  6.3 ms with YNNPACK.
- Reductions go to YNNPACK: XLA's own split the squeeze-excite means and
  gradient sums into reduce-windows.
F0 train step at 192 px, batch 8, one process, the programs compiled with
each setting and interleaved (6 rounds): 1213 ms with YNNPACK off, 1102 ms
with dots and reductions on it on a Zen 5 EPYC (+10%), 2172 against 1995 ms
on a Zen 4 EPYC (+9%); inference 348 against 344 ms and 658 against 654.
Adding YNNPACK's elementwise fusions made both slower (train -5%, inference
-12%). Numbers change only by float rounding.

XLA reads `XLA_FLAGS` once, when the first JAX computation starts a backend,
so `nfnets_jax` appends its flags at import. Flags the user already put in
`XLA_FLAGS` win; `NFNETS_JAX_XLA_FLAGS=0` keeps XLA's defaults. XLA_FLAGS is
process-wide: other JAX code in the same process gets the flags too.
"""
from __future__ import annotations

from collections.abc import MutableMapping
import os
import warnings

# flag name -> value: YNNPACK for plain dots and reductions only.
CPU_XLA_FLAGS: dict[str, str] = {
    "xla_cpu_experimental_ynn_fusion_type": "individual_dot,reduce"}
OPT_OUT_ENV = "NFNETS_JAX_XLA_FLAGS"


def flags_to_add(xla_flags: str, flags: dict[str, str] = CPU_XLA_FLAGS
                 ) -> list[str]:
  """The `--name=value` items of `flags` whose name `xla_flags` lacks."""
  return [f"--{name}={value}" for name, value in flags.items()
          if f"--{name}" not in xla_flags]


def apply(environ: MutableMapping[str, str] = os.environ) -> list[str]:
  """Appends `CPU_XLA_FLAGS` to `environ['XLA_FLAGS']`; returns what it added.

  Adds nothing when `environ[OPT_OUT_ENV]` is '0'. Warns (and still adds,
  for child processes) when a JAX backend already started: the flags then
  take effect only in processes started afterwards.
  """
  if environ.get(OPT_OUT_ENV, "1") == "0":
    return []
  current = environ.get("XLA_FLAGS", "")
  added = flags_to_add(current)
  if not added:
    return []
  environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
  if environ is os.environ and backend_started():
    warnings.warn(
        "nfnets_jax was imported after JAX started its backend, so its "
        f"CPU flags ({' '.join(added)}) do not apply to this process; "
        "import nfnets_jax before running any JAX computation, or put them "
        "in XLA_FLAGS yourself", stacklevel=3)
  return added


def backend_started() -> bool:
  """Whether a JAX backend (and so its flags and client options) exists."""
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # A JAX without the private helper.
    return False
