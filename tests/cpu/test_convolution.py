"""The convolution lowerings and the run-time switch, against NumPy.

Every lowering ('native', 'split', 'onednn') gives the numbers of a
brute-force NumPy convolution, forward and gradients; the oneDNN custom call
is in the programs it should be in and nowhere else.
"""
import textwrap

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nfnets_jax as nj
from nfnets_jax.cpu import convolution
from nfnets_jax.cpu import lowering
from nfnets_jax.cpu import onednn
import train_harness as testing

needs_onednn = pytest.mark.skipif(
    not onednn.available(),
    reason="this jaxlib / CPU runs no oneDNN convolution")


def conv(x, w, *, impl, stride, padding, groups):
  """`lowering.conv2d` with the lowering `impl` (traced in the context)."""
  with nj.conv_impl(impl):
    return lowering.conv2d(x, w, stride=stride, padding=padding,
                           groups=groups)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_split_grouped_conv_equals_native(stride, groups):
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 8))
  w = jax.random.normal(jax.random.key(1), (3, 3, 8 // groups, 12))
  kw = dict(stride=(stride, stride), padding="SAME", groups=groups)
  native = conv(x, w, impl="native", **kw)
  split = conv(x, w, impl="split", **kw)
  np.testing.assert_allclose(split, native, rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("kernel,stride,groups,size", [
    (3, 1, 1, 8), (3, 2, 2, 9), (1, 1, 1, 6), (1, 2, 4, 7), (5, 2, 1, 8)])
def test_split_lowering_gradients_equal_native(kernel, stride, groups, size,
                                               padding):
  # VALID at stride 2 on an even size leaves the last input row unused.
  x = jax.random.normal(jax.random.key(0), (2, size, size, 8))
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, 8 // groups, 12))
  g = jax.random.normal(jax.random.key(2), conv(
      x, w, stride=(stride,) * 2, padding=padding, groups=groups,
      impl="native").shape)
  grads = {}
  for impl in ("native", "split"):
    f = lambda x, w: conv(x, w, stride=(stride,) * 2,
                                         padding=padding, groups=groups,
                                         impl=impl)
    grads[impl] = jax.vjp(f, x, w)[1](g)
  for got, want in zip(grads["split"], grads["native"]):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_split_conv_kernel_grad_matches_numpy_brute_force():
  # Strided, padded, 2 groups: dW[i, j, c, o] of group k sums
  # x_pad[n, 2h + i, 2w + j, k*C + c] * g[n, h, w, k*O + o] over n, h, w.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 5, 6)).astype(np.float32)
  g = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
  w = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
  pads = ((1, 1), (1, 1))
  f = lambda w: conv(jnp.asarray(x), w, stride=(2, 2),
                                    padding=pads, groups=2, impl="split")
  (got,) = jax.vjp(f, jnp.asarray(w))[1](jnp.asarray(g))
  xp = np.pad(x, ((0, 0), *pads, (0, 0)))
  want = np.zeros((3, 3, 3, 4))
  for k in range(2):
    for i in range(3):
      for j in range(3):
        for h in range(3):
          for v in range(3):
            want[i, j, :, 2 * k:2 * k + 2] += np.einsum(
                "nc,no->co", xp[:, 2 * h + i, 2 * v + j, 3 * k:3 * k + 3],
                g[:, h, v, 2 * k:2 * k + 2])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride,pads,size", [
    ((2, 2), ((1, 1), (1, 1)), (7, 6)), ((2, 2), ((0, 1), (2, 0)), (8, 9)),
    ((3, 3), ((1, 1), (0, 2)), (10, 8)), ((2, 1), ((1, 1), (1, 1)), (7, 5))])
def test_split_conv_strided_input_grad_matches_numpy_brute_force(stride, pads,
                                                                 size):
  # dx[n, sh*h + i - p_lo, sw*v + j - q_lo, k*C + c] += W[i, j, c, k*O + o] *
  # g[n, h, v, k*O + o]: each output scatters back through every tap.
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, *size, 6)).astype(np.float32)
  w = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
  f = lambda x: conv(x, jnp.asarray(w), stride=stride,
                                    padding=pads, groups=2, impl="split")
  out, vjp = jax.vjp(f, jnp.asarray(x))
  g = rng.normal(size=out.shape).astype(np.float32)
  (got,) = vjp(jnp.asarray(g))
  want = np.zeros((2, size[0] + sum(pads[0]), size[1] + sum(pads[1]), 6))
  sh, sw = stride
  for k in range(2):
    for i in range(3):
      for j in range(3):
        for h in range(g.shape[1]):
          for v in range(g.shape[2]):
            want[:, sh * h + i, sw * v + j, 3 * k:3 * k + 3] += (
                g[:, h, v, 2 * k:2 * k + 2] @ w[i, j, :, 2 * k:2 * k + 2].T)
  want = want[:, pads[0][0]:pads[0][0] + size[0],
              pads[1][0]:pads[1][0] + size[1]]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_split_1x1_conv_is_a_matmul_with_numpy_gradients():
  # out[n,h,w,o] = sum_c x[n,h,w,c] W[c,o]; dx = g W^T; dW = sum_nhw x^T g.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 4, 3, 5)).astype(np.float32)
  w = rng.normal(size=(1, 1, 5, 6)).astype(np.float32)
  g = rng.normal(size=(2, 4, 3, 6)).astype(np.float32)
  f = lambda x, w: conv(x, w, stride=(1, 1), padding="SAME",
                                       groups=1, impl="split")
  out, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(w))
  dx, dw = vjp(jnp.asarray(g))
  np.testing.assert_allclose(out, np.einsum("nhwc,co->nhwo", x, w[0, 0]),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, np.einsum("nhwo,co->nhwc", g, w[0, 0]),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw[0, 0], np.einsum("nhwc,nhwo->co", x, g),
                             rtol=1e-5, atol=1e-5)
  hlo = jax.jit(f).lower(x, w).as_text()
  assert "dot_general" in hlo and "convolution" not in hlo


def test_add_bias_value_and_gradients_match_numpy():
  # y = x + b; dy/dx = g; dy/db = sum of g over all leading axes; jvp adds db.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  b = rng.normal(size=(5,)).astype(np.float32)
  g = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  out, vjp = jax.vjp(convolution.add_bias, jnp.asarray(x), jnp.asarray(b))
  dx, db = vjp(jnp.asarray(g))
  np.testing.assert_allclose(out, x + b, rtol=1e-6)
  np.testing.assert_allclose(dx, g, rtol=1e-6)
  np.testing.assert_allclose(db, g.sum(axis=(0, 1, 2)), rtol=1e-5, atol=1e-5)
  _, tangent = jax.jvp(convolution.add_bias, (x, b), (g, b))
  np.testing.assert_allclose(tangent, g + b, rtol=1e-6)


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
  f = lambda x, w: conv(x, w, stride=stride, padding=pads,
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
    f = lambda x, w, impl=impl: jnp.sum(conv(
        x, w, stride=(1, 1), padding="SAME", groups=2, impl=impl) ** 2)
    hlo = jax.jit(jax.grad(f, (0, 1))).lower(x, w).compile().as_text()
    # Forward and input gradient on oneDNN; the kernel gradient on XLA.
    assert hlo.count(onednn.CUSTOM_CALL_TARGET) == 2, impl
  hlo = jax.jit(lambda x, w: conv(
      x, w, stride=(1, 1), padding="SAME", groups=2, impl="split")).lower(
          x, w).compile().as_text()
  assert onednn.CUSTOM_CALL_TARGET not in hlo


@needs_onednn
def test_onednn_falls_back_to_split_for_bfloat16():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 5, 5, 4)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.bfloat16)
  jitted = {impl: jax.jit(lambda x, w, impl=impl: conv(
      x, w, stride=(1, 1), padding="SAME", groups=2, impl=impl))
            for impl in ("onednn", "split")}
  assert onednn.CUSTOM_CALL_TARGET not in jitted["onednn"].lower(
      x, w).compile().as_text()
  # Same program, same inputs: the same bits.
  np.testing.assert_array_equal(jitted["onednn"](x, w), jitted["split"](x, w))


@needs_onednn
def test_onednn_conv_under_vmap_matches_a_loop():
  rng = np.random.default_rng(3)
  xs = rng.normal(size=(3, 2, 5, 5, 4)).astype(np.float32)
  ws = rng.normal(size=(3, 3, 3, 2, 6)).astype(np.float32)
  one = lambda x, w: onednn.conv(x, w, (1, 1), ((1, 1), (1, 1)), 2)
  got = jax.vmap(one)(xs, ws)
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
  f = jax.jit(lambda x: conv(
      x, jnp.asarray(w), stride=(2, 2), padding=pads, groups=2,
      impl="onednn"))
  exported = jax.export.export(f, platforms=platforms)(
      jax.ShapeDtypeStruct(x.shape, x.dtype))
  assert onednn.CUSTOM_CALL_TARGET not in exported.mlir_module()
  restored = jax.export.deserialize(exported.serialize())
  want = _numpy_conv_and_grads(x, w, np.zeros((2, 4, 4, 4)), (2, 2), pads,
                               2)[0]
  np.testing.assert_allclose(restored.call(x), want, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_flop_count_does_not_depend_on_the_lowering():
  def count(impl):
    with nj.conv_impl(impl):
      return nj.count_flops(lambda x: nj.NFNet(10, "F0", width=0.25)(
          x, is_training=False), 64)
  assert count("onednn") == count("native") == count("split") > 0


def test_bad_conv_inputs_name_what_is_allowed():
  x = jnp.ones((1, 4, 4, 4))
  w = jnp.ones((3, 3, 4, 4))
  with pytest.raises(ValueError, match="allowed: 'auto', 'native', 'split', "
                     "'onednn'"):
    conv(x, w, stride=(1, 1), padding="SAME", groups=1, impl="winograd")
  with pytest.raises(ValueError, match="pads must be >= 0"):
    onednn.conv(x, w, (1, 1), ((-1, 0), (0, 0)))
  with pytest.raises(ValueError, match="allowed: \\['float32'\\]"):
    onednn.conv(x.astype(jnp.bfloat16), w, (1, 1), ((1, 1), (1, 1)))
  with pytest.raises(ValueError, match="2 groups"):
    onednn.conv(x, w, (1, 1), ((1, 1), (1, 1)), groups=2)


_SHARDED_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import nfnets_jax as nj
    from nfnets_jax.cpu import lowering, onednn

    assert jax.device_count() == 4 and onednn.available()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 6, 6, 8)).astype(np.float32)
    w = rng.normal(size=(3, 3, 4, 8)).astype(np.float32)

    def grads(impl):
      def loss(x, w):
        with nj.conv_impl(impl):
          return jnp.sum(jnp.tanh(lowering.conv2d(
              x, w, stride=(2, 2), padding="SAME", groups=2)))
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
  out = testing.run_script(_SHARDED_SCRIPT, devices=4)
  assert out["devices"] == 4
  assert out["max_err"] < 1e-4


def test_haiku_model_under_every_lowering_equals_native():
  # Same parameters, same logits, whichever lowering the setting picks.
  # Grouped, strided and 1x1 convolutions: two stages of 2-group blocks.
  variant = {"width": (32, 64), "depth": (1, 1), "train_imsize": 32,
             "test_imsize": 32, "randaugment_layers": 0,
             "randaugment_magnitude": 0, "drop_rate": 0.0}
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  net = hk.transform(lambda x: nj.NFNet(5, variant, group_size=8)(
      x, is_training=False)["logits"])
  params = jax.jit(net.init)(jax.random.key(1), x)
  logits = {}
  # 'auto' is one of the others ('onednn' on a CPU that has it).
  for impl in {nj.cpu.resolved_conv_impl(i) for i in ("auto", "native",
                                                       "split")}:
    with nj.conv_impl(impl):
      logits[impl] = jax.jit(net.apply)(params, None, x)
  for impl, got in logits.items():
    np.testing.assert_allclose(got, logits["native"], rtol=1e-4, atol=1e-4,
                               err_msg=impl)
