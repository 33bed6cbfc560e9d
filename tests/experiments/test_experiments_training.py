"""Training experiments: `agc_batch_size`, `clipping_threshold`, and the
`small_scale` harness they share.

The scripts run their `main(['--quick', '--out', tmp])` here, as
`python -m experiments.<name> --quick` would; the harness is checked against
the library (its optimizer chain equals `make_optimizer`, its data the
training pipeline's), for reproducibility and for how it reports divergence.
"""
import itertools
import math

import jax
import ml_collections
import numpy as np
import optax
import pytest

from experiments import agc_batch_size
from experiments import clipping_threshold
from experiments import small_scale as ss
from nfnets_jax import data
from nfnets_jax.experiment import config_validation
from nfnets_jax.optim import optimizers

import experiment_outputs

pytestmark = pytest.mark.slow  # End-to-end runs.

NUM_TRAIN, NUM_TEST = 1437, 360


def _same(csv_value: str, value) -> bool:
  """A CSV cell against the returned value (None: empty; NaN: 'nan')."""
  if value is None:
    return csv_value == ""
  if isinstance(value, str):
    return csv_value == value
  got = float(csv_value)
  return (math.isnan(got) and math.isnan(value)) or got == value


def _check_run(r, batch_size, epochs):
  """Facts every run row holds."""
  assert r["steps"] == int(NUM_TRAIN * epochs) // batch_size
  if r["diverged_step"] is None:
    assert 0.0 <= r["test_top1"] <= 1.0
    # A fraction of the 360 test digits.
    assert abs(r["test_top1"] * NUM_TEST - round(r["test_top1"] * NUM_TEST)
               ) < 1e-6
    assert math.isfinite(r["test_loss"]) and math.isfinite(r["train_loss"])
  else:
    assert 1 <= r["diverged_step"] <= r["steps"]
    assert math.isnan(r["test_top1"]) and math.isnan(r["test_loss"])


# Opt-in (-m long), to keep the suite under CI's 10 minutes: 12 small runs,
# 37 compilations; the small-scale trainer is run by the clipping-threshold
# experiment's test and the trainer tests here.
@pytest.mark.long
def test_agc_batch_size_quick(tmp_path):
  out = agc_batch_size.main(["--quick", "--out", str(tmp_path)])
  experiment_outputs.check_outputs(tmp_path, agc_batch_size.MODULE,
                                   ("png", "csv", "md"))
  grid, runs = out["grid"], out["runs"]
  models = [v.name for v in grid.variants()]
  assert len(models) == 3 and sum("AGC" in m for m in models) == 1
  # Every cell of the grid, once per seed.
  keys = [(r["model"], r["batch_size"], r["lr_scale"], r["seed"])
          for r in runs]
  assert sorted(keys) == sorted(itertools.product(
      models, grid.batch_sizes, grid.lr_scales, grid.seeds))
  for r in runs:
    _check_run(r, r["batch_size"], grid.epochs)
    assert r["peak_lr"] == pytest.approx(
        r["lr_scale"] * 0.1 * r["batch_size"] / 256)
    assert r["clipping"] == (grid.clipping if "AGC" in r["model"] else None)
  # The CSV is the returned runs.
  csv_rows = experiment_outputs.read_csv(tmp_path / "agc_batch_size.csv")
  assert len(csv_rows) == len(runs)
  for c, r in zip(csv_rows, runs):
    for key in c:
      assert _same(c[key], r[key]), (key, c[key], r[key])
  # Cells summarize the runs; the Markdown shows each cell.
  assert len(out["cells"]) == len(models) * len(grid.batch_sizes) * len(
      grid.lr_scales)
  md = (tmp_path / "agc_batch_size.md").read_text()
  by_key = {(c["model"], c["batch_size"], c["lr_scale"]): c
            for c in out["cells"]}
  for cell in out["cells"]:
    accs = [r["test_top1"] for r in runs
            if (r["model"], r["batch_size"], r["lr_scale"])
            == (cell["model"], cell["batch_size"], cell["lr_scale"])]
    if any(math.isnan(a) for a in accs):
      assert math.isnan(cell["mean"])
    else:
      assert cell["mean"] == pytest.approx(np.mean(accs))
  assert len(out["table"]) == len(grid.batch_sizes) * len(grid.lr_scales)
  for row in out["table"]:
    line = " | ".join(row[m] for m in models)
    assert line in md
    for m in models:
      assert row[m] == ss.fmt_acc_cell(
          by_key[(m, row["batch_size"], row["lr_scale"])])
  assert len(out["findings"]) == 1 + len(grid.lr_scales)
  assert all(f in md for f in out["findings"])


def test_clipping_threshold_quick(tmp_path):
  out = clipping_threshold.main(["--quick", "--out", str(tmp_path)])
  experiment_outputs.check_outputs(tmp_path, clipping_threshold.MODULE,
                                   ("png", "csv", "md"))
  grid, runs = out["grid"], out["runs"]
  assert ss.NO_CLIPPING in grid.clippings and len(grid.lambdas) >= 2
  keys = [(r["batch_size"], r["clipping"], r["seed"]) for r in runs]
  assert sorted(keys) == sorted(itertools.product(
      grid.batch_sizes, grid.clippings, grid.seeds))
  for r in runs:
    _check_run(r, r["batch_size"], grid.epochs)
  # lambda reaches the compiled step: same seed and data, other lambda,
  # other training loss.
  for b in grid.batch_sizes:
    losses = {r["clipping"]: r["train_loss"] for r in runs
              if r["batch_size"] == b and r["seed"] == grid.seeds[0]}
    assert len(set(losses.values())) == len(losses), losses
  csv_rows = experiment_outputs.read_csv(tmp_path / "clipping_threshold.csv")
  assert len(csv_rows) == len(runs)
  for c, r in zip(csv_rows, runs):
    for key in c:
      assert _same(c[key], r[key]), (key, c[key], r[key])
  md = (tmp_path / "clipping_threshold.md").read_text()
  assert [row["batch_size"] for row in out["table"]] == list(
      grid.batch_sizes)
  for row in out["table"]:
    means = np.array([row[f"lambda_{c:g}"]["mean"] for c in grid.lambdas])
    # The best-lambda column is the argmax of the row over the finite
    # lambdas, NaN (diverged) cells excluded.
    if np.isnan(means).all():
      assert row["best_lambda"] is None
    else:
      assert row["best_lambda"] == grid.lambdas[int(np.nanargmax(means))]
      assert row["best_top1"] == np.nanmax(means)
      assert f"| **{row['best_lambda']:g}** |" in md
    for c in grid.clippings:
      key = "no_agc" if math.isinf(c) else f"lambda_{c:g}"
      accs = [r["test_top1"] for r in runs
              if r["batch_size"] == row["batch_size"] and r["clipping"] == c]
      assert row[key] == ss.summarize(accs)
      assert ss.fmt_acc_cell(row[key]) in md
  assert all(f in md for f in out["findings"])


def _params():
  """A Haiku-like tree: a WS conv, a classifier (excluded from AGC)."""
  shapes = {"Net/~/conv": {"w": (3, 3, 2, 4), "gain": (4,), "bias": (4,)},
            "Net/~/linear": {"w": (4, 10), "b": (10,)}}
  keys = iter(jax.random.split(jax.random.PRNGKey(0), 5))
  return {m: {n: 0.3 * jax.random.normal(next(keys), s)
              for n, s in d.items()} for m, d in shapes.items()}


@pytest.mark.parametrize("clipping", [0.01, ss.NO_CLIPPING])
def test_make_tx_equals_make_optimizer(clipping):
  recipe = ss.Recipe("NFResNet", {}, epochs=3.0, warmup_epochs=1.0)
  plan = config_validation.validate(ss.make_config(recipe, 256),
                                    check_model=False)
  spec = plan.spec
  params = _params()
  tx = ss.make_tx(plan.tx, params, clipping=clipping, eps=recipe.agc_eps,
                  lr_scale=2.0)
  # The library's own chain: AGC at lambda, twice the base learning rate.
  reference = ss.make_config(
      recipe, 256, clipping=0.0 if math.isinf(clipping) else clipping)
  reference.optimizer.lr.base_lr = 2 * recipe.base_lr
  ref_tx, _ = optimizers.make_optimizer(
      reference.optimizer, batch_size=256,
      steps_per_epoch=spec.steps_per_epoch, total_epochs=spec.total_epochs,
      params=params)
  state, ref_state = tx.init(params), ref_tx.init(params)
  p = ref_p = params
  update, ref_update = jax.jit(tx.update), jax.jit(ref_tx.update)
  for step in range(4):
    # Large gradients, so that AGC at 0.01 clips.
    grads = jax.tree.map(
        lambda x: 5.0 * jax.random.normal(jax.random.PRNGKey(step), x.shape),
        params)
    u, state = update(grads, state, p)
    ref_u, ref_state = ref_update(grads, ref_state, ref_p)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6,
                                                         atol=1e-9),
                 u, ref_u)
    p, ref_p = optax.apply_updates(p, u), optax.apply_updates(ref_p, ref_u)
  if not math.isinf(clipping):  # AGC did act: unclipped updates differ.
    free = ss.make_tx(plan.tx, params, clipping=ss.NO_CLIPPING,
                      eps=recipe.agc_eps, lr_scale=2.0)
    free_state, clip_state = free.init(params), tx.init(params)
    for _ in range(2):  # Step 0 has lr 0 (warmup from 0).
      u_free, free_state = free.update(grads, free_state, params)
      u_clip, clip_state = tx.update(grads, clip_state, params)
    assert not np.allclose(u_free["Net/~/conv"]["w"], u_clip["Net/~/conv"]["w"])
    # The classifier weight is not clipped.
    np.testing.assert_allclose(u_free["Net/~/linear"]["w"],
                               u_clip["Net/~/linear"]["w"], rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_trainer():
  recipe = ss.Recipe("NFResNet", dict(depth=(1,), width=0.25,
                                      stochdepth_rate=0.0, skipinit_gain=None),
                     epochs=2.0, fast_compile=True)
  return ss.Trainer(ss.Setup(recipe), 128)


def test_trainer_is_reproducible(tiny_trainer):
  a = tiny_trainer.run(seed=3, clipping=0.02, lr_scale=2.0)
  b = tiny_trainer.run(seed=3, clipping=0.02, lr_scale=2.0)
  c = tiny_trainer.run(seed=4, clipping=0.02, lr_scale=2.0)
  del a["seconds"], b["seconds"], c["seconds"]
  assert a == b
  assert a["train_loss"] != c["train_loss"]
  assert a["diverged_step"] is None and a["steps"] == 2 * NUM_TRAIN // 128
  assert a["peak_lr"] == pytest.approx(2.0 * 0.1 * 128 / 256)


def test_trainer_reports_divergence(tiny_trainer):
  r = tiny_trainer.run(seed=3, clipping=ss.NO_CLIPPING, nan_at_step=4)
  assert r["diverged_step"] == 4
  assert math.isnan(r["test_top1"]) and math.isnan(r["test_loss"])
  # The loss before the NaN step is reported, the NaN one is not.
  assert math.isfinite(r["train_loss"])
  s = ss.summarize([0.5, r["test_top1"]])
  assert math.isnan(s["mean"]) and s["diverged"] == 1
  assert s["finite_mean"] == 0.5
  assert ss.fmt_acc_cell(s) == "NaN (1/2 diverged; others 50.0)"


def test_summaries_and_best_lambda_with_nan():
  nan, inf = math.nan, math.inf
  assert ss.fmt_acc_cell(ss.summarize([nan, nan])) == "NaN (2/2 diverged)"
  assert ss.fmt_acc_cell(ss.summarize([0.9, 0.95])) == "92.5 [90.0, 95.0]"
  assert ss.fmt_acc_cell(ss.summarize([0.9])) == "90.0"
  best = clipping_threshold.best_lambda
  # NaN cells and no-AGC never win; ties go to the smaller lambda.
  assert best({0.01: 0.9, 0.02: nan, inf: 0.99}) == 0.01
  assert best({0.01: 0.9, 0.04: 0.95, 0.08: 0.95}) == 0.04
  assert best({0.01: nan, inf: 0.5}) is None


def test_agc_findings_name_the_divergence():
  grid = agc_batch_size.Grid(depth=(1,), width=0.25, batch_sizes=(64, 256),
                             lr_scales=(1.0,), seeds=(0,), epochs=1.0)
  plain, clipped, bn = [v.name for v in grid.variants()]
  acc = {(plain, 64): 0.9, (plain, 256): math.nan,
         (clipped, 64): 0.92, (clipped, 256): 0.91,
         (bn, 64): 0.95, (bn, 256): 0.93}
  cells = [{"model": m, "batch_size": b, "lr_scale": 1.0,
            "peak_lr": 0.1 * b / 256, **ss.summarize([a])}
           for (m, b), a in acc.items()]
  lines = agc_batch_size.findings(cells, grid)
  assert "NF-ResNet 1/2" in lines[0]
  assert ("trained at B = 64 (peak lr 0.025) and diverged (at least one "
          "seed) at B = 256 (peak lr 0.1)") in lines[1]
  assert "AGC minus BN: -3.0 to -2.0 points" in lines[1]


def test_digits_arrays_are_the_training_pipeline():
  arrays = ss.digits_arrays(16)
  assert arrays["train"]["images"].shape == (NUM_TRAIN, 16, 16, 3)
  assert arrays["test"]["images"].shape == (NUM_TEST, 16, 16, 3)
  # A batch of the library's training iterator (no augmentation) holds
  # exactly rows of the arrays, with their labels.
  it = data.load(data.Split.TRAIN, dataset=data.DIGITS, batch_size=64,
                 image_size=16, is_training=True, seed=0)
  batch = next(it)
  flat = arrays["train"]["images"].reshape(NUM_TRAIN, -1)
  for image, label in zip(batch["images"], batch["labels"]):
    match = np.flatnonzero((flat == image.reshape(-1)).all(axis=1))
    assert len(match) >= 1
    assert label in arrays["train"]["labels"][match]


def test_train_batches_cover_each_epoch():
  arrays = {"images": np.arange(NUM_TRAIN)[:, None],
            "labels": np.arange(NUM_TRAIN), "soft_labels": np.zeros(NUM_TRAIN)}
  batches = list(ss.train_batches(arrays, 479, 6, seed=1))  # 3 per epoch.
  epochs = [np.concatenate([b["labels"] for b in batches[i:i + 3]])
            for i in (0, 3)]
  for e in epochs:
    assert sorted(e) == list(range(NUM_TRAIN))
  assert not np.array_equal(epochs[0], epochs[1])  # Reshuffled.
  again = list(ss.train_batches(arrays, 479, 6, seed=1))
  assert all(np.array_equal(a["labels"], b["labels"])
             for a, b in zip(batches, again))
  other = next(ss.train_batches(arrays, 479, 1, seed=2))
  assert not np.array_equal(other["labels"], batches[0]["labels"])


def test_make_config_is_a_valid_experiment_config():
  recipe = ss.Recipe("NFNet", {}, epochs=20.0)
  config = ss.make_config(recipe, 1024, seed=5, clipping=0.01)
  assert isinstance(config, ml_collections.ConfigDict)
  spec = config_validation.validate(config, check_model=False).spec
  # As the loop: 1,437 * 20 // 1024 steps, 1 step per epoch.
  assert spec.total_steps == 28 and spec.steps_per_epoch == 1
  assert config.optimizer.agc.clipping == 0.01 and config.seed == 5
