"""oneDNN convolutions (`conv_impl='onednn'`) against NumPy brute force."""
import json
import os
import subprocess
import sys
import textwrap

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nfnets_jax as nj
from nfnets_jax import layers
from nfnets_jax import onednn_conv

needs_onednn = pytest.mark.skipif(
    not onednn_conv.available(),
    reason="this jaxlib / CPU runs no oneDNN convolution")


def _numpy_conv_and_grads(x, w, g, stride, pads, groups):
  """Forward, dx and dW of a grouped NHWC x HWIO convolution, by loops.

  out[n, h, v, k*O + o] = sum_{i, j, c} x_pad[n, sh*h + i, sw*v + j, k*C + c]
  * W[i, j, c, k*O + o]; dx and dW are the same sums scattered back.
  """
  kh, kw, cin_g, cout = w.shape
  cout_g = cout // groups
  xp = np.pad(x.astype(np.float64), ((0, 0), *pads, (0, 0)))
  out_h = (xp.shape[1] - kh) // stride[0] + 1
  out_w = (xp.shape[2] - kw) // stride[1] + 1
  out = np.zeros((x.shape[0], out_h, out_w, cout))
  dxp = np.zeros_like(xp)
  dw = np.zeros(w.shape)
  for k in range(groups):
    ci = slice(k * cin_g, (k + 1) * cin_g)
    co = slice(k * cout_g, (k + 1) * cout_g)
    for i in range(kh):
      for j in range(kw):
        for h in range(out_h):
          for v in range(out_w):
            patch = xp[:, stride[0] * h + i, stride[1] * v + j, ci]
            out[:, h, v, co] += patch @ w[i, j, :, co]
            dxp[:, stride[0] * h + i, stride[1] * v + j, ci] += (
                g[:, h, v, co] @ w[i, j, :, co].T)
            dw[i, j, :, co] += patch.T @ g[:, h, v, co]
  dx = dxp[:, pads[0][0]:pads[0][0] + x.shape[1],
           pads[1][0]:pads[1][0] + x.shape[2]]
  return out, dx, dw


CASES = [  # stride, pads, kernel, groups, input (H, W)
    ((1, 1), ((1, 1), (1, 1)), (3, 3), 2, (6, 7)),  # F0's grouped 3x3
    ((2, 2), ((0, 1), (0, 1)), (3, 3), 2, (8, 8)),  # F0's transitions
    ((2, 1), ((1, 0), (2, 1)), (3, 3), 3, (7, 5)),  # uneven everything
    ((1, 1), ((0, 0), (0, 0)), (3, 2), 1, (6, 5)),  # VALID, 3x2 kernel
    ((3, 3), ((2, 2), (1, 1)), (3, 3), 1, (9, 10)),
    ((1, 1), ((3, 0), (0, 3)), (3, 3), 1, (5, 6)),  # pads > k - 1
    ((2, 2), ((0, 0), (0, 0)), (1, 1), 1, (7, 7)),  # strided 1x1 shortcut
]


@needs_onednn
@pytest.mark.parametrize("stride,pads,kernel,groups,size", CASES)
def test_onednn_grouped_conv_and_gradients_match_numpy(stride, pads, kernel,
                                                       groups, size):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, *size, 6)).astype(np.float32)
  w = rng.normal(size=(*kernel, 6 // groups, 4 * groups)).astype(np.float32)
  f = lambda x, w: layers.grouped_conv(x, w, stride=stride, padding=pads,
                                       groups=groups, impl="onednn")
  out, vjp = jax.vjp(jax.jit(f), jnp.asarray(x), jnp.asarray(w))
  g = rng.normal(size=out.shape).astype(np.float32)
  dx, dw = vjp(jnp.asarray(g))
  want = _numpy_conv_and_grads(x, w, g, stride, pads, groups)
  for got, ref in zip((out, dx, dw), want):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_onednn_conv_runs_as_the_custom_call_and_auto_picks_it_on_cpu():
  x = jnp.ones((2, 6, 6, 8))
  w = jnp.ones((3, 3, 4, 8))
  for impl in ("onednn", "auto"):
    f = lambda x, w, impl=impl: jnp.sum(layers.grouped_conv(
        x, w, stride=(1, 1), padding="SAME", groups=2, impl=impl) ** 2)
    hlo = jax.jit(jax.grad(f, (0, 1))).lower(x, w).compile().as_text()
    # Forward and input gradient on oneDNN; the kernel gradient on XLA.
    assert hlo.count(onednn_conv.CUSTOM_CALL_TARGET) == 2, impl
  hlo = jax.jit(lambda x, w: layers.grouped_conv(
      x, w, stride=(1, 1), padding="SAME", groups=2, impl="split")).lower(
          x, w).compile().as_text()
  assert onednn_conv.CUSTOM_CALL_TARGET not in hlo


@needs_onednn
def test_onednn_falls_back_to_split_for_bfloat16():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 5, 5, 4)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.bfloat16)
  conv = {impl: jax.jit(lambda x, w, impl=impl: layers.grouped_conv(
      x, w, stride=(1, 1), padding="SAME", groups=2, impl=impl))
          for impl in ("onednn", "split")}
  assert onednn_conv.CUSTOM_CALL_TARGET not in conv["onednn"].lower(
      x, w).compile().as_text()
  # Same program, same inputs: the same bits.
  np.testing.assert_array_equal(conv["onednn"](x, w), conv["split"](x, w))


@needs_onednn
def test_onednn_conv_under_vmap_matches_a_loop():
  rng = np.random.default_rng(3)
  xs = rng.normal(size=(3, 2, 5, 5, 4)).astype(np.float32)
  ws = rng.normal(size=(3, 3, 3, 2, 6)).astype(np.float32)
  conv = lambda x, w: onednn_conv.conv(x, w, (1, 1), ((1, 1), (1, 1)), 2)
  got = jax.vmap(conv)(xs, ws)
  for x, w, out in zip(xs, ws, got):
    want = _numpy_conv_and_grads(x, w, np.zeros((2, 5, 5, 6)), (1, 1),
                                 ((1, 1), (1, 1)), 2)[0]
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize("platforms", [None, ("cpu", "cuda")])
def test_exported_programs_use_the_portable_convolution(platforms):
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 8, 8, 6)).astype(np.float32)
  w = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
  pads = ((0, 1), (0, 1))
  f = jax.jit(lambda x: layers.grouped_conv(
      x, jnp.asarray(w), stride=(2, 2), padding=pads, groups=2,
      impl="onednn"))
  exported = jax.export.export(f, platforms=platforms)(
      jax.ShapeDtypeStruct(x.shape, x.dtype))
  assert onednn_conv.CUSTOM_CALL_TARGET not in exported.mlir_module()
  restored = jax.export.deserialize(exported.serialize())
  want = _numpy_conv_and_grads(x, w, np.zeros((2, 4, 4, 4)), (2, 2), pads,
                               2)[0]
  np.testing.assert_allclose(restored.call(x), want, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_flop_count_sees_onednn_convolutions():
  count = lambda impl: nj.count_flops(lambda x: nj.NFNet(
      10, "F0", width=0.25, conv_impl=impl)(x, is_training=False), 64)
  assert count("onednn") == count("native") > 0


def test_bad_conv_inputs_name_what_is_allowed():
  x = jnp.ones((1, 4, 4, 4))
  w = jnp.ones((3, 3, 4, 4))
  with pytest.raises(ValueError, match="allowed: 'auto', 'native', 'split', "
                     "'onednn'"):
    layers.grouped_conv(x, w, stride=(1, 1), padding="SAME", groups=1,
                        impl="winograd")
  with pytest.raises(ValueError, match="pads must be >= 0"):
    onednn_conv.conv(x, w, (1, 1), ((-1, 0), (0, 0)))
  with pytest.raises(ValueError, match="allowed: \\['float32'\\]"):
    onednn_conv.conv(x.astype(jnp.bfloat16), w, (1, 1), ((1, 1), (1, 1)))
  with pytest.raises(ValueError, match="2 groups"):
    onednn_conv.conv(x, w, (1, 1), ((1, 1), (1, 1)), groups=2)


_SHARDED_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from nfnets_jax import layers, onednn_conv

    assert jax.device_count() == 4 and onednn_conv.available()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 6, 6, 8)).astype(np.float32)
    w = rng.normal(size=(3, 3, 4, 8)).astype(np.float32)

    def grads(impl):
      loss = lambda x, w: jnp.sum(jnp.tanh(layers.grouped_conv(
          x, w, stride=(2, 2), padding="SAME", groups=2, impl=impl)))
      return jax.grad(loss, (0, 1))

    mesh = Mesh(np.array(jax.devices()), ("data",))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ws = jax.device_put(w, NamedSharding(mesh, P()))
    got = jax.jit(grads("onednn"))(xs, ws)
    want = jax.jit(grads("native"))(x, w)
    print(json.dumps({
        "devices": len(got[0].sharding.device_set),
        "max_err": max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                       for a, b in zip(got, want))}))
""")


@needs_onednn
def test_onednn_conv_data_parallel_over_four_cpu_devices():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env,
                        cwd=root, capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 4
  assert out["max_err"] < 1e-4


def test_haiku_model_under_onednn_equals_native():
  # Same parameters, same logits, whichever lowering the CPU picks.
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  nets = {impl: hk.transform(lambda x, impl=impl: nj.NFNet(
      5, "F0", width=0.25, conv_impl=impl)(x, is_training=False)["logits"])
          for impl in ("auto", "native")}
  params = nets["native"].init(jax.random.key(1), x)
  np.testing.assert_allclose(nets["auto"].apply(params, None, x),
                             nets["native"].apply(params, None, x),
                             rtol=1e-4, atol=1e-4)
