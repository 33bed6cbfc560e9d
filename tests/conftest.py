"""Session fixtures shared by the end-to-end test files."""
import pytest

import train_harness


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  """One persistent compilation cache for every subprocess of the session."""
  return train_harness.session_dirs(str(tmp_path_factory.getbasetemp()))[0]


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
  """The uninterrupted 1-device tiny run other runs are compared with."""
  return train_harness.reference_run(str(tmp_path_factory.getbasetemp()))
