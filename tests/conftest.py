"""Session fixtures shared by the test files; `experiments/` importable.

The test process compiles without XLA:CPU's expensive LLVM passes: its
programs are tiny and most run once, so compiling is most of their time
(set before JAX starts; the library itself never sets XLA_FLAGS). The
command-line programs the tests run in-process write no compilation cache
into the user's folder (`NFNETS_JAX_COMPILE_CACHE=0`).
"""
import os
import sys

os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true"]).strip()
os.environ["NFNETS_JAX_COMPILE_CACHE"] = "0"

import filelock
import pytest

import checkpoint_files
import train_harness

# The papers' scripts (`experiments/`) live at the repository root, outside
# the installed package.
if train_harness.REPO not in sys.path:
  sys.path.insert(0, train_harness.REPO)


def _session_root(tmp_path_factory) -> str:
  """The session's base directory, shared by `pytest -n` workers."""
  root = tmp_path_factory.getbasetemp()
  return str(root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  """One persistent compilation cache for every subprocess of the session."""
  return train_harness.session_dirs(_session_root(tmp_path_factory))[0]


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
  """The uninterrupted 1-device tiny run other runs are compared with (made
  by the first worker that needs it; the others wait for it)."""
  root = _session_root(tmp_path_factory)
  with filelock.FileLock(os.path.join(root, "reference_run.lock")):
    return train_harness.reference_run(root)


@pytest.fixture(scope="session")
def perturbed_timm_f0():
  """A perturbed random timm dm_nfnet_f0, its params and both forwards."""
  return checkpoint_files.perturbed_timm_f0()


def pytest_collection_modifyitems(items):
  """Files with slow (end-to-end) tests first, each file's tests in order.

  Under `-n auto` each file goes whole to one worker in this order, so the
  long files start early and the short ones fill in at the end.
  """
  slow_files = {item.path for item in items
                if item.get_closest_marker("slow") is not None}
  items.sort(key=lambda item: item.path not in slow_files)
