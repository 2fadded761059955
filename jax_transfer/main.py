"""CLI: python -m jax_transfer.main --config=ml_collections_configs/<method>/<name>.py[:args]
--workdir=DIR [--config.a.b=value ...]. Relaunching with the same workdir resumes.

Bad input (unknown or mistyped keys, impossible meshes, unknown names, missing datasets) is
reported as one line naming the key, with exit status 2, before anything compiles.
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (file.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and exports go.")
flags.mark_flags_as_required(["config", "workdir"])


def run(argv):
  del argv
  from jax_transfer import config as config_lib, data, train  # After flags: fast --help.
  from jax_transfer.metrics import setup_logging
  setup_logging()
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (config_lib.ConfigError, data.DatasetNotPreparedError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def main():
  # Parse once up front so an unknown --config.key or a wrong type is one line, exit 2
  # (ml_collections raises KeyError/TypeError from inside absl's parser otherwise).
  try:
    flags.FLAGS(sys.argv)
  except (flags.Error, KeyError, TypeError, ValueError, AttributeError) as e:
    msg = " ".join(str(e).split())
    if isinstance(e, KeyError) and e.args:  # "'key'\nDid you mean ...?" from ml_collections.
      key, *hint = str(e.args[0]).split("\n")
      msg = f"unknown config key {key} in a --config.* override" + (
          f" ({' '.join(hint).strip()})" if hint else "")
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)
  app.run(run, flags_parser=lambda argv: [argv[0]])  # Already parsed above.


if __name__ == "__main__":
  main()
