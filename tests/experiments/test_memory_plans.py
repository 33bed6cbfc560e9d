"""experiments/memory_plans.py: the F0-F7 memory table, from cached compiles.

The compiles are what `nfnets-plan` runs (tests/cli/test_plan.py); here the
cache holds them, so the table's arithmetic and the resume are checked
without compiling. The whole quick run compiles: opt-in (`-m long`).
"""
import json

import pytest

from experiments import memory_plans
from nfnets_jax.experiment import memory_plan

GIB = memory_plan.GIB


def _record(batch, peak, remat=False):
  return {"key": f"smoke/{batch}/{remat}", "micro_batch": batch,
          "accumulation_steps": 1, "remat": remat, "argument_bytes": 0,
          "output_bytes": 0, "alias_bytes": 0, "temp_bytes": peak,
          "flops": 1e12 * batch, "compile_s": 0.0, "backend": "cpu",
          "peak_bytes": peak}


def test_table_from_cached_compiles(tmp_path):
  # Peak = 3 GiB + 0.5 GiB per image: 4, 7 and (on the line) 19 GiB; the
  # compiled 32-image step says 19.25.
  records = [_record(2, 4 * GIB), _record(8, 7 * GIB),
             _record(32, int(19.25 * GIB))]
  (tmp_path / memory_plans.CACHE).write_text(
      "".join(json.dumps(r) + "\n" for r in records))
  rows = memory_plans.main(["--quick", "--out", str(tmp_path)])
  assert [(r["per_device"], r["how"]) for r in rows] == [
      (2, "compiled"), (8, "compiled"), (32, "line through the two above")]
  assert [r["plain_gib"] for r in rows] == [4.0, 7.0, 19.0]
  assert rows[-1]["compiled_gib"] == 19.25
  assert [r["fits_plain"] for r in rows] == ["16 GiB", "16 GiB", "24 GiB"]
  assert rows[0]["tflops"] == 2.0
  text = (tmp_path / memory_plans.FILE).read_text()
  assert "| smoke | 32 | 32 | 32 | 19.00 | 24 GiB |" in text
  # Nothing was compiled: the cache is as written.
  assert len((tmp_path / memory_plans.CACHE).read_text().splitlines()) == 3


def test_unknown_variant_is_refused(tmp_path):
  with pytest.raises(ValueError, match="--variants='F9'.*allowed: F0"):
    memory_plans.main(["--variants", "F9", "--out", str(tmp_path)])


@pytest.mark.long
def test_quick_run_compiles_and_resumes(tmp_path):
  rows = memory_plans.main(["--quick", "--out", str(tmp_path)])
  compiled = rows[-1]
  assert abs(compiled["plain_gib"] / compiled["compiled_gib"] - 1) < 0.1
  lines = (tmp_path / memory_plans.CACHE).read_text().splitlines()
  assert len(lines) == 3
  again = memory_plans.main(["--quick", "--out", str(tmp_path)])
  assert again == rows
