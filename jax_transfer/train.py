"""THE training loop, shared by every method.

Reads top to bottom: Mesh / Input / Model / Shard / Update / Checkpoint / Evals / Loop.
A method (jax_transfer/methods/) supplies its params, loss and evaluators; this file owns
everything else so no method forks a trainer.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_transfer import checkpoint, config as config_lib, data, methods, optim, parallel
from jax_transfer.metrics import MetricWriter, Progress


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array   # Base key: step s uses fold_in(rng, s), so resumed runs draw the same keys.
  extra: Any = None  # Method state outside the optimiser (model pools, EMA, ...).


class NonFiniteLossError(FloatingPointError):
  pass


def make_default_train_step(method, tx, schedule, grad_accum_steps: int):
  """(state, batch) -> (state, metrics): grads of method.loss_fn, averaged over
  `grad_accum_steps` microbatches (lax.scan keeps one microbatch live at a time)."""

  def grads_of(params, extra, batch, rng):
    (loss, (metrics, extra)), grads = jax.value_and_grad(method.loss_fn, has_aux=True)(
        params, extra, batch, rng)
    return grads, dict(metrics, loss=loss), extra

  def step_fn(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    if grad_accum_steps == 1:
      grads, metrics, extra = grads_of(state.params, state.extra, batch, rng)
    else:
      # Microbatch i takes examples i, i+A, ...: a reshape that keeps the batch dim sharded.
      micro = jax.tree.map(
          lambda x: jnp.swapaxes(x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps,
                                           *x.shape[1:]), 0, 1), batch)
      def body(carry, xs):
        acc, extra = carry
        i, mb = xs
        g, m, extra = grads_of(state.params, extra, mb, jax.random.fold_in(rng, i))
        return (jax.tree.map(jnp.add, acc, g), extra), m
      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, extra), metrics = jax.lax.scan(
          body, (zeros, state.extra), (jnp.arange(grad_accum_steps), micro))
      grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
      metrics = jax.tree.map(jnp.mean, metrics)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = method.after_update(optax.apply_updates(state.params, updates))
    metrics = {f"train/{k}": v for k, v in metrics.items()}
    metrics["train/grad_norm"] = optax.global_norm(grads)
    metrics["train/lr"] = schedule(state.step)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         extra=extra), metrics

  return step_fn


def create_state(method, tx, mesh, rules, rng):
  """Born-sharded train state: shapes from eval_shape, shardings from the logical-axis rules,
  then jit(init, out_shardings=...). No parameter is ever materialised unsharded.
  Returns (state, state_shardings)."""
  param_rng, extra_rng = jax.random.split(rng)
  abstract_boxed = jax.eval_shape(method.init_params, param_rng)
  param_sh = parallel.logical_to_shardings(abstract_boxed, mesh, rules)
  replicated = NamedSharding(mesh, P())
  abstract_params = nn.unbox(abstract_boxed)
  opt_sh = parallel.shardings_following_params(
      jax.eval_shape(tx.init, abstract_params), param_sh, abstract_params, mesh)
  abstract_extra = jax.eval_shape(method.init_extra, extra_rng, abstract_params)
  extra_sh = parallel.logical_to_shardings(abstract_extra, mesh, rules)
  shardings = TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated,
                         extra=extra_sh)

  def init(rng):
    param_rng, extra_rng = jax.random.split(rng)
    params = nn.unbox(method.init_params(param_rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=rng, extra=nn.unbox(method.init_extra(extra_rng, params)))

  # Outside the logical-rules context on purpose: flax's boxed DenseGeneral init would apply
  # its [in, *out]-named constraint to the flat kernel it reshapes. out_shardings is enough.
  state = jax.jit(init, out_shardings=shardings)(rng)
  return state, shardings


def _abstract(state, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def train_and_evaluate(config, workdir: str, *, devices=None, stop_after_step=None):
  """Runs (or resumes) the experiment in `config`, writing everything under `workdir`.

  devices: the devices of the mesh (default: all). stop_after_step: end this run after that
  step as a preemption would (checkpoint, then return), for resume tests.
  Returns (final train state, last evaluation's metrics)."""
  # ---------------------------------------------------------------- Validate (before compiling).
  parallel.maybe_initialize_distributed()
  devices = list(devices if devices is not None else jax.devices())
  config_lib.validate(config, len(devices))
  method_cls = methods.get_method(config.method)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  # ------------------------------------------------------------------------------------ Mesh.
  mesh = parallel.make_mesh(config.mesh, devices)
  rules = parallel.rules_from_config(config.sharding_rules)
  logging.info("Mesh %s over %d devices", dict(mesh.shape), mesh.size)

  # ----------------------------------------------------------------------------------- Input.
  # Each process builds the iterator for its own slice of every global batch.
  train_iter = data.make_train_iterator(config.input, seed=config.seed,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count())

  # ------------------------------------------------------------------------- Model + update.
  method = method_cls(config, mesh, workdir)
  tx, schedule = optim.make_optimizer(config.optimizer, config.schedule, config.total_steps)
  step_fn = method.train_step or make_default_train_step(method, tx, schedule,
                                                         config.grad_accum_steps)

  # ----------------------------------------------------------------------------------- Shard.
  state, state_sh = create_state(method, tx, mesh, rules, jax.random.key(config.seed))
  batch_sh = parallel.batch_sharding(mesh)
  metrics_sh = NamedSharding(mesh, P())
  with jax.set_mesh(mesh), parallel.with_sharding_rules(rules):
    train_step = jax.jit(step_fn, in_shardings=(state_sh, batch_sh),
                         out_shardings=(state_sh, metrics_sh), donate_argnums=0)

  # ------------------------------------------------------------------------------ Checkpoint.
  mngr = checkpoint.checkpoint_manager(workdir, config.keep_checkpoints,
                                       config.checkpoint_every_steps)
  restored = checkpoint.restore_latest(mngr, _abstract(state, state_sh), train_iter)
  if restored is not None:
    state = restored
  elif config.init.export_dir:
    params = method.load_pretrained(jax.device_get(state.params))
    state = state.replace(params=jax.device_put(params, state_sh.params))
  if restored is None:  # Host-loaded method state (a distillation teacher), fresh start only.
    state = state.replace(extra=jax.device_put(method.load_extra(state.extra), state_sh.extra))
  first_step = int(state.step)

  # ----------------------------------------------------------------------------------- Evals.
  writer = MetricWriter(workdir)
  evaluators = method.evaluators()

  def run_evals(step, force=False):
    results = {}
    for ev in evaluators:
      if force or step % ev.every_steps == 0:
        with jax.set_mesh(mesh), parallel.with_sharding_rules(rules):
          results.update({f"{ev.name}/{k}": v for k, v in ev.run(state.params,
                                                                  state.extra).items()})
    if results:
      writer.write(step, results)
      logging.info("[%d] eval %s", step, " ".join(f"{k}={v:.4g}" for k, v in results.items()))
    return results

  # ------------------------------------------------------------------------------------ Loop.
  progress = Progress(config.total_steps, config.input.global_batch_size, first_step)
  last_eval = {}
  pending = None  # (step, metrics) of the previous step: checked one step late, so the host
                  # never waits on the step it just dispatched.

  def check_finite(step, metrics):
    loss = float(metrics["train/loss"])
    if not jnp.isfinite(loss):
      raise NonFiniteLossError(
          f"loss is {loss} at step {step}; stopping. The last good checkpoint "
          f"(step {mngr.latest_step()}) in {workdir} is intact.")

  try:
    for step in range(first_step + 1, config.total_steps + 1):
      batch = parallel.global_batch(method.host_batch(next(train_iter)), mesh)
      with jax.set_mesh(mesh), parallel.with_sharding_rules(rules):
        state, metrics = train_step(state, batch)
      if pending is not None:
        check_finite(*pending)
      pending = (step, metrics)
      final = step == config.total_steps
      if step % config.log_every_steps == 0 or final:
        check_finite(step, metrics)
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        speed = progress.measure(step)
        writer.write(step, {**host, **speed})
        logging.info(progress.line(step, host, speed))
      if step % config.eval_every_steps == 0 or final:
        last_eval = run_evals(step, force=final) or last_eval
      stop = step == stop_after_step
      if step % config.checkpoint_every_steps == 0 or final or stop:
        check_finite(step, metrics)  # Never save parameters that a NaN step produced.
        checkpoint.save(mngr, step, state, train_iter, force=final or stop)
      if stop:
        logging.info("Stopping after step %d; relaunch with the same workdir to resume.", step)
        break
    if first_step >= config.total_steps:  # Relaunch of a finished run: just evaluate.
      last_eval = run_evals(first_step, force=True)
  finally:
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump({"step": int(state.step), **last_eval}, f, indent=2)
  return state, last_eval
