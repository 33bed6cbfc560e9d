"""What every command line of the package does with bad input.

A user's mistake (a bad flag, a file that is not a checkpoint, a missing
directory) ends with one line `PROG: error: MESSAGE` on stderr and exit
status 2; the Python traceback is shown only with `--verbose` or with the
environment variable `NFNETS_VERBOSE=1`. Anything else is a bug and keeps its
traceback.

    def main() -> None:
      sys.exit(cli.guard("nfnets-predict", lambda: _main(sys.argv[1:])))
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
import os
import pickle
import sys
import traceback

EXIT_USAGE = 2
VERBOSE_ENV = "NFNETS_VERBOSE"


class UsageError(Exception):
  """Bad input from the user: shown as one message, exit status 2."""


# Raised by the library for inputs the user chose: unreadable or unsafe
# files, configs and checkpoints that do not fit. `ValueError` covers
# `ConfigError` and `ParamsMismatchError`; `pickle.UnpicklingError` covers
# `UnsafeCheckpointError`.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UsageError, OSError, ValueError, pickle.UnpicklingError)


def verbose_requested(argv: Sequence[str] | None = None) -> bool:
  """True when `--verbose` is among `argv` or `NFNETS_VERBOSE` is set."""
  argv = sys.argv[1:] if argv is None else argv
  env = os.environ.get(VERBOSE_ENV, "").strip().lower()
  flag = any(a == "--verbose" or a.lower() in ("--verbose=true",
                                               "--verbose=1")
             for a in argv)
  return flag or env not in ("", "0", "false", "no")


def report(prog: str, err: BaseException, *, verbose: bool = False) -> int:
  """Prints `err` as `PROG: error: ...` (with traceback if verbose)."""
  if verbose:
    traceback.print_exception(err)
  message = str(err) or type(err).__name__
  if isinstance(err, OSError) and err.filename and err.strerror:
    # "PATH: No such file or directory" rather than "[Errno 2] ...: 'PATH'".
    message = f"{err.filename}: {err.strerror}"
  print(f"{prog}: error: {message}", file=sys.stderr)
  if not verbose:
    print(f"{prog}: (run with --verbose or {VERBOSE_ENV}=1 for the "
          "traceback)", file=sys.stderr)
  return EXIT_USAGE


def guard(prog: str, main: Callable[[], int | None], *,
          user_errors: tuple[type[BaseException], ...] = USER_ERRORS,
          argv: Sequence[str] | None = None) -> int:
  """Runs `main()`; a user error becomes a message and exit status 2.

  Args:
    prog: the program name printed before the message.
    main: the command; returns its exit status (None means 0).
    user_errors: exception types that mean bad input, not a bug.
    argv: the arguments to look for `--verbose` in (default `sys.argv`).

  Returns:
    The exit status for `sys.exit`.
  """
  try:
    status = main()
  except user_errors as err:  # pylint: disable=catching-non-exception
    return report(prog, err, verbose=verbose_requested(argv))
  return 0 if status is None else int(status)
