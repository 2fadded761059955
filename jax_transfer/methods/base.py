"""What a method supplies to the shared loop (train.py). Everything else is the loop's.

A method is a class built from the config. The loop calls, in order:
  train_iterator(seed=, process_index=, process_count=)
                                   -> the host iterator of training batches, checkpointed
                                      with its get_state / set_state (default: the
                                      config.input stream; DANN zips in a target domain's)
  host_batch(local_batch)          -> numeric arrays for the step (e.g. tokenised captions)
  init_params(rng)                 -> boxed param tree (leaves carry logical axis names)
  init_extra(rng, params)          -> method state outside the optimiser (default None);
                                      boxed leaves are sharded by the same rules
  load_pretrained(params, config)  -> params after transfer initialisation (default: the
                                      `config.init` export, with init.adapter_dir's adapter
                                      on top, regex-selected; a learngene export is first
                                      expanded to this model's depth)
  load_extra(extra)                -> extra with host-loaded values (e.g. a teacher export),
                                      on a fresh start only; placed on init_extra's shardings
  loss_fn(params, extra, batch, rng) -> (loss, (metrics, new_extra)), for the loop's step
  after_update(params)             -> params (e.g. clamp a temperature), inside the step
  evaluators()                     -> list of Evaluator, each with `name`, `every_steps` and
                                      run(params, extra) -> dict of floats
A method with nested optimisation may override `train_step` entirely; it must keep the
(state, batch) -> (state, metrics) signature so the loop can jit, donate and checkpoint it.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jax_transfer import checkpoint


class Method:

  def __init__(self, config, mesh, workdir: str | None = None):
    self.config, self.mesh, self.workdir = config, mesh, workdir

  def train_iterator(self, *, seed: int, process_index: int = 0, process_count: int = 1):
    """This process's iterator of local training batches (dicts of numpy), with
    get_state() -> JSON-serialisable and set_state(s) for exact resumption. Default:
    data.make_train_iterator(config.input, ...)."""
    from jax_transfer import data  # pylint: disable=g-import-not-at-top
    return data.make_train_iterator(self.config.input, seed=seed, process_index=process_index,
                                    process_count=process_count)

  def host_batch(self, batch: dict) -> dict:
    """Local host batch -> the numeric arrays the step consumes (runs before the batch is
    made global). Default: drop non-numeric columns (captions); a method that needs text
    tokenises it here."""
    return {k: v for k, v in batch.items() if np.asarray(v).dtype.kind not in "OSU"}

  @staticmethod
  def validate_config(config) -> None:
    """Method-specific checks, run by config.validate before anything compiles; raise
    config.ConfigError with one line naming the key."""

  def init_params(self, rng: jax.Array):
    raise NotImplementedError

  def init_extra(self, rng: jax.Array, params) -> Any:
    return None

  def load_pretrained(self, params):
    init = self.config.init
    if not init.export_dir:
      return params
    if init.get("adapter_dir"):  # The base with the adapter on top, merged when need be.
      pretrained, _ = checkpoint.load_adapted(init.export_dir, init.adapter_dir, like=params)
    else:
      pretrained = checkpoint.load_export_params(init.export_dir)
    from jax_transfer.models import learngene  # TLEG: a learngene initialises any depth.
    if learngene.is_learngene(pretrained):
      pretrained = learngene.expand_like(pretrained, params)
    from jax_transfer import peft  # The PEFT params a plain export lacks keep their init.
    return checkpoint.merge_pretrained(
        params, pretrained, init.load_regex,
        init.skip_regex, source=f"export {init.export_dir}",
        optional_regex=rf"(^|/){peft.ADDED}$" if peft.from_config(self.config) else "^$")

  def load_extra(self, extra):
    return extra

  def loss_fn(self, params, extra, batch, rng):
    raise NotImplementedError

  def after_update(self, params):
    return params

  def evaluators(self) -> list:
    return []

  has_batch_stats = False  # BatchNorm running statistics in extra (Supervised: a BN model)
  train_step = None  # Optional override: (state, batch) -> (state, metrics).
