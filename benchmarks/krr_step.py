r"""KRR-ST outer step at n = 1000: where the time goes, per part, for each KRR form.

  python benchmarks/krr_step.py [--n 1000] [--reps 3] [--rounds 2] [--krr-reps 10]
                                [--scan-inner]
                                [--results benchmarks/RESULTS.md]

The step is ml_collections_configs/distill/cifar100_krr_st.py's (method=distill, n = 1000
synthetic 32x32x3 images, the ConvNet learner of depth 3 with instance norm and flatten
pooling), shrunk to fit this CPU as benchmarks/krr_outer_step.py shrinks it (make_config): learner
width 32 instead of 128 (512 features + bias instead of 2048, which puts n above the feature
width: the primal regime), real batch 128 instead of 1024, a pool of 4 instead of 10
(only one member is used per step), and g = a randomly initialised ViT-mu/4 export (D = 32
instead of ViT-s/4's 384; the step's cost does not depend on g's weights). The whole step
is the one train.py builds (benchmarks/harness.py). Each part is also jitted on its own, on
the state's own arrays (pool member 0), and timed to jax.block_until_ready: min and median
of --reps calls (--krr-reps for the KRR-only rows) after one warm-up call (the machine is
shared; the min is the least disturbed):
  target g       g(x_real) forward [B]
  f(x_real)      learner forward on the real batch [B]
  f(X_s) fwd     learner forward on the synthetic set [n]
  f(X_s) f+b     the same plus its backward w.r.t. X_s (the outer gradient's path)
  inner step     Distill.inner_update: one SGD step of the picked learner on MSE(h(f(X_s)),
                 Y_s) (forward + backward w.r.t. its params over n images)
  KRR            value_and_grad of losses.krr_loss w.r.t. (f_s, Y_s) on fixed features, for
                 each form: QR primal / QR dual (krr_predict; 'auto' picks by shape) and the
                 Cholesky normal equations it replaced (krr_predict_cholesky, dual = the former
                 path); 'factorise' times the factorisation alone (QR of the augmented
                 matrix; Gram + Cholesky).
  whole step     the train step with each form's KRR (losses.krr_loss patched to that form
                 while the step is traced): --rounds rounds, each running --reps steps of
                 every form in turn (one warm-up step each in the first).
--scan-inner also times (one call, compiled ahead) the inner step as it was before: a
lax.scan over inner_steps, whose convolution gradients XLA:CPU runs ~40x slower.
On a shared machine run it with OPENBLAS_NUM_THREADS=1: jax's CPU QR / Cholesky call scipy's
OpenBLAS, whose threads spin under contention (a [1513, 513] QR: 0.09-6 s at load 4-5,
25 ms with one thread); the section's command shows the variable when it is set.
Writes/replaces only the section "## KRR-ST outer step: where the time goes" of --results.
"""
from __future__ import annotations

import report  # benchmarks/report.py: machine line + RESULTS.md sections
import harness  # benchmarks/harness.py: the step as train.py builds it, median_time
import krr_outer_step  # benchmarks/krr_outer_step.py: the shrunk config, a random g export
import argparse
import functools
import os
import tempfile
import time

SECTION = "## KRR-ST outer step: where the time goes"
FORMS = ("qr primal", "qr dual", "cholesky primal", "cholesky dual")


def _krr_fn(losses, form):
  """losses.krr_loss computing the prediction in `form`."""
  kind, side = form.split()
  if kind == "qr":
    return functools.partial(losses.krr_loss, form=side)

  def loss(f_t, f_s, y_s, y_t, reg_ratio=1e-6):
    pred = losses.krr_predict_cholesky(f_t, f_s, y_s, reg_ratio, side)
    mse = ((pred - y_t) ** 2).mean()
    return mse, {"krr_mse": mse}
  return loss


def _factorise_fn(form, reg_ratio):
  """The factorisation alone: QR of the augmented matrix, or Gram + Cholesky."""
  import jax
  import jax.numpy as jnp
  kind, side = form.split()

  def factorise(f_s):
    phi = jnp.concatenate([f_s, jnp.ones((f_s.shape[0], 1), f_s.dtype)], 1)
    phi = phi if side == "primal" else phi.T  # Rows: the side whose Gram is factorised.
    root = jnp.sqrt(reg_ratio * jnp.sum(phi * phi))
    eye = jnp.eye(phi.shape[1], dtype=phi.dtype)
    if kind == "qr":
      return jnp.linalg.qr(jnp.concatenate([phi, root * eye]), mode="r")
    gram = jnp.matmul(phi.T, phi, precision=jax.lax.Precision.HIGHEST)
    return jax.scipy.linalg.cho_factor(gram + root ** 2 * eye)[0]
  return jax.jit(factorise)


def scan_inner_update(method, model_params, opt_state, images, targets):
  """Distill.inner_update as it was before this benchmark: a lax.scan over inner_steps."""
  import jax
  import optax

  def step(carry, _):
    p, o = carry
    loss, g = jax.value_and_grad(method.inner_loss)(p, images, targets)
    updates, o = method.inner_tx.update(g, o, p)
    return (optax.apply_updates(p, updates), o), loss
  (model_params, opt_state), inner = jax.lax.scan(step, (model_params, opt_state), None,
                                                  length=method.dcfg.inner_steps)
  return model_params, opt_state, inner[-1]


def _min_median(times):
  return 1e3 * min(times), 1e3 * sorted(times)[len(times) // 2]


def measure(args, g_export):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax_transfer import losses

  config = krr_outer_step.make_config(args.n, g_export)
  ts = harness.build_train_step(config, jax.devices()[:1])
  m, state = ts.method, ts.state
  reg = float(config.distill.reg_ratio)
  params = nn.unbox(jax.tree.map(lambda x: x[0], state.extra["pool_params"]))
  opt = jax.tree.map(lambda x: x[0], state.extra["pool_opt"])
  # Copies: the timed steps donate the state.
  x_s, y_s = (jnp.array(state.params[k]) for k in ("images", "targets"))
  real = np.random.default_rng(0).uniform(-1, 1, (config.input.global_batch_size, 32, 32, 3))
  x_real = jnp.asarray(real, jnp.float32)
  timed = lambda fn, *a, reps=args.reps: _min_median(harness.median_time(
      lambda: jax.block_until_ready(fn(*a)), 1, reps)["times_s"])

  def feats_fwd_bwd(p, x):
    f, vjp = jax.vjp(lambda x: m.features(p, x), x)
    return vjp(jnp.ones_like(f))[0]

  f_t, f_s = jax.jit(m.features)(params, x_real), jax.jit(m.features)(params, x_s)
  y_t = jax.jit(m.g_apply)(state.extra["target"], x_real)
  parts = {
      "target g(x_real) forward": timed(jax.jit(m.g_apply), state.extra["target"], x_real),
      "learner f(x_real) forward": timed(jax.jit(m.features), params, x_real),
      "learner f(X_s) forward": timed(jax.jit(m.features), params, x_s),
      "learner f(X_s) forward + backward (d/dX_s)": timed(jax.jit(feats_fwd_bwd), params, x_s),
      "inner step (d/dparams over X_s, SGD update)": timed(jax.jit(m.inner_update), params,
                                                           opt, x_s, y_s),
  }
  if args.scan_inner:
    compiled = jax.jit(functools.partial(scan_inner_update, m)).lower(
        params, opt, x_s, y_s).compile()
    parts["inner step, former lax.scan (1 call)"] = _min_median(harness.median_time(
        lambda: jax.block_until_ready(compiled(params, opt, x_s, y_s)), 0, 1)["times_s"])
  print(parts, flush=True)

  batch = ts.global_batch({"image": real.astype(np.float32)})
  krr, steps, original = {}, {}, losses.krr_loss
  for form in FORMS:
    fn = _krr_fn(losses, form)
    vg = jax.jit(jax.value_and_grad(lambda fs, ys: fn(f_t, fs, ys, y_t, reg)[0],
                                    argnums=(0, 1)))
    fwd = jax.jit(lambda fs, ys: fn(f_t, fs, ys, y_t, reg)[0])
    krr[form] = dict(factorise=timed(_factorise_fn(form, reg), f_s, reps=args.krr_reps),
                     forward=timed(fwd, f_s, y_s, reps=args.krr_reps),
                     value_and_grad=timed(vg, f_s, y_s, reps=args.krr_reps))
    print(form, krr[form], flush=True)
    losses.krr_loss = fn  # distill.py calls losses.krr_loss: the step traces this form.
    try:
      fresh = ts.fresh_state()
      with ts.context():
        steps[form] = [ts.step.lower(fresh, batch).compile(), fresh, []]
    finally:
      losses.krr_loss = original
  # The whole steps in alternating rounds, so load changes on the shared machine hit all forms.
  for i in range(args.rounds):
    for form, entry in steps.items():
      with ts.context():
        timing, entry[1], _ = harness.time_step(entry[0], entry[1], batch, int(i == 0),
                                                args.reps)
      entry[2] += timing["times_s"]
  for form, entry in steps.items():
    krr[form]["step"] = _min_median(entry[2])
  return dict(parts=parts, krr=krr, n=args.n, features=f_s.shape[1],
              batch=config.input.global_batch_size, target_dim=y_s.shape[1],
              auto=losses.krr_form(args.n, f_s.shape[1] + 1), load_end=os.getloadavg())


def section(r, args, parser, machine):
  auto = "qr " + r["auto"]
  step = r["krr"][auto]["step"][0]
  cell = lambda t: f"{t[0]:.1f} / {t[1]:.1f}"
  lines = [
      f"The KRR-ST outer step of `distill/cifar100_krr_st.py` at n = {r['n']} synthetic "
      f"images, shrunk to this CPU: ConvNet learner width 32 ({r['features']} features + bias, "
      f"so n {'>' if r['auto'] == 'primal' else '<='} F + 1: krr_form picks **{r['auto']}**), "
      f"real batch {r['batch']}, pool of 4, D = {r['target_dim']} targets (random ViT-mu/4 "
      f"g). Parts are jitted alone on the state's arrays: min / median ms of {args.reps} "
      f"calls ({args.krr_reps} for the KRR alone) after a warm-up (min: the least disturbed "
      f"by other jobs); whole steps: {args.rounds} alternating rounds of {args.reps} steps "
      "per form. Parts overlap inside the step (XLA shares the f(X_s) forward of the KRR and "
      "of the inner step), so they need not sum to it.",
      "",
      "| part | ms (min / median) | min as share of the step's min |",
      "|---|---:|---:|"]
  rows = list(r["parts"].items()) + [
      (f"KRR value_and_grad ({auto}, the default)", r["krr"][auto]["value_and_grad"]),
      (f"**whole outer step ({auto})**", r["krr"][auto]["step"])]
  for name, t in rows:
    lines.append(f"| {name} | {cell(t)} | {100 * t[0] / step:.0f}% |")
  lines += [
      "",
      "KRR alone (value_and_grad w.r.t. f_s and Y_s on fixed features) and the whole step, "
      "per form, ms min / median (`cholesky dual` is the former krr_loss path):",
      "",
      "| form | factorise | KRR forward | KRR value_and_grad | whole step |",
      "|---|---:|---:|---:|---:|"]
  for form, row in r["krr"].items():
    mark = " (auto)" if form == auto else ""
    lines.append(f"| {form}{mark} | {cell(row['factorise'])} | {cell(row['forward'])} | "
                 f"{cell(row['value_and_grad'])} | {cell(row['step'])} |")
  command = report.env_prefix("OPENBLAS_NUM_THREADS") + report.command_line(
      "python benchmarks/krr_step.py", parser, args,
      ["n", "reps", "rounds", "krr_reps"]) + (" --scan-inner" if args.scan_inner else "")
  end = r["load_end"]
  lines += [""] + report.footer(command, machine, f"Load average at the end: {end[0]:.2f}/"
                                f"{end[1]:.2f}/{end[2]:.2f}.")
  return f"{SECTION}\n\n" + "\n".join(lines).strip() + "\n"


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--n", type=int, default=1000)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--krr-reps", type=int, default=10, help="calls per KRR-only timing")
  p.add_argument("--scan-inner", action="store_true",
                 help="also time the former lax.scan inner step once (~1 min at n = 1000)")
  report.add_results_arg(p)
  args = p.parse_args()
  import jax
  load = os.getloadavg()
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    krr_outer_step.export_random_g(tmp)
    r = measure(args, tmp)
  print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
  machine = report.machine_line(f"jax {jax.__version__}, backend {jax.default_backend()}",
                                load)
  report.publish(args.results, SECTION, section(r, args, p, machine))


if __name__ == "__main__":
  main()
