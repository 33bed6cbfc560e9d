r"""Trains and evaluates an NFNet experiment described by a config file.

    nfnets-train --config configs/default.py --workdir /tmp/digits
    nfnets-train --config configs/nfnet_f0.py --workdir gs-or-local-dir \
        --config.dataset.data_dir=/data/tfds --config.train.num_epochs=90
    python -m nfnets_jax.train --config configs/nfnet_f3.py:smoke --workdir w

`--config.<field>=<value>` overrides any field (the config is locked, so a
misspelt field fails); `:smoke` after a config path selects its one-step,
tiny-model variant. Running again with the same workdir resumes from its
newest checkpoint. Exit status: 0 done, 2 invalid config, 3 non-finite loss,
130 interrupted (a checkpoint was saved).
"""
from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from nfnets_jax.experiment import config_validation
from nfnets_jax.experiment import loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py), optionally "
    "followed by ':<arg>' passed to its get_config (e.g. ':smoke').",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics.jsonl, TensorBoard "
    "events and the resolved config; an existing run there is resumed.")

EXIT_BAD_CONFIG, EXIT_NON_FINITE, EXIT_INTERRUPTED = 2, 3, 130


def _main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax/grain INFO lines are noise.
  config = _CONFIG.value
  config.workdir = _WORKDIR.value
  try:
    loop.run(config)
  except config_validation.ConfigError as err:
    print(f"nfnets-train: {err}", file=sys.stderr)
    return EXIT_BAD_CONFIG
  except loop.NonFiniteLossError as err:
    print(f"nfnets-train: {err}", file=sys.stderr)
    return EXIT_NON_FINITE
  except loop.Interrupted as err:
    print(f"nfnets-train: {err}", file=sys.stderr)
    return EXIT_INTERRUPTED
  return 0


def main() -> None:
  """Console entry point `nfnets-train`."""
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(_main)


if __name__ == "__main__":
  main()
