"""The package's XLA:CPU compiler options (`cpu.compiler`)."""
import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax.cpu import compiler

WIDTH, ROWS, LAYERS = 256, 512, 8


def _layer(w, x):
  return jnp.tanh(jnp.tanh(x @ w) @ w.T) + x


def _grad(remat: bool):
  layer = jax.checkpoint(_layer) if remat else _layer

  def loss(ws, x):
    for w in ws:
      x = layer(w, x)
    return jnp.sum(x ** 2)
  return jax.jit(jax.grad(loss))


def test_remat_keeps_its_memory_saving_under_the_package_options():
  """XLA:CPU's `cse_barrier_expander` would drop the optimization barriers
  of `jax.checkpoint` and merge the recomputation into the forward pass;
  the package's options keep them, so a rematerialized chain holds one
  activation per layer instead of three."""
  rng = np.random.default_rng(0)
  ws = [jnp.asarray(rng.normal(size=(WIDTH, WIDTH)) / 16, jnp.float32)
        for _ in range(LAYERS)]
  x = jnp.asarray(rng.normal(size=(ROWS, WIDTH)), jnp.float32)
  options = compiler.compiler_options(environ={})
  plain = _grad(False).lower(ws, x).compile(compiler_options=options)
  remat = _grad(True).lower(ws, x).compile(compiler_options=options)
  activation = ROWS * WIDTH * 4
  plain_temp = plain.memory_analysis().temp_size_in_bytes
  remat_temp = remat.memory_analysis().temp_size_in_bytes
  assert plain_temp >= 2 * LAYERS * activation  # Two tanh outputs a layer.
  assert remat_temp <= (LAYERS + 4) * activation  # The layers' inputs.
  for g, h in zip(plain(ws, x), remat(ws, x)):
    np.testing.assert_allclose(h, g, rtol=1e-5, atol=1e-5 * np.abs(g).max())
