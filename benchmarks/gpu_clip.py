r"""CLIP ViT-B/16 training steps on one GPU: the largest batch that fits, images/s, step time
and MFU. Run it through benchmarks/gpu.sh (XLA flags, memory fraction, a hard timeout).

  python benchmarks/gpu_clip.py [--batches 2048,1536,1024,768,512,384,256,128] [--probe 128]
                                [--steps 15] [--warmup 3] [--budget-s 240] [--remat]
                                [--results benchmarks/RESULTS.md]
  python benchmarks/gpu_clip.py --smoke [--results FILE]     # CPU: tiny towers, 2 steps

Model: the coco_clip_b16.py pod config's (ml_collections_configs/contrastive/): ViT-B/16
image tower at 224x224 (pre-LN, class token), 12-layer 512-wide text tower (8 heads,
context 77, vocab 49,408), 512-d embeddings; bf16 compute, f32 parameters and AdamW state;
chunked (shard_map ring) CLIP loss. Remat is off by default (so XLA's FLOP count is the model's,
not model + recomputation); --remat turns the config's per-block remat back on.
The step is the one train.py runs (benchmarks/harness.py: the contrastive method,
train.create_state, train.make_default_train_step, jit with donated state) on synthetic
batches that stay on the device (uniform images, random tokens ending in EOT = the largest id).
The data set only names the image shape and trains the tokenizer: the embedded
shapes_captions, resized to 224 (built on first use, ~3 s); nothing is read per step.

Batch sizes are per device (global = per device x devices). The search: compile and run
--probe first (a result even if nothing larger fits), read XLA's memory_analysis to estimate
the bytes per example, then try the --batches candidates from the largest one predicted to
fit downwards; a candidate that XLA reports as over the device's limit, or that fails with
RESOURCE_EXHAUSTED, is skipped. The search stops at the first success or when --budget-s
would be exceeded (each try costs about one compile). Every try is printed as it finishes.

Reported for each try that ran: step time (median of --steps steps after --warmup, each to
block_until_ready; and the mean of back-to-back steps, dispatch overlapped as in train.py),
images/s, FLOPs per step per device from XLA's cost analysis of the compiled executable
(jax_transfer.mfu.compiled_flops) and MFU against the device's dense bf16 peak
(jax_transfer.mfu.peak_flops); also an analytic model-FLOP count (matmuls only, 3x forward)
and its MFU, because XLA's cost analysis may not count FLOPs inside custom calls (the cuDNN
fused attention kernel). On CPU (--smoke) MFU is n/a. Writes the section "## CLIP ViT-B/16
train step (GPU)" of --results (smoke mode: its own section, and by default no file).
The last line printed is one summary line starting with GPU_CLIP_SUMMARY.
"""
from __future__ import annotations

import report  # benchmarks/report.py: machine line + RESULTS.md sections
import harness  # benchmarks/harness.py: the step as train.py builds it
import argparse
import gc
import math
import os
import pathlib
import shlex
import signal
import sys
import time
import traceback

REPO = pathlib.Path(__file__).resolve().parents[1]
SECTION = "## CLIP ViT-B/16 train step (GPU)"
SMOKE_SECTION = "## CLIP ViT-B/16 train step (GPU script, CPU smoke mode)"
GIB = 2 ** 30


class OutOfTime(Exception):
  """SIGTERM (gpu.sh's timeout) or the budget ran out: report what was measured."""


def log(msg: str) -> None:
  print(f"[gpu_clip] {msg}", flush=True)


def die(msg: str, code: int) -> None:
  """One clear error line, then the summary line gpu.sh looks for."""
  print(f"[gpu_clip] error: {msg}", flush=True)
  print(f"GPU_CLIP_SUMMARY status=FAILED {msg}", flush=True)
  sys.exit(code)


def is_oom(err: BaseException) -> bool:
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


# ------------------------------------------------------------------------------ Config.

def clip_b16_config(smoke: bool, remat: bool, per_device_batch: int, n_devices: int,
                    scan: bool = False):
  """coco_clip_b16.py's model, reading the embedded shapes_captions (resized to 224) on a
  1-axis data-parallel mesh, no gradient accumulation."""
  c = harness.load_config("contrastive/coco_clip_b16.py", "clip")
  c.input.dataset = "shapes_captions"
  c.input.caption_key = "caption"
  c.input.image_size = None if smoke else 224
  c.input.num_workers = 0
  c.input.global_batch_size = per_device_batch * n_devices
  c.eval.split = "test"
  c.eval.batch_size = n_devices
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
  c.grad_accum_steps = 1
  c.model.remat = remat
  c.model.scan_layers = scan
  c.contrastive.chunked_loss = True
  c.contrastive.zero_shot = {}
  c.contrastive.retrieval_limit = 0
  c.contrastive.probe_train_limit = 0
  if smoke:  # Tiny towers at 32x32: the same code path in seconds on a CPU.
    c.model.update(image_variant="nano/8", text_width=32, text_depth=1, text_heads=2,
                   vocab_size=64, context_length=16, embed_dim=32)
  return c


def analytic_train_flops(model_cfg, image_size: int) -> float:
  """Matmul FLOPs of one training example (forward x 3), the usual MFU convention: every
  Dense / attention matmul, 2 FLOPs per multiply-add; causal attention counted in full;
  no remat recomputation, LayerNorm, softmax or loss."""
  from jax_transfer.models.two_towers import image_geometry
  v = image_geometry(model_cfg)
  e = model_cfg.embed_dim

  def tower(n, d, m, depth):  # per layer: qkv, out, fc1, fc2, q.k and p.v
    return depth * (2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d)

  p, d = v["patch_size"], v["width"]
  patches = (image_size // p) ** 2
  image = (2 * patches * p * p * 3 * d + tower(patches + 1, d, v["mlp_dim"], v["depth"])
           + 2 * d * e)
  dt, lt = model_cfg.text_width, model_cfg.context_length
  text = tower(lt, dt, model_cfg.get("text_mlp_dim") or 4 * dt, model_cfg.text_depth)
  text += 2 * dt * e
  return 3.0 * (image + text)


# ------------------------------------------------------------------------------ Measure.

def synthetic_batch(ts, batch: int, image_size: int, context: int, vocab: int, seed: int = 0):
  """The global batch, on the devices: images float32 [B, S, S, 3] uniform in [-1, 1) (what
  the pipeline yields), drawn on the devices (a B/16 batch of 2048 is 1.2 GB); tokens int32
  [B, L] with sot, random words, EOT = vocab - 1 (the largest id) and padding."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax_transfer import parallel
  draw = jax.jit(lambda key: jax.random.uniform(key, (batch, image_size, image_size, 3),
                                                jnp.float32, -1.0, 1.0),
                 out_shardings=parallel.batch_sharding(ts.mesh))
  images = draw(jax.random.key(seed))
  rng = np.random.default_rng(seed)
  tokens = np.zeros((batch, context), np.int32)
  lengths = rng.integers(2, context, size=batch)
  words = rng.integers(3, vocab - 1, size=(batch, context)).astype(np.int32)
  for row, eot, w in zip(tokens, lengths, words):
    row[0] = 2
    row[1:eot] = w[1:eot]
    row[eot] = vocab - 1
  return {"image": images, "tokens": ts.global_batch({"tokens": tokens})["tokens"]}


def try_batch(ts, per_device: int, n_devices: int, image_size: int, args, deadline: float):
  """Compile and time the step at one per-device batch. Returns a result dict with
  status 'ok' | 'oom' | 'predicted oom' | 'error' | 'out of time'."""
  import jax
  from jax_transfer import mfu as mfu_lib
  m = ts.config.model
  batch = per_device * n_devices
  row = dict(per_device=per_device, batch=batch)
  dev = jax.devices()[0]
  gbatch = None
  try:
    if any(x.is_deleted() for x in jax.tree.leaves(ts.state)):  # Donated by a failed call.
      log("  rebuilding the train state (the last failed call consumed it)")
      ts.fresh_state()
    gbatch = synthetic_batch(ts, batch, image_size, m.context_length, m.vocab_size)
    with ts.context():
      t0 = time.perf_counter()
      compiled = ts.step.lower(ts.state, gbatch).compile()
      row["compile_s"] = time.perf_counter() - t0
      mem = compiled.memory_analysis()
      if mem is not None:
        row.update(temp=mem.temp_size_in_bytes, args=mem.argument_size_in_bytes,
                   out=mem.output_size_in_bytes, alias=mem.alias_size_in_bytes)
      row["flops"] = mfu_lib.compiled_flops(compiled)
      hlo = compiled.as_text() or ""
      row["cudnn_attention_calls"] = hlo.count("__cudnn$fmha")
      stats = dev.memory_stats() or {}
      limit = stats.get("bytes_limit")
      if limit and mem is not None:
        need = stats.get("bytes_in_use", 0) + mem.temp_size_in_bytes + max(
            0, mem.output_size_in_bytes - mem.alias_size_in_bytes)
        row["predicted_bytes"] = need
        if need > limit:
          row["status"] = "predicted oom"
          log(f"  batch {batch}: XLA needs {need / GIB:.1f} GiB > limit {limit / GIB:.1f} GiB;"
              " skipped")
          return row
      log(f"  batch {batch}: compiled in {row['compile_s']:.1f} s; XLA temp "
          f"{row.get('temp', 0) / GIB:.2f} GiB, args {row.get('args', 0) / GIB:.2f} GiB, "
          f"{_g(row['flops'])} GFLOP/step/device, "
          f"{row['cudnn_attention_calls']} cuDNN attention calls")
      box = {"state": ts.state}

      def one_step():
        box["state"], box["metrics"] = compiled(box["state"], gbatch)
        jax.block_until_ready(box["metrics"])

      if args.simulate_oom_above and per_device > args.simulate_oom_above:
        # Test hook (tests/test_benchmarks.py): what a real OOM at the first call leaves
        # behind, a consumed (donated) state and a RESOURCE_EXHAUSTED error.
        for x in jax.tree.leaves(ts.state):
          x.delete()
        raise jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory (simulated by --simulate-oom-above)")
      one_step()  # First call: allocation (an OOM shows here), autotuned kernels warm up.
      ts.state = box["state"]
      if time.perf_counter() > deadline:
        raise OutOfTime
      timing = harness.median_time(one_step, args.warmup, args.steps)
      ts.state = box["state"]
      # Back-to-back steps, one block at the end: dispatch overlaps compute, as in train.py.
      n_b2b = max(2, args.steps // 2)
      t0 = time.perf_counter()
      for _ in range(n_b2b):
        box["state"], box["metrics"] = compiled(box["state"], gbatch)
      jax.block_until_ready(box["metrics"])
      row["b2b_s"] = (time.perf_counter() - t0) / n_b2b
      ts.state = box["state"]
    loss = float(box["metrics"]["train/loss"])
    if not math.isfinite(loss):
      raise FloatingPointError(f"loss is {loss}: the step would time garbage")
    stats = dev.memory_stats() or {}
    peak = mfu_lib.peak_flops(dev)
    step_s = timing["median_s"]
    model_flops = analytic_train_flops(m, image_size) * per_device
    row.update(
        status="ok", loss=loss, step_s=step_s, p10_s=timing["p10_s"], p90_s=timing["p90_s"],
        images_per_s=batch / step_s, peak_bytes=stats.get("peak_bytes_in_use"),
        model_flops=model_flops, peak_flops=peak,
        # XLA's cost analysis counts a while loop's body once, so with --scan (the blocks in
        # a loop) its FLOPs miss most of the model: only the model-FLOP MFU holds then.
        mfu=None if args.scan else mfu_lib.mfu(row["flops"], 1.0 / step_s, peak),
        mfu_model=mfu_lib.mfu(model_flops, 1.0 / step_s, peak))
    return row
  except OutOfTime:
    row["status"] = "out of time"
    raise
  except Exception as e:  # noqa: BLE001 - one try's failure must not end the search.
    if is_oom(e):
      row["status"] = "oom"
      log(f"  batch {batch}: out of memory ({str(e).splitlines()[0][:160]})")
    else:
      row["status"] = "error"
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
      log(f"  batch {batch}: FAILED with {row['error']}")
      traceback.print_exc()
    return row
  finally:
    del gbatch
    gc.collect()


def search(ts, args, n_devices: int, image_size: int, t_start: float, rows: list) -> None:
  """The probe, then candidates from the largest predicted to fit, downwards. Appends one
  dict per try to `rows` as it finishes (kept when OutOfTime ends the search)."""
  deadline = t_start + args.budget_s
  candidates = sorted({int(b) for b in args.batches.split(",")}, reverse=True)
  probe = args.probe
  while True:  # The probe must run: halve it on OOM.
    log(f"probe: per-device batch {probe}")
    row = try_batch(ts, probe, n_devices, image_size, args, deadline)
    rows.append(row)
    if row["status"] == "ok" or probe == 1 or row["status"] == "error":
      break
    probe //= 2
  if row["status"] != "ok":
    return
  log(f"probe ok: {fmt_row(row)}")
  last = row
  # Bytes per example from the probe: XLA temp grows ~linearly with the batch; the state and
  # everything else already live is fixed.
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit")
  per_example = (row.get("temp", 0) + 4 * image_size ** 2 * 3) / probe if limit else None
  fixed = stats.get("bytes_in_use", 0)
  todo = [b for b in candidates if b > probe]
  if per_example:
    fit = [b for b in todo if fixed + per_example * b < 0.95 * limit]
    log(f"memory: limit {limit / GIB:.1f} GiB, in use {fixed / GIB:.1f} GiB, "
        f"~{per_example / 2**20:.1f} MiB per example -> largest predicted to fit: "
        f"{max(fit) if fit else 'none above the probe'}")
    todo = fit
  for b in todo:
    est = last["compile_s"] + (args.warmup + args.steps * 1.5 + 2) * last["step_s"] * b / last[
        "per_device"] + 10
    if time.perf_counter() + est > deadline:
      log(f"  batch {b * n_devices}: skipped, ~{est:.0f} s would pass the --budget-s "
          f"{args.budget_s:.0f} s deadline")
      rows.append(dict(per_device=b, batch=b * n_devices, status="out of time"))
      continue
    row = try_batch(ts, b, n_devices, image_size, args, deadline)
    rows.append(row)
    if row["status"] == "ok":
      log(f"ok: {fmt_row(row)}")
      break


# ------------------------------------------------------------------------------ Reporting.

def _pct(x):
  return "n/a" if x is None else f"{100 * x:.1f}%"


def _g(flops):
  """GFLOP with 4 significant digits ('-' when unknown)."""
  return "-" if not flops else f"{flops / 1e9:,.4g}"


def fmt_row(r: dict) -> str:
  return (f"batch {r['batch']}: {r['step_s'] * 1e3:.1f} ms/step (median; back-to-back "
          f"{r['b2b_s'] * 1e3:.1f}), {r['images_per_s']:,.0f} images/s, "
          f"{_g(r['flops'])} GFLOP/step/device (XLA), MFU {_pct(r['mfu'])} "
          f"(analytic model FLOPs: {_pct(r['mfu_model'])})")


def best_row(rows):
  ok = [r for r in rows if r["status"] == "ok"]
  return max(ok, key=lambda r: r["batch"]) if ok else None


def render(rows, args, command, machine, smoke, n_devices) -> str:
  title = SMOKE_SECTION if smoke else SECTION
  model = ("tiny towers (ViT-nano/8 at 32x32, text 32 wide x 1 layer), the B/16 script's "
           "code path" if smoke else
           "ViT-B/16 at 224x224 + 12-layer 512-wide text tower (context 77), embed 512")
  lines = [
      title, "",
      f"CLIP training step ({model}): bf16 compute, f32 params and AdamW state, chunked CLIP "
      f"loss, remat {'on' if args.remat else 'off'}, scan {'on' if args.scan else 'off'}, "
      f"{n_devices} device(s), data parallel; "
      "the step train.py builds (benchmarks/harness.py) on synthetic device-resident batches. "
      f"Median of {args.steps} steps after {args.warmup} warm-up steps, each to "
      "`block_until_ready`; back-to-back = mean of steps dispatched without waiting. "
      "XLA GFLOP = `compiled.cost_analysis()` per device per step (jax_transfer.mfu); "
      "model GFLOP = matmul FLOPs of the towers x 3 (fwd + bwd); MFU against "
      "jax_transfer.mfu's dense bf16 peak. Batch search: probe, then the largest "
      "candidate predicted by XLA's memory analysis to fit, downwards.", "",
      "| per-device batch | status | compile s | ms/step (median) | p10-p90 ms "
      "| back-to-back ms | images/s | XLA GFLOP/step | model GFLOP/step | TFLOP/s (XLA) "
      "| MFU (XLA FLOPs) | MFU (model FLOPs) | XLA temp GiB | peak GiB |",
      "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    if r["status"] != "ok":
      note = r["status"] + (f" ({r['error']})" if r.get("error") else "")
      lines.append(f"| {r['per_device']} | {note} | "
                   + (f"{r['compile_s']:.1f}" if "compile_s" in r else "-")
                   + " | - | - | - | - | - | - | - | - | - | "
                   + (f"{r['temp'] / GIB:.2f}" if "temp" in r else "-") + " | - |")
      continue
    tflops = (r["flops"] or 0) / r["step_s"] / 1e12
    peak = f"{r['peak_bytes'] / GIB:.1f}" if r.get("peak_bytes") else "-"
    lines.append(
        f"| {r['per_device']} | ok | {r['compile_s']:.1f} | {r['step_s'] * 1e3:.1f} "
        f"| {r['p10_s'] * 1e3:.1f}-{r['p90_s'] * 1e3:.1f} | {r['b2b_s'] * 1e3:.1f} "
        f"| {r['images_per_s']:,.0f} | {_g(r['flops'])} "
        f"| {_g(r['model_flops'])} | {tflops:.3g} | {_pct(r['mfu'])} "
        f"| {_pct(r['mfu_model'])} | {r.get('temp', 0) / GIB:.2f} | {peak} |")
  best = best_row(rows)
  if args.remat:
    lines += ["", "With --remat XLA's FLOPs include the recomputed forward passes: the XLA-FLOP "
              "MFU is then hardware FLOP utilisation; the model-FLOP MFU is the MFU."]
  if args.scan:
    lines += ["", "With --scan the blocks run in a while loop, whose body XLA's cost analysis "
              "counts once: the XLA GFLOP column undercounts, and only the model-FLOP MFU "
              "holds."]
  if best and best.get("cudnn_attention_calls"):
    lines += ["", f"The compiled step calls the cuDNN fused attention kernel "
              f"{best['cudnn_attention_calls']} times; XLA's cost analysis may leave those "
              "FLOPs out, which the model-FLOP MFU does not."]
  lines += ["", f"Command: `{command}`", "", machine, ""]
  return "\n".join(lines)


def summary_line(rows, device_kind: str, smoke: bool) -> str:
  best = best_row(rows)
  head = f'GPU_CLIP_SUMMARY device="{device_kind}"' + (" mode=smoke" if smoke else "")
  if best is None:
    statuses = ", ".join(f"{r['per_device']}:{r['status']}" for r in rows)
    return f"{head} status=FAILED tries=[{statuses}]"
  return (f"{head} status=ok per_device_batch={best['per_device']} batch={best['batch']} "
          f"images_per_s={best['images_per_s']:.1f} step_ms={best['step_s'] * 1e3:.2f} "
          f"xla_gflop_per_step={(best['flops'] or 0) / 1e9:.4g} "
          f"model_gflop_per_step={best['model_flops'] / 1e9:.4g} "
          f"mfu={_pct(best['mfu'])} mfu_model_flops={_pct(best['mfu_model'])}")


# ------------------------------------------------------------------------------ Main.

def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true",
                 help="CPU smoke mode: tiny towers, tiny batches, 2 steps, MFU n/a")
  p.add_argument("--batches", default=None,
                 help="per-device batch candidates (default 2048,...,128; smoke 8,4)")
  p.add_argument("--probe", type=int, default=None,
                 help="per-device batch tried first (default 128; smoke 4)")
  p.add_argument("--steps", type=int, default=None, help="timed steps (default 15; smoke 2)")
  p.add_argument("--warmup", type=int, default=None, help="default 3; smoke 1")
  p.add_argument("--budget-s", type=float, default=240.0,
                 help="stop trying larger batches when this many seconds would pass")
  p.add_argument("--remat", action="store_true", help="per-block remat (the pod config's)")
  p.add_argument("--scan", action="store_true",
                 help="nn.scan over the blocks (model.scan_layers): one compiled block per "
                      "tower, for when compiles are too slow for the budget")
  p.add_argument("--simulate-oom-above", type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument("--results", default=None,
                 help="RESULTS.md to update ('' = print only; default benchmarks/RESULTS.md, "
                      "or '' with --smoke)")
  a = p.parse_args()
  smoke = a.smoke
  a.batches = a.batches or ("8,4" if smoke else "2048,1536,1024,768,512,384,256,128")
  a.probe = a.probe or (4 if smoke else 128)
  a.steps = a.steps if a.steps is not None else (2 if smoke else 15)
  a.warmup = a.warmup if a.warmup is not None else (1 if smoke else 3)
  if a.results is None:
    a.results = "" if smoke else str(REPO / "benchmarks" / "RESULTS.md")
  t_start = time.perf_counter()
  load = os.getloadavg()

  def on_term(signum, frame):
    raise OutOfTime
  signal.signal(signal.SIGTERM, on_term)

  try:
    import jax
    from jax_transfer import mfu as mfu_lib  # noqa: F401  (fail early if the package is off)
  except ImportError as e:
    die(f"cannot import {e.name!r}: install the project's dependencies in this Python "
        "(pip install -e . from the repo root; see benchmarks/gpu.sh)", 2)
  devices = jax.devices()
  backend = jax.default_backend()
  if not smoke and backend != "gpu":
    die(f"JAX sees no GPU (backend={backend!r}, devices={devices}). Install a CUDA jaxlib "
        f"(pip install 'jax[cuda12]=={jax.__version__}'), check nvidia-smi, or run with "
        "--smoke for the CPU smoke mode.", 2)
  n_devices = len(devices)
  log(f"jax {jax.__version__}, backend {backend}, {n_devices} x {devices[0].device_kind}; "
      f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")

  try:
    import numpy as np  # noqa: F401
    config = clip_b16_config(smoke, a.remat, a.probe, n_devices, a.scan)
    t0 = time.perf_counter()
    log("building the train state (method, create_state; the dataset is built on first "
        "use, ~3 s)")
    ts = harness.build_train_step(config, devices)
    image_size = ts.method.image_shape[0]
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ts.state.params))
    log(f"  {n_params / 1e6:.1f} M parameters, image {ts.method.image_shape}, "
        f"{time.perf_counter() - t0:.1f} s")
  except Exception as e:  # noqa: BLE001 - the traceback, then one clear line.
    traceback.print_exc()
    die(f"setup failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", 3)

  rows = []
  try:
    search(ts, a, n_devices, image_size, t_start, rows)
  except OutOfTime:
    log("out of time (SIGTERM or budget): reporting what was measured")
  except KeyboardInterrupt:
    log("interrupted: reporting what was measured")
  signal.signal(signal.SIGTERM, signal.SIG_DFL)

  # The command as typed, less where the results go and gpu.sh's own --budget-s.
  argv, shown = sys.argv[1:], []
  while argv:
    arg = argv.pop(0)
    if arg in ("--results", "--budget-s"):
      argv = argv[1:]
    elif not arg.startswith(("--results=", "--budget-s=")):
      shown.append(shlex.quote(arg))
  command = " ".join(["bash benchmarks/gpu.sh" if os.environ.get("GPU_SH") else
                      "python benchmarks/gpu_clip.py"] + shown)
  xla_flags = os.environ.get("XLA_FLAGS", "")
  machine = report.accelerator_line(
      devices, f"jax {jax.__version__}, backend {backend}", load,
      f"XLA_FLAGS: `{xla_flags}`." if xla_flags else "")
  section = render(rows, a, command, machine, smoke, n_devices) if rows else ""
  if section:
    print(section, flush=True)
  if a.results and best_row(rows) is not None:
    report.write_section(a.results, SMOKE_SECTION if smoke else SECTION, section)
    log(f"wrote {'the smoke' if smoke else 'the'} section of {a.results}")
  elif a.results:
    log(f"nothing ran to completion: {a.results} left unchanged")
  print(summary_line(rows, devices[0].device_kind, smoke), flush=True)
  sys.exit(0 if best_row(rows) is not None else 4)


if __name__ == "__main__":
  main()
