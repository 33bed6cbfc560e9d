"""Rematerialization (`config.model.remat`): each residual block's
activations recomputed in the backward pass, with outputs, gradients and
parameter names unchanged."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nfnets_jax as nj
from nfnets_jax.models import families

VARIANT = {"width": (16, 32), "depth": (1, 1), "train_imsize": 16,
           "test_imsize": 16, "drop_rate": 0.0, "randaugment_layers": 0,
           "randaugment_magnitude": 0}
# The families share `layers.apply_stages`, where remat is applied; the
# NFNet is the test's (the cheapest to compile).
KWARGS = {
    "NFNet": {"variant": VARIANT, "group_size": 8, "stochdepth_rate": 0.0},
}


def _loss_and_grads(net, params, state, images, labels):
  def loss(p):
    out, _ = net.apply(p, state, jax.random.PRNGKey(1), images,
                       is_training=True)
    logp = jax.nn.log_softmax(out["logits"])
    return -jnp.mean(logp[jnp.arange(len(labels)), labels])
  # XLA's own convolutions: the test is about remat, not the lowering, and
  # they compile fastest.
  with nj.conv_impl("native"):
    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("family", sorted(KWARGS))
def test_remat_keeps_outputs_gradients_and_names(family):
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 2))
  net, remat_net = (
      families.make_network(family, KWARGS[family], 10, remat=remat)
      for remat in (False, True))
  init = lambda n: functools.partial(n.init, is_training=True)
  params, state = jax.jit(init(net))(jax.random.PRNGKey(0), images)
  # The same parameter names and shapes (traced, not run).
  assert jax.eval_shape(init(remat_net), jax.random.PRNGKey(0), images) == (
      jax.eval_shape(init(net), jax.random.PRNGKey(0), images))
  loss, grads = _loss_and_grads(net, params, state, images, labels)
  remat_loss, remat_grads = _loss_and_grads(remat_net, params, state, images,
                                            labels)
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
    np.testing.assert_allclose(h, g, rtol=1e-5, atol=1e-7)


def test_remat_for_a_family_without_it_is_refused_by_name():
  assert families.remat_families() == ["NFNet", "NFRegNet", "NFResNet",
                                       "NormFreeNet"]
  with pytest.raises(ValueError, match="config.model.remat=True is not "
                     "supported by ResNet; allowed with NFNet"):
    families.make_network("ResNet", {"depth": 50}, 10, remat=True)
