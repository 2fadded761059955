"""THE training loop, shared by every method.

Reads top to bottom: Mesh / Input / Model / Shard / Update / Checkpoint / Evals / Loop.
A method (jax_transfer/methods/) supplies its params, loss and evaluators; this file owns
everything else so no method forks a trainer.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_transfer import (checkpoint, config as config_lib, data, methods, mfu, optim, parallel,
                          peft)
from jax_transfer.metrics import MetricWriter, Progress, ProgressBar


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array   # Base key: step s uses fold_in(rng, s), so resumed runs draw the same keys.
  extra: Any = None  # Method state outside the optimiser (model pools, EMA, ...).


class NonFiniteLossError(FloatingPointError):
  pass


def make_default_train_step(method, tx, schedule, grad_accum_steps: int, opt_cfg=None):
  """(state, batch) -> (state, metrics): grads of method.loss_fn, averaged over
  `grad_accum_steps` microbatches (lax.scan keeps one microbatch live at a time).

  opt_cfg: config.optimizer; its trainable_regex selects the leaves to differentiate
  (optim.trainable_paths, read at trace time from the params' shapes). The gradient is taken
  with respect to those leaves only, the others entering as constants, so
  a frozen backbone costs its forward pass and no backward (a linear probe's step compiles to
  ~1/3 of full fine-tuning's FLOPs: tests/test_optim.py). The frozen leaves get zero
  gradients, which the optimiser (multi_transform 'freeze') ignores."""

  def grads_of(params, trainable, extra, batch, rng):
    """(grads, metrics, extra): grads like params when everything trains, else a flat
    {path: grad} of the trainable leaves only (so gradient accumulation carries only those)."""
    if trainable is None:
      (loss, (metrics, extra)), grads = jax.value_and_grad(method.loss_fn, has_aux=True)(
          params, extra, batch, rng)
      return grads, dict(metrics, loss=loss), extra
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    train = {k: v for k, v in flat.items() if k in trainable}
    frozen = {k: jax.lax.stop_gradient(v) for k, v in flat.items() if k not in trainable}

    def loss_of(train):
      return method.loss_fn(flax.traverse_util.unflatten_dict({**frozen, **train}, sep="/"),
                            extra, batch, rng)
    (loss, (metrics, extra_out)), g = jax.value_and_grad(loss_of, has_aux=True)(train)
    return g, dict(metrics, loss=loss), extra_out

  def full_grads(params, trainable, grads):
    """Trainable grads -> a tree like params, the frozen leaves' zero."""
    if trainable is None:
      return grads
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    zeros = {k: jnp.zeros_like(v) for k, v in flat.items() if k not in trainable}
    return flax.traverse_util.unflatten_dict({**zeros, **grads}, sep="/")

  def step_fn(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    trainable = optim.trainable_paths(state.params, opt_cfg) if opt_cfg is not None else None
    if grad_accum_steps == 1:
      grads, metrics, extra = grads_of(state.params, trainable, state.extra, batch, rng)
    else:
      # Microbatch i takes examples i, i+A, ...: a reshape that keeps the batch dim sharded.
      micro = jax.tree.map(
          lambda x: jnp.swapaxes(x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps,
                                           *x.shape[1:]), 0, 1), batch)
      def body(carry, xs):
        acc, extra = carry
        i, mb = xs
        g, m, extra = grads_of(state.params, trainable, extra, mb, jax.random.fold_in(rng, i))
        return (jax.tree.map(jnp.add, acc, g), extra), m
      like = state.params if trainable is None else {
          k: v for k, v in flax.traverse_util.flatten_dict(state.params, sep="/").items()
          if k in trainable}
      zeros = jax.tree.map(jnp.zeros_like, like)  # the accumulator: trainable leaves only
      (grads, extra), metrics = jax.lax.scan(
          body, (zeros, state.extra), (jnp.arange(grad_accum_steps), micro))
      grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
      metrics = jax.tree.map(jnp.mean, metrics)
    grads = full_grads(state.params, trainable, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = method.after_update(optax.apply_updates(state.params, updates))
    metrics = {f"train/{k}": v for k, v in metrics.items()}
    metrics["train/grad_norm"] = optax.global_norm(grads)
    metrics["train/lr"] = schedule(state.step)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         extra=extra), metrics

  return step_fn


def store_frozen(params, config):
  """params with the frozen leaves (optim.trainable_paths of optimizer.trainable_regex, or of
  config.peft) of a floating dtype cast to config.peft.frozen_dtype: a frozen backbone stored
  in bfloat16 takes half the memory while the trained leaves, their optimiser state and the
  compute (model.dtype) keep their dtypes. Unchanged when frozen_dtype is '' or nothing is
  frozen. abstract_state and create_state both apply it, so the state, its checkpoints and a
  resumed run agree; frozen leaves stay in that dtype (zero updates)."""
  dtype = config_lib.frozen_dtype(config)
  trainable = optim.trainable_paths(params, peft.optimizer_config(config)) if dtype else None
  if trainable is None:
    return params

  def cast(path, x):
    name = "/".join(str(k.key) for k in path)
    return x.astype(dtype) if name not in trainable and jnp.issubdtype(
        x.dtype, jnp.floating) else x
  return jax.tree_util.tree_map_with_path(cast, params)


def abstract_state(method, tx, mesh, rules, rng):
  """(abstract train state, its shardings): shapes from eval_shape, shardings from the
  logical-axis rules. Traces only — nothing compiles — so checks against checkpoints and
  exports run before any compilation."""
  param_rng, extra_rng = jax.random.split(rng)
  abstract_boxed = jax.eval_shape(method.init_params, param_rng)
  param_sh = parallel.logical_to_shardings(abstract_boxed, mesh, rules)
  replicated = NamedSharding(mesh, P())
  abstract_params = jax.eval_shape(lambda p: store_frozen(p, method.config),
                                   nn.unbox(abstract_boxed))
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_sh = parallel.shardings_following_params(abstract_opt, param_sh, abstract_params, mesh)
  abstract_extra = jax.eval_shape(method.init_extra, extra_rng, abstract_params)
  extra_sh = parallel.logical_to_shardings(abstract_extra, mesh, rules)
  shardings = TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated,
                         extra=extra_sh)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                        opt_state=abstract_opt, rng=jax.eval_shape(lambda: rng),
                        extra=nn.unbox(abstract_extra))
  return _abstract(abstract, shardings), shardings


def create_state(method, tx, mesh, rules, rng, shardings=None):
  """Born-sharded train state: shardings from `abstract_state` (or the ones given, from an
  earlier call), then jit(init, out_shardings=...). No parameter is ever materialised
  unsharded. Returns (state, state_shardings)."""
  if shardings is None:
    _, shardings = abstract_state(method, tx, mesh, rules, rng)

  def init(rng):
    param_rng, extra_rng = jax.random.split(rng)
    params = store_frozen(nn.unbox(method.init_params(param_rng)), method.config)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=rng, extra=nn.unbox(method.init_extra(extra_rng, params)))

  # Outside the logical-rules context on purpose: flax's boxed DenseGeneral init would apply
  # its [in, *out]-named constraint to the flat kernel it reshapes. out_shardings is enough.
  state = jax.jit(init, out_shardings=shardings)(rng)
  return state, shardings


def jit_train_step(method, tx, schedule, config, state_sh, mesh):
  """The jitted (not yet compiled) train step: the method's own `train_step`, or the default
  one with gradient accumulation; state donated, batch sharded over the batch axes, metrics
  replicated. The loop compiles it ahead of time; benchmarks/ time it. Lower and call it
  under the mesh and logical-rules context (jax.set_mesh, parallel.with_sharding_rules):
  that is where it is traced."""
  step_fn = method.train_step or make_default_train_step(
      method, tx, schedule, config.grad_accum_steps, opt_cfg=peft.optimizer_config(config))
  return jax.jit(step_fn, in_shardings=(state_sh, parallel.batch_sharding(mesh)),
                 out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=0)


def _abstract(state, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


class Preemption:
  """SIGTERM (what TPU pods and SLURM send before evicting a job) -> `reached(step)` turns True
  at the next step boundary, where the loop saves a checkpoint and returns.

  One process: a Python SIGTERM handler sets a flag. Several processes: JAX's preemption sync
  manager (started by jax.distributed.initialize) receives the signal on any host and agrees
  on one step for all of them (`multihost_utils.reached_preemption_sync_point`), so every host
  saves the same step; our handler is not installed then, as it would replace JAX's."""

  def __init__(self):
    from jax._src import distributed
    self._multi = distributed.global_state.client is not None
    self.requested = False
    self._previous = None
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self.requested = True
    logging.warning("SIGTERM received: saving a checkpoint at the next step boundary.")

  def reached(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _check_workdir(workdir: str) -> None:
  """A workdir that cannot be one is a one-line ConfigError; nothing is created here."""
  if "://" in workdir:
    raise config_lib.ConfigError(
        f"--workdir={workdir!r}: only local paths are supported; mount the bucket with "
        f"gcsfuse (tpu_scripts/setup.sh does) and pass the mounted path")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise config_lib.ConfigError(f"--workdir={workdir!r} exists and is not a directory")
  if os.path.isdir(workdir) and not os.access(workdir, os.W_OK | os.X_OK):
    raise config_lib.ConfigError(f"--workdir={workdir!r} is not writable")


def _create_workdir(workdir: str) -> None:
  """Called once every check has passed, still before anything compiles."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test.{os.getpid()}")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise config_lib.ConfigError(f"--workdir={workdir!r} cannot be created or written: "
                                 f"{e.strerror}") from None


def _profile_window(config):
  """(first, last) step traced by jax.profiler, or None when profiling is off."""
  start = config.profile.start_step
  return (start, start + config.profile.num_steps - 1) if start > 0 else None


def train_and_evaluate(config, workdir: str, *, devices=None, stop_after_step=None,
                       progress: ProgressBar | bool = False):
  """Runs (or resumes) the experiment in `config`, writing everything under `workdir`.

  devices: the devices of the mesh (default: all). stop_after_step: end this run after that
  step as a preemption would (checkpoint, then return), for resume tests. SIGTERM does the
  same at the next step boundary. progress: True (or a metrics.ProgressBar) draws a live
  step / loss / examples/s / ETA line on stderr, for callers that silence the INFO log lines
  (the experiment scripts); it changes no metric. Returns (final train state, last
  evaluation's metrics).
  """
  # ---------------------------------------------------------------- Validate (before compiling).
  parallel.maybe_initialize_distributed()
  devices = list(devices if devices is not None else jax.devices())
  config_lib.validate(config, len(devices))
  _check_workdir(workdir)
  method_cls = methods.get_method(config.method)

  # ------------------------------------------------------------------------------------ Mesh.
  mesh = parallel.make_mesh(config.mesh, devices)
  rules = parallel.rules_from_config(config.sharding_rules)
  logging.info("Mesh %s over %d devices", dict(mesh.shape), mesh.size)

  # ----------------------------------------------------------------------------------- Input.
  # Each process builds the iterator for its own slice of every global batch; DevicePrefetch
  # keeps `input.device_prefetch` global batches in flight to the devices.
  method = method_cls(config, mesh, workdir)
  host_iter = method.train_iterator(seed=config.seed, process_index=jax.process_index(),
                                    process_count=jax.process_count())
  # Images travel as uint8 and are scaled to the recipe's value range on the devices.
  normalise = data.normaliser(config.input, train=True)
  train_iter = parallel.DevicePrefetch(
      host_iter, lambda b: normalise(parallel.global_batch(method.host_batch(b), mesh)),
      config.input.device_prefetch)

  # ------------------------------------------------------------------------- Model + update.
  tx, schedule = optim.make_optimizer(peft.optimizer_config(config), config.schedule,
                                      config.total_steps)

  # ------------------------------------------- Checks against what is on disk (still no compile).
  rng = jax.random.key(config.seed)
  try:  # Traces tx.init: a mask regex splitting a scanned stack of blocks fails here.
    abstract, state_sh = abstract_state(method, tx, mesh, rules, rng)
  except optim.MaskError as e:
    raise config_lib.ConfigError(str(e)) from None
  try:  # A peft.target_regex that matched no module added no parameter.
    peft.check_added(config, abstract.params)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  latest = checkpoint.latest_step(workdir)
  try:
    if latest is not None:  # Another architecture's checkpoint: one line, workdir untouched.
      checkpoint.check_compatible(workdir, latest, abstract)
    elif config.init.export_dir:  # Missing or wrong-shaped pretrained parameters: traced only.
      jax.eval_shape(method.load_pretrained, abstract.params)
  except checkpoint.CheckpointMismatchError as e:
    raise config_lib.ConfigError(str(e)) from None
  except checkpoint.AdapterError as e:  # Another base, or a model without its PEFT.
    raise config_lib.ConfigError(f"init.adapter_dir: {' '.join(str(e).split())}") from None
  except (ValueError, FileNotFoundError) as e:
    raise config_lib.ConfigError(f"init.export_dir: {' '.join(str(e).split())}") from None
  _create_workdir(workdir)
  mngr = checkpoint.checkpoint_manager(workdir, config.keep_checkpoints,
                                       config.checkpoint_every_steps)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  # ----------------------------------------------------------------------------------- Shard.
  state, _ = create_state(method, tx, mesh, rules, rng, shardings=state_sh)
  restored = checkpoint.restore_latest(mngr, abstract, train_iter)
  if restored is not None:
    state = restored
  elif config.init.export_dir:
    params = method.load_pretrained(jax.device_get(state.params))
    state = state.replace(params=jax.device_put(params, state_sh.params))
  if restored is None:  # Host-loaded method state (a distillation teacher), fresh start only.
    state = state.replace(extra=jax.device_put(method.load_extra(state.extra), state_sh.extra))
  first_step = int(state.step)

  # --------------------------------------------------------------------------------- Compile.
  # Ahead of time, so the compiled step's FLOP count gives MFU (omitted on CPU). A relaunch of
  # a finished run only evaluates: nothing to compile.
  flops, peak = None, mfu.peak_flops(devices[0])
  if first_step < config.total_steps:
    batch = next(train_iter)
    with jax.set_mesh(mesh), parallel.with_sharding_rules(rules):
      train_step = jit_train_step(method, tx, schedule, config, state_sh,
                                  mesh).lower(state, batch).compile()
    flops = mfu.compiled_flops(train_step)
    if flops:
      logging.info("Train step: %.3g FLOPs per device%s", flops,
                   f", peak {peak:.3g} FLOP/s per device" if peak else "")

  # ----------------------------------------------------------------------------------- Evals.
  writer = MetricWriter(workdir, resume_step=first_step)
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
  speed_meter = Progress(config.total_steps, config.input.global_batch_size, first_step)
  bar = progress if isinstance(progress, ProgressBar) else ProgressBar() if progress else None
  if bar:
    bar.start(config.total_steps, config.input.global_batch_size, first_step,
              desc=os.path.basename(os.path.normpath(workdir)))
  preemption = Preemption()
  profile = _profile_window(config)
  last_eval = {}
  pending = None  # (step, metrics) of the previous step: checked one step late, so the host
                  # never waits on the step it just dispatched.

  def check_finite(step, metrics):
    loss = float(metrics["train/loss"])
    if not jnp.isfinite(loss):
      raise NonFiniteLossError(
          f"loss is {loss} at step {step}; stopping. The last good checkpoint "
          f"(step {mngr.latest_step()}) in {workdir} is intact.")
    if bar:  # Every checked loss (already on the host) also feeds the live line.
      bar.update(step, loss)

  try:
    for step in range(first_step + 1, config.total_steps + 1):
      if profile and step == profile[0]:
        jax.profiler.start_trace(os.path.join(workdir, "tensorboard"))
      if step > first_step + 1:
        batch = next(train_iter)
      with jax.set_mesh(mesh), parallel.with_sharding_rules(rules):
        state, metrics = train_step(state, batch)
      if profile and step == profile[1]:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        logging.info("Profiled steps %d-%d into %s/tensorboard", *profile, workdir)
      if pending is not None:
        check_finite(*pending)
      pending = (step, metrics)
      final = step == config.total_steps
      if step % config.log_every_steps == 0 or final:
        check_finite(step, metrics)
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        speed = speed_meter.measure(step)
        utilisation = mfu.mfu(flops, speed["steps_per_sec"], peak)
        if utilisation is not None:
          speed["perf/mfu"] = utilisation
        if hasattr(host_iter, "skipped"):  # Web shards: corrupt samples skipped so far.
          speed["data/skipped"] = host_iter.skipped
        writer.write(step, {**host, **speed})
        logging.info(speed_meter.line(step, host, speed))
      if step % config.eval_every_steps == 0 or final:
        last_eval = run_evals(step, force=final) or last_eval
      preempted = preemption.reached(step)
      stop = step == stop_after_step or preempted
      if step % config.checkpoint_every_steps == 0 or final or stop:
        check_finite(step, metrics)  # Never save parameters that a NaN step produced.
        checkpoint.save(mngr, step, state, train_iter, force=final or stop)
      if stop:
        why = "Preempted (SIGTERM)" if preempted else "Stopping"
        logging.warning("%s after step %d: checkpoint saved in %s; relaunch with the same "
                        "--workdir to resume.", why, step, workdir)
        break
    if first_step >= config.total_steps:  # Relaunch of a finished run: just evaluate.
      last_eval = run_evals(first_step, force=True)
  finally:
    if bar:
      bar.close()
    preemption.close()
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
  if jax.process_index() == 0 and int(state.step) == config.total_steps:
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump({"step": int(state.step), **last_eval}, f, indent=2)
  return state, last_eval
