r"""The model levers side by side: nn.scan compile time, and bf16 / remat / scan step time and
memory, through the platform's own train step.

  nice -n 5 python benchmarks/levers.py [--steps 20] [--warmup 3] [--rounds 3]
                                        [--results benchmarks/RESULTS.md]

Both tables build the step exactly as train.py does: the supervised method's model and loss
(`methods.supervised.Supervised`, on synthetic images so no dataset is needed),
`optim.make_optimizer` from `config.base_config()` (AdamW, grad clipping), `train.abstract_state`
/ `train.create_state` and `train.make_default_train_step`, jitted with the state / batch
shardings of a 1-device mesh and the state donated. Every measurement runs in its own
subprocess (no shared caches; its own peak RSS).

1. Compile time, ViT-B/16 (1000 classes, 224x224x3, batch 8, f32), depth 12 and 24, with and
   without `model.scan_layers`: `jit(step).lower(abstract state, abstract batch)` (tracing +
   StableHLO) and `.compile()` (XLA) are timed separately; nothing executes and no parameter
   is allocated (the state is `jax.ShapeDtypeStruct`s).
2. Step time and memory of a small ViT (ViT-mu/4 widened to 12 blocks: width 64, 4 heads, MLP
   128, 32x32x3 images -> 65 tokens, 10 classes, batch 32) for each lever: baseline f32,
   bf16 compute (`model.dtype='bfloat16'`, params f32), per-block remat with the
   `nothing_saveable` and `dots_saveable` policies, scan, scan + remat.
     ms/step   median of --steps steps after --warmup, each to `jax.block_until_ready`; the
               grid is run --rounds times interleaved and each row keeps its fastest round
               (the range of the rounds' medians beside it shows the noise).
     memory    `compiled.memory_analysis()`: temp (activations kept for the backward pass,
               workspace) + argument + output bytes of the compiled step. With the state
               donated, outputs alias arguments, so args + out counts the state twice; temp is
               the lever-dependent part.
     GFLOP     `compiled.cost_analysis()['flops']`: remat's recomputation shows up here.
Writes/replaces the section "## Levers: scan, remat, bf16 (CPU)" of --results.
"""
from __future__ import annotations

import report  # benchmarks/report.py: machine line + RESULTS.md sections
import harness  # benchmarks/harness.py: time_step
import argparse
import json
import os
import resource
import time

SECTION = "## Levers: scan, remat, bf16 (CPU)"
COMPILE_GRID = [(d, s) for d in (12, 24) for s in (False, True)]  # (depth, scan)
COMPILE_BATCH = 8
# name -> (compute dtype, remat, remat_policy, scan); the first row is the baseline.
LEVERS = {
    "baseline f32": ("float32", False, "nothing_saveable", False),
    "bf16 compute": ("bfloat16", False, "nothing_saveable", False),
    "remat nothing_saveable": ("float32", True, "nothing_saveable", False),
    "remat dots_saveable": ("float32", True, "dots_saveable", False),
    "scan": ("float32", False, "nothing_saveable", True),
    "scan + remat nothing_saveable": ("float32", True, "nothing_saveable", True),
}
SMALL = dict(variant="mu/4", depth=12, num_classes=10, image=32, batch=32)


def _build(model_kwargs: dict, image_shape: tuple, batch: int):
  """(jitted step, method, tx, mesh, rules, batch sharding) as train.py builds them."""
  import jax
  import ml_collections
  from jax_transfer import config as config_lib, optim, parallel, train
  from jax_transfer.methods.base import Method
  from jax_transfer.methods.supervised import Supervised, build_model

  class SyntheticSupervised(Supervised):
    """Supervised's model, init and loss on images of a given shape (no dataset needed)."""

    def __init__(self, config, mesh):
      Method.__init__(self, config, mesh)
      self.model = build_model(config)
      self.image_shape = image_shape

  c = config_lib.base_config()
  c.model = ml_collections.ConfigDict(dict(pool="cls", dropout=0.0, **model_kwargs))
  c.input.global_batch_size = batch
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
  mesh = parallel.make_mesh(c.mesh, jax.devices()[:1])
  rules = parallel.rules_from_config(c.sharding_rules)
  method = SyntheticSupervised(c, mesh)
  tx, schedule = optim.make_optimizer(c.optimizer, c.schedule, c.total_steps)
  _, state_sh = train.abstract_state(method, tx, mesh, rules, jax.random.key(0))
  step = train.jit_train_step(method, tx, schedule, c, state_sh, mesh)
  return step, method, tx, mesh, rules, parallel.batch_sharding(mesh)


def _memory(compiled) -> dict:
  from jax_transfer import mfu
  mem = compiled.memory_analysis()
  return dict(temp_bytes=mem.temp_size_in_bytes, argument_bytes=mem.argument_size_in_bytes,
              output_bytes=mem.output_size_in_bytes, flops=mfu.compiled_flops(compiled) or 0.0)


def measure_compile(depth: int, scan: bool) -> dict:
  import jax
  import jax.numpy as jnp
  from jax_transfer import parallel, train
  shape = (224, 224, 3)
  step, method, tx, mesh, rules, batch_sh = _build(
      dict(variant="b/16", depth=depth, num_classes=1000, dtype="float32", remat=False,
           scan_layers=scan), shape, COMPILE_BATCH)
  abstract, _ = train.abstract_state(method, tx, mesh, rules, jax.random.key(0))
  batch = {"image": jax.ShapeDtypeStruct((COMPILE_BATCH, *shape), jnp.float32,
                                         sharding=batch_sh),
           "label": jax.ShapeDtypeStruct((COMPILE_BATCH,), jnp.int32, sharding=batch_sh)}
  with jax.set_mesh(mesh), parallel.with_sharding_rules(rules):
    t0 = time.perf_counter()
    lowered = step.lower(abstract, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
  n_params = sum(x.size for x in jax.tree.leaves(abstract.params))
  return dict(depth=depth, scan=scan, lower_s=t1 - t0, compile_s=t2 - t1,
              hlo_lines=lowered.as_text().count("\n"), params=int(n_params),
              peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              **_memory(compiled))


def measure_step(lever: str, steps: int, warmup: int) -> dict:
  import jax
  import numpy as np
  from jax_transfer import parallel, train
  dtype, remat, policy, scan = LEVERS[lever]
  s = SMALL
  shape = (s["image"], s["image"], 3)
  step, method, tx, mesh, rules, _ = _build(
      dict(variant=s["variant"], depth=s["depth"], num_classes=s["num_classes"], dtype=dtype,
           remat=remat, remat_policy=policy, scan_layers=scan), shape, s["batch"])
  state, _ = train.create_state(method, tx, mesh, rules, jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = parallel.global_batch(
      {"image": rng.standard_normal((s["batch"], *shape)).astype(np.float32),
       "label": rng.integers(0, s["num_classes"], s["batch"]).astype(np.int32)}, mesh)
  with jax.set_mesh(mesh), parallel.with_sharding_rules(rules):
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    timing, state, metrics = harness.time_step(compiled, state, batch, warmup, steps)
  loss = float(metrics["train/loss"])
  assert loss == loss, "NaN loss: the benchmark would time garbage"
  return dict(lever=lever, ms_per_step=1e3 * timing["median_s"], p10_ms=1e3 * timing["p10_s"],
              p90_ms=1e3 * timing["p90_s"], compile_s=compile_s, final_loss=loss,
              peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              **_memory(compiled))


# ------------------------------------------------------------------------------- Reporting.


def _mib(x):
  return f"{x / 2**20:.1f}"


def render(compile_rows, step_rows, command: str, load: tuple) -> str:
  import jax
  s = SMALL
  lines = [
      SECTION, "",
      "Both tables: the platform's supervised train step (model + softmax CE + AdamW with grad "
      "clipping, `train.make_default_train_step`), jitted with a 1-device mesh's shardings and "
      "the state donated; each row in its own subprocess. Memory from "
      "`compiled.memory_analysis()`, GFLOP from `compiled.cost_analysis()`.", "",
      f"**Compile time**, ViT-B/16 (1000 classes) at 224x224x3, batch {COMPILE_BATCH}, f32, "
      "lower + compile only (abstract state: nothing executes).", "",
      "| blocks | scan | params | trace + lower s | XLA compile s | total s | vs. unrolled "
      "| StableHLO lines | XLA temp MiB | peak RSS MiB |",
      "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  unrolled = {r["depth"]: r["lower_s"] + r["compile_s"] for r in compile_rows if not r["scan"]}
  for r in compile_rows:
    total = r["lower_s"] + r["compile_s"]
    lines.append(
        f"| {r['depth']} | {'on' if r['scan'] else 'off'} | {r['params']:,} "
        f"| {r['lower_s']:.1f} | {r['compile_s']:.1f} | {total:.1f} "
        f"| {total / unrolled[r['depth']]:.2f}x | {r['hlo_lines']:,} "
        f"| {_mib(r['temp_bytes'])} | {r['peak_rss_bytes'] / 2**20:.0f} |")
  base = step_rows[0]
  lines += [
      "",
      f"**Levers**, ViT-{s['variant']} widened to {s['depth']} blocks (width 64, 4 heads, MLP "
      f"128; {s['image']}x{s['image']}x3 -> 65 tokens, {s['num_classes']} classes), batch "
      f"{s['batch']}. Median of {base['steps']} steps after {base['warmup']} warm-up steps, "
      f"best of {base['rounds']} interleaved rounds (range of the rounds' medians shown). "
      "Memory = XLA temp + args + out; with the donated state, args and out are the same "
      "buffers counted twice, so temp is the column the levers move.", "",
      "| lever | ms/step (median) | p10-p90 ms | rounds' medians ms | vs. baseline "
      "| compile s | GFLOP/step | XLA temp MiB | args MiB | out MiB | temp+args+out MiB "
      "| final loss |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in step_rows:
    total = r["temp_bytes"] + r["argument_bytes"] + r["output_bytes"]
    star = "*" if LEVERS[r["lever"]][3] else ""  # scan: a while loop (see the note)
    lines.append(
        f"| {r['lever']} | {r['ms_per_step']:.1f} | {r['p10_ms']:.1f}-{r['p90_ms']:.1f} "
        f"| {min(r['round_medians_ms']):.1f}-{max(r['round_medians_ms']):.1f} "
        f"| {r['ms_per_step'] / base['ms_per_step']:.2f}x | {r['compile_s']:.2f} "
        f"| {r['flops'] / 1e9:.2f}{star} | {_mib(r['temp_bytes'])} | {_mib(r['argument_bytes'])} "
        f"| {_mib(r['output_bytes'])} | {_mib(total)} | {r['final_loss']:.4f} |")
  lines += [
      "",
      "\\* XLA's cost analysis counts a while loop's body once, so the scan rows' GFLOP are "
      "one block's (plus the rest of the model), comparable with each other but not with the "
      "unrolled rows.", "",
      "What these CPU numbers can and cannot say: compile times and HLO sizes are properties "
      "of the program and carry over to GPU/TPU in trend (scan compiles one block whatever "
      "the depth). Step times are XLA:CPU's: bf16 has no native matmul on this CPU (it "
      "converts), so it is slower here and says nothing about bf16 on accelerators. Temp "
      "memory is XLA:CPU's buffer assignment, which need not free what the GPU/TPU backends "
      "free; a remat saving seen here is real, a missing one is not evidence against remat on "
      "an accelerator. Remat's recomputation shows in GFLOP and step time.", "",
  ] + report.footer(
      command, report.machine_line(f"jax {jax.__version__}, backend {jax.default_backend()}",
                                   load))
  return "\n".join(lines)


def _child(args: list[str]) -> dict:
  return report.run_child(__file__, args, " ".join(args))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--rounds", type=int, default=3)
  report.add_results_arg(p)
  p.add_argument("--compile", help=argparse.SUPPRESS)  # "depth,scan": child process.
  p.add_argument("--lever", help=argparse.SUPPRESS)  # a LEVERS name: child process.
  a = p.parse_args()
  if a.compile:
    depth, scan = a.compile.split(",")
    print(json.dumps(measure_compile(int(depth), scan == "1")))
    return
  if a.lever:
    print(json.dumps(measure_step(a.lever, a.steps, a.warmup)))
    return
  load = os.getloadavg()
  compile_rows = []
  for depth, scan in COMPILE_GRID:
    compile_rows.append(_child(["--compile", f"{depth},{int(scan)}"]))
    r = compile_rows[-1]
    print(f"ViT-B/16 x{depth} scan {'on ' if scan else 'off'}: lower {r['lower_s']:.1f} s, "
          f"compile {r['compile_s']:.1f} s", flush=True)
  runs = {name: [] for name in LEVERS}
  for rnd in range(a.rounds):
    for name in LEVERS:
      runs[name].append(_child(["--lever", name, "--steps", str(a.steps),
                                "--warmup", str(a.warmup)]))
      print(f"round {rnd} {name:30s}: {runs[name][-1]['ms_per_step']:.1f} ms/step, temp "
            f"{_mib(runs[name][-1]['temp_bytes'])} MiB", flush=True)
  step_rows = []
  for name in LEVERS:
    best = dict(min(runs[name], key=lambda x: x["ms_per_step"]))
    best.update(round_medians_ms=[x["ms_per_step"] for x in runs[name]], rounds=a.rounds,
                steps=a.steps, warmup=a.warmup)
    step_rows.append(best)
  command = report.command_line("nice -n 5 python benchmarks/levers.py", p, a,
                               ("steps", "warmup", "rounds"))
  report.publish(a.results, SECTION, render(compile_rows, step_rows, command, load))


if __name__ == "__main__":
  main()
