"""The end-to-end harness: it waits on several processes without deadlock
and reports a hung one with its Python stack."""
import subprocess
import sys

import pytest

import train_harness as testing


def _python(code: str) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, "-c", code], env=testing.subprocess_env(),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_processes_that_wait_on_each_other_all_finish(tmp_path):
  """Process 0 ends only after process 1 has written 1 MB to stderr, far
  more than a pipe holds: waited on one at a time, neither would end."""
  flag = tmp_path / "written"
  waiter = _python(
      "import os, time\n"
      f"while not os.path.exists({str(flag)!r}): time.sleep(0.01)\n"
      "print('done')")
  writer = _python(
      "import sys\n"
      "sys.stderr.write('x' * 2**20)\n"
      f"open({str(flag)!r}, 'w').close()")
  (out0, _), (_, err1) = testing.communicate_all([waiter, writer], 60)
  assert out0 == "done\n"
  assert len(err1) == 2**20
  assert waiter.returncode == writer.returncode == 0


def test_hung_process_is_reported_with_its_stack():
  sleeper = _python("import time\ndef wait_forever():\n  time.sleep(600)\n"
                    "print('started', flush=True)\nwait_forever()")
  quick = _python("print('quick')")
  with pytest.raises(AssertionError) as info:
    testing.communicate_all([sleeper, quick], 5)
  report = str(info.value)
  assert report.startswith("1 of 2 process(es) still running after 5 s")
  assert "process 0 (hung) stdout:\nstarted" in report
  assert "process 1 (exited 0) stdout:\nquick" in report
  assert "in wait_forever" in report  # faulthandler's dump on SIGABRT.
  assert sleeper.poll() is not None
