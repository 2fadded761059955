r"""KRR-ST outer step: time and memory as the synthetic-set size n grows.

  python benchmarks/krr_outer_step.py [--sizes 10,100,300,1000,2000] [--steps 10]
                                      [--results benchmarks/RESULTS.md]

Builds the real step exactly as train.py does (method=distill by name, optim.make_optimizer,
train.create_state, train.make_default_train_step, jit with state/batch shardings and donated
state) on 32x32x3 images (shapes_captions, CIFAR's shape), a ConvNet learner (width 32,
depth 3 -> 512 features), pool of 4, real batch 128, g = a randomly initialised ConvNet export
(the step's cost does not depend on g's weights). For each n it reports:
  ms/step       median of --steps outer steps (one real batch reused; pipeline excluded), each
                timed to jax.block_until_ready.
  solve ms      the KRR part alone: jitted value_and_grad of losses.krr_loss w.r.t. (f_s, Y_s)
                on fixed features: QR of the augmented features on the smaller side
                (losses.krr_form: [n, n] while n <= 513, then [513, 513]), solves, prediction.
  XLA temp/args MiB  compiled.memory_analysis() of the whole step.
Writes/replaces only the section "## KRR-ST outer step" of --results (others are kept).
"""
from __future__ import annotations

import report  # benchmarks/report.py: machine line + RESULTS.md sections
import harness  # benchmarks/harness.py: median_time, time_step
import argparse
import os
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SECTION = "## KRR-ST outer step"


def make_config(n, g_export):
  from ml_collections_configs.distill import cifar100_krr_st
  c = cifar100_krr_st.get_config("runlocal")
  c.distill.num_synthetic, c.distill.pool_size, c.distill.target_export = n, 4, g_export
  c.input.global_batch_size = 128
  c.model.width, c.model.depth = 32, 3
  return c


def export_random_g(out):
  import flax.linen as nn
  import jax
  from jax_transfer import checkpoint, parallel
  from jax_transfer.methods.ssl import BarlowTwins
  from ml_collections_configs.distill import cifar100_krr_st
  c = cifar100_krr_st.get_config("ssl,runlocal")
  m = BarlowTwins(c, parallel.make_mesh(c.mesh, jax.devices()[:1]))
  checkpoint.export(nn.unbox(m.init_params(jax.random.key(0))), c, out)


def measure(n, g_export, steps):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax_transfer import config as config_lib, losses, methods, optim, parallel, train
  c = make_config(n, g_export)
  config_lib.validate(c, 1)
  mesh = parallel.make_mesh(c.mesh, jax.devices()[:1])
  rules = parallel.rules_from_config(c.sharding_rules)
  method = methods.get_method(c.method)(c, mesh)
  tx, schedule = optim.make_optimizer(c.optimizer, c.schedule, c.total_steps)
  state, sh = train.create_state(method, tx, mesh, rules, jax.random.key(0))
  batch = parallel.global_batch(
      {"image": np.random.default_rng(0).uniform(-1, 1, (128, 32, 32, 3)).astype(np.float32)},
      mesh)
  with jax.set_mesh(mesh), parallel.with_sharding_rules(rules):
    jitted = train.jit_train_step(method, tx, schedule, c, sh, mesh)
    t = time.perf_counter()
    compiled = jitted.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    timing, state, metrics = harness.time_step(compiled, state, batch, 2, steps)
    step_s = timing["median_s"]
  r = np.random.default_rng(1)
  f_t, f_s = jnp.asarray(r.normal(size=(128, 512)), jnp.float32), jnp.asarray(
      r.normal(size=(n, 512)), jnp.float32)
  y_s, y_t = jnp.asarray(r.normal(size=(n, 128)), jnp.float32), jnp.asarray(
      r.normal(size=(128, 128)), jnp.float32)
  solve = jax.jit(jax.value_and_grad(lambda fs, ys: losses.krr_loss(f_t, fs, ys, y_t)[0],
                                     argnums=(0, 1)))
  solve_s = harness.median_time(lambda: jax.block_until_ready(solve(f_s, y_s)), 1,
                                steps)["median_s"]
  mib = lambda b: b / 2 ** 20
  return dict(n=n, ms=1e3 * step_s, solve_ms=1e3 * solve_s,
              compile_s=compile_s, temp=mib(mem.temp_size_in_bytes),
              args=mib(mem.argument_size_in_bytes), loss=float(metrics["train/loss"]))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--sizes", default="10,100,300,1000,2000")
  p.add_argument("--steps", type=int, default=10)
  report.add_results_arg(p)
  args = p.parse_args()
  import jax
  load = os.getloadavg()
  with tempfile.TemporaryDirectory() as tmp:
    export_random_g(tmp)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
      rows.append(measure(n, tmp, args.steps))
      print(rows[-1], flush=True)
  base = rows[0]["ms"]
  lines = [
      "KRR-ST outer step (`method=distill`, the train step train.py builds) on 32x32x3 images: "
      "ConvNet learner (width 32, depth 3, 512 features + bias), pool of 4, real batch 128, "
      "one inner SGD step on the picked model. Median of "
      f"{args.steps} steps after 2 warm-up steps; 'solve' = value_and_grad of the KRR loss "
      "alone on fixed features (QR of the bias-augmented features on the smaller side, "
      "losses.krr_form: dual [n, n] up to n = 513, primal [513, 513] above; its solves and "
      "the prediction). Per-part profile at n = 1000: 'KRR-ST outer step: where the time goes'.",
      "",
      "| n (synthetic images) | ms/step | vs. n=%d | solve ms | compile s | XLA temp MiB | "
      "XLA args MiB |" % rows[0]["n"],
      "|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['n']} | {r['ms']:.1f} | {r['ms'] / base:.2f}x | {r['solve_ms']:.2f} | "
                 f"{r['compile_s']:.2f} | {r['temp']:.1f} | {r['args']:.1f} |")
  lines += ["", f"Command: `{report.env_prefix('OPENBLAS_NUM_THREADS')}"
            f"python benchmarks/krr_outer_step.py --sizes {args.sizes} "
            f"--steps {args.steps}`", "",
            report.machine_line(f"jax {jax.__version__}, backend {jax.default_backend()}",
                                load)]
  report.publish(args.results, SECTION, f"{SECTION}\n\n" + "\n".join(lines).strip() + "\n")


if __name__ == "__main__":
  main()
