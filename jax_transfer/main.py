"""CLI: python -m jax_transfer.main --config=ml_collections_configs/<method>/<name>.py[:args]
--workdir=DIR [--config.a.b=value ...]. Relaunching with the same workdir resumes.

Bad input (unknown or mistyped keys, impossible meshes, unknown names, missing datasets) is
reported as one line naming the key, with exit status 2, before anything compiles.
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags


def _define_flags(flag_values, sys_argv=None):
  config = config_flags.DEFINE_config_file("config", None, "Config file (file.py[:arg]).",
                                           lock_config=True, flag_values=flag_values,
                                           sys_argv=sys_argv)
  workdir = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and exports go.",
                                flag_values=flag_values)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)
  return config, workdir


_CONFIG, _WORKDIR = _define_flags(flags.FLAGS)


class UsageError(ValueError):
  """A command line the CLI refuses before anything runs (printed as one line, exit 2)."""


def _parse(argv, flag_values) -> None:
  # ml_collections raises KeyError/TypeError from inside absl's parser: made one line here.
  try:
    flag_values(argv)
  except (flags.Error, KeyError, TypeError, ValueError, AttributeError) as e:
    msg = " ".join(str(e).split())
    raise UsageError(_explain_override(argv) or msg) from None  # a bad key path, any depth


def parse_command(argv):
  """(config, workdir) of the command line `argv` (argv[0] = the program), parsed as main()
  parses sys.argv but on fresh flags, so it can run many times in one process (tests of the
  documented commands). Raises UsageError. absl's own flags (--v, --logtostderr) are not
  defined here."""
  flag_values = flags.FlagValues()
  config, workdir = _define_flags(flag_values, sys_argv=list(argv))
  _parse(list(argv), flag_values)
  return config.value, workdir.value


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


def _explain_override(argv) -> str | None:
  """The first --config.a.b.c=V override whose key path does not exist in the config, as
  'unknown config key ...': where, what is allowed there and the closest match. At any depth
  (ml_collections' own KeyError names only the last part, and only at the top level gives a
  hint). None when every override path exists (the error was something else)."""
  import difflib
  import ml_collections
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if not spec:
    return None
  try:
    from ml_collections.config_flags import config_flags as impl  # the file parser
    config = impl.ConfigFileFlagParser(name="config").parse(spec)
  except Exception:  # pylint: disable=broad-except
    return None
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    parts = arg[len("--config."):].split("=", 1)[0].split(".")
    node = config
    for i, part in enumerate(parts):
      if isinstance(node, ml_collections.ConfigDict) and part in node:
        node = node[part]
        continue
      where = "config" + "".join(f".{p}" for p in parts[:i])
      if not isinstance(node, ml_collections.ConfigDict):
        return (f"config key {'.'.join(parts[:i])!r} is a value ({node!r}), not a section: "
                f"{arg!r} cannot set {part!r} under it")
      allowed = sorted(node.keys())
      name = f"{'.'.join(parts[:i + 1])!r} in {arg.split('=')[0]!r}"
      fields = _model_fields(config) if where == "config.model" else []
      if part in fields:
        return (f"config key {name}: {part!r} is a field of the {config.model_name!r} model "
                f"that this config does not list (it takes the model's or its variant's "
                f"default); add it to the config file's model section to set it. "
                f"{where} has {allowed}")
      close = difflib.get_close_matches(part, sorted(set(allowed) | set(fields)), n=1,
                                        cutoff=0.5)
      return (f"unknown config key {name}: {where} has {allowed}" +
              (f" (did you mean {close[0]!r}?)" if close else ""))
  return None


def _model_fields(config) -> list[str]:
  """The constructor fields of config.model_name's module (built, never initialised)."""
  import dataclasses
  from jax_transfer import config as config_lib, models
  try:
    module = models.get_model(config.model_name, **config_lib.model_kwargs(config.model))
  except Exception:  # pylint: disable=broad-except
    return []
  return [f.name for f in dataclasses.fields(module) if f.name not in ("parent", "name")]


def main():
  # Parse once up front so an unknown --config.key or a wrong type is one line, exit 2.
  try:
    _parse(sys.argv, flags.FLAGS)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  app.run(run, flags_parser=lambda argv: [argv[0]])  # Already parsed above.


if __name__ == "__main__":
  main()
