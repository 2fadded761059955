r"""Start-up on a 100k-record dataset: the label column and the first batch.

  python benchmarks/startup.py [--data_dir DIR] [--num_train 100000] [--image_size 64]
                               [--batch 256] [--rounds 2] [--results benchmarks/RESULTS.md]

Builds once (kept in --data_dir; default: a temporary directory, removed afterwards)
`shapes_jpeg_startup`: shapes_jpeg's builder (imagenet2012's record layout: encoded JPEG
image, ClassLabel label, file_name) with --num_train train records of small JPEGs (32-64 px a
side). Then measures, each in a fresh process (imports excluded; the files are in the OS page
cache, as on any run after the first):
  old          the label column as pipeline._read_labels did at commit 81fbe1e: every record
               decoded whole (its JPEG included) through tfds.data_source, 1024 at a time.
  tree         pipeline._read_labels as it is in this working tree.
  new, cold    labels.read_labels without its cache file: each record's tf.train.Example is
               parsed and only the label read; writes <builder.data_dir>/labels/train.label.npy.
  new, cached  labels.read_labels with that file present: np.load of one small file.
  first batch  `data.make_train_iterator` (input.classes=(0, 1, 2), image_size, batch) and
               `next(it)`: with this tree's pipeline as it is, and with pipeline._read_labels
               replaced by labels.read_labels (cache present), as the lead will wire it.
and, on the embedded shapes_jpeg (96-500 px JPEGs), reading 1000 records through
tfds.data_source raw (decoders={'image': tfds.decode.SkipDecoding()}: the JPEG bytes) and
decoded (tfds's default: cv2). Of --rounds rounds the fastest of each is reported. Writes/
replaces the section "## Start-up on a 100k-record dataset" of --results.
"""
from __future__ import annotations

import report  # benchmarks/report.py: machine line + RESULTS.md sections
import argparse
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

SECTION = "## Start-up on a 100k-record dataset"
NAME = "shapes_jpeg_startup"
CLASSES = (0, 1, 2)
MEASURES = ("old", "tree", "new_cold", "new_cached", "iter_tree", "iter_new", "read1000")


@functools.lru_cache(maxsize=None)
def _builder_class(num_train: int):
  """shapes_jpeg with `num_train` train records of 32-64 px (registered as NAME; one
  num_train per process)."""
  from jax_transfer.data import builders

  class ShapesJpegStartup(builders.ShapesJpeg):
    VERSION = builders.ShapesJpeg.VERSION
    SPLITS = {"train": (num_train, 31), "validation": (1_000, 32)}
    MIN_SIZE, MAX_SIZE = 32, 64
    # tfds reads metadata files from the defining module's directory: builders.py's, not
    # this script (tfds would list it as a directory).
    pkg_dir_path = builders.ShapesJpeg._get_pkg_dir_path()  # pylint: disable=protected-access

  return ShapesJpegStartup


def ensure_dataset(data_dir: str, num_train: int) -> float | None:
  """Builds NAME at data_dir unless prepared with num_train records; its build seconds."""
  builder = _builder_class(num_train)(data_dir=data_dir, file_format="array_record")
  if builder.is_prepared():
    if builder.info.splits["train"].num_examples == num_train:
      return None
    shutil.rmtree(os.fspath(builder.data_dir))  # Another --num_train: build it again.
    builder = _builder_class(num_train)(data_dir=data_dir, file_format="array_record")
  import tensorflow_datasets as tfds
  t0 = time.perf_counter()
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return time.perf_counter() - t0


def old_read_labels(name: str, split: str, data_dir: str, key: str) -> np.ndarray:
  """pipeline._read_labels at commit 81fbe1e (kept here: the pipeline will call
  labels.read_labels). get_source then decoded every feature, the image included."""
  import tensorflow_datasets as tfds
  source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  labels = np.empty(len(source), np.int64)
  chunk = 1024
  for start in range(0, len(source), chunk):
    idx = list(range(start, min(start + chunk, len(source))))
    labels[idx] = [int(ex[key]) for ex in source.__getitems__(idx)]
  return labels


def _digest(labels) -> str:
  return hashlib.sha256(np.asarray(labels, np.int64).tobytes()).hexdigest()[:12]


def _input_cfg(data_dir: str, image_size: int, batch: int):
  from jax_transfer import config as config_lib
  cfg = config_lib.base_config().input
  cfg.dataset, cfg.data_dir, cfg.train_split = NAME, data_dir, "train"
  cfg.classes, cfg.image_size, cfg.global_batch_size = CLASSES, image_size, batch
  return cfg


def measure(what: str, data_dir: str, num_train: int, image_size: int, batch: int) -> dict:
  """One measurement, in this (fresh) process: seconds of the operation, imports excluded."""
  _builder_class(num_train)  # Registers NAME in this process.
  import tensorflow_datasets as tfds  # noqa: F401  (imports before the clock starts)
  from jax_transfer.data import labels as labels_lib
  from jax_transfer.data import pipeline
  out = {"what": what}
  t0 = time.perf_counter()
  if what == "old":
    out["digest"] = _digest(old_read_labels(NAME, "train", data_dir, "label"))
  elif what == "tree":
    out["digest"] = _digest(pipeline._read_labels(NAME, "train", data_dir, "label"))
  elif what in ("new_cold", "new_cached"):
    out["digest"] = _digest(labels_lib.read_labels(NAME, "train", data_dir, "label"))
  elif what in ("iter_tree", "iter_new"):
    if what == "iter_new":
      pipeline._read_labels = lambda name, split, d, key: labels_lib.read_labels(
          name, split, d, key, builder=pipeline._builder(name, d))
    it = pipeline.make_train_iterator(_input_cfg(data_dir, image_size, batch), seed=0)
    out["first_s"] = time.perf_counter() - t0
    b = next(it)
    out["shapes"] = {k: list(np.shape(v)) for k, v in b.items()}
  elif what == "read1000":
    idx = list(range(1000))
    for mode, decoders in (("raw", {"image": tfds.decode.SkipDecoding()}), ("decoded", None)):
      for name in ("shapes_jpeg", NAME):
        src = tfds.data_source(name, split="train", data_dir=data_dir, download=False,
                               decoders=decoders)
        src.__getitems__(idx[:10])  # Opens the files.
        t = time.perf_counter()
        recs = src.__getitems__(idx)
        out[f"{name}_{mode}_s"] = time.perf_counter() - t
        if mode == "raw":
          out[f"{name}_kb"] = float(np.mean([len(r["image"]) for r in recs]) / 1e3)
  out["s"] = time.perf_counter() - t0
  return out


# ------------------------------------------------------------------------------ Reporting.

def render(best: dict, args, build_s, command: str, load: tuple, note: str) -> str:
  import tensorflow_datasets as tfds
  n = args.num_train
  o = best["old"]["s"]

  def row(label, key, what):
    s = best[key]["s"]
    return f"| {label} | {what} | {s:.3f} | {o / s:,.0f}x |"

  r = best["read1000"]
  lines = [
      SECTION, "",
      f"`{NAME}`: shapes_jpeg's builder (imagenet2012's record layout: encoded JPEG, "
      f"ClassLabel, file_name) with {n:,} train records of 32-64 px JPEGs (mean "
      f"{r[NAME + '_kb']:.1f} KB), array_record. Each number: one fresh process (imports "
      "excluded, files in the OS page cache), the fastest of "
      f"{args.rounds} round(s)." + (f" Building the dataset took {build_s:.0f} s."
                                    if build_s else ""), "",
      "| label column of train | how | seconds | vs old |",
      "|---|---|---:|---:|",
      row("old: pipeline._read_labels at 81fbe1e", "old",
          "tfds.data_source, every feature decoded (the JPEG too)"),
      row("pipeline._read_labels in this tree", "tree", "as this working tree has it"),
      row("labels.read_labels, no cache file", "new_cold",
          "tf.train.Example parsed, label read only; writes labels/train.label.npy"),
      row("labels.read_labels, cache file present", "new_cached",
          "np.load of one .npy (len checked against dataset_info.json)"),
      "",
      f"All four give the same labels: {'yes' if len(set(best[k]['digest'] for k in ('old', 'tree', 'new_cold', 'new_cached'))) == 1 else 'NO'}.",
      "",
      f"| first batch (`make_train_iterator`, input.classes={CLASSES}, image_size "
      f"{args.image_size}, batch {args.batch}) | make_train_iterator s | + first batch s |",
      "|---|---:|---:|",
      f"| this tree's pipeline as it is | {best['iter_tree']['first_s']:.3f} "
      f"| {best['iter_tree']['s']:.3f} |",
      f"| with pipeline._read_labels -> labels.read_labels (cache present) "
      f"| {best['iter_new']['first_s']:.3f} | {best['iter_new']['s']:.3f} |",
      "",
      "| 1000 records through tfds.data_source | raw (SkipDecoding: JPEG bytes) s "
      "| decoded (tfds default, cv2) s | decoded / raw |",
      "|---|---:|---:|---:|",
  ]
  for name, what in (("shapes_jpeg", f"shapes_jpeg train (96-500 px, mean "
                                      f"{r['shapes_jpeg_kb']:.1f} KB)"),
                     (NAME, f"{NAME} train (32-64 px)")):
    raw, dec = r[f"{name}_raw_s"], r[f"{name}_decoded_s"]
    lines.append(f"| {what} | {raw:.4f} | {dec:.4f} | {dec / raw:.0f}x |")
  lines += [""] + report.footer(
      command, report.machine_line(f"tensorflow_datasets {tfds.__version__}, numpy "
                                   f"{np.__version__}", load), note)
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data_dir", default="",
                 help="where the dataset is built once and kept (default: a temp dir)")
  p.add_argument("--num_train", type=int, default=100_000)
  p.add_argument("--image_size", type=int, default=64)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--rounds", type=int, default=2)
  report.add_results_arg(p)
  p.add_argument("--note", default="", help="text appended to the section")
  p.add_argument("--one", help=argparse.SUPPRESS)  # measurement name: child process.
  a = p.parse_args()
  if a.one:
    print(json.dumps(measure(a.one, a.data_dir, a.num_train, a.image_size, a.batch)))
    return
  load = os.getloadavg()
  data_dir = a.data_dir or tempfile.mkdtemp(prefix="startup_")
  try:
    build_s = ensure_dataset(data_dir, a.num_train)
    from jax_transfer.data import builders, labels as labels_lib
    import tensorflow_datasets as tfds
    builders.ensure_embedded("shapes_jpeg", data_dir)
    cache = labels_lib.cache_path(tfds.builder(NAME, data_dir=data_dir), "train", "label")
    runs = {m: [] for m in MEASURES}
    child = ["--data_dir", data_dir, "--num_train", str(a.num_train), "--image_size",
             str(a.image_size), "--batch", str(a.batch)]
    for rnd in range(a.rounds):
      for m in MEASURES:
        if m == "new_cold" and os.path.exists(cache):
          os.remove(cache)
        r = report.run_child(__file__, ["--one", m, *child], m)
        runs[m].append(r)
        print(f"round {rnd} {m:10s}: {r['s']:.3f} s", flush=True)
    best = {m: min(rs, key=lambda r: r["s"]) for m, rs in runs.items()}
    command = report.command_line("python benchmarks/startup.py", p, a,
                                  ("num_train", "image_size", "batch", "rounds"))
    report.publish(a.results, SECTION, render(best, a, build_s, command, load, a.note))
  finally:
    if not a.data_dir:
      shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
  sys.exit(main())
