"""Input-wait accounting and the profile window (experiment/profiling.py)."""
import pytest

from nfnets_jax.experiment import profiling


def test_parse_profile_steps():
  assert profiling.parse_profile_steps(None) is None
  assert profiling.parse_profile_steps("") is None
  assert profiling.parse_profile_steps("0,3") == (0, 3)
  assert profiling.parse_profile_steps(" 10, 20") == (10, 20)
  for bad in ("3", "3,3", "5,2", "x,2", "-1,2", "1,2,3"):
    with pytest.raises(ValueError, match="config.logging.profile_steps"):
      profiling.parse_profile_steps(bad)


class FakeClock:
  """`time.perf_counter` that moves only when told."""

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_step_timer_splits_wall_time_into_input_wait(monkeypatch):
  clock = FakeClock()
  monkeypatch.setattr(profiling.time, "perf_counter", clock)

  def batches():
    while True:
      clock.now += 0.25  # The input pipeline takes 0.25 s per batch.
      yield "batch"

  it = batches()
  timer = profiling.StepTimer(step=10)
  for _ in range(4):  # Steps 11..14: wait 0.25 s, then compute 0.75 s.
    assert timer.next_batch(it) == "batch"
    clock.now += 0.75
  metrics = timer.interval(14, images_per_step=8)
  assert metrics == {"images_per_sec": 8.0, "step_time_s": 1.0,
                     "input_wait_frac": 0.25}
  clock.now += 5.0  # An evaluation: not part of the next interval.
  timer.reset(14)
  timer.next_batch(it)
  clock.now += 0.25
  assert timer.interval(15, images_per_step=8) == {
      "images_per_sec": 16.0, "step_time_s": 0.5, "input_wait_frac": 0.5}


def test_step_timer_counts_a_failing_wait(monkeypatch):
  clock = FakeClock()
  monkeypatch.setattr(profiling.time, "perf_counter", clock)

  def broken():
    clock.now += 2.0
    raise OSError("disk gone")
    yield  # pylint: disable=unreachable

  timer = profiling.StepTimer(step=0)
  with pytest.raises(OSError):
    timer.next_batch(broken())
  assert timer.interval(1, 1)["input_wait_frac"] == 1.0
