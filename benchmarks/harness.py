"""Shared by the benchmark scripts: the training step built exactly as train.py builds it, and
a timing helper. One copy, so gpu_clip.py, input_pipeline.py and profile_step.py time the
same jitted step that `train.train_and_evaluate` runs.

`build_train_step` repeats the "Model + update" and "Shard" sections of
`train.train_and_evaluate` (method by name, optim.make_optimizer, method.train_step or
train.make_default_train_step, train.create_state, jax.jit with the state / batch shardings
and the donated state); train.py has no function that returns its jitted step, so keep the
two in step when either changes.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import statistics
import time
from typing import Any, Callable

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(relpath: str, arg: str = ""):
  """ml_collections_configs/<relpath>'s get_config(arg), as `--config=file.py:arg` loads it."""
  path = REPO / "ml_collections_configs" / relpath
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@dataclasses.dataclass
class TrainStep:
  step: Any          # jax.jit(step_fn, in/out shardings, donate_argnums=0)
  state: Any         # the born-sharded train state
  state_shardings: Any
  method: Any
  mesh: Any
  rules: Any
  config: Any

  def context(self):
    """The mesh + logical-rules context train.py runs the step in."""
    import contextlib
    import jax
    from jax_transfer import parallel
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(parallel.with_sharding_rules(self.rules))
    return stack

  def global_batch(self, local_batch: dict):
    """Host batch (numpy, after method.host_batch) -> global jax.Arrays, as train.py does."""
    from jax_transfer import data, parallel
    return data.normaliser(self.config.input)(parallel.global_batch(local_batch, self.mesh))

  def fresh_state(self):
    """A new train state (e.g. after a failed call deleted the donated one)."""
    import jax
    from jax_transfer import optim, peft, train
    tx, _ = optim.make_optimizer(peft.optimizer_config(self.config), self.config.schedule,
                                 self.config.total_steps)
    state, _ = train.create_state(self.method, tx, self.mesh, self.rules,
                                  jax.random.key(self.config.seed))
    self.state = state.replace(extra=jax.device_put(self.method.load_extra(state.extra),
                                                    self.state_shardings.extra))
    return self.state


def build_train_step(config, devices=None, workdir: str | None = None,
                     abstract: bool = False) -> TrainStep:
  """The jitted train step of `config` on `devices` (default: all), built as train.py does.
  abstract: the state is train.abstract_state's (ShapeDtypeStructs with their shardings), for
  lowering and compiling a step whose state is too big to allocate here."""
  import jax
  from jax_transfer import config as config_lib, methods, optim, parallel, peft, train

  devices = list(devices if devices is not None else jax.devices())
  config_lib.validate(config, len(devices))
  mesh = parallel.make_mesh(config.mesh, devices)
  rules = parallel.rules_from_config(config.sharding_rules)
  method = methods.get_method(config.method)(config, mesh, workdir)
  tx, schedule = optim.make_optimizer(peft.optimizer_config(config), config.schedule,
                                      config.total_steps)
  if abstract:
    state, state_sh = train.abstract_state(method, tx, mesh, rules, jax.random.key(config.seed))
  else:
    state, state_sh = train.create_state(method, tx, mesh, rules, jax.random.key(config.seed))
    # As train.py on a fresh start: host-loaded method state (a distillation teacher).
    state = state.replace(extra=jax.device_put(method.load_extra(state.extra), state_sh.extra))
  step = train.jit_train_step(method, tx, schedule, config, state_sh, mesh)
  return TrainStep(step, state, state_sh, method, mesh, rules, config)


def median_time(fn: Callable[[], Any], warmup: int, steps: int) -> dict:
  """Calls fn() warmup + steps times (fn must block on its result); returns median / p10 /
  p90 seconds of the timed calls and the list of times."""
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    fn()
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  s = sorted(times)
  q = lambda f: s[min(len(s) - 1, int(f * len(s)))]
  return dict(median_s=statistics.median(s), p10_s=q(0.1), p90_s=q(0.9), times_s=times)


def time_step(step: Callable, state, batch, warmup: int, steps: int) -> tuple[dict, Any, Any]:
  """median_time of a train step `step(state, batch) -> (state, metrics)` (the state donated,
  so each call feeds the next), each call blocked on its outputs. Returns (timing, last
  state, last metrics)."""
  import jax
  box = [state, None]

  def one():
    box[0], box[1] = step(box[0], batch)
    jax.block_until_ready((box[0], box[1]))
  return median_time(one, warmup, steps), box[0], box[1]
