"""JAX's persistent compilation cache for the package's command-line programs.

The command-line programs call `enable()` first thing: compiled programs
(all of them, however quick to compile) are written to a folder and read
back by later processes that compile the same program (same model, shapes,
flags, jaxlib), so a second `nfnets-predict` or a resumed run skips most
compilation. The library never does this on import (it changes `jax.config`
values); in your own process, turn the cache on yourself:

    import jax
    jax.config.update("jax_compilation_cache_dir", "/path/to/cache")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

The folder: `$NFNETS_JAX_COMPILE_CACHE` when it is a path, else
`$XDG_CACHE_HOME/nfnets_jax/jax` (default `~/.cache/nfnets_jax/jax`);
`NFNETS_JAX_COMPILE_CACHE=0` turns it off, and a cache folder you already
gave JAX (`JAX_COMPILATION_CACHE_DIR`) is used as it is.

On CPU, programs holding the oneDNN convolution custom call
(`NFNETS_JAX_CONV=onednn`, the training default where it is available)
cannot be serialized by jaxlib 0.10.2: they are compiled in every process,
and JAX's warning about each failed write is not shown (docs/performance.md).
`Model`'s forward uses XLA's convolutions, which the cache keeps.
"""
from __future__ import annotations

import os
import warnings

import jax

ENV = "NFNETS_JAX_COMPILE_CACHE"
# jaxlib cannot serialize programs holding the oneDNN custom call.
_WRITE_FAILED = r"Error writing persistent compilation cache entry"


def cache_dir(environ: dict[str, str] | None = None) -> str | None:
  """The folder `enable` would use (None: off), from the environment."""
  environ = os.environ if environ is None else environ
  setting = environ.get(ENV, "").strip()
  if setting == "0":
    return None
  if setting and setting != "1":
    return os.path.expanduser(setting)
  base = environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return os.path.join(base, "nfnets_jax", "jax")


def enable() -> str | None:
  """Turns the persistent compilation cache on for this process.

  Call it before anything compiles. A folder already set through JAX's own
  setting wins.

  Returns:
    The cache folder, or None when turned off (`NFNETS_JAX_COMPILE_CACHE=0`).
  """
  if jax.config.jax_compilation_cache_dir:
    path = jax.config.jax_compilation_cache_dir
  else:
    path = cache_dir()
    if path is None:
      return None
    jax.config.update("jax_compilation_cache_dir", path)
  # Keep every program, not only those that took over a second to compile:
  # start-up is many small ones (weight standardization, initializers).
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  warnings.filterwarnings("ignore", message=_WRITE_FAILED)
  return path
