r"""Where the training step's time goes, from a jax.profiler trace of the compiled step.

  python benchmarks/profile_step.py [--configs shapes_clip,digits_vit] [--steps 20]
                                    [--top 12] [--ab-rounds 5] [--attention cpu|jax_nn]
                                    [--results benchmarks/RESULTS.md]

For each default config (one subprocess each, one device) it builds the step train.py runs
(benchmarks/harness.py) on one real batch from the train iterator, then traces --steps steps
with `jax.profiler.trace` and reads the trace back with `jax.profiler.ProfileData`. On
XLA:CPU every executed HLO instruction (a thunk: a fusion, a dot, a custom call, ...) is one
trace event named after the instruction, so the compiled module's text
(`compiled.as_text()`) gives each event its opcode and its `op_name` metadata: the flax module
path (`img/encoderblock_0/attn/...`) and whether it is forward or backward (`transpose(jvp(`
is the backward pass). Events are summed per step and grouped by
  part       image tower / text tower (per sub-module: attention core, qkv/out projections,
             MLP, LayerNorm, patch embedding, ...), loss, optimiser update;
  direction  forward / backward;
and the top instructions are listed. Thunks can run concurrently on the 2 cores, so their
summed time may exceed the wall time; the table gives both. XLA's cost analysis of the whole
step gives the FLOPs and the achieved GFLOP/s.

Before / after: --ab-rounds interleaved rounds time the step (median of --steps, untraced)
with the model's CPU attention (models/vit.py cpu_attention, the default) and with
`jax.nn.dot_product_attention`'s XLA path in its place (`--attention jax_nn`, what the
models ran before), both built in one subprocess per round and timed in alternating
blocks; the median of the rounds' after / before ratios is reported.
Writes/replaces the section "## Where the step time goes (CPU profile)" of --results.
"""
from __future__ import annotations

import report  # benchmarks/report.py: machine line + RESULTS.md sections
import harness  # benchmarks/harness.py: the step as train.py builds it
import argparse
import collections
import glob
import json
import os
import pathlib
import re
import statistics
import tempfile

SECTION = "## Where the step time goes (CPU profile)"
CONFIGS = {
    "shapes_clip": ("contrastive/shapes_clip.py", "clip"),
    "digits_vit": ("supervised/digits_vit.py", ""),
}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?(%?[\w.\-]+)\s*=\s*[^=]*?\s([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> (opcode, op_name metadata) for every instruction of the module
  (fusion bodies included; thunks are named after the top-level ones)."""
  out = {}
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    name = m.group(1).lstrip("%")
    op = _OP_NAME.search(line)
    kind = m.group(2)
    if kind == "fusion":
      k = re.search(r"kind=(\w+)", line)
      kind = f"fusion:{k.group(1)}" if k else kind
    out[name] = (kind, op.group(1) if op else "")
  return out


def classify(op_name: str, opcode: str) -> tuple[str, str]:
  """(part, direction) of one instruction from its flax op_name path."""
  direction = "backward" if "transpose(" in op_name else "forward"
  path = op_name
  tower = None
  for key, label in (("/img/", "image tower"), ("/txt/", "text tower"), ("img_proj", "image tower"),
                     ("txt_proj", "text tower")):
    if key in path:
      tower = label
      break
  if tower is None and re.search(r"/(encoderblock_\d+|embedding|encoder_norm|head|ln_pre)/",
                                 path):
    tower = "ViT"
  if tower is not None:
    if "/attn/" in path:
      sub = ("attention projections (qkv, out)" if re.search(r"/attn/(qkv|out)/", path)
             else "attention core (q.k, softmax, p.v)")
    elif "/mlp/" in path:
      sub = "MLP (fc1, GELU, fc2)"
    elif re.search(r"/(ln_\d|ln_pre|ln_final|encoder_norm)/", path):
      sub = "LayerNorm"
    elif re.search(r"/(embedding|token_embedding|pos_embedding|positional_embedding)", path):
      sub = "embeddings"
    elif "proj" in path:
      sub = "projection"
    elif "/head/" in path:
      sub = "head"
    else:
      sub = "other (residual adds, pooling, casts)"
    return f"{tower}: {sub}", direction
  if not path:
    return "no op_name (XLA-made broadcasts, copies)", "-"
  if "jvp(" in path:  # Inside value_and_grad but in neither tower: the contrastive loss.
    return "loss", direction
  # Outside value_and_grad: AdamW, clipping, the grad norm, the logit-scale clamp.
  return "optimiser update (AdamW, clipping, grad norm)", "update"


_CPU_ATTENTION = []


def use_attention(mode: str) -> None:
  """The models' CPU attention for the steps traced from now on: 'cpu' (models/vit.py
  cpu_attention) or 'jax_nn' (jax.nn.dot_product_attention's XLA path in its place: the
  code before cpu_attention)."""
  import jax
  from jax_transfer.models import vit
  if not _CPU_ATTENTION:
    _CPU_ATTENTION.append(vit.cpu_attention)
  vit.cpu_attention = _CPU_ATTENTION[0] if mode == "cpu" else (
      lambda q, k, v, causal: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                           implementation="xla"))


def measure_ab(name: str, steps: int, blocks: int) -> dict:
  """Median ms/step of the step with each attention, both built in this process (two
  train states) and timed in alternating blocks of `steps` steps, so that load changes on
  a shared machine hit both alike."""
  import jax
  from jax_transfer import data
  relpath, arg = CONFIGS[name]
  built = {}
  for mode in ("jax_nn", "cpu"):
    use_attention(mode)  # Before the build: each build traces a new step function.
    config = harness.load_config(relpath, arg)
    ts = harness.build_train_step(config, jax.devices()[:1])
    batch = ts.global_batch(ts.method.host_batch(
        next(data.make_train_iterator(config.input, seed=config.seed))))
    with ts.context():
      built[mode] = [ts.step.lower(ts.state, batch).compile(), ts.state, batch]
  use_attention("cpu")
  times = {m: [] for m in built}
  for block in range(blocks):
    for mode in (("jax_nn", "cpu") if block % 2 == 0 else ("cpu", "jax_nn")):
      b = built[mode]

      def one():
        b[1], m = b[0](b[1], b[2])
        jax.block_until_ready(m)
      times[mode] += harness.median_time(one, 2, steps)["times_s"]
  return {m: 1e3 * statistics.median(t) for m, t in times.items()}


def measure(name: str, steps: int, top: int, trace: bool = True) -> dict:
  import jax
  from jax_transfer import data, mfu
  relpath, arg = CONFIGS[name]
  config = harness.load_config(relpath, arg)
  ts = harness.build_train_step(config, jax.devices()[:1])
  it = data.make_train_iterator(config.input, seed=config.seed)
  batch = ts.global_batch(ts.method.host_batch(next(it)))
  with ts.context():
    compiled = ts.step.lower(ts.state, batch).compile()
    flops = mfu.compiled_flops(compiled)
    instr = hlo_instructions(compiled.as_text())
    state = ts.state
    box = {"state": state}

    def one():
      box["state"], m = compiled(box["state"], batch)
      jax.block_until_ready(m)

    timing = harness.median_time(one, 5, steps)
    if not trace:
      return dict(name=name, wall_ms=1e3 * timing["median_s"])
    trace_dir = tempfile.mkdtemp(prefix="profile_step_")
    with jax.profiler.trace(trace_dir):
      for _ in range(steps):
        one()
  files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  profile = jax.profiler.ProfileData.from_file(max(files, key=os.path.getmtime))
  per_instr = collections.Counter()
  unmatched = collections.Counter()
  for plane in profile.planes:
    for line in plane.lines:
      for ev in line.events:
        key = ev.name
        if key in instr:
          per_instr[key] += ev.duration_ns
        elif key.split(":")[0] in instr:
          per_instr[key.split(":")[0]] += ev.duration_ns
        elif not key.startswith(("$", "ThreadpoolListener", "ThunkExecutor", "end: ")):
          unmatched[key] += ev.duration_ns
  by_part, by_dir, by_kind = collections.Counter(), collections.Counter(), collections.Counter()
  rows = []
  for key, ns in per_instr.items():
    opcode, op_name = instr[key]
    part, direction = classify(op_name, opcode)
    by_part[(part, direction)] += ns
    by_dir[direction] += ns
    by_kind[opcode.split(":")[0] if not opcode.startswith("fusion") else opcode] += ns
    rows.append((ns, key, opcode, op_name))
  rows.sort(reverse=True)
  to_ms = lambda ns: ns / 1e6 / steps
  return dict(
      name=name, config=relpath + (f":{arg}" if arg else ""),
      batch=config.input.global_batch_size, steps=steps, wall_ms=1e3 * timing["median_s"],
      flops=flops, thunk_ms=to_ms(sum(per_instr.values())),
      parts=[(p, d, to_ms(ns)) for (p, d), ns in by_part.most_common()],
      directions={d: to_ms(ns) for d, ns in by_dir.items()},
      kinds=[(k, to_ms(ns)) for k, ns in by_kind.most_common(8)],
      top=[(to_ms(ns), key, opcode, op_name[-110:]) for ns, key, opcode, op_name in rows[:top]],
      unmatched=[(k, to_ms(ns)) for k, ns in unmatched.most_common(5)])


# ------------------------------------------------------------------------------ Reporting.

def render(results: list[dict], ab: dict, ab_rounds: int, command: str, load: tuple,
           note: str) -> str:
  import jax
  lines = [SECTION, ""]
  if ab:
    lines += [
        "Before / after the CPU attention fix (models/vit.py `cpu_attention`, in place of "
        "`jax.nn.dot_product_attention`'s XLA path): ms/step. Each round is one process "
        "that builds both steps and times them in 6 alternating blocks of --steps steps "
        "(median over all their steps), so load changes on the shared machine hit both "
        f"alike. {ab_rounds} rounds: each round's pair, and the median of the rounds' "
        "after / before ratios.", "",
        "| config | rounds: before -> after ms/step | median after / before |",
        "|---|---|---:|"]
    for name in dict.fromkeys(n for n, _ in ab):
      pairs = list(zip(ab[(name, "jax_nn")], ab[(name, "cpu")]))
      ratio = statistics.median(a / b for b, a in pairs)
      lines.append(f"| `{'{}:{}'.format(*CONFIGS[name]).rstrip(':')}` | "
                   + ", ".join(f"{b:.1f} -> {a:.1f}" for b, a in pairs)
                   + f" | **{ratio:.2f}** |")
    lines.append("")
  lines += [
           "Trace of the compiled train step (`jax.profiler.trace`, read back with "
           "`jax.profiler.ProfileData`); each XLA:CPU thunk event is one HLO instruction, "
           "attributed through its `op_name` metadata to the flax module that emitted it "
           "(backward = `transpose(jvp(...))`). ms are per step, summed over thunks (which may "
           "overlap on the 2 cores; the wall time is the median of the untraced steps).", ""]
  for r in results:
    total = r["thunk_ms"]
    gflops = (r["flops"] or 0) / 1e9
    lines += [f"**`{r['config']}`** (batch {r['batch']}): {r['wall_ms']:.1f} ms/step wall, "
              f"{total:.1f} ms in thunks; XLA counts {gflops:.2f} GFLOP/step = "
              f"{gflops / (r['wall_ms'] / 1e3):.0f} GFLOP/s. "
              + ", ".join(f"{d} {ms:.1f} ms ({100 * ms / total:.0f}%)"
                          for d, ms in sorted(r["directions"].items(), key=lambda x: -x[1]))
              + ".", "",
              "| part | direction | ms/step | share |", "|---|---|---:|---:|"]
    for part, direction, ms in r["parts"]:
      if ms / total >= 0.01:
        lines.append(f"| {part} | {direction} | {ms:.2f} | {100 * ms / total:.1f}% |")
    lines += ["", "By instruction kind: " + ", ".join(
        f"{k} {ms:.1f} ms ({100 * ms / total:.0f}%)" for k, ms in r["kinds"]) + ".", "",
        "Top instructions:", "", "| ms/step | instruction | kind | op_name (tail) |",
        "|---:|---|---|---|"]
    for ms, key, opcode, op_name in r["top"]:
      lines.append(f"| {ms:.2f} | `{key}` | {opcode} | `{op_name}` |")
    lines.append("")
  lines += report.footer(
      command, report.machine_line(f"jax {jax.__version__}, backend {jax.default_backend()}",
                                   load), note)
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--configs", default=",".join(CONFIGS))
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--top", type=int, default=12)
  report.add_results_arg(p)
  p.add_argument("--ab-rounds", type=int, default=5,
                 help="before/after rounds of the attention comparison (0 = none)")
  p.add_argument("--attention", choices=("cpu", "jax_nn"), default="cpu",
                 help="the models' CPU attention for the profile (jax_nn: before the fix)")
  p.add_argument("--note", default="", help="file whose text is appended to the section")
  p.add_argument("--one", help=argparse.SUPPRESS)
  p.add_argument("--no-trace", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--ab", help=argparse.SUPPRESS)  # config name: before/after child.
  a = p.parse_args()
  if a.ab:
    print(json.dumps(measure_ab(a.ab, a.steps, blocks=6)))
    return
  if a.one:
    use_attention(a.attention)
    print(json.dumps(measure(a.one, a.steps, a.top, trace=not a.no_trace)))
    return

  def child(name, attention, trace):
    return report.run_child(
        __file__, ["--one", name, "--steps", str(a.steps), "--top", str(a.top), "--attention",
                   attention] + ([] if trace else ["--no-trace"]), f"{name} ({attention})")

  load, results, ab = os.getloadavg(), [], {}
  names = a.configs.split(",")
  for rnd in range(a.ab_rounds):
    for n in names:
      ab_ms = report.run_child(__file__, ["--ab", n, "--steps", str(a.steps)],
                               f"{n} (before/after)")
      for attention, ms in ab_ms.items():
        ab.setdefault((n, attention), []).append(ms)
      print(f"round {rnd} {n}: jax_nn {ab[(n, 'jax_nn')][-1]:.1f}, cpu "
            f"{ab[(n, 'cpu')][-1]:.1f} ms/step", flush=True)
  for n in names:
    results.append(child(n, a.attention, True))
    r = results[-1]
    print(f"{n}: {r['wall_ms']:.1f} ms/step wall, {r['thunk_ms']:.1f} ms in thunks; "
          f"unmatched events {r['unmatched']}", flush=True)
  command = report.command_line("python benchmarks/profile_step.py", p, a,
                               ("configs", "steps", "top", "ab_rounds", "attention"))
  note = pathlib.Path(a.note).read_text().rstrip("\n") if a.note else ""
  report.publish(a.results, SECTION, render(results, ab, a.ab_rounds, command, load, note))


if __name__ == "__main__":
  main()
