"""`experiments.normalizers --quick` and `benchmarks/normalization_cost.py
--quick`, run in-process.

The experiment: its files, every normalizer x batch size (and the unscaled
smallest batch) present, accuracies that are fractions of the 360 test
digits, the NF-ResNet above chance, the timing rows, and the same seed
trained again from a fresh setup giving the same numbers. The benchmark: the
format of its report (rows, memory, and a decomposition that adds up).
"""
import importlib.util
import math
import pathlib
import re
import sys

import pytest

from experiments import normalizers
from experiments import small_scale as ss

import experiment_outputs

# Whole experiment and benchmark forms, about a minute each: opt-in
# (`python -m pytest -q -n auto -m long tests`), out of CI's 10 minutes.
pytestmark = [pytest.mark.slow, pytest.mark.long]

NUM_TEST = 360
CHANCE = 0.1
REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("normalizers")
  return out_dir, normalizers.main(["--quick", "--out", str(out_dir)])


def test_quick_writes_every_cell(quick):
  out_dir, out = quick
  experiment_outputs.check_outputs(out_dir, normalizers.MODULE,
                                   ("png", "csv", "md"))
  grid = out["grid"]
  assert grid == normalizers.QUICK
  names = [v.name for v in normalizers.VARIANTS]
  assert len(names) == 7
  assert {v.normalization for v in normalizers.VARIANTS} == {
      "batchnorm", "running_batchnorm", "layernorm", "instancenorm",
      "groupnorm", "none", normalizers.NF}
  expected = sorted((m, b, s) for m in names for b in grid.batch_sizes
                    for s in grid.lr_scales(b))
  # The smallest batch also at the largest batch's lr.
  small, large = min(grid.batch_sizes), max(grid.batch_sizes)
  assert grid.lr_scales(small) == (1.0, large / small)
  csv_rows = experiment_outputs.read_csv(out_dir / "normalizers.csv")
  got = sorted((r["model"], int(r["batch_size"]), float(r["lr_scale"]))
               for r in csv_rows)
  assert got == expected
  assert len(out["runs"]) == len(expected) * len(grid.seeds)
  for r in csv_rows:
    batch, scale = int(r["batch_size"]), float(r["lr_scale"])
    assert float(r["peak_lr"]) == pytest.approx(
        scale * grid.base_lr * batch / grid.base_batch_size)
    assert int(r["steps"]) == int(1437 * grid.epochs) // batch
    assert int(r["n"]) == len(grid.seeds)
    for v in r["seed_top1"].split():
      assert 0.0 <= float(v) <= 1.0
  for r in out["runs"]:
    if r["diverged_step"] is None:
      acc = r["test_top1"]
      assert 0.0 <= acc <= 1.0
      assert abs(acc * NUM_TEST - round(acc * NUM_TEST)) < 1e-6
    else:
      assert math.isnan(r["test_top1"])
  # The Markdown shows a row per normalizer and a column per cell kind.
  md = (out_dir / "normalizers.md").read_text()
  for name in names:
    assert f"| {name} |" in md
  assert "unscaled" in md and "load average" in md.lower()


def test_quick_nf_learns_above_chance(quick):
  _, out = quick
  nf = [r for r in out["runs"] if r["normalization"] == normalizers.NF]
  assert nf and all(r["test_top1"] > 2 * CHANCE for r in nf), [
      r["test_top1"] for r in nf]


def test_quick_times_every_network(quick):
  _, out = quick
  timing = {r["model"]: r for r in out["timing"]}
  assert list(timing) == [v.name for v in normalizers.VARIANTS]
  batch = out["grid"].timing_batch
  for r in timing.values():
    assert r["ms_per_step"] > 0 and r["spread"] >= 0
    assert r["us_per_image"] == pytest.approx(
        1e3 * r["ms_per_step"] / batch)
  assert timing["BatchNorm"]["vs_batchnorm"] == 1.0
  before, after = out["load"]
  assert len(before.split(",")) == 3 and len(after.split(",")) == 3


def test_same_seed_reproduces(quick):
  """The NF recipe's first run, trained again from a fresh setup (new
  initialization, new compile), gives the same accuracy and losses."""
  _, out = quick
  grid = out["grid"]
  nf = next(v for v in normalizers.VARIANTS
            if v.normalization == normalizers.NF)
  first = next(r for r in out["runs"] if r["model"] == nf.name
               and r["lr_scale"] == 1.0 and r["seed"] == grid.seeds[0])
  trainer = ss.Trainer(ss.Setup(normalizers.recipe(grid, nf)),
                       first["batch_size"])
  again = trainer.run(seed=grid.seeds[0],
                      clipping=normalizers.clipping(grid, nf))
  assert again["test_top1"] == first["test_top1"]
  assert again["train_loss"] == pytest.approx(first["train_loss"], rel=1e-5)
  assert again["test_loss"] == pytest.approx(first["test_loss"], rel=1e-5)


def _benchmark():
  """The benchmark script as a module (benchmarks/ is not a package)."""
  path = REPO / "benchmarks" / "normalization_cost.py"
  spec = importlib.util.spec_from_file_location("normalization_cost", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # Its dataclasses look themselves up.
  spec.loader.exec_module(module)
  return module


def test_benchmark_quick_report_format(tmp_path, capsys):
  bench = _benchmark()
  out = tmp_path / "cost.md"
  report = bench.main(["--quick", "--out", str(out)])
  assert out.read_text() == report
  printed = capsys.readouterr().out
  assert "before: load average:" in printed and "after: load average:" in (
      printed)
  lines = report.splitlines()
  assert lines[0].startswith("# What normalization costs")
  assert "64 px" in lines[2] and "1 interleaved round" in lines[2]
  assert "### Batch 2" in lines
  rows = {}
  for line in lines:
    cells = [c.strip() for c in line.strip("|").split("|")]
    if len(cells) == 10 and cells[0] in ("BN", "BN -> id", "NF", "NF - WS"):
      rows[cells[0]] = [float(c.rstrip("%")) for c in cells[1:]]
  assert set(rows) == {"BN", "BN -> id", "NF", "NF - WS"}
  for label, (ms, ms_img, vs_bn, _, temp, arg, outp, _, comp) in rows.items():
    # ms printed to 0.1, ms / image to 0.01.
    assert ms > 0 and ms_img == pytest.approx(ms / 2, abs=0.06)
    assert arg > 0 and outp > 0 and temp >= 0 and comp > 0
  assert rows["BN"][2] == 1.0
  # The parameters of BN -> id are BN's minus the norms: fewer argument bytes.
  assert rows["BN -> id"][5] < rows["BN"][5]
  # The decomposition adds up (each term rounded to 0.1 ms).
  m = re.search(r"T\(BN\) - T\(NF\) = ([-+\d.]+) ms = normalization ops "
                r"([-+\d.]+) ms - weight standardization ([-+\d.]+) ms \+ "
                r"rest ([-+\d.]+) ms", report)
  assert m, report
  total, norm, ws, rest = map(float, m.groups())
  assert total == pytest.approx(norm - ws + rest, abs=0.25)
  assert total == pytest.approx(rows["BN"][0] - rows["NF"][0], abs=0.15)
