r"""Merging exports of a ViT-B/16: jax_transfer.merge on a mesh of simulated devices vs the same
merge in plain numpy on one host (time, per-device memory, agreement).

  python benchmarks/merge_speed.py [--devices 8] [--models 3] [--repeats 3]
                                   [--results benchmarks/RESULTS.md]
  python benchmarks/merge_speed.py --smoke --data-dir DIR --results FILE   # the test's run

Exports: a base and --models "fine-tunes" written by checkpoint.export into a temporary
directory (deleted at the end): the model of ml_collections_configs/supervised/
imagenet_vit_b16.py (ViT-B/16, 224 px, ~86M params) with random params (init seed 0) and the
input retargeted to the embedded shapes_jpeg (imagenet2012's layout, 6 classes, built into
the temporary directory unless --data-dir has it), so num_classes = 6; each fine-tune is the
base plus N(0, 0.01^2) noise on every leaf and names the base as its init.export_dir.
The params.msgpack copy export also writes is deleted (merging reads params.safetensors).

Methods: task_arithmetic (scale 1), ties (--scope=global, top_k 0.2, scale 1), average; the
head ('^head/', merge's default skip_regex) is the base's in every output.

Sharded (one subprocess, XLA_FLAGS=--xla_force_host_platform_device_count=--devices): the jit
merge_exports runs, reproduced from merge's public pieces because merge_exports returns
neither its compiled function nor its arrays' load time: merge.check_mergeable,
merge.export_layout on the mesh merge.MERGE_MESH (every device on 'fsdp'), the base's
sharding rules, merge.load_sharded (each device's shard read from the safetensors file),
then jax.jit(merge.<method>, out_shardings=the leaves' shardings), lowered and compiled
ahead of time so that memory_analysis() gives XLA's argument / temp / output bytes of one
device's program. Timed: the compiled merge alone (median of --repeats after one warm-up
call) and load + merge (median of --repeats), each blocked on its result; merge_exports
itself is also called once per method (its wall time includes tracing and compiling, as a
command-line merge pays) and its result compared with the reproduction's.

Numpy (one subprocess per method, jax never imported): safetensors.numpy.load_file of every
export, the formula in float32 numpy (TIES as the authors' code: np.partition for the k-th
smallest |tau| over the whole model), timed once; peak memory = the growth of
resource.getrusage's max RSS from after the imports to after the merge. Its result is saved
(untimed) and compared with the sharded one (max |difference| over every parameter).

All simulated devices share this machine's cores, so the sharded times measure the total
work of the sharded program on these cores, not a pod's speed; the per-device bytes are
what each device of a real mesh would hold. Writes/replaces the section
"## Merging exports: sharded (8 simulated devices) vs numpy" of --results (--smoke: its own).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import report  # benchmarks/report.py: machine line + RESULTS.md sections

SECTION = "## Merging exports: sharded (8 simulated devices) vs numpy"
SMOKE_SECTION = "## Merging exports (script smoke mode, nano ViT)"
METHODS = ("task_arithmetic", "ties", "average")
SCALE, TOP_K, NOISE, SKIP = 1.0, 0.2, 0.01, r"^head/"


# ------------------------------------------------------------------------------- Exports.

def make_exports(root: str, n_models: int, data_dir: str | None, smoke: bool) -> dict:
  """The base and n_models fine-tunes under root (run in a child with one device)."""
  import flax.linen as nn
  import jax
  import numpy as np
  import harness  # benchmarks/harness.py
  from jax_transfer import checkpoint, methods
  from jax_transfer.data import builders
  data_dir = data_dir or os.path.join(root, "tfds")
  builders.ensure_embedded("shapes_jpeg", data_dir)
  c = harness.load_config("supervised/imagenet_vit_b16.py")
  c.input.update(dataset="shapes_jpeg", data_dir=data_dir, num_workers=0)
  c.model.num_classes = 6
  if smoke:
    c.model.variant = "nano/16"
  method = methods.get_method(c.method)(c, jax.make_mesh((1,), ("data",),
                                                         devices=jax.devices()[:1]))
  params = jax.device_get(nn.unbox(method.init_params(jax.random.key(0))))
  flat = checkpoint.flatten(params)
  out = {"base": os.path.join(root, "base"), "models": [],
         "n_params": int(sum(v.size for v in flat.values())),
         "n_merged": int(sum(v.size for k, v in flat.items() if not k.startswith("head/")))}

  def write(p, cfg, d):
    checkpoint.export(p, cfg, d)
    os.remove(os.path.join(d, "params.msgpack"))  # merging reads params.safetensors only
  write(params, c, out["base"])
  rng = np.random.default_rng(0)
  for i in range(n_models):
    ft = {k: v + NOISE * rng.standard_normal(v.shape, np.float32) for k, v in flat.items()}
    cf = c.copy_and_resolve_references()
    cf.init.export_dir = out["base"]
    d = os.path.join(root, f"ft{i}")
    write(checkpoint.unflatten(ft), cf, d)
    out["models"].append(d)
    del ft
  out["export_mb"] = os.path.getsize(os.path.join(out["base"], "params.safetensors")) / 1e6
  return out


# --------------------------------------------------------------------------------- Numpy.

def numpy_merge(method: str, base: dict, models: list, keys: list) -> dict:
  """The merged leaves `keys` (float32 numpy), the formulas of merge.py's docstring."""
  import numpy as np
  if method == "average":
    return {k: np.mean([m[k] for m in models], axis=0, dtype=np.float32) for k in keys}
  taus = [{k: m[k] - base[k] for k in keys} for m in models]
  if method == "task_arithmetic":
    return {k: base[k] + np.float32(SCALE) * sum(t[k] for t in taus) for k in keys}
  d = sum(base[k].size for k in keys)  # TIES, global scope: the authors' ties_merging.py.
  kth = max(d - int(d * TOP_K), 1)
  for t in taus:
    mags = np.concatenate([np.abs(t[k]).ravel() for k in keys])
    threshold = np.partition(mags, kth - 1)[kth - 1]
    del mags
    for k in keys:
      t[k][np.abs(t[k]) < threshold] = 0
  gamma = {k: np.sign(sum(t[k] for t in taus)) for k in keys}
  majority = np.sign(sum(int(np.sum(g, dtype=np.int64)) for g in gamma.values()))
  out = {}
  for k in keys:
    g = gamma.pop(k)
    g[g == 0] = majority
    agree = [np.where(g > 0, t[k] > 0, t[k] < 0) for t in taus]
    picked = sum(np.where(a, t[k], 0) for a, t in zip(agree, taus))
    count = sum(a.astype(np.float32) for a in agree)
    out[k] = base[k] + np.float32(SCALE) * (picked / np.maximum(count, np.float32(1)))
  return out


def measure_numpy(method: str, exports: dict, out_file: str) -> dict:
  import re
  import resource
  import numpy as np
  from safetensors.numpy import load_file, save_file
  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  t0 = time.perf_counter()
  base = load_file(os.path.join(exports["base"], "params.safetensors"))
  models = [load_file(os.path.join(m, "params.safetensors")) for m in exports["models"]]
  t1 = time.perf_counter()
  keys = sorted(k for k in base if not re.search(SKIP, k))
  merged = numpy_merge(method, base, models, keys)
  t2 = time.perf_counter()
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  assert all(v.dtype == np.float32 for v in merged.values())
  save_file({**base, **merged}, out_file)  # untimed: for the comparison
  return dict(method=method, np_load_s=t1 - t0, np_merge_s=t2 - t1, np_total_s=t2 - t0,
              np_peak_rss_delta_bytes=(peak - rss0) * 1024, np_rss_before_bytes=rss0 * 1024)


# ------------------------------------------------------------------------------- Sharded.

def _formula(method: str, n_models: int):
  from jax_transfer import merge
  if method == "average":
    return lambda sub0, thetas: merge.average(thetas)
  if method == "task_arithmetic":
    return lambda sub0, thetas: merge.task_arithmetic(sub0, thetas, SCALE, [1] * n_models)
  return lambda sub0, thetas: merge.ties(sub0, thetas, SCALE, TOP_K, "global")


def _max_abs_diff(a: dict, b: dict) -> float:
  import numpy as np
  assert set(a) == set(b), sorted(set(a) ^ set(b))
  return max(float(np.max(np.abs(np.asarray(a[k], np.float32) - np.asarray(b[k], np.float32))))
             for k in a)


def measure_sharded(exports: dict, n_devices: int, repeats: int, np_files: dict) -> list[dict]:
  import jax
  import ml_collections
  import numpy as np
  import harness  # benchmarks/harness.py: median_time
  from safetensors.numpy import load_file
  from jax_transfer import checkpoint, merge, parallel
  assert jax.device_count() == n_devices, (jax.device_count(), n_devices)
  base, models = exports["base"], exports["models"]
  keys = merge.check_mergeable(base, models, SKIP)
  cfg = checkpoint.load_export_config(base)
  mesh = parallel.make_mesh(ml_collections.ConfigDict(merge.MERGE_MESH), jax.devices())
  rules = parallel.rules_from_config(cfg.get("sharding_rules") or parallel.DEFAULT_RULES)
  _, abstract, shardings = merge.export_layout(base, mesh, rules)
  every = sorted(shardings)
  shard_bytes = lambda ks: sum(int(np.prod(shardings[k].shard_shape(abstract[k].shape))) *
                               abstract[k].dtype.itemsize for k in ks)
  full_bytes = lambda ks: sum(int(np.prod(abstract[k].shape)) * abstract[k].dtype.itemsize
                              for k in ks)
  split = [k for k in keys if shardings[k].shard_shape(abstract[k].shape) != abstract[k].shape]
  layout = dict(devices=n_devices, mesh=dict(mesh.shape), n_leaves=len(keys),
                n_split=len(split), merged_bytes=full_bytes(keys),
                merged_bytes_per_device=shard_bytes(keys),
                split_params=sum(int(np.prod(abstract[k].shape)) for k in split))

  def load():
    theta0 = merge.load_sharded(base, every, shardings)
    return theta0, [merge.load_sharded(m, keys, shardings) for m in models]

  def timed(method):
    """The reproduction of merge_exports' jit for `method`: compile, memory, timings and its
    result (all of the base's paths); its loaded arrays die with this call."""
    theta0, thetas = load()
    sub0 = {k: theta0[k] for k in keys}
    fn = jax.jit(_formula(method, len(models)), out_shardings={k: shardings[k] for k in keys})
    t0 = time.perf_counter()
    compiled = fn.lower(sub0, thetas).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    box = {}

    def merge_only():
      box["out"] = jax.block_until_ready(compiled(sub0, thetas))

    def load_and_merge():
      t0_, ts_ = load()
      box["out"] = jax.block_until_ready(compiled({k: t0_[k] for k in keys}, ts_))
    alone = harness.median_time(merge_only, 1, repeats)
    both = harness.median_time(load_and_merge, 0, repeats)
    row = dict(method=method, compile_s=compile_s, merge_s=alone["median_s"],
               merge_times_s=alone["times_s"], load_merge_s=both["median_s"],
               load_merge_times_s=both["times_s"], argument_bytes=mem.argument_size_in_bytes,
               temp_bytes=mem.temp_size_in_bytes, output_bytes=mem.output_size_in_bytes,
               alias_bytes=mem.alias_size_in_bytes, repeats=repeats, **layout)
    if method == "ties":  # the whole-model threshold alone (merge's private bisection)
      d = sum(int(np.prod(abstract[k].shape)) for k in keys)
      kth = max(d - int(d * TOP_K), 1)
      kth_smallest = merge._kth_smallest_abs  # pylint: disable=protected-access
      thr = jax.jit(lambda b, ms: [kth_smallest(jax.tree.leaves(t), kth)
                                   for t in merge.task_vectors(b, ms)])
      thr = thr.lower(sub0, thetas).compile()
      row["threshold_s"] = harness.median_time(
          lambda: jax.block_until_ready(thr(sub0, thetas)), 0, 1)["median_s"]
    return row, {**theta0, **box["out"]}

  rows = []
  for method in METHODS:
    row, ours = timed(method)
    t0 = time.perf_counter()
    api, _ = merge.merge_exports(base, models, method, scale=SCALE, top_k=TOP_K,
                                 scope="global", skip_regex=SKIP)
    jax.block_until_ready(api)
    row.update(api_s=time.perf_counter() - t0, api_vs_repro_max_abs=_max_abs_diff(api, ours))
    del api
    row["max_abs_diff"] = _max_abs_diff(ours, load_file(np_files[method]))
    row["max_abs_change"] = _max_abs_diff(ours, load_file(os.path.join(
        base, "params.safetensors")))
    rows.append(row)
    del ours
  return rows


# ------------------------------------------------------------------------------ Reporting.

def _mib(n) -> str:
  return f"{n / 2 ** 20:,.1f}"


def render(rows: list[dict], exports: dict, n_models: int, title: str, command: str,
           machine: str) -> str:
  r0 = rows[0]
  n = r0["devices"]
  model = _mib(r0["merged_bytes"])
  lines = [
      title, "",
      f"A base and {n_models} fine-tunes (base + N(0, {NOISE}^2) noise) of the model of "
      f"`imagenet_vit_b16.py` (random params, {exports['n_params']:,} params, "
      f"{exports['n_merged']:,} merged: all but the head; one model's merged leaves in "
      f"float32: {model} MiB; params.safetensors {exports['export_mb']:.0f} MB per export) "
      f"merged into one, scale {SCALE:g}, TIES global with top_k {TOP_K:g}. **Sharded**: "
      f"merge.py's jit on {n} simulated CPU devices, mesh "
      f"{'x'.join(f'{k}={v}' for k, v in r0['mesh'].items())} (merge.MERGE_MESH), every "
      f"leaf laid out by the base's logical rules: {r0['n_split']} of {r0['n_leaves']} merged "
      f"leaves ({100 * r0['split_params'] / exports['n_merged']:.2f}% of the params) split "
      f"{n} ways, the rest (biases on 'mlp' / 'heads', the cls token) replicated, so one "
      f"model is {_mib(r0['merged_bytes_per_device'])} MiB per device "
      f"({r0['merged_bytes'] / r0['merged_bytes_per_device']:.2f}x less than the whole). "
      "merge_exports is reproduced from merge's public pieces (check_mergeable, "
      "export_layout, load_sharded, the formula under jax.jit with the leaves' "
      "out_shardings) because it returns neither its compiled function (for "
      "memory_analysis) nor its load time; its own wall time (which includes tracing and "
      "compiling, as each command-line merge does) is the 'merge_exports' column, and its "
      "result equals the reproduction's to the max |difference| shown. **Numpy**: "
      "safetensors.numpy loads of every export and the same formulas in float32 on one "
      "host, in a fresh process per method; peak memory = its max-RSS growth over the "
      "load + merge. Merge = median of "
      f"{r0['repeats']} calls of the compiled merge after one warm-up; load + merge = median "
      f"of {r0['repeats']} (page cache warm); numpy once. Memory per device is XLA's "
      "`compiled.memory_analysis()` of one device's program.", "",
      "| method | sharded merge s | sharded load + merge s | merge_exports s (incl. "
      "compile) | compile s | XLA argument MiB / device | XLA temp MiB / device | XLA "
      "output MiB / device | numpy merge s | numpy load + merge s | numpy peak RSS growth MiB "
      "| max abs diff sharded vs numpy | max abs diff merge_exports vs reproduction |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    lines.append(
        f"| {r['method']} | {r['merge_s']:.2f} | {r['load_merge_s']:.2f} | {r['api_s']:.1f} "
        f"| {r['compile_s']:.1f} | {_mib(r['argument_bytes'])} | {_mib(r['temp_bytes'])} "
        f"| {_mib(r['output_bytes'])} | {r['np_merge_s']:.2f} | {r['np_total_s']:.2f} "
        f"| {_mib(r['np_peak_rss_delta_bytes'])} | {r['max_abs_diff']:.2e} "
        f"| {r['api_vs_repro_max_abs']:.1e} |")
  note = (f"How to read it: with one model {model} MiB in float32, a device's arguments are "
          f"the base's and the {n_models} fine-tunes' shards (average: the fine-tunes' "
          f"only; jit drops the unused base), about {n_models + 1} x "
          f"{_mib(r0['merged_bytes_per_device'])} MiB, and its output one model's shard: "
          f"each device holds ~1/{n} of each model, where numpy's one host holds "
          f"{n_models + 1} whole models plus the task vectors and temporaries (its RSS "
          "growth). Times: the "
          f"{n} simulated devices run on the same {os.cpu_count()} cores, so the sharded "
          "times are the sharded program's total work on these cores (XLA fusing the "
          "formula into few passes, vs numpy's one temporary per operation), not what a pod "
          "would take; the load is the safetensors slice reads of each device's shard. "
          "Differences vs numpy are float32 rounding (another order of the same sums; "
          "average divides by 3 where jax multiplies by 1/3); the max |merged - base| "
          "over the params is " + ", ".join(f"{r['method']} {r['max_abs_change']:.3f}"
                                            for r in rows) + " for scale.")
  ties = [r for r in rows if r["method"] == "ties"]
  if ties:
    t = ties[0]
    note += (f" TIES: its temp is {t['temp_bytes'] / t['merged_bytes_per_device']:.1f} model "
             "shards per device (about two full-size temporaries per task vector); of its "
             f"sharded {t['merge_s']:.1f} s, the whole-model threshold (merge."
             "_kth_smallest_abs over the task vectors, compiled and timed alone once) takes "
             f"{t['threshold_s']:.1f} s: a bisection of 32 counting passes over every task "
             "vector (each pass's per-leaf counts go to one combined all-reduce per task "
             "vector), where numpy does one np.partition per task vector (a radix select, 4 "
             "passes of 256-bin histograms by jnp.bincount, was tried and was slower on "
             "XLA:CPU: 33 s and 4x the temp memory, its scatter-adds dominating); the sharded TIES "
             f"took {t['merge_s'] / t['np_merge_s']:.1f}x numpy's time here (the others: "
             + ", ".join(f"{r['method']} {r['merge_s'] / r['np_merge_s']:.2f}x" for r in rows
                         if r["method"] != "ties")
             + "). What the bisection buys is that no device ever holds, sorts or gathers a "
             "whole task vector.")
  lines += [""] + report.footer(command, machine, note)
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--models", type=int, default=3, help="fine-tunes merged")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--data-dir", default=None,
                 help="a TFDS dir with shapes_jpeg (default: built in the temporary dir)")
  p.add_argument("--smoke", action="store_true", help="a nano ViT (tests)")
  report.add_results_arg(p)
  p.add_argument("--child", help=argparse.SUPPRESS)  # exports | numpy:METHOD | sharded
  p.add_argument("--work", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.child:
    if a.child != "exports":
      with open(os.path.join(a.work, "exports.json")) as f:
        exports = json.load(f)
    if a.child == "exports":
      out = make_exports(a.work, a.models, a.data_dir, a.smoke)
      with open(os.path.join(a.work, "exports.json"), "w") as f:
        json.dump(out, f)
    elif a.child.startswith("numpy:"):
      method = a.child.split(":", 1)[1]
      out = measure_numpy(method, exports, os.path.join(a.work, f"numpy_{method}.safetensors"))
    else:
      files = {m: os.path.join(a.work, f"numpy_{m}.safetensors") for m in METHODS}
      out = measure_sharded(exports, a.devices, a.repeats, files)
    print(json.dumps(out))
    return

  load = os.getloadavg()
  work = tempfile.mkdtemp(prefix="merge_speed_")
  try:
    common = ["--work", work, "--models", str(a.models)] + (["--smoke"] if a.smoke else []) + (
        ["--data-dir", a.data_dir] if a.data_dir else [])
    env1 = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    t0 = time.perf_counter()
    exports = report.run_child(__file__, ["--child", "exports", *common], "exports", env1)
    print(f"exports: {len(exports['models'])} + base in {time.perf_counter() - t0:.0f} s, "
          f"{exports['n_params']:,} params, {exports['export_mb']:.0f} MB each", flush=True)
    numpy_rows = {}
    for method in METHODS:
      numpy_rows[method] = report.run_child(__file__, ["--child", f"numpy:{method}", *common],
                                            f"numpy {method}", env1)
      r = numpy_rows[method]
      print(f"numpy {method}: load {r['np_load_s']:.2f} s merge {r['np_merge_s']:.2f} s "
            f"peak RSS +{_mib(r['np_peak_rss_delta_bytes'])} MiB", flush=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                          f" --xla_force_host_platform_device_count={a.devices}").strip())
    rows = report.run_child(__file__, ["--child", "sharded", "--devices", str(a.devices),
                                       "--repeats", str(a.repeats), *common], "sharded", env)
    rows = [{**r, **numpy_rows[r["method"]]} for r in rows]
    for r in rows:
      print(f"sharded {r['method']}: merge {r['merge_s']:.2f} s load+merge "
            f"{r['load_merge_s']:.2f} s args {_mib(r['argument_bytes'])} temp "
            f"{_mib(r['temp_bytes'])} MiB/device, max|diff| vs numpy {r['max_abs_diff']:.2e}",
            flush=True)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  import importlib.metadata
  versions = ", ".join(f"{m} {importlib.metadata.version(m)}"
                       for m in ("jax", "flax", "numpy", "safetensors"))
  command = report.command_line("python benchmarks/merge_speed.py", p, a,
                                ("devices", "models", "repeats")) + (
      " --smoke" if a.smoke else "")
  title = SMOKE_SECTION if a.smoke else SECTION
  report.publish(a.results, title, render(rows, exports, a.models, title, command,
                                          report.machine_line(versions, load)))
  print(json.dumps(rows))  # last line: the raw numbers


if __name__ == "__main__":
  main()
