"""Parameter-efficient transfer as one mechanism for every model: `config.peft`.

A PEFT method adds its parameters to the modules whose path matches `peft.target_regex`
(Hugging Face peft's semantics: a FULL match on the '/'-joined module path, e.g.
'encoderblock_3/attn/qkv', 'img/encoderblocks/mlp' under scan) through flax method
interception: no model code knows about it. The added parameters live inside the matched
module (e.g. encoderblock_0/attn/qkv/lora_a), so under model.scan_layers=True they are
stacked on the 'layers' axis like the block they belong to, and the frozen base is never
re-stacked or copied. Only the PEFT parameters and the head train (optimizer.trainable_regex
is set from the method; frozen weights get no gradient, train.make_default_train_step).

  peft.method   'none' | 'lora' | 'adapter' | 'parallel_adapter' | 'bitfit'
  peft.target_regex   '' = the method's default target (below)
  peft.rank     LoRA rank r / adapter bottleneck width
  peft.alpha    LoRA alpha: scale alpha / r, or alpha / sqrt(r) with peft.rslora (rsLoRA)
  peft.rslora   False
  peft.dropout  LoRA dropout on the layer input (only where a 'dropout' rng is given: training)
  peft.init     LoRA A init: 'kaiming' (peft's default: kaiming-uniform a=sqrt(5), i.e.
                U(-1/sqrt(fan_in), 1/sqrt(fan_in))) or 'gaussian' (N(0, 1/r), peft's
                init_lora_weights='gaussian'); B = 0 either way, so the model equals the base
                model at init
  peft.scale    parallel adapter's s (He et al. 2022 use 4)
  peft.train_regex   extra params that stay trainable (default: the head '^head/')

Methods:
  lora              y = W x + b + scale * B(A(dropout(x))) on every Dense / Projection layer
                    matched (default: the attention projections '.*attn/(qkv|out)'; fused qkv
                    gets one A [D, r] and B [r, 3, H, K]; per-head out A [H, K, r]). r * (d_in
                    + d_out) parameters per matrix. A takes the base kernel's input logical
                    axes, B its output axes.
  adapter           Houlsby et al. 2019 serial adapters after the attention and the MLP
                    sublayers (default '.*(attn|mlp)'): y + up(gelu(down(y))), up zero-init.
  parallel_adapter  the scaled parallel adapter of He et al. 2022 (Unified View) beside the
                    MLP (default '.*mlp'): mlp(x) + s * up(relu(down(x))), up zero-init.
  bitfit            Ben Zaken et al. 2022: only biases and LayerNorm parameters train (no
                    parameter is added).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

METHODS = ("none", "lora", "adapter", "parallel_adapter", "bitfit")
DEFAULT_TARGETS = {"lora": r".*attn/(qkv|out)", "adapter": r".*(attn|mlp)",
                   "parallel_adapter": r".*mlp", "bitfit": ""}
ADDED = r"(lora_a|lora_b|adapter_down|adapter_up)"  # names of the params PEFT adds


def default_config() -> ml_collections.ConfigDict:
  from jax_transfer.config import PEFT_DEFAULTS
  return ml_collections.ConfigDict(dict(PEFT_DEFAULTS))


@dataclasses.dataclass(frozen=True)
class Peft:
  method: str
  target: str
  rank: int
  alpha: float
  rslora: bool
  dropout: float
  init: str
  scale: float
  train_regex: str

  @property
  def lora_scale(self) -> float:
    return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)


def from_config(config) -> Optional[Peft]:
  """config.peft -> Peft, or None when absent / 'none'. Raises ValueError naming the key."""
  section = config.get("peft")
  if section is None or section.get("method", "none") == "none":
    return None
  c = default_config()
  unknown = sorted(set(section.keys()) - set(c.keys()))
  if unknown:
    raise ValueError(f"unknown peft keys {unknown}; allowed: {sorted(c.keys())}")
  c.update(section.to_dict())
  if c.method not in METHODS:
    raise ValueError(f"peft.method={c.method!r}; allowed: {', '.join(METHODS)}")
  if c.method in ("lora", "adapter", "parallel_adapter") and not c.rank > 0:
    raise ValueError(f"peft.rank={c.rank!r} must be > 0")
  if c.init not in ("kaiming", "gaussian"):
    raise ValueError(f"peft.init={c.init!r}; allowed: kaiming, gaussian")
  if not 0 <= c.dropout < 1:
    raise ValueError(f"peft.dropout={c.dropout!r} must be in [0, 1)")
  target = c.target_regex or DEFAULT_TARGETS[c.method]
  try:
    re.compile(target)
    re.compile(c.train_regex)
  except re.error as e:
    raise ValueError(f"peft.target_regex / train_regex: {e}") from None
  return Peft(c.method, target, int(c.rank), float(c.alpha), bool(c.rslora),
              float(c.dropout), c.init, float(c.scale), c.train_regex)


def trainable_regex(p: Peft) -> str:
  """optimizer.trainable_regex for a PEFT method: its parameters plus train_regex."""
  own = (r"(^|/)(bias|scale)$" if p.method == "bitfit"
         else rf"(^|/){ADDED}$")
  return f"{own}|{p.train_regex}" if p.train_regex else own


def optimizer_config(config):
  """config.optimizer, with trainable_regex set by config.peft when a method is active (a
  trainable_regex set by hand as well is refused: one of them would be silently ignored)."""
  p = from_config(config)
  if p is None:
    return config.optimizer
  if config.optimizer.trainable_regex not in ("", ".*"):
    raise ValueError(f"optimizer.trainable_regex={config.optimizer.trainable_regex!r} and "
                     f"peft.method={p.method!r} both choose the trainable parameters; set "
                     f"peft.train_regex instead")
  opt = ml_collections.ConfigDict(config.optimizer.to_dict())
  opt.trainable_regex = trainable_regex(p)
  return opt


# --------------------------------------------------------------------------- Interception.

def _path(module) -> str:
  return "/".join(str(p) for p in module.path)


def _n_in(module, x) -> int:
  """How many leading kernel dims a layer contracts with its input."""
  from jax_transfer.models.vit import Projection
  if isinstance(module, Projection):
    lhs, rhs = module.spec.split("->")[0].split(",")
    return sum(1 for ch in rhs if ch in lhs)
  return 1


def _kernel_names(module) -> Optional[tuple]:
  """The base kernel's logical axis names (init only: params are boxed then)."""
  try:
    kernel = module.get_variable("params", "kernel")
  except Exception:  # pylint: disable=broad-except
    return None
  return tuple(kernel.names) if isinstance(kernel, nn.Partitioned) else None


def _lora(p: Peft, module, x, y, kwargs):
  kernel = module.get_variable("params", "kernel")
  kshape = (kernel.value if isinstance(kernel, nn.Partitioned) else kernel).shape
  n_in = _n_in(module, x)
  if getattr(module, "kernel_shape", None) is not None:
    kshape = tuple(module.kernel_shape)
  in_shape, out_shape = kshape[:n_in], kshape[n_in:]
  names = _kernel_names(module) or (None,) * len(kshape)
  fan_in = 1
  for s in in_shape:
    fan_in *= s
  if p.init == "kaiming":  # torch kaiming_uniform_(a=sqrt(5)) on A [r, fan_in]
    a_init = nn.initializers.uniform(2.0 / fan_in ** 0.5)
    a_init = _shifted(a_init, -1.0 / fan_in ** 0.5)
  else:
    a_init = nn.initializers.normal(1.0 / p.rank)
  a = module.param("lora_a", nn.with_logical_partitioning(a_init, names[:n_in] + (None,)),
                   in_shape + (p.rank,), module.param_dtype)
  b = module.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros,
                                                          (None,) + names[n_in:]),
                   (p.rank,) + out_shape, module.param_dtype)
  take = kwargs.get("take")
  if take is not None:  # MAPHead's slices of a fused qkv kernel
    b = b[:, take]
  dtype = module.dtype or x.dtype
  h = x.astype(dtype)
  if p.dropout and module.has_rng("dropout"):
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1 - p.dropout, h.shape)
    h = jnp.where(keep, h / (1 - p.dropout), 0).astype(h.dtype)
  h = jnp.tensordot(h, a.astype(dtype), axes=n_in)  # [..., r]
  return y + p.lora_scale * jnp.tensordot(h, b.astype(dtype), axes=1)


def _shifted(init, shift):
  def fn(key, shape, dtype=jnp.float32):
    return init(key, shape, dtype) + jnp.asarray(shift, dtype)
  return fn


def _bottleneck(module, z, p: Peft, act):
  """up(act(down(z))) with up zero-initialised: [..., D] -> [..., D]."""
  d = z.shape[-1]
  down = module.param("adapter_down", nn.with_logical_partitioning(
      nn.initializers.xavier_uniform(), ("embed", None)), (d, p.rank), module.param_dtype)
  up = module.param("adapter_up", nn.with_logical_partitioning(
      nn.initializers.zeros, (None, "embed")), (p.rank, d), module.param_dtype)
  h = act(z.astype(module.dtype) @ down.astype(module.dtype))
  return h @ up.astype(module.dtype)


def interceptor(p: Peft):
  """The flax method interceptor applying `p` to every matched module's __call__."""
  from jax_transfer.models.vit import MLP, Attention, Projection
  target = re.compile(p.target)

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or p.method == "bitfit" or not target.fullmatch(
        _path(module)):
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    if p.method == "lora" and isinstance(module, (nn.Dense, Projection)):
      return _lora(p, module, args[0], y, kwargs)
    if p.method == "adapter" and isinstance(module, (Attention, MLP)):
      return y + _bottleneck(module, y, p, nn.gelu)
    if p.method == "parallel_adapter" and isinstance(module, MLP):
      return y + p.scale * _bottleneck(module, args[0], p, nn.relu)
    return y
  return intercept


class PeftModel:
  """A model whose init / apply run under the PEFT interceptor; everything else (fields,
  methods such as encode_image, passed as `method=`) is the wrapped model's."""

  def __init__(self, model: nn.Module, p: Peft):
    self._model, self.peft = model, p
    self._intercept = interceptor(p)

  def __getattr__(self, name: str) -> Any:
    return getattr(self._model, name)

  def init(self, *args, **kwargs):
    with nn.intercept_methods(self._intercept):
      return self._model.init(*args, **kwargs)

  def apply(self, *args, **kwargs):
    with nn.intercept_methods(self._intercept):
      return self._model.apply(*args, **kwargs)

  def __repr__(self):
    return f"PeftModel({self.peft.method}, target {self.peft.target!r}, {self._model!r})"


def wrap(model, config):
  """model, or PeftModel(model) when config.peft selects a method."""
  p = from_config(config)
  return model if p is None or p.method == "bitfit" else PeftModel(model, p)
