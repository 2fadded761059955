"""Shared by the benchmark scripts: the machine line and section-wise updates of
benchmarks/RESULTS.md (each script owns one '## ' section and replaces only that)."""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent


def cpu_model() -> str:
  """lscpu's 'Model name' (e.g. 'AMD EPYC'), or the platform's best guess."""
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"^Model name:\s*(.+)$", out, re.M)
    if m:
      return m.group(1).strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  return platform.processor() or "unknown"


def machine_line(versions: str, load: tuple) -> str:
  """One line naming the machine, the library versions, the load average when the run started
  (1/5/15 min: other jobs share this machine) and the date, for every RESULTS.md section."""
  return (f"Machine: {os.cpu_count()} CPU cores ({cpu_model()}), no accelerator; {versions}. "
          f"Load average at start (1/5/15 min, other jobs share the machine): "
          f"{load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}. Date: {datetime.date.today().isoformat()}.")


def accelerator_line(devices, versions: str, load: tuple, extra: str = "") -> str:
  """machine_line for runs on accelerators: the device kind and count (`jax.devices()`),
  the host's CPU cores, versions, load and date. `extra` (e.g. the XLA_FLAGS) is appended."""
  kinds = sorted({d.device_kind for d in devices})
  return (f"Machine: {len(devices)} x {', '.join(kinds)} ({devices[0].platform}), host "
          f"{os.cpu_count()} CPU cores ({cpu_model()}); {versions}. Load average at start "
          f"(1/5/15 min): {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}. "
          f"Date: {datetime.date.today().isoformat()}." + (f" {extra}" if extra else ""))


def write_section(path, title: str, section: str) -> None:
  """Replaces the section starting with the line `title` (up to the next '## ' heading) by
  `section` (which starts with that title), keeping every other section; appends it when
  absent. Creates the file when missing."""
  path = pathlib.Path(path)
  text = path.read_text() if path.exists() else "# Benchmarks\n\n"
  start = text.find(title + "\n")
  if start < 0:
    text = text.rstrip("\n") + "\n\n" + section
  else:
    nxt = text.find("\n## ", start + len(title))
    rest = "" if nxt < 0 else "\n" + text[nxt + 1:]
    text = text[:start] + section.rstrip("\n") + "\n" + rest
  path.write_text(text.rstrip("\n") + "\n")


def command_line(script: str, parser, args, names) -> str:
  """`script` plus ` --name value` for each argparse dest in `names` (in that order) whose
  value in `args` differs from `parser`'s default, '_' written '-': the command a section
  names."""
  return script + "".join(f" --{k.replace('_', '-')} {getattr(args, k)}" for k in names
                          if getattr(args, k) != parser.get_default(k))


def env_prefix(*names: str) -> str:
  """`NAME=value ` for each environment variable in `names` that is set: the part of a
  section's command that argv does not show (e.g. OPENBLAS_NUM_THREADS, which the LAPACK
  calls of jax's CPU linalg, via scipy's OpenBLAS, obey)."""
  return "".join(f"{n}={os.environ[n]} " for n in names if n in os.environ)


def footer(command: str, machine: str, note: str = "") -> list[str]:
  """The lines that end a section: the command, the machine line and, when given, a note."""
  return [f"Command: `{command}`", "", machine, ""] + ([note, ""] if note else [])


def add_results_arg(parser) -> None:
  """--results: the RESULTS.md whose section the script replaces ('' = print only)."""
  parser.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"),
                      help="RESULTS.md to update ('' = print only)")


def run_child(script, args, what: str, env: dict | None = None):
  """Runs `python script *args` in a fresh process (repo root as cwd and on PYTHONPATH;
  `env` replaces os.environ) and returns the JSON on its last stdout line; exits naming `what`
  with the end of its stderr when it fails. Each measurement runs alone in its own process."""
  env = dict(os.environ if env is None else env, PYTHONPATH=str(REPO))
  out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                       cwd=REPO, env=env)
  if out.returncode:
    sys.exit(f"{what} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def publish(results, title: str, section: str) -> None:
  """Prints `section` and, when `results` (a RESULTS.md path) is set, writes it there as the
  section `title` (write_section)."""
  print(section)
  if results:
    write_section(results, title, section)
