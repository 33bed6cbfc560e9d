"""Experiment scripts 1, 2, 5 in quick mode: outputs exist, numbers hold.

`experiments.model_table`, `experiments.signal_propagation` and
`experiments.gammas` each run their `main(['--quick', '--out', tmp])` here,
as `python -m experiments.<name> --quick` would.
"""
import numpy as np
import pytest

from experiments import common
from experiments import gammas
from experiments import model_table
from experiments import model_zoo
from experiments import signal_propagation
from nfnets_jax.models import layers
from nfnets_jax.models import signal_propagation as sp
from nfnets_jax.pretrained import registry

import experiment_outputs

pytestmark = pytest.mark.slow  # End-to-end runs.


def test_model_table_quick(tmp_path):
  rows = model_table.main(["--quick", "--out", str(tmp_path)])
  experiment_outputs.check_outputs(tmp_path, model_table.MODULE)
  by_name = {r["model"]: r for r in rows}
  assert set(by_name) == {"NFNet-F0", "NF-ResNet-50", "NF-RegNet-B0"}
  f0 = by_name["NFNet-F0"]
  assert f0["params"] == 71_489_284
  assert (f0["train_px"], f0["test_px"]) == (192, 256)
  assert abs(f0["flops"] / 12.38e9 - 1) < 0.01
  assert abs(f0["flops_diff_pct"]) < 1.0
  assert f0["params_minus_timm"] == 0
  # One skip_gain scalar per block more than timm's layout.
  assert by_name["NF-ResNet-50"]["params_minus_timm"] == 16
  assert by_name["NF-RegNet-B0"]["params"] == 8_595_372
  csv_rows = experiment_outputs.read_csv(tmp_path / "model_table.csv")
  assert [r["model"] for r in csv_rows] == [r["model"] for r in rows]
  assert int(csv_rows[0]["params"]) == 71_489_284
  assert csv_rows[1]["params_paper"] == ""  # No paper number: empty cell.
  md = (tmp_path / "model_table.md").read_text()
  assert "| NFNet-F0 | 192 | 256 | 71,489,284 | 71.5M |" in md
  assert common.MISSING in md


def test_model_table_specs_cover_every_variant():
  names = [s.name for s in model_table.model_specs()]
  assert len(names) == 16 + 4 + 9
  assert {"NFNet-F7", "NFNet-F7+", "NF-ResNet-200", "NF-RegNet-B8"} <= set(
      names)
  assert set(model_table.PAPER) <= set(names)
  assert set(model_table.TIMM) <= set(names)


def test_model_zoo_quick(tmp_path):
  rows = model_zoo.main(["--quick", "--out", str(tmp_path)])
  experiment_outputs.check_outputs(tmp_path, model_zoo.MODULE)
  by_name = {r["name"]: r for r in rows}
  assert list(by_name) == list(model_zoo.QUICK)
  assert by_name["nf_resnet26"]["definition"] == "official"
  assert by_name["nf_seresnet26"]["definition"] == "timm `nf_seresnet26`"
  assert by_name["nf_seresnet26"]["crop_mode"] == "center"
  assert by_name["nf_seresnet26"]["params"] > by_name["nf_resnet26"]["params"]
  assert model_zoo.weights(registry.get_spec("nf_resnet50")) == (
      "timm `nf_resnet50.ra2_in1k` (builds `timm_nf_resnet50`)")


def test_gammas_quick(tmp_path):
  rows = gammas.main(["--quick", "--out", str(tmp_path)])
  experiment_outputs.check_outputs(tmp_path, gammas.MODULE)
  assert [r["nonlinearity"] for r in rows] == list(layers.NONLINEARITY_GAMMAS)
  for r in rows:
    # Sampling (2 x 1M samples) and the shipped constants agree to 2e-3,
    # and the shipped constants are within 1e-3 of the exact value.
    assert abs(r["rel_sampled_vs_shipped"]) < 2e-3, r["nonlinearity"]
    assert abs(r["rel_shipped_vs_exact"]) < 1e-3, r["nonlinearity"]
    if r["closed_form"] is not None:
      assert abs(r["rel_exact_vs_closed"]) < 1e-7, r["nonlinearity"]
  by_name = {r["nonlinearity"]: r for r in rows}
  assert by_name["relu"]["closed_form"] == pytest.approx(1.7128585, abs=1e-6)
  assert by_name["identity"]["exact"] == pytest.approx(1.0, abs=1e-9)
  assert len(experiment_outputs.read_csv(tmp_path / "gammas.csv")) == len(rows)


def test_signal_propagation_quick(tmp_path):
  out = signal_propagation.main(["--quick", "--out", str(tmp_path)])
  experiment_outputs.check_outputs(tmp_path, signal_propagation.MODULE,
                                   ("png", "csv", "md"))
  cfg, results, facts = out["config"], out["results"], out["facts"]
  depths, n = cfg.depths, sum(cfg.depths)
  assert len(depths) >= 2 and min(depths) >= 4
  # The script's own checks, written into its Markdown, all hold ...
  assert all(facts.values()), facts
  assert "✗" not in (tmp_path / "signal_propagation.md").read_text()
  # ... and, directly: linear growth within stages and a reset at each
  # transition for BN-ResNet and NF-ResNet (scaled WS).
  stages = signal_propagation.stage_slices(depths)
  for name in ("BN-ResNet", "NF-ResNet, scaled WS"):
    h = results[name]["h_var"]
    for s in stages:
      inc = np.diff(h[s])
      assert (inc > 0).all(), name
      assert inc.max() < 2 * inc.min(), name
    for s in stages[1:]:
      assert h[s.start] < h[s.start - 1], name
  # NF-ResNet: each block adds ~alpha^2 Var(branch) (plus a covariance of
  # the branch with its own input, up to ~20% on this small network).
  nf = results["NF-ResNet, scaled WS"]
  for s in stages:
    np.testing.assert_allclose(np.diff(nf["h_var"][s]),
                               cfg.alpha**2 * nf["res"][s.start:s.stop - 1],
                               rtol=0.3)
  np.testing.assert_allclose(nf["branch_in"][1:], 1.0, rtol=0.15)
  # Mean shift: the unnormalized ResNet's squared channel mean grows within
  # every stage and dominates its variance; scaled WS keeps it near zero.
  plain = results["ResNet, no normalization"]
  for s in stages:
    assert plain["h_sq_mean"][s.stop - 1] > plain["h_sq_mean"][s.start]
  assert (plain["h_sq_mean"][1:] > plain["h_var"][1:]).all()
  assert (nf["h_sq_mean"][1:] < 0.05 * nf["h_var"][1:]).all()
  no_ws = results["NF-ResNet, no WS"]
  assert (no_ws["h_sq_mean"][1:] > 1.0).all()
  csv_rows = experiment_outputs.read_csv(tmp_path / "signal_propagation.csv")
  assert len(csv_rows) == 4 * (n + 1)


def test_qualitative_facts_catch_a_violation():
  depths = (3, 3)
  grow = np.array([0.3, 1.0, 1.2, 1.4, 1.0, 1.2, 1.4])
  flat = {"h_sq_mean": np.full(7, 0.01), "h_var": grow,
          "res": np.ones(6), "branch_in": np.ones(6)}
  shifted = {"h_sq_mean": np.linspace(1, 5, 7), "h_var": grow,
             "res": np.ones(6), "branch_in": np.ones(6)}
  results = {"BN-ResNet": flat, "NF-ResNet, scaled WS": flat,
             "ResNet, no normalization": shifted, "NF-ResNet, no WS": shifted}
  assert all(signal_propagation.qualitative_facts(results, depths).values())
  no_reset = dict(flat, h_var=np.array([0.3, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0]))
  facts = signal_propagation.qualitative_facts(
      dict(results, **{"BN-ResNet": no_reset}), depths)
  assert not facts["BN-ResNet: variance drops at every stage transition"]


def test_block_arrays_layout():
  outputs = {f"avg_sq_mean_{i}": i * 0.1 for i in range(3)}
  outputs.update({f"avg_var_{i}": 1.0 + i for i in range(3)})
  outputs.update({f"res_avg_var_{i}": 2.0 for i in range(2)})
  outputs.update({f"branch_in_avg_var_{i}": 3.0 for i in range(2)})
  arrays = sp.block_arrays(outputs, 2)
  np.testing.assert_allclose(arrays["h_var"], [1, 2, 3])
  np.testing.assert_allclose(arrays["h_sq_mean"], [0, 0.1, 0.2])
  assert arrays["res"].shape == arrays["branch_in"].shape == (2,)
