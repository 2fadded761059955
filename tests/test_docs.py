"""The docs stand on their own and say what runs: every repository path that README.md and
experiments/**/*.md name exists, and every `python -m jax_transfer.main ...` command in them
and in the config docstrings parses through the CLI and validates, as written. Fast: nothing
trains or compiles."""
import ast
import pathlib
import re
import shlex

import pytest

from jax_transfer import main, train
from test_pod_configs import (ANY_TARGET, TARGETS, catalogue_metadata,  # noqa: F401 (autouse)
                              validate_for_some)

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "experiments").rglob("*.md"))]
CONFIG_FILES = sorted(p for p in (ROOT / "ml_collections_configs").rglob("*.py")
                      if p.name != "__init__.py")

# ------------------------------------------------------------------------------------ Paths.
# A path whose first part is one of these is a repository path, relative to the root.
ANCHORS = {p.name for p in ROOT.iterdir() if not p.name.startswith(".") or p.name == ".ci"} - {
    "workdirs", "jax_transfer.egg-info"}  # (run and install outputs)
# Created when something runs, so absent from a clone: experiment and run outputs (workdirs/,
# a run's workdir/ with checkpoints/ and tensorboard/), the setup's .venv/, and what
# experiments/icl/transition.py writes beside its workdirs.
RUN_TIME_DIRS = {"workdirs", "workdir", "checkpoints", "tensorboard", ".venv"}
RUN_TIME_FILES = {"transition.md"}
PLACEHOLDERS = {"file.py"}  # `--config=file.py:arg` in the README: any config file.
# Shorthand (`convert/core.py`, `test_randaug.py`) names the tail of a repository file; only
# these kinds are checked there, so parameter paths (`head/`) and metric names (`perf/mfu`)
# are not taken for paths. Other file kinds (.json, .jpg, .txt) are run outputs or inputs.
FILE_KINDS = (".py", ".md", ".sh", ".png", ".ini")
REPO_FILES = sorted({p.relative_to(ROOT).as_posix() for top in ANCHORS if (ROOT / top).is_dir()
                     for p in (ROOT / top).rglob("*") if "__pycache__" not in p.parts})


def _split_markdown(text):
  """(fenced code blocks, inline code spans, link targets) of a markdown text."""
  fence = re.compile(r"^[ \t]*```.*?^[ \t]*```", re.S | re.M)  # also indented, in a list
  fences, prose = fence.findall(text), fence.sub("", text)
  inline = [s.replace("\n", " ") for s in re.findall(r"`([^`]+)`", prose)]
  links = re.findall(r"\]\(([^)\s]+)\)", prose)
  return fences, inline, links


def _named_paths(doc):
  """(token, path, test name or None) for each path-like token of the code in `doc`."""
  fences, inline, _ = _split_markdown(doc.read_text())
  for code in fences + inline:
    for token in re.split(r"[\s=,;()\"'\[\]]+", code):
      path = token.rstrip(".:")
      name = None
      if "::" in path:  # tests/test_x.py::test_name
        path, name = path.split("::", 1)
      if re.match(r"[^:]+\.py:", path):  # a config file with its arguments
        path = path.split(":", 1)[0]
      if (not path or "://" in path or path[0] in "/~$-" or re.search(r"[<>{}*$…|^?]", path)
          or path in PLACEHOLDERS):
        continue  # URLs, absolute paths (/tmp, /mnt/gcs/BUCKET), globs and placeholders.
      first = path.split("/")[0]
      if first in RUN_TIME_DIRS or path in RUN_TIME_FILES:
        continue
      if first in ANCHORS or path.endswith(FILE_KINDS):
        yield token, path, name


def _resolve(doc, path):
  """The file `path` (as `doc` names it) should be, or None when no candidate exists."""
  if path.split("/")[0] in ANCHORS:
    return ROOT / path.rstrip("/")
  for candidate in [doc.parent / path] + [ROOT / f for f in REPO_FILES
                                          if f.endswith("/" + path)]:
    if candidate.exists():
      return candidate
  return None


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_path_the_docs_name_exists(doc):
  missing = []
  for token, path, name in _named_paths(doc):
    found = _resolve(doc, path)
    if found is None or not found.exists():
      missing.append(token)
    elif name and not re.search(rf"^def {re.escape(name)}\b", found.read_text(), re.M):
      missing.append(f"{token} (no such test)")
  for link in _split_markdown(doc.read_text())[2]:
    target = link.split("#")[0]
    if target and not re.match(r"[a-z]+:", target) and not (doc.parent / target).exists():
      missing.append(f"link {link}")
  assert not missing, f"{doc.relative_to(ROOT)} names paths that do not exist: {missing}"


def test_path_check_catches_a_missing_path(tmp_path):
  doc = tmp_path / "README.md"
  doc.write_text("See `jax_transfer/nosuch.py`, `nosuch_helper.py` and `tests/test_train.py"
                 "::test_nosuch`, not `workdirs/x/curves.png` or `/tmp/x.py`.\n")
  found = {(p, n): _resolve(doc, p) for _, p, n in _named_paths(doc)}
  assert set(found) == {("jax_transfer/nosuch.py", None), ("nosuch_helper.py", None),
                        ("tests/test_train.py", "test_nosuch")}
  assert not found["jax_transfer/nosuch.py", None].exists()
  assert found["nosuch_helper.py", None] is None


def test_readme_says_where_each_method_family_lives():
  readme = (ROOT / "README.md").read_text()
  assert "../" not in readme  # Nothing outside the repository.
  for family in ("CLIP", "ALIGN", "SigLIP", "GPICL", "TLEG", "KRR-ST", "transfer"):
    assert family in readme.split("## Two commands")[0], family
  for code in ("jax_transfer/methods/contrastive.py", "jax_transfer/methods/icl.py",
               "jax_transfer/methods/learngene.py", "jax_transfer/methods/distill.py",
               "jax_transfer/methods/supervised.py"):
    assert f"`{code}`" in readme, code


# --------------------------------------------------------------------------------- Commands.
CLI = "python -m jax_transfer.main"
# One flag as a shell passes it: --key or --key=value, the value unquoted, bare or quoted.
FLAG = re.compile(r"""[ \t]+(--[\w.-]+(?:=(?:'[^']*'|"[^"]*"|[^\s'"`\\]+))?)""")


def _commands(text):
  """The argv of each `python -m jax_transfer.main` command in `text`: backslash-continued
  lines joined, the flags that follow it up to the first word that is not one (a closing
  quote, `&&`, the end of a code span or line)."""
  text = text.replace("\\\n", " ")
  for m in re.finditer(re.escape(CLI), text):
    pos, argv = m.end(), ["jax_transfer.main"]
    while flag := FLAG.match(text, pos):
      argv.extend(shlex.split(flag.group(1)))
      pos = flag.end()
    yield argv


def _documented_commands():
  """(file, its code text, the argv of each command in it): the config docstrings, then the
  docs' fenced blocks and inline code spans (one a line: a span may wrap in the markdown)."""
  found = []
  for path in CONFIG_FILES:
    doc = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""
    found.append((path, doc, list(_commands(doc))))
  for path in DOCS:
    fences, inline, _ = _split_markdown(path.read_text())
    code = "\n".join(fences + inline)
    found.append((path, code, list(_commands(code))))
  return found


COMMANDS = [(f"{path.relative_to(ROOT)}[{i}]", argv)
            for path, _, argvs in _documented_commands() for i, argv in enumerate(argvs)]


def test_every_documented_command_is_found():
  for path, text, argvs in _documented_commands():
    assert len(argvs) == text.count(CLI), path
    assert all(any(a.startswith("--config=") for a in argv) for argv in argvs), (path, argvs)
  assert len(COMMANDS) >= 20


def _stand_in_export(tmp_path):
  """An export as the command before `init=DIR` writes it (import_checkpoint --out=DIR): the
  config.json of a ViT with its image size. Validation reads only that; the parameters (an
  empty file here) are read when a run starts."""
  from ml_collections_configs.supervised import digits_vit
  config = digits_vit.get_config("runlocal")
  config.input.image_size = 32
  export = tmp_path / "export"
  export.mkdir()
  (export / "config.json").write_text(config.to_json())
  (export / "params.safetensors").write_bytes(b"")
  return str(export)


def _dry_run(argv, tmp_path, exports=None):
  """The CLI's checks of `argv` up to where a real run needs the real machine or data.

  Placeholders: $VAR becomes the bare name VAR (a local path that does not exist, as
  /mnt/gcs/BUCKET/... does not here), and a config's `init=DIR` names a stand-in export.
  Not checked: the device count (each config validates for the one its docstring targets,
  tests/test_pod_configs.py's TARGETS, else for some plausible count), the metadata of
  catalogue datasets (imagenet2012, coco_captions, ...: stubbed as in test_pod_configs), and
  what train_and_evaluate reads from disk after validating (init.export_dir parameters,
  teacher and target exports, checkpoints)."""
  argv = [re.sub(r"\$\{?(\w+)\}?", r"\1", a) for a in argv]
  urls = [a for a in argv if "://" in a]
  assert not urls, f"the loop reads local paths only (mount buckets with gcsfuse): {urls}"
  argv = [re.sub(r"(?<=[:,])init=[^,]+", lambda _: "init=" + _stand_in_export(tmp_path), a)
          if a.startswith("--config=") else a for a in argv]
  if exports is not None:  # merging/atlas.py's base=DIR,tasks=A+B: real tiny exports
    argv = [re.sub(r"(?<=[:,])tasks=[^,]+", "tasks=" + "+".join(exports["models"][:2]),
                   re.sub(r"(?<=[:,])base=[^,]+", "base=" + exports["base"], a))
            if a.startswith("--config=") else a for a in argv]
  config, workdir = main.parse_command(argv)  # UsageError: an unknown key, a wrong type.
  train._check_workdir(workdir)
  spec = next(a for a in argv if a.startswith("--config="))[len("--config="):]
  rel, _, args = spec.partition(":")
  rel = rel[len("ml_collections_configs/"):]
  documented = [d for a, d in TARGETS.get(rel, []) if a == args]
  validate_for_some(config, documented or ANY_TARGET, " ".join(argv))


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_validates(where, argv, tmp_path, monkeypatch, request):
  monkeypatch.chdir(ROOT)  # The commands run from the checkout.
  needs_exports = any(re.search(r"[:,]base=", a) for a in argv if a.startswith("--config="))
  _dry_run(argv, tmp_path, request.getfixturevalue("exports") if needs_exports else None)


@pytest.mark.parametrize("bad,error", [
    ("--config.optimizer.lrr=1e-3", "unknown config key 'optimizer.lrr'"),
    ("--config.input.data_dir=gs://bucket/tfds", "local paths only"),
    ("--config.mesh.data=3", "needs 3 devices"),  # digits_vit.py targets 1 device.
])
def test_dry_run_refuses_a_bad_command(bad, error, tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  argv = ["jax_transfer.main", "--config=ml_collections_configs/supervised/digits_vit.py",
          "--workdir=/tmp/w", bad]
  with pytest.raises((main.UsageError, AssertionError, pytest.fail.Exception), match=error):
    _dry_run(argv, tmp_path)

