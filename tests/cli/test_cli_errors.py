"""Every bad input at a command line: one message, exit status 2, no compile.

One row of `CASES` per bad input. Each runs in-process, as the program's
`main` would (`errors.guard` around the command), with a listener on JAX's
compile events: the test asserts exit status 2, no traceback, the message's
content (field, value and what is allowed, or the file), and that nothing
was compiled or written. `test_compile_listener_sees_a_compile` shows the
listener would see one. A few cases also run as real subprocesses, end to
end (`SUBPROCESS_CASES`).

    PYTHONPATH=tests python tests/cli/test_cli_errors.py   # the docs' table
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import os
import pickle
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import pytest

from nfnets_jax.cli import errors
from nfnets_jax.cli import train
from nfnets_jax.cli import train_flags
import train_harness as testing

TRAIN = ("-m", "nfnets_jax.cli.train")
CONVERT = ("-m", "nfnets_jax.cli.convert")
PREDICT = ("-m", "nfnets_jax.cli.predict")
DEFAULT = "configs/default.py"
MARKER = "PWNED"  # What the malicious pickle would create, were it run.
COMPILE_LOG = "Compiling"  # JAX's log line for every XLA compile.


class _Exploit:
  """Pickles to a call of os.system (`touch <marker>`)."""

  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@dataclasses.dataclass(frozen=True)
class Case:
  """A bad input: the command (after `python`) and what stderr must say.

  `{tmp}` in `args` and `expect` is the test's directory, where `_files`
  writes `text.npz` (not a checkpoint), `evil.pkl` (a pickle that would run
  `touch {tmp}/PWNED`), `broken_config.py` (a syntax error), `a_file`, and
  `image.jpg` (not an image). Outputs would go to `{tmp}/out`.
  """
  name: str
  what: str  # The bad input, for the README table.
  args: tuple[str, ...]
  expect: tuple[str, ...]
  env: tuple[tuple[str, str], ...] = ()
  traceback: bool = False


def _train(*flags: str, workdir: bool = True) -> tuple[str, ...]:
  base = (*TRAIN, f"--config={DEFAULT}")
  return (*base, *(("--workdir={tmp}/out",) if workdir else ()), *flags)


CASES = (
    Case("unknown_field", "`--config.no_such_field=1`",
         _train("--config.no_such_field=1"),
         ("--config.no_such_field: configs/default.py has no field "
          "config.no_such_field", "config has: checkpoint, dataset")),
    Case("misspelt_field", "`--config.train.global_batchsize=8`",
         _train("--config.train.global_batchsize=8"),
         ("no field config.train.global_batchsize; did you mean "
          "--config.train.global_batch_size",)),
    Case("field_without_group", "`--config.global_batch_size=8`",
         _train("--config.global_batch_size=8"),
         ("did you mean --config.train.global_batch_size",)),
    Case("int_type", "`--config.train.global_batch_size=abc`",
         _train("--config.train.global_batch_size=abc"),
         ("--config.train.global_batch_size='abc' is invalid",
          "allowed: an int (the config has 128)")),
    Case("float_type", "`--config.optimizer.lr.base_lr=fast`",
         _train("--config.optimizer.lr.base_lr=fast"),
         ("--config.optimizer.lr.base_lr='fast' is invalid",
          "allowed: a number (the config has 0.1)")),
    Case("bool_type", "`--config.train.augment.flip=maybe`",
         _train("--config.train.augment.flip=maybe"),
         ("--config.train.augment.flip='maybe' is invalid: not a boolean; "
          "allowed: true or false",)),
    Case("group_type", "`--config.model.kwargs.variant=F1` (a group there)",
         _train("--config.model.kwargs.variant=F1"),
         ("--config.model.kwargs.variant='F1' is invalid: not a dict literal",
          "allowed: a dict literal", "--config.model.kwargs.variant.FIELD=",
          "(the config has {'depth': (1, 1, 1)")),
    Case("bad_value", "`--config.train.global_batch_size=0`",
         _train("--config.train.global_batch_size=0"),
         ("config.train.global_batch_size=0 is invalid; allowed: a positive "
          "int",)),
    Case("negative_lr", "`--config.optimizer.lr.base_lr=-1`",
         _train("--config.optimizer.lr.base_lr=-1.0"),
         ("config.optimizer.lr.base_lr must be > 0, got -1.0",)),
    Case("unknown_model", "`--config.model.name=VGG`",
         _train("--config.model.name=VGG"),
         ("config.model.name='VGG' is invalid; allowed: one of",)),
    Case("unknown_flag", "`--nonsense`", _train("--nonsense"),
         ("Unknown command line flag 'nonsense'", "see --help")),
    Case("positional", "a positional argument `extra`", _train("extra"),
         ("unexpected arguments ['extra']",)),
    Case("no_config", "no `--config`", (*TRAIN, "--workdir={tmp}/out"),
         ("--config is required",)),
    Case("no_workdir", "no `--workdir`", _train(workdir=False),
         ("--workdir is required",)),
    Case("missing_config", "`--config=configs/nope.py`",
         (*TRAIN, "--config=configs/nope.py", "--workdir={tmp}/out"),
         ("no such config file 'configs/nope.py' (allowed: a config file; "
          "in configs/: default.py, nf_regnet.py",)),
    Case("broken_config", "a config file with a syntax error",
         (*TRAIN, "--config={tmp}/broken_config.py", "--workdir={tmp}/out"),
         ("loading {tmp}/broken_config.py failed: SyntaxError",)),
    Case("workdir_is_file", "`--workdir` is a file",
         (*TRAIN, f"--config={DEFAULT}", "--workdir={tmp}/a_file"),
         ("config.workdir='{tmp}/a_file' is invalid; allowed: a directory",)),
    Case("pretrained_missing", "`--config.pretrained.path` does not exist",
         _train("--config.pretrained.path={tmp}/nope.npz"),
         ("config.pretrained.path='{tmp}/nope.npz' is invalid; allowed: an "
          "existing checkpoint file",)),
    Case("pretrained_not_checkpoint",
         "`--config.pretrained.path` is a text file",
         _train("--config.pretrained.path={tmp}/text.npz"),
         ("config.pretrained.path='{tmp}/text.npz' is invalid",
          "neither a NumPy .npz nor a pickled params tree")),
    Case("pretrained_unsafe", "`--config.pretrained.path` is a malicious "
         "pickle", _train("--config.pretrained.path={tmp}/evil.pkl"),
         ("config.pretrained.path='{tmp}/evil.pkl' is refused",
          "refusing to unpickle global posix.system",
          "Nothing from it was called")),
    Case("tfds_data_dir_missing", "TFDS `dataset.data_dir` does not exist",
         _train("--config.dataset.name=cifar10",
                "--config.dataset.data_dir={tmp}/no_data"),
         ("no prepared TFDS data for 'cifar10' in "
          "data_dir='{tmp}/no_data'",)),
    Case("image_folder_missing", "image folder does not exist",
         _train("--config.dataset.name=image_folder",
                "--config.dataset.data_dir={tmp}/no_images"),
         ("{tmp}/no_images",)),
    Case("verbose", "`--config.no_such_field=1 --verbose` (traceback first)",
         _train("--config.no_such_field=1", "--verbose"),
         ("has no field config.no_such_field",), traceback=True),
    Case("verbose_env", "`NFNETS_VERBOSE=1`, a malicious pretrained file "
         "(traceback first)",
         _train("--config.pretrained.path={tmp}/evil.pkl"),
         ("is refused",), env=(("NFNETS_VERBOSE", "1"),), traceback=True),
    Case("convert_not_checkpoint", "`nfnets-convert info` of a text file",
         (*CONVERT, "info", "{tmp}/text.npz"),
         ("nfnets-convert: error: {tmp}/text.npz: neither a NumPy .npz",)),
    Case("convert_unsafe", "`nfnets-convert convert` of a malicious pickle",
         (*CONVERT, "convert", "{tmp}/evil.pkl", "{tmp}/out.npz"),
         ("{tmp}/evil.pkl: refusing to unpickle global posix.system",
          "Nothing from it was called")),
    Case("convert_missing", "`nfnets-convert info` of a missing file",
         (*CONVERT, "info", "{tmp}/nope.npz"),
         ("error: {tmp}/nope.npz: No such file or directory",)),
    Case("convert_timm_not_torch", "`nfnets-convert convert-timm` of a text "
         "file", (*CONVERT, "convert-timm", "{tmp}/text.npz", "{tmp}/out.npz"),
         ("{tmp}/text.npz: not a readable timm checkpoint",)),
    Case("convert_bad_command", "`nfnets-convert frobnicate`",
         (*CONVERT, "frobnicate"), ("invalid choice: 'frobnicate'",)),
    Case("predict_unsafe", "`nfnets-predict --pretrained` a malicious pickle",
         (*PREDICT, "--pretrained={tmp}/evil.pkl", "{tmp}/image.jpg"),
         ("{tmp}/evil.pkl", "Nothing from it was called")),
    Case("predict_missing", "`nfnets-predict --pretrained` a missing file",
         (*PREDICT, "--pretrained={tmp}/nope.npz", "{tmp}/image.jpg"),
         ("{tmp}/nope.npz",)),
    Case("experiment_depth", "`signal_propagation --depth=abc`",
         ("-m", "experiments.signal_propagation", "--depth=abc",
          "--out={tmp}/out"),
         ("--depth='abc' is invalid", "allowed: a ResNet depth")),
    Case("experiment_batch", "`signal_propagation --batch=-1`",
         ("-m", "experiments.signal_propagation", "--batch=-1",
          "--out={tmp}/out"),
         ("argument --batch: '-1' is invalid; allowed: a positive int",)),
    Case("experiment_out_is_file", "`model_table --out` is a file",
         ("-m", "experiments.model_table", "--out={tmp}/a_file"),
         ("argument --out: '{tmp}/a_file' is a file",)),
    Case("experiment_unsafe", "`pretrained_eval --checkpoint` a malicious "
         "pickle", ("-m", "experiments.pretrained_eval",
                    "--checkpoint={tmp}/evil.pkl", "--out={tmp}/out"),
         ("{tmp}/evil.pkl: refusing to unpickle", "Nothing from it was "
          "called")),
)


def _files(tmp: str) -> None:
  with open(os.path.join(tmp, "text.npz"), "w") as f:
    f.write("hello, not a checkpoint\n")
  with open(os.path.join(tmp, "evil.pkl"), "wb") as f:
    pickle.dump(_Exploit(os.path.join(tmp, MARKER)), f)
  with open(os.path.join(tmp, "broken_config.py"), "w") as f:
    f.write("def get_config(:\n")
  with open(os.path.join(tmp, "a_file"), "w") as f:
    f.write("x\n")
  with open(os.path.join(tmp, "image.jpg"), "w") as f:
    f.write("not an image\n")


# The cases that also run as real processes: one per program, and the
# traceback switch through the environment.
SUBPROCESS_CASES = ("unknown_field", "convert_missing", "predict_unsafe",
                    "verbose_env")


def _run_main(module: str, argv: list[str]) -> int:
  """What `python -m module *argv` does, in this process: its exit status."""
  if module == "nfnets_jax.cli.train":
    return errors.guard(train.PROG, lambda: train.run([train.PROG, *argv]),
                        argv=argv)
  main = importlib.import_module(module).main
  if module.startswith("experiments."):
    prog = f"python -m {module}"
    return errors.guard(prog, lambda: (main(argv), 0)[1], argv=argv)
  return main(argv)


def run_case(case: Case, tmp: str, monkeypatch: Any
             ) -> tuple[int, str, list[str]]:
  """Runs `case` in-process with its files in `tmp`.

  Returns:
    `(exit status, stderr, compile events)`.
  """
  _files(tmp)
  args = [a.replace("{tmp}", tmp) for a in case.args]
  monkeypatch.chdir(testing.REPO)
  monkeypatch.delenv(errors.VERBOSE_ENV, raising=False)
  for key, value in case.env:
    monkeypatch.setenv(key, value)
  stderr = io.StringIO()
  with testing.compile_events() as compiles, contextlib.redirect_stderr(stderr), \
      contextlib.redirect_stdout(io.StringIO()):
    try:
      status = _run_main(args[1], args[2:])
    except SystemExit as exit_:  # argparse's own errors.
      status = exit_.code
  return status, stderr.getvalue(), compiles


def _check(case: Case, tmp: str, status: int, err: str) -> None:
  assert status == 2, err[-3000:]
  for text in case.expect:
    assert text.replace("{tmp}", tmp) in err, err[-3000:]
  assert ("Traceback" in err) == case.traceback, err[-3000:]
  # Nothing was written, and the malicious pickle ran nothing.
  assert not os.path.exists(os.path.join(tmp, "out"))
  assert not os.path.exists(os.path.join(tmp, "out.npz"))
  assert not os.path.exists(os.path.join(tmp, MARKER))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_one_message_exit_2(case, tmp_path, monkeypatch):
  tmp = str(tmp_path)
  status, err, compiles = run_case(case, tmp, monkeypatch)
  _check(case, tmp, status, err)
  assert not compiles, compiles  # Before any compile.


def test_compile_listener_sees_a_compile():
  """The observable above: the listener records a compile."""
  with testing.compile_events() as compiles:
    jax.jit(lambda x: x * 3 + 1)(jnp.arange(7.0)).block_until_ready()
  assert compiles


@pytest.mark.slow
@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_in_a_real_process(name, tmp_path):
  """End to end: the console program's exit status and stderr."""
  case = {c.name: c for c in CASES}[name]
  tmp = str(tmp_path)
  _files(tmp)
  env = {**testing.subprocess_env(1), **dict(case.env)}
  if not case.env:
    env.pop(errors.VERBOSE_ENV, None)
  proc = subprocess.run(
      [sys.executable, *(a.replace("{tmp}", tmp) for a in case.args)],
      cwd=testing.REPO, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  _check(case, tmp, proc.returncode, proc.stderr)


def _help(args: list[str], cwd: str, monkeypatch: Any) -> str:
  monkeypatch.chdir(cwd)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert train.run([train.PROG, *args]) == 0
  return out.getvalue()


def test_help_lists_flags_overrides_and_configs(monkeypatch):
  out = _help(["--help"], testing.REPO, monkeypatch)
  for text in ("usage: nfnets-train --config", "--workdir DIR", "--verbose",
               "--config.FIELD=VALUE", "examples:", "exit status: 0 done; 2"):
    assert text in out
  for field, _ in train_flags.COMMON_OVERRIDES:
    assert f"--config.{field} " in out
  assert "configs in configs/ (in the current directory):" in out
  for path in testing.config_paths():
    name = os.path.basename(path)
    doc = train_flags.config_docs(os.path.dirname(path))
    assert f"  {name} " in out
    assert dict(doc)[name].split()[0] in out
  assert all(len(line) <= 80 for line in out.splitlines())
  assert _help(["-h"], testing.REPO, monkeypatch) == out


def test_help_elsewhere_lists_configs_next_to_config(tmp_path, monkeypatch):
  out = _help(["--help"], str(tmp_path), monkeypatch)
  assert "configs: none found (no configs/ in the current directory)" in out
  configs = tmp_path / "my_configs"
  configs.mkdir()
  (configs / "tiny.py").write_text('"""A tiny run."""\n')
  out = _help([f"--config={configs / 'tiny.py'}", "--help"], str(tmp_path),
              monkeypatch)
  assert f"configs in {configs}/ (next to --config):" in out
  assert "tiny.py  A tiny run." in out


def test_common_overrides_are_fields_of_every_config():
  """--help names real fields (of the schema, so of every config)."""
  for path in testing.config_paths():
    paths = set(train_flags.field_paths(train_flags.load_config(path)))
    for field, _ in train_flags.COMMON_OVERRIDES:
      if field == "model.kwargs.variant" and "variant" not in paths:
        continue  # Only families with variants have it.
      assert field in paths, (path, field)


def test_flag_value_forms():
  args = ["--config=a.py", "--workdir", "w", "--config.x=1", "--", "--config=z"]
  assert train_flags.flag_value(args, "config") == "a.py"
  assert train_flags.flag_value(args, "workdir") == "w"
  assert train_flags.flag_value(["-workdir=v"], "workdir") == "v"
  assert train_flags.flag_value(["--workdir"], "workdir") is None
  assert train_flags.overrides(args) == [("x", "--config.x")]
  assert train_flags.wants_help(["--config=a", "-h"])
  assert not train_flags.wants_help(["--", "--help"])


def _table(rows: list[tuple[Case, int, str]]) -> str:
  """The docs' table: each bad input, the first line of its message."""
  lines = ["| Bad input | Message (first line of stderr) | Exit |",
           "|---|---|---|"]
  for case, status, err in rows:
    first = next((l for l in err.splitlines() if ": error:" in l), "")
    if first.endswith("invalid config:"):  # The problem is on line 2.
      lines_ = err.splitlines()
      first = f"{first} {lines_[lines_.index(first) + 1].strip()}"
    if len(first) > 240:  # The table shows the start; the test all.
      first = first[:240] + " …"
    first = first.replace("|", "\\|")
    lines.append(f"| {case.what} | `{first}` | {status} |")
  return "\n".join(lines)


if __name__ == "__main__":
  import tempfile  # pylint: disable=g-import-not-at-top
  measured = []
  with pytest.MonkeyPatch.context() as patch:
    for c in CASES:
      with tempfile.TemporaryDirectory() as d:
        code, text, _ = run_case(c, d, patch)
        measured.append((c, code, text.replace(d, "DIR")))
  print(_table(measured))
