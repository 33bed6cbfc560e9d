"""examples/vit_agc.py at tiny size, in-process.

The training tests share one module fixture: a width-16, one-block ViT
trained for 30 steps at batch 32 without AGC and with lambda = 1e-4, where
every unit whose gradient is not zero is clipped. Its two compilations take
11-20 s on 2 shared CPU cores, so those tests are marked slow; the groups,
patches and argument checks are not.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples import vit_agc

TINY = vit_agc.Config(steps=30, batch_size=32, learning_rate=3e-3, width=16,
                      depth=1, heads=2, log_every=10)
TINY_LAMBDA = 1e-4
slow = pytest.mark.slow  # Trains (the module fixture or the command line).


def tiny(**changes) -> vit_agc.Config:
  return dataclasses.replace(TINY, **changes)


@pytest.fixture(scope="module")
def runs():
  """{name: `vit_agc.run` result} of the tiny runs."""
  lines = []
  out = {
      "off": vit_agc.run(tiny(clipping=0.0), log=lines.append),
      "agc": vit_agc.run(tiny(clipping=TINY_LAMBDA), log=None),
      "agc_again": vit_agc.run(tiny(clipping=TINY_LAMBDA), log=None),
      "agc_seed1": vit_agc.run(tiny(clipping=TINY_LAMBDA, seed=1), log=None),
  }
  out["lines"] = lines
  return out


@slow
def test_clip_fraction_is_zero_without_agc(runs):
  fracs = runs["off"]["clip_fractions"]
  assert fracs.shape == (TINY.steps,)
  np.testing.assert_array_equal(fracs, 0.0)
  assert runs["off"]["clip_fraction"] == 0.0


@slow
def test_tiny_lambda_clips_almost_every_unit(runs):
  fracs = runs["agc"]["clip_fractions"]
  assert fracs.shape == (TINY.steps,)
  assert np.all((fracs >= 0.0) & (fracs <= 1.0))
  # Every unit with a nonzero gradient is clipped; the attention key bias
  # (one unit per block) gets none: softmax ignores a shift of all keys.
  assert np.all(fracs > 0.95), fracs
  assert 0.95 < runs["agc"]["clip_fraction"] <= 1.0


@slow
def test_loss_decreases(runs):
  for name in ("off", "agc", "agc_seed1"):
    losses = runs[name]["losses"]
    assert np.all(np.isfinite(losses)), name
    assert losses[-10:].mean() < losses[:10].mean() - 0.1, (name, losses)
    assert 0.0 <= runs[name]["accuracy"] <= 1.0


@slow
def test_same_seed_same_run_other_seed_other_run(runs):
  a, b, c = runs["agc"], runs["agc_again"], runs["agc_seed1"]
  np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(a["clip_fractions"], b["clip_fractions"],
                             atol=1e-6)
  assert abs(a["accuracy"] - b["accuracy"]) <= 1 / 360  # One test image.
  assert not np.allclose(a["losses"], c["losses"], rtol=1e-3)


@slow
def test_progress_lines(runs):
  assert len(runs["lines"]) == TINY.steps // TINY.log_every
  assert runs["lines"][-1].startswith("lambda=0 seed=0 step    30  loss ")


def test_agc_and_weight_decay_groups():
  """AGC leaves only the classifier kernel out; weight decay only kernels."""
  config = tiny(clipping=0.01)
  params = vit_agc.init_params(config, jax.random.key(0))
  tx = vit_agc.make_optimizer(config)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, state = jax.jit(tx.update)(grads, state, params)
  clipped = {k.removeprefix("agc_clip_frac/")
             for k in vit_agc.nj.clip_stats(state)} - {"agc_clip_frac"}
  names = {jax.tree_util.keystr(path, simple=True, separator="/")
           for path, _ in jax.tree_util.tree_leaves_with_path(params)}
  assert clipped == names - {"head/kernel"}
  assert "blocks/0/attn/query/kernel" in clipped
  decayed = {jax.tree_util.keystr(path, simple=True, separator="/")
             for path, d in jax.tree_util.tree_leaves_with_path(
                 vit_agc.decay_mask(params)) if d}
  assert decayed == {n for n in names if n.endswith("kernel")} | {"pos"}


def test_patchify_keeps_every_pixel_once():
  images = jnp.arange(2 * 8 * 8, dtype=jnp.float32).reshape(2, 8, 8, 1)
  patches = vit_agc.patchify(images, 2)
  assert patches.shape == (2, 16, 4)
  np.testing.assert_array_equal(patches[0, 0], [0, 1, 8, 9])  # Top-left 2x2.
  np.testing.assert_array_equal(np.sort(patches.ravel()),
                                np.arange(2 * 8 * 8))


@slow
def test_command_line_writes_the_table(tmp_path, capsys):
  out = tmp_path / "sweep.md"
  argv = ["--steps", "30", "--batch_size", "32", "--learning_rate", "3e-3",
          "--width", "16", "--depth", "1", "--heads", "2", "--log_every",
          "10", "--clipping", "0", str(TINY_LAMBDA), "--seeds", "0",
          "--out", str(out)]
  rows = vit_agc.main(argv)
  assert [(r["clipping"], r["seed"]) for r in rows] == [(0.0, 0),
                                                        (TINY_LAMBDA, 0)]
  printed = capsys.readouterr().out
  table = out.read_text()
  assert table.startswith("<!-- python -m examples.vit_agc --steps 30 ")
  assert "| off | 0 |" in table and "| 0.0001 | 0 |" in table
  assert table.split("\n", 2)[2] in printed


@pytest.mark.parametrize("argv", [["--batch_size", "0"], ["--clipping", "-1"],
                                  ["--batch_size", "2000"]])
def test_bad_arguments_exit_2(argv):
  with pytest.raises(SystemExit) as e:
    vit_agc.parse_args(argv)
  assert e.value.code == 2
