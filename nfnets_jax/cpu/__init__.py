"""How NFNets run fast on XLA:CPU, in one corner of the package.

- `lowering`: which convolution lowering the models trace (`conv_impl`, a
  context manager, or `$NFNETS_JAX_CONV`) and the models' one convolution
  entry point, `conv2d`.
- `convolution`: the lowerings ('native', 'split', 'onednn') and their
  gradients.
- `onednn`: oneDNN's direct convolution as a JAX primitive, and the
  per-process check that it runs here.
- `compiler`: XLA:CPU compiler options given to each program the package
  compiles, never to the process.
- `malloc`: glibc settings that keep XLA's freed buffers (opt-in, applied by
  the command-line programs, never on import).

Nothing here runs on import.
"""
from nfnets_jax.cpu.compiler import compiler_options
from nfnets_jax.cpu.compiler import jit
from nfnets_jax.cpu.lowering import CONV_IMPLS
from nfnets_jax.cpu.lowering import conv_impl
from nfnets_jax.cpu.lowering import current_conv_impl
from nfnets_jax.cpu.lowering import resolved_conv_impl

__all__ = ("CONV_IMPLS", "compiler_options", "conv_impl",
           "current_conv_impl", "jit", "resolved_conv_impl")
