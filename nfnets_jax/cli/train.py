r"""Trains and evaluates an NFNet experiment described by a config file.

    nfnets-train --config configs/default.py --workdir /tmp/digits
    nfnets-train --config configs/nfnet.py:F0 --workdir gs-or-local-dir \
        --config.dataset.data_dir=/data/tfds --config.train.num_epochs=90
    python -m nfnets_jax.cli.train --config configs/default.py:smoke --workdir w

`--config.<field>=<value>` overrides any field (the config is locked, so a
misspelt field fails, naming the closest fields); `:smoke` after a config
path selects its one-step, tiny-model variant. `--help` lists the flags, the
common overrides and the configs found; bad input is one message (exit 2),
with the traceback under `--verbose` or `NFNETS_VERBOSE=1`. Running again with the same workdir resumes from its
newest checkpoint; one run at a time holds a workdir (a second one exits
2, naming the first); a finished workdir prints its recorded result
(`--reevaluate` evaluates again); a resume whose config changes the model
or recipe is refused unless `--allow_config_change=FIELD,...` names the
fields. Exit status: 0 done, 2 invalid config, a workdir in use, a changed
config on resume, a checkpoint that cannot be written (the previous ones are
kept) or an image that cannot be decoded (a checkpoint was saved),
3 non-finite loss, 130 interrupted (a checkpoint was saved).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
import logging as std_logging
import os
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging

from nfnets_jax.cli import compile_cache
from nfnets_jax.cli import errors
from nfnets_jax.cli import train_flags
from nfnets_jax.cpu import malloc

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics.jsonl, TensorBoard "
    "events and the resolved config; an existing run there is resumed.")
_REEVALUATE = flags.DEFINE_bool(
    "reevaluate", False, "On a finished workdir, evaluate the final state "
    "again (recorded as a 'reeval' record of metrics.jsonl); without it, a "
    "finished run prints its recorded final evaluation.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_list(
    "allow_config_change", [], "Config fields (e.g. model.kwargs.activation,"
    " train.num_steps) a resume may change although they shape what is "
    "trained; recorded in the workdir's config_changes.jsonl.")
flags.DEFINE_bool(
    "verbose", False, "Show the Python traceback of an error and orbax's "
    f"own error log (or set {errors.VERBOSE_ENV}=1).")

PROG = train_flags.PROG
EXIT_BAD_CONFIG, EXIT_NON_FINITE, EXIT_INTERRUPTED = 2, 3, 130


def _train() -> int:
  """Runs the experiment of the parsed flags; returns the exit status."""
  # Imported here: --help and flag errors answer without TFDS, orbax, grain.
  # pylint: disable=g-import-not-at-top
  from nfnets_jax.experiment import checkpoint_io
  from nfnets_jax.experiment import config_validation
  from nfnets_jax.experiment import loop
  from nfnets_jax.experiment import workdir_lock
  # pylint: enable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax/grain INFO lines are noise.
  # Each orbax failure reaches the user as one message of ours; orbax's own
  # error log of it (a traceback per thread, and asyncio's report of its
  # write tasks) only with --verbose.
  for logger in (logging.get_absl_logger(), std_logging.getLogger("asyncio")):
    if errors.verbose_requested():
      logger.removeFilter(_hide_orbax_errors)
    else:
      logger.addFilter(_hide_orbax_errors)
  config = train_flags.CONFIG.value
  config.workdir = _WORKDIR.value
  try:
    loop.run(config, reevaluate=_REEVALUATE.value,
             allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except config_validation.ConfigError as err:
    errors.report(PROG, err, verbose=errors.verbose_requested())
    return EXIT_BAD_CONFIG
  except loop.NonFiniteLossError as err:
    print(f"{PROG}: {err}", file=sys.stderr)
    return EXIT_NON_FINITE
  except loop.BadImageError as err:  # Bad input; a checkpoint was saved.
    print(f"{PROG}: {err}", file=sys.stderr)
    return EXIT_BAD_CONFIG
  except (checkpoint_io.NoIntactCheckpointError,
          checkpoint_io.CheckpointMismatchError,
          checkpoint_io.CheckpointSaveError,
          workdir_lock.WorkdirLockedError) as err:
    print(f"{PROG}: {err}", file=sys.stderr)
    return EXIT_BAD_CONFIG
  except loop.Interrupted as err:
    print(f"{PROG}: {err}", file=sys.stderr)
    return EXIT_INTERRUPTED
  return 0


def _hide_orbax_errors(record: Any) -> bool:
  """A `logging` filter: False for orbax's ERROR records, and for asyncio's
  "Task exception was never retrieved" about an orbax task (a write whose
  failure orbax has already raised)."""
  if record.levelno < std_logging.ERROR:
    return True
  if f"{os.sep}orbax{os.sep}" in record.pathname:
    return False
  return not (record.name == "asyncio" and "orbax" in record.getMessage())


def run(argv: Sequence[str],
        launch: Callable[[Callable[[], int]], int] = lambda train: train()
        ) -> int:
  """The command on `argv` (program name first); returns the exit status.

  Each call parses its flags afresh, so tests run it in-process. Bad input
  raises `errors.UsageError` (or a library error that `errors.guard`
  reports); a bad config is reported here (exit status 2).

  Args:
    argv: the command line.
    launch: calls the training function; `main` runs it under absl's
      `app.run` (logging handler, faulthandler).
  """
  argv = list(argv)
  if train_flags.wants_help(argv[1:]):
    print(train_flags.help_text(argv[1:]))
    return 0
  app.define_help_flags()  # --helpfull, --helpshort (exit 1, absl's way).
  remaining = train_flags.parse_flags(argv)
  if len(remaining) > 1:
    raise errors.UsageError(f"unexpected arguments {remaining[1:]}: {PROG} "
                            "takes only flags (see --help)")
  return launch(_train)


def _under_absl(train: Callable[[], int]) -> int:
  """absl's set-up (logging handler, faulthandler), then `train()`."""
  app.run(lambda _: train(), argv=sys.argv[:1], flags_parser=lambda a: a)
  return 0  # Not reached: app.run exits with train()'s status.


def main() -> None:
  """Console entry point `nfnets-train`."""
  malloc.tune()  # Opt-in (NFNETS_JAX_MALLOC=1); before JAX starts.
  compile_cache.enable()  # NFNETS_JAX_COMPILE_CACHE=0 turns it off.
  sys.exit(errors.guard(PROG, lambda: run(sys.argv, _under_absl)))


if __name__ == "__main__":
  main()
