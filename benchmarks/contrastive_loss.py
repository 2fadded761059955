r"""Dense vs chunked (ring) contrastive loss + gradient: per-device memory and time vs devices.

  python benchmarks/contrastive_loss.py [--devices 1,2,4,8] [--per-device-batch 256]
                                        [--dim 128] [--steps 20] [--warmup 3]
                                        [--results benchmarks/RESULTS.md]

The per-device batch b is fixed, so the global batch B = b * n grows with the device count n
(weak scaling, the regime data parallelism lives in). For each n a subprocess is started with
XLA_FLAGS=--xla_force_host_platform_device_count=n, a mesh ('data'=n, 'fsdp'=1, 'tensor'=1)
from parallel.make_mesh, L2-normalised embeddings zimg, ztxt [B, E] sharded over the batch
axes, and for each loss (clip, siglip; align has clip's shapes) and form (dense, chunked) it
compiles `jax.jit(jax.value_and_grad(loss, argnums=(zimg, ztxt, t[, b])))` and reports:
  XLA temp MiB  compiled.memory_analysis().temp_size_in_bytes: the per-device scratch
                (logits, softmax, gathered embeddings) of the SPMD-partitioned program.
  XLA args MiB  argument_size_in_bytes, per device (the local [b, E] shards + scalars).
  ms            median wall time of --steps calls after --warmup, each to block_until_ready.
                On simulated CPU devices all n "devices" share this machine's cores, so time
                grows with the total work (B^2 E); it says nothing about a real pod's
                communication, only about the relative compute of the two forms.
Writes/replaces the section "## Contrastive loss: dense vs chunked" of --results.
"""
from __future__ import annotations

import report  # benchmarks/report.py: machine line + RESULTS.md sections
import harness  # benchmarks/harness.py: median_time
import argparse
import json
import os
import time

SECTION = "## Contrastive loss: dense vs chunked"
LOSSES = ("clip", "siglip")


def measure(n: int, per_device_batch: int, dim: int, steps: int, warmup: int) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from jax_transfer import losses, parallel

  assert jax.device_count() == n, (jax.device_count(), n)
  mesh = parallel.make_mesh({"data": n, "fsdp": 1, "tensor": 1})
  batch = per_device_batch * n
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, dim)).astype(np.float32)
  y = x + rng.normal(size=(batch, dim)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  y /= np.linalg.norm(y, axis=1, keepdims=True)
  sharding = NamedSharding(mesh, P(parallel.BATCH_AXES))
  zimg, ztxt = jax.device_put(x, sharding), jax.device_put(y, sharding)
  rows = []
  for name in LOSSES:
    args = (zimg, ztxt, jnp.float32(np.log(10.0)), jnp.float32(-10.0))
    argnums = (0, 1, 2, 3) if name == "siglip" else (0, 1, 2)
    for chunked in (False, True):
      fn = losses.get_contrastive_loss(name, chunked=chunked, mesh=mesh)
      step = jax.jit(jax.value_and_grad(fn, argnums=argnums, has_aux=True))
      t0 = time.perf_counter()
      compiled = step.lower(*args).compile()
      compile_s = time.perf_counter() - t0
      mem = compiled.memory_analysis()
      last = {}

      def one():
        (last["loss"], _), grads = compiled(*args)
        jax.block_until_ready((last["loss"], grads))
      timing = harness.median_time(one, warmup, steps)
      loss = last["loss"]
      rows.append(dict(
          devices=n, loss=name, form="chunked" if chunked else "dense", batch=batch,
          per_device_batch=per_device_batch, dim=dim, loss_value=float(loss),
          temp_bytes=mem.temp_size_in_bytes, argument_bytes=mem.argument_size_in_bytes,
          ms=1e3 * timing["median_s"], compile_s=compile_s, steps=steps, warmup=warmup))
  return rows


# ------------------------------------------------------------------------------- Reporting.



def render(rows: list[dict], command: str, load: tuple, jax_version: str) -> str:
  r0 = rows[0]
  lines = [
      SECTION, "",
      f"Loss + gradient (w.r.t. zimg, ztxt, t and, for SigLIP, b) of "
      f"`jax_transfer.losses` at a fixed per-device batch b = {r0['per_device_batch']}, "
      f"E = {r0['dim']}, float32, mesh ('data' = n, 'fsdp' = 1, 'tensor' = 1) of n simulated "
      "CPU devices (one subprocess per n). Dense = plain jnp, XLA partitions it (all-gathers "
      "the other tower, [b, B] logit slabs per device); chunked = `jax.shard_map` ring of "
      "[b, b] blocks with a hand-written ring backward. Memory is per device, from "
      "`jax.jit(...).lower(...).compile().memory_analysis()`: temp = XLA scratch, args = the "
      f"inputs. Time = median of {r0['steps']} calls after {r0['warmup']} warm-up calls; all n "
      "simulated devices share the same 2 cores, so time tracks total work (B^2 E), not pod "
      "communication, and on this shared, loaded machine single timings vary by up to ~2x "
      "between runs at small n. The expected outcome: dense temp grows ~linearly with n "
      "(its [b, B] slabs and the gathered [B, E] tower), chunked temp stays flat (a few "
      "[b, b] blocks).", "",
      "| loss | devices n | global B | B x B f32 MiB | dense temp MiB | chunked temp MiB "
      "| dense args MiB | chunked args MiB | dense ms | chunked ms | loss (dense / chunked) |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
  ]
  by_key = {(r["loss"], r["devices"], r["form"]): r for r in rows}
  for name in LOSSES:
    for n in sorted({r["devices"] for r in rows}):
      d, c = by_key[(name, n, "dense")], by_key[(name, n, "chunked")]
      lines.append(
          f"| {name} | {n} | {d['batch']} | {4 * d['batch'] ** 2 / 2**20:.1f} "
          f"| {d['temp_bytes'] / 2**20:.2f} "
          f"| {c['temp_bytes'] / 2**20:.2f} | {d['argument_bytes'] / 2**20:.3f} "
          f"| {c['argument_bytes'] / 2**20:.3f} | {d['ms']:.1f} | {c['ms']:.1f} "
          f"| {d['loss_value']:.6f} / {c['loss_value']:.6f} |")
  lines += [""] + report.footer(command,
                                report.machine_line(f"jax {jax_version}, backend cpu", load))
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--devices", default="1,2,4,8")
  p.add_argument("--per-device-batch", type=int, default=256)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  report.add_results_arg(p)
  p.add_argument("--child", type=int, help=argparse.SUPPRESS)  # device count: child process.
  a = p.parse_args()
  if a.child:
    rows = measure(a.child, a.per_device_batch, a.dim, a.steps, a.warmup)
    print(json.dumps(rows))
    return
  load, rows, jax_version = os.getloadavg(), [], None
  for n in (int(s) for s in a.devices.split(",")):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                          f" --xla_force_host_platform_device_count={n}").strip())
    new = report.run_child(
        __file__, ["--child", str(n), "--per-device-batch", str(a.per_device_batch), "--dim",
                   str(a.dim), "--steps", str(a.steps), "--warmup", str(a.warmup)],
        f"devices={n}", env)
    rows += new
    for r in new:
      print(f"n={n} {r['loss']:6s} {r['form']:7s} temp {r['temp_bytes'] / 2**20:7.2f} MiB "
            f"args {r['argument_bytes'] / 2**20:6.3f} MiB {r['ms']:8.1f} ms", flush=True)
  import importlib.metadata
  jax_version = importlib.metadata.version("jax")
  command = report.command_line("python benchmarks/contrastive_loss.py", p, a,
                               ("devices", "per_device_batch", "dim", "steps", "warmup"))
  report.publish(a.results, SECTION, render(rows, command, load, jax_version))


if __name__ == "__main__":
  main()
