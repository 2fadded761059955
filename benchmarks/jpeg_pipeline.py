r"""JPEG input pipeline at 224 px, side by side with tf.data, per core.

  python benchmarks/jpeg_pipeline.py [--cores 1,2] [--batch 256] [--batches 12]
                                     [--data_dir DIR] [--results benchmarks/RESULTS.md]

On `shapes_jpeg` (the embedded imagenet2012-layout set: JPEGs of 96-500 px, q90; its train
split decoded at 224 px exceeds the pipeline's in-memory cache, so every batch decodes), each
measurement runs alone in a fresh process pinned to the first k cores (os.sched_setaffinity,
inherited by grain's worker processes) and reports images/s after 3 warm-up batches:
  train      the platform's make_train_iterator with
             input.pp = decode_jpeg_and_inception_crop(224)|flip_lr|value_range(-1, 1)
             and k worker processes (input.num_workers = k), batch --batch
  train+ra   the same plus randaug(2, 15) (its cost reported apart: big_vision's randaug
             needs the retired tensorflow_addons, so tf.data has no counterpart here)
  eval       make_eval_iterator with decode|resize_small(256)|central_crop(224)|value_range
  tf.data    big_vision's decode_jpeg_and_inception_crop(224)|flip_lr|value_range(-1, 1) in
             tf.data (tf.image.sample_distorted_bounding_box with area (0.05, 1), aspect
             (3/4, 4/3); tf.image.decode_and_crop_jpeg; tf.image.resize bilinear; random
             flip; float32 in [-1, 1]) over the same JPEG bytes (held in memory, so tf.data
             does no reading), num_parallel_calls=AUTOTUNE, a private thread pool of k
  tf eval    decode_jpeg, resize so the smaller side is 256 (area), central crop 224
Also, with the most workers: the main process's CPU time per image (time.process_time, which
excludes the workers): what receiving batches costs the process that feeds the devices.
TensorFlow is a benchmark-only extra (`pip install tensorflow-cpu==2.21.0`); without it the
tf.data rows are skipped. Writes the section "## JPEG pipeline at 224 px vs tf.data" of
--results.
"""
from __future__ import annotations

import report  # benchmarks/report.py: machine line + RESULTS.md sections
import argparse
import json
import os
import sys
import time

SECTION = "## JPEG pipeline at 224 px vs tf.data"
TRAIN_PP = "decode_jpeg_and_inception_crop(224)|flip_lr|value_range(-1, 1)"
RANDAUG_PP = "decode_jpeg_and_inception_crop(224)|flip_lr|randaug(2, 15)|value_range(-1, 1)"
EVAL_PP = "decode|resize_small(256)|central_crop(224)|value_range(-1, 1)"
WARMUP = 3
# Consumption rates at ViT-B/16, 224 px (images/s), for the cores-needed column.
# 8x H100: 1.5k-3k images/s per GPU (measured ViT-B/16 training rates quoted in issue #12).
# TPU v4 host: 4 chips x 275 TFLOP/s bf16 x 50% MFU / (3 x 17.6 GFLOP per image) = 10.4k.
RATES = {"8x H100 host (12k-24k img/s)": (12_000, 24_000),
         "TPU v4 host, 4 chips (10.4k img/s)": (10_400, 10_400)}


def _input_cfg(data_dir, batch, workers, pp, pp_eval=EVAL_PP):
  from jax_transfer import config as config_lib
  c = config_lib.base_config().input
  c.dataset, c.data_dir, c.train_split = "shapes_jpeg", data_dir, "train"
  c.global_batch_size, c.num_workers, c.prefetch = batch, workers, 4
  c.pp, c.pp_eval = pp, pp_eval
  return c


def _rate(next_batch, batches, batch):
  """(images/s, main-process CPU seconds per image) over `batches` after WARMUP."""
  for _ in range(WARMUP):
    next_batch()
  t0, cpu0 = time.perf_counter(), time.process_time()  # process_time: not the workers'.
  for _ in range(batches):
    next_batch()
  n = batches * batch
  return n / (time.perf_counter() - t0), (time.process_time() - cpu0) / n


def child_ours(kind, data_dir, batch, batches, workers):
  from jax_transfer.data import pipeline
  if kind == "eval":
    cfg = _input_cfg(data_dir, batch, workers, TRAIN_PP)
    it = iter(pipeline.make_eval_iterator(cfg, "train", batch_size=batch))
  else:
    cfg = _input_cfg(data_dir, batch, workers, RANDAUG_PP if kind == "train+ra" else TRAIN_PP)
    it = pipeline.make_train_iterator(cfg, seed=0)
  rate, main_cpu = _rate(lambda: next(it), batches, batch)
  first = next(it)
  return {"images_per_s": rate, "main_cpu_us_per_image": 1e6 * main_cpu,
          "batch_mb": first["image"].nbytes / 2**20, "dtype": str(first["image"].dtype)}


def _jpeg_bytes(data_dir, n):
  from jax_transfer.data import pipeline
  source = pipeline.get_source("shapes_jpeg", "train", data_dir)
  out = []
  for i in range(min(n, len(source))):
    image = source[i]["image"]
    out.append(image.item() if hasattr(image, "item") else image)
  return out


def child_tf(kind, data_dir, batch, batches, cores):
  import tensorflow as tf
  tf.config.threading.set_inter_op_parallelism_threads(cores)
  tf.config.threading.set_intra_op_parallelism_threads(1)
  jpegs = _jpeg_bytes(data_dir, (batches + WARMUP + 1) * batch)

  def train_fn(data):  # big_vision pp/ops_image.py: decode_jpeg_and_inception_crop + flip.
    shape = tf.image.extract_jpeg_shape(data)
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        shape, tf.zeros([0, 0, 4], tf.float32), area_range=(0.05, 1.0),
        min_object_covered=0, use_image_if_no_bounding_boxes=True)
    offset_y, offset_x, _ = tf.unstack(begin)
    target_h, target_w, _ = tf.unstack(size)
    crop = tf.stack([offset_y, offset_x, target_h, target_w])
    image = tf.image.decode_and_crop_jpeg(data, crop, channels=3)
    image = tf.cast(tf.image.resize(image, (224, 224), "bilinear"), tf.uint8)
    image = tf.image.random_flip_left_right(image)
    return tf.cast(image, tf.float32) / 127.5 - 1

  def eval_fn(data):  # decode|resize_small(256)|central_crop(224)|value_range(-1, 1)
    image = tf.image.decode_jpeg(data, channels=3)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    ratio = 256.0 / tf.cast(tf.minimum(h, w), tf.float32)
    new = (tf.cast(tf.round(tf.cast(h, tf.float32) * ratio), tf.int32),
           tf.cast(tf.round(tf.cast(w, tf.float32) * ratio), tf.int32))
    image = tf.cast(tf.image.resize(image, new, "area"), tf.uint8)
    top, left = (new[0] - 224) // 2, (new[1] - 224) // 2
    image = image[top:top + 224, left:left + 224]
    return tf.cast(image, tf.float32) / 127.5 - 1

  ds = tf.data.Dataset.from_tensor_slices(jpegs).repeat()
  ds = ds.map(train_fn if kind == "tf.data" else eval_fn,
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  ds = ds.batch(batch, drop_remainder=True).prefetch(2)
  options = tf.data.Options()
  options.threading.private_threadpool_size = cores
  options.threading.max_intra_op_parallelism = 1
  it = iter(ds.with_options(options))
  return {"images_per_s": _rate(lambda: next(it).numpy(), batches, batch)[0]}


def _scaled(data, m):
  import simplejpeg
  h, w, _, _ = simplejpeg.decode_jpeg_header(data)
  return simplejpeg.decode_jpeg(data, min_height=h // m, min_width=w // m)


def decoders(data_dir, n=400) -> list[tuple[str, float]]:
  """ms per image of each JPEG decoder on shapes_jpeg (one core, this process): what
  ops_image.decode_bytes was chosen by."""
  import io
  import cv2
  import numpy as np
  import simplejpeg
  from PIL import Image
  cv2.setNumThreads(1)
  jpegs = _jpeg_bytes(data_dir, n)
  ways = {
      "simplejpeg (libjpeg-turbo), full size": simplejpeg.decode_jpeg,
      "simplejpeg at DCT scale 1/2": lambda d: _scaled(d, 2),
      "simplejpeg at DCT scale 1/4": lambda d: _scaled(d, 4),
      "OpenCV imdecode, full size": lambda d: cv2.imdecode(np.frombuffer(d, np.uint8),
                                                           cv2.IMREAD_COLOR),
      "OpenCV imdecode at 1/2 (IMREAD_REDUCED_COLOR_2)": lambda d: cv2.imdecode(
          np.frombuffer(d, np.uint8), cv2.IMREAD_REDUCED_COLOR_2),
      "PIL, full size": lambda d: np.asarray(Image.open(io.BytesIO(d)).convert("RGB")),
  }
  out = []
  for name, fn in ways.items():
    for d in jpegs[:20]:
      fn(d)
    t0 = time.perf_counter()
    for d in jpegs:
      fn(d)
    out.append((name, 1e3 * (time.perf_counter() - t0) / len(jpegs)))
  # One large photo-like JPEG (1600 x 1200, blurred noise over gradients, q90), where DCT
  # scaling has more to save than on shapes_jpeg's <= 500 px files.
  h, w = 1200, 1600
  y, x = np.mgrid[0:h, 0:w]
  img = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (h + w)], -1)
  img = img + np.random.default_rng(0).integers(-40, 40, img.shape)
  big = simplejpeg.encode_jpeg(cv2.GaussianBlur(np.clip(img, 0, 255).astype(np.uint8),
                                                (5, 5), 0), quality=90)
  for m in (1, 2, 4):
    _scaled(big, m)
    t0 = time.perf_counter()
    for _ in range(20):
      _scaled(big, m)
    out.append((f"1600x1200 JPEG: simplejpeg at DCT scale 1/{m}",
                1e3 * (time.perf_counter() - t0) / 20))
  return out


def child(args):
  cores = args.child_cores
  os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if args.child == "decoders":
    print(json.dumps({"rows": decoders(args.data_dir)}))
    return
  if args.child in ("tf.data", "tf eval"):
    out = child_tf(args.child, args.data_dir, args.batch, args.batches, cores)
  else:
    out = child_ours(args.child, args.data_dir, args.batch, args.batches, workers=cores)
  print(json.dumps(out))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cores", default="1,2", help="core counts to pin to (comma list)")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--batches", type=int, default=12)
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data dir (default: $JAX_TRANSFER_DATA_DIR or ~/tensorflow_datasets)")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--child_cores", type=int, default=1, help=argparse.SUPPRESS)
  report.add_results_arg(parser)
  args = parser.parse_args()
  if args.batch < 1 or args.batches < 1:
    parser.error("--batch and --batches must be >= 1")
  cores = [int(c) for c in args.cores.split(",") if c]
  if not cores or max(cores) > len(os.sched_getaffinity(0)) or min(cores) < 1:
    parser.error(f"--cores {args.cores}: this machine has {len(os.sched_getaffinity(0))}")
  if args.child:
    return child(args)

  from jax_transfer.data import builders
  from jax_transfer.data import pipeline
  data_dir = args.data_dir or builders.default_data_dir()
  builders.ensure_embedded("shapes_jpeg", data_dir)
  n = len(pipeline.get_source("shapes_jpeg", "train", data_dir))
  load = os.getloadavg()
  try:
    import tensorflow  # noqa: F401  pylint: disable=unused-import
    kinds = ["train", "tf.data", "train+ra", "eval", "tf eval"]
    tf_version = f", tensorflow {tensorflow.__version__}"
  except ImportError:
    kinds, tf_version = ["train", "train+ra", "eval"], ""
  rows = {}
  for k in cores:
    for kind in kinds:
      child_args = ["--child", kind, "--child_cores", str(k), "--batch", str(args.batch),
                    "--batches", str(args.batches), "--data_dir", data_dir]
      rows[(kind, k)] = report.run_child(__file__, child_args, f"{kind} on {k} cores")
      print(kind, k, rows[(kind, k)], file=sys.stderr, flush=True)

  lines = [SECTION, "",
           f"shapes_jpeg train split ({n} JPEGs, 96-500 px, q90; {n} x 224 x 224 x 3 bytes = "
           f"{n * 224 * 224 * 3 / 2**20:.0f} MiB decoded, over the pipeline's "
           f"{pipeline.CACHE_MAX_BYTES / 2**20:.0f} MiB cache, so every batch decodes), batch "
           f"{args.batch}, {args.batches} batches after {WARMUP} warm-up ones, each row a fresh "
           "process pinned to k cores; the platform's rows use k grain worker processes.", "",
           "| pipeline | " + " | ".join(f"{k} core{'s' * (k > 1)}: images/s (per core)"
                                        for k in cores) + " |",
           "|---|" + "---|" * len(cores)]
  for kind in kinds:
    cells = [f"{rows[(kind, k)]['images_per_s']:.0f} ({rows[(kind, k)]['images_per_s'] / k:.0f})"
             for k in cores]
    lines.append(f"| {kind} | " + " | ".join(cells) + " |")
  lines.append("")
  best = max(rows[("train", k)]["images_per_s"] / k for k in cores)
  notes = []
  if "tf.data" in kinds:
    for k in cores:
      notes.append(f"train vs tf.data on {k} core(s): "
                   f"{rows[('train', k)]['images_per_s'] / rows[('tf.data', k)]['images_per_s']:.2f}x")
  if 1 in cores and 2 in cores:
    notes.append(f"2 workers vs 1 (train): "
                 f"{rows[('train', 2)]['images_per_s'] / rows[('train', 1)]['images_per_s']:.2f}x")
  ra = [rows[("train", k)]["images_per_s"] / rows[("train+ra", k)]["images_per_s"] for k in cores]
  notes.append(f"randaug(2, 15) costs {min(ra):.2f}-{max(ra):.2f}x the train recipe's time")
  first = rows[("train", cores[-1])]
  notes.append(f"batches leave the workers as {first['dtype']}: {first['batch_mb']:.1f} MiB per "
               f"batch of {args.batch} (float32 would be {4 * first['batch_mb']:.1f} MiB)")
  if first.get("main_cpu_us_per_image") is not None and cores[-1] > 1:
    us = first["main_cpu_us_per_image"]
    notes.append(f"with {cores[-1]} workers the main process spends {us:.1f} us of CPU per "
                 f"image (receiving whole uint8 batches through grain's shared memory), a "
                 f"ceiling of {1e6 / us:,.0f} images/s per host; the float32 pipeline "
                 "this replaced spent ~55 us per image receiving")
  lines.append("; ".join(notes) + ".")
  lines.append("")
  if 1 in cores:
    lines += ["JPEG decoders on the same files, one core (ms per image; the pipeline uses "
              "simplejpeg, falling back to OpenCV and PIL for other formats):", "",
              "| decoder | ms per image |", "|---|---:|"]
    lines += [f"| {name} | {ms:.3f} |" for name, ms in
              report.run_child(__file__, ["--child", "decoders", "--child_cores", "1",
                                          "--data_dir", data_dir], "decoders")["rows"]]
    lines.append("")
  lines.append(f"Host cores needed for the train recipe at the best measured rate per core "
               f"({best:.0f} images/s):")
  lines.append("")
  for what, (lo, hi) in RATES.items():
    need = f"{lo / best:.0f}" if lo == hi else f"{lo / best:.0f}-{hi / best:.0f}"
    lines.append(f"- {what}: {need} cores")
  lines.append("")
  versions = f"Python {sys.version.split()[0]}{tf_version}"
  command = report.command_line("python benchmarks/jpeg_pipeline.py", parser, args,
                                ["cores", "batch", "batches"])
  lines += report.footer(command, report.machine_line(versions, load))
  report.publish(args.results, SECTION, "\n".join(lines))


if __name__ == "__main__":
  main()
