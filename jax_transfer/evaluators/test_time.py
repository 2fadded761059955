r"""Test-time adaptation of BatchNorm under covariate shift: a source-trained BN model
evaluated on a shifted target domain with the BN statistics re-estimated on the test batches.

Four ways of normalising, side by side (`TestTimeBNEvaluator`):

  source    the running (source) statistics: the plain evaluation (model.apply(train=False)).
  test_bn   each BN layer normalises by the statistics of the current test batch (biased
            variance, as torch's BN in train mode; Schneider et al. 2020, Nado et al. 2020,
            "prediction-time BN"). No parameter changes.
  alpha_a   alpha-BN (You et al. 2021, "Test-time Batch Statistics Calibration for Covariate
            Shift", arXiv:2110.04065), alpha weighting the TEST side as the common
            implementation does (mariodoebler/test-time-adaptation, methods/bn.py
            AlphaBatchNorm):
              mu  = (1 - alpha) * mu_source  + alpha * mu_test
              var = (1 - alpha) * var_source + alpha * var_test_unbiased
            var_test_unbiased = sum (x - mu_test)^2 / (n - 1) (torch's running_var after a
            momentum-1 BN, which that implementation reads), n = the batch's count per channel
            (B * H * W). alpha=0 is `source`; alpha=1 is `test_bn` up to the n/(n-1) factor.
            The source variance is the project's running (biased-batch-variance) EMA.
  tent      TENT (Wang et al., ICLR 2021, "Tent: Fully Test-Time Adaptation by Entropy
            Minimization"; DequanWang/tent tent.py): test-batch statistics as test_bn, and
            one Adam step per test batch (lr 1e-3, their CIFAR config; `tent_steps`) on the
            BN affine parameters only (every BN layer's scale and bias) minimising the mean
            prediction entropy -sum_c p log p of the batch; online (not episodic): the
            adapted parameters carry over to the next batch; the batch's predictions are
            those of the forward pass BEFORE its update (forward_and_adapt returns them).

The statistics are per channel over the batch and spatial axes of the GLOBAL batch (under jit
on a mesh the sums are all-reduced: the same on 8 devices as on 1) and exclude the padding
rows of the last batch (embed_split's mask), so every example is counted once and padding
never shifts the statistics. The test stream is eval.split in dataset order, cut into batches
of `batch_size` (the test-time batch size matters for all but `source`; the default is
config.eval.batch_size). Only BN layers in eval mode are changed (flax nn.intercept_methods
around each nn.BatchNorm call), so any model whose BN modules are flax's works, not just
models/resnet.py.
"""
from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_transfer import config as config_lib
from jax_transfer.evaluators.classification import accuracy_and_loss
from jax_transfer.evaluators.common import embed_split, load_export

TENT_LR = 1e-3  # tent's cifar10 config: OPTIM.METHOD Adam, LR 1e-3, BETA 0.9, WD 0, STEPS 1.


def _masked_moments(x, mask, unbiased: bool):
  """Per-channel mean and variance of x [B, ..., C] over every axis but the last, counting
  only the rows with mask 1 (float32)."""
  x = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  w = mask.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
  n = w.sum() * float(np.prod(x.shape[1:-1]))
  mean = (x * w).sum(axes) / n
  var = (jnp.square(x - mean) * w).sum(axes) / (n - 1.0 if unbiased else n)
  return mean, var


def apply_calibrated(model, variables, images, mask, alpha: float, unbiased: bool = True):
  """model.apply(variables, images, train=False) with every nn.BatchNorm normalising by
  (1 - alpha) * source + alpha * test-batch statistics (module docstring). Returns what the
  model returns ((logits, aux) for the project's classifiers)."""
  alpha = jnp.float32(alpha)

  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    if not isinstance(m, nn.BatchNorm) or context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    x = args[0]
    mean_t, var_t = _masked_moments(x, mask, unbiased)
    mean_s = m.get_variable("batch_stats", "mean").astype(jnp.float32)
    var_s = m.get_variable("batch_stats", "var").astype(jnp.float32)
    mean = (1.0 - alpha) * mean_s + alpha * mean_t
    var = (1.0 - alpha) * var_s + alpha * var_t
    y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + m.epsilon)
    if m.use_scale:
      y = y * nn.unbox(m.get_variable("params", "scale")).astype(jnp.float32)
    if m.use_bias:
      y = y + nn.unbox(m.get_variable("params", "bias")).astype(jnp.float32)
    return y.astype(m.dtype or x.dtype)

  with nn.intercept_methods(interceptor):
    return model.apply(variables, images, train=False)


def bn_param_paths(params, batch_stats) -> list[str]:
  """'/'-joined paths of the affine params (scale, bias) of every module that keeps batch
  statistics: the parameters TENT adapts."""
  modules = {k.rsplit("/", 1)[0]
             for k in flax.traverse_util.flatten_dict(nn.unbox(batch_stats), sep="/")}
  flat = flax.traverse_util.flatten_dict(nn.unbox(params), sep="/")
  return sorted(k for k in flat if k.rsplit("/", 1)[0] in modules
                and k.rsplit("/", 1)[1] in ("scale", "bias"))


def _entropy(logits):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  return -(jnp.exp(logp) * logp).sum(-1)


class Tent:
  """TENT's online adaptation as a stateful function of the test stream: each call
  `tent(images, mask)` returns the batch's logits (before its update) and takes `steps` Adam
  steps on the BN affine params minimising the masked mean entropy. `params` holds the
  adapted parameters; reset() restores the source ones (episodic use)."""

  def __init__(self, model, params, batch_stats, lr: float = TENT_LR, steps: int = 1):
    if not batch_stats:
      raise ValueError("TENT needs a BatchNorm model (no batch_stats in the method state)")
    if steps < 1:
      raise ValueError(f"tent steps must be >= 1, got {steps}")
    self._model, self._stats, self._steps = model, batch_stats, steps
    self._source = flax.traverse_util.flatten_dict(nn.unbox(params), sep="/")
    self.paths = bn_param_paths(params, batch_stats)
    self._tx = optax.adam(lr, b1=0.9, b2=0.999)

    def loss_fn(adapt, frozen, images, mask):
      p = flax.traverse_util.unflatten_dict({**frozen, **adapt}, sep="/")
      logits = apply_calibrated(model, {"params": p, "batch_stats": batch_stats}, images, mask,
                                1.0, unbiased=False)[0]
      m = mask.astype(jnp.float32)
      return (_entropy(logits) * m).sum() / m.sum(), logits

    def step(adapt, opt_state, frozen, images, mask):
      (_, logits), g = jax.value_and_grad(loss_fn, has_aux=True)(adapt, frozen, images, mask)
      updates, opt_state = self._tx.update(g, opt_state, adapt)
      return optax.apply_updates(adapt, updates), opt_state, logits
    self._step = jax.jit(step)
    self.reset()

  def reset(self):
    self._adapt = {k: self._source[k] for k in self.paths}
    self._frozen = {k: v for k, v in self._source.items() if k not in self._adapt}
    self._opt_state = self._tx.init(self._adapt)

  @property
  def params(self):
    return flax.traverse_util.unflatten_dict({**self._frozen, **self._adapt}, sep="/")

  def __call__(self, images, mask):
    first = None
    for _ in range(self._steps):
      self._adapt, self._opt_state, logits = self._step(self._adapt, self._opt_state,
                                                        self._frozen, images, mask)
      first = logits if first is None else first
    return first


class TestTimeBNEvaluator:
  """source / test_bn / alpha-BN for each of `alphas` / TENT accuracies (and losses) of a BN
  model on `split` of input_cfg's dataset, side by side: {'source/accuracy', ...,
  'alpha_0.5/accuracy', 'tent/accuracy', ...}. run(params, extra) with extra['batch_stats']
  (the source statistics). tent_lr None: no TENT column."""

  def __init__(self, model, input_cfg, split: str, batch_size: int, mesh, every_steps,
               name: str = "test_time", alphas=(0.1, 0.5, 0.9), tent_lr: float | None = TENT_LR,
               tent_steps: int = 1):
    self.name, self.every_steps = name, every_steps
    self._model, self._input, self._split = model, input_cfg, split
    self._batch_size, self._mesh = batch_size, mesh
    self._tent_lr, self._tent_steps = tent_lr, tent_steps
    self.arms = {"source": (0.0, True), "test_bn": (1.0, False)}
    for a in alphas:
      if not 0.0 <= float(a) <= 1.0:
        raise ValueError(f"alpha-BN alphas must be in [0, 1] (the weight of the test "
                         f"statistics), got {a}")
      self.arms[f"alpha_{float(a):g}"] = (float(a), True)
    self._apply = jax.jit(
        lambda pe, images, mask, alpha, unbiased: apply_calibrated(
            model, {"params": pe[0], "batch_stats": pe[1]}, images, mask, alpha, unbiased)[0],
        static_argnames="unbiased")

  def _embed(self, fn):
    return embed_split(fn, None, self._input, self._split, self._batch_size, self._mesh,
                       inputs=lambda b: {"images": b["image"], "mask": b["mask"]},
                       keep=("label",))

  def run(self, params, extra=None) -> dict:
    if not extra or "batch_stats" not in extra:
      raise ValueError(f"{self.name}: test-time BN needs the model's BatchNorm statistics "
                       f"(extra['batch_stats']); this model has none")
    stats, out = extra["batch_stats"], {}
    for arm, (alpha, unbiased) in self.arms.items():
      emb = self._embed(lambda _, images, mask: self._apply(
          (params, stats), images, mask, alpha, unbiased=unbiased))
      out.update({f"{arm}/{k}": v
                  for k, v in accuracy_and_loss(emb["out"], emb["label"]).items()})
    if self._tent_lr is not None:
      tent = Tent(self._model, params, stats, self._tent_lr, self._tent_steps)
      emb = self._embed(lambda _, images, mask: tent(images, mask))
      out.update({f"tent/{k}": v
                  for k, v in accuracy_and_loss(emb["out"], emb["label"]).items()})
    return out


def for_method(method, dataset: str | None = None, split: str | None = None,
               batch_size: int | None = None, **kwargs) -> TestTimeBNEvaluator:
  """A supervised BN method's evaluator on `dataset` (a shifted domain; None: input.dataset)
  at `split` (default eval.split) in test batches of `batch_size` (default eval.batch_size),
  named 'test_time_<dataset>'."""
  c = method.config
  if not method.has_batch_stats:
    raise ValueError(f"test-time BN: model {c.model_name!r} has no BatchNorm statistics; "
                     f"use a BN model (resnet18, resnet50, resnet_tiny)")
  input_cfg = c.input if dataset is None else config_lib.eval_input(c.input, dataset)
  kwargs.setdefault("name", f"test_time_{dataset or c.input.dataset}")
  return TestTimeBNEvaluator(method.model, input_cfg, split or c.eval.split,
                             batch_size or c.eval.batch_size, method.mesh, c.eval_every_steps,
                             **kwargs)


def evaluate_export(export_dir: str, dataset: str | None = None, split: str | None = None,
                    data_dir: str | None = None, devices=None, **kwargs) -> dict[str, float]:
  """The side-by-side table of a supervised BN export (its params and running statistics)
  on `dataset`'s `split`."""
  method, params, extra = load_export(export_dir, data_dir, devices)
  ev = for_method(method, dataset, split, **kwargs)  # refuses a model without BatchNorm
  if extra is None:
    raise ValueError(f"{export_dir}: the export has no BatchNorm statistics (batch_stats); "
                     f"re-export the run without --adapter_only")
  return ev.run(params, extra)
