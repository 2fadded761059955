"""Parameter-efficient transfer as one mechanism for every model: `config.peft`.

A PEFT method adds its parameters to the modules whose path matches `peft.target_regex`
(Hugging Face peft's semantics: a FULL match on the '/'-joined module path, e.g.
'encoderblock_3/attn/qkv', 'img/encoderblocks/mlp' under scan) through flax method
interception: no model code knows about it. The added parameters live inside the matched
module (e.g. encoderblock_0/attn/qkv/lora_a), so under model.scan_layers=True they are
stacked on the 'layers' axis like the block they belong to, and the frozen base is never
re-stacked or copied. Only the PEFT parameters and the head train (optimizer.trainable_regex
is set from the method; frozen weights get no gradient, train.make_default_train_step).

  peft.method   'none' | 'lora' | 'adapter' | 'parallel_adapter' | 'prefix' | 'vpt' | 'coop'
                | 'bitfit'
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
  peft.length   prefix / prompt / context length; 0 = the method's default (prefix 8,
                vpt 8, coop 4)
  peft.deep     VPT: prompts at every block's input (VPT-deep, default) or only the first
  peft.frozen_dtype   '' | 'bfloat16': the frozen params' storage dtype, also for a probe
                (optimizer.trainable_regex); compute stays model.dtype (train.store_frozen)

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
  prefix            Li & Liang 2021 (the Unified View's prefix tuning): `length` learned
                    keys and values per attention layer, prefix_k / prefix_v [length, H, K],
                    prepended to the layer's keys / values; every query sees them (a causal
                    text tower's mask is shifted by `length`). Default target: the blocks'
                    attention '.*encoderblock(s|_\d+)/attn' (the regex is matched on the
                    Attention module's path). Init N(0, 0.02); not the base model at init.
                    length * 2 * D parameters per layer.
  vpt               Jia et al. 2022, visual prompt tuning: `length` learned prompt tokens
                    joining the patch tokens of every ViT whose path matches (default '.*';
                    in two towers the image tower 'img'), after the position embedding.
                    Shallow (deep=False): one set [length, D] before the first block; deep: a
                    set per block [depth, length, D], each replacing the previous block's
                    prompt outputs. The prompts are appended after the patch tokens, which
                    equals VPT's [cls, prompts, patches] order (no position embedding on
                    prompts, attention is permutation-equivariant), and they are removed
                    before the final norm and the pooling (cls, gap or map). Init
                    U(-v, v), v = sqrt(6 / (patch fan_in + D)), VPT's code. Not the base
                    model at init.
  coop              Zhou et al. 2022 (CoOp), learned text-prompt context: `length` context
                    vectors coop_ctx [length, D] (init N(0, 0.02), CoOp's random init)
                    replace the token embeddings right after the start token of every text
                    tower that matches (default '.*'; in two towers 'txt'); the caption's
                    tokens move right by `length` and its last `length` positions are
                    dropped, so captions must leave that many pad positions (ids are
                    shifted alike, so argmax / eot pooling still finds EOT). The position
                    embedding is added after, as in CoOp.
  bitfit            Ben Zaken et al. 2022: only biases and LayerNorm parameters train (no
                    parameter is added).

Export (checkpoint.export, `python -m jax_transfer.export`): a LoRA or BitFit run exports a
plain model, LoRA merged into the kernels (merge_lora) and config.peft.method 'none'; any other
method's export keeps its parameters and config.peft, and checkpoint.load_pretrained wraps the
rebuilt model again, so it computes what the trained model did. `--adapter_only` writes only
the trained parameters (trainable_regex: the PEFT ones and train_regex's, e.g. the head) with
a fingerprint of the base export (base.json); init.adapter_dir or load_pretrained(base,
adapter_dir=...) applies it onto that base and refuses any other.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

METHODS = ("none", "lora", "adapter", "parallel_adapter", "prefix", "vpt", "coop", "bitfit")
DEFAULT_TARGETS = {"lora": r".*attn/(qkv|out)", "adapter": r".*(attn|mlp)",
                   "parallel_adapter": r".*mlp", "prefix": r".*encoderblock(s|_\d+)/attn",
                   "vpt": ".*", "coop": ".*", "bitfit": ""}
DEFAULT_LENGTH = {"prefix": 8, "vpt": 8, "coop": 4}
ADDED = (r"(lora_a|lora_b|adapter_down|adapter_up|prefix_k|prefix_v|vpt_prompt|"
         r"coop_ctx)")  # names of the params PEFT adds


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
  length: int = 0
  deep: bool = True

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
  if not (isinstance(c.length, int) and c.length >= 0):
    raise ValueError(f"peft.length={c.length!r} must be an int >= 0 (0: the method's default)")
  target = c.target_regex or DEFAULT_TARGETS[c.method]
  try:
    re.compile(target)
    re.compile(c.train_regex)
  except re.error as e:
    raise ValueError(f"peft.target_regex / train_regex: {e}") from None
  return Peft(c.method, target, int(c.rank), float(c.alpha), bool(c.rslora),
              float(c.dropout), c.init, float(c.scale), c.train_regex,
              int(c.length or DEFAULT_LENGTH.get(c.method, 0)), bool(c.deep))


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
  fan_in, fan_out = math.prod(in_shape), math.prod(out_shape)
  if p.rank > min(fan_in, fan_out):
    raise ValueError(f"peft.rank={p.rank} exceeds the smaller dimension of {_path(module)!r} "
                     f"(kernel {tuple(kshape)}: {fan_in} in, {fan_out} out)")
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


def _token_param(hook, name, init, shape, names):
  return hook.param(name, nn.with_logical_partitioning(init, names), shape, jnp.float32)


def _vpt_init(fan_in: int, d: int):
  v = (6.0 / (fan_in + d)) ** 0.5  # VPT's code: uniform(-v, v), fan_in = 3 * patch area
  return _shifted(nn.initializers.uniform(2 * v), -v)


def _hook(p: Peft, target, hook, args, info):
  """A models.vit.Hook call under method `p`: the token methods' edits (module docstring)."""
  name = hook.name
  owner = "/".join(str(s) for s in hook.path[:-1])  # the module that holds the hook
  if p.method == "prefix" and name == "prefix" and target.fullmatch(owner):
    k, v = args  # [B, S, H, K]
    pk, pv = (_token_param(hook, f"prefix_{n}", nn.initializers.normal(0.02),
                           (p.length,) + k.shape[2:], (None, "heads", "kv")) for n in "kv")
    tile = lambda t, like: jnp.broadcast_to(t.astype(like.dtype), like.shape[:1] + t.shape)
    return (jnp.concatenate([tile(pk, k), k], axis=1),
            jnp.concatenate([tile(pv, v), v], axis=1))
  if p.method == "vpt" and name in ("prompt_in", "prompt", "prompt_out"):
    (x,) = args  # [B, N, D]
    tower = owner if name != "prompt" else owner.rpartition("/")[0]
    if target.fullmatch(tower):
      if name == "prompt_out":
        return x[:, :-p.length]
      if name == "prompt" and not p.deep:
        return x
      b, _, d = x.shape
      if name == "prompt_in" and p.deep:  # placeholders: block 0 puts its own prompts here
        prompts = jnp.zeros((p.length, d), x.dtype)
      else:
        prompts = _token_param(hook, "vpt_prompt", _vpt_init(info["fan_in"], d),
                               (p.length, d), (None, "embed")).astype(x.dtype)
      prompts = jnp.broadcast_to(prompts, (b, p.length, d))
      keep = x if name == "prompt_in" else x[:, :-p.length]
      return jnp.concatenate([keep, prompts], axis=1)
  if p.method == "coop" and name == "context_in" and target.fullmatch(owner):
    x, tokens = args  # [B, L, D], [B, L]
    b, n, d = x.shape
    if n <= p.length:
      raise ValueError(f"peft.length={p.length} leaves no room in {n} text tokens")
    ctx = _token_param(hook, "coop_ctx", nn.initializers.normal(0.02), (p.length, d),
                       (None, "embed")).astype(x.dtype)
    keep = n - p.length
    x = jnp.concatenate([x[:, :1], jnp.broadcast_to(ctx, (b, p.length, d)), x[:, 1:keep]], 1)
    tokens = jnp.concatenate([tokens[:, :1], jnp.zeros((b, p.length), tokens.dtype),
                              tokens[:, 1:keep]], axis=1)
    return x, tokens
  return args[0] if len(args) == 1 else args


def interceptor(p: Peft):
  """The flax method interceptor applying `p` to every matched module's __call__."""
  from jax_transfer.models.vit import MLP, Attention, Hook, Projection
  target = re.compile(p.target)

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or p.method == "bitfit":
      return next_fun(*args, **kwargs)
    if isinstance(module, Hook):
      return _hook(p, target, module, args, kwargs)
    if not target.fullmatch(_path(module)):
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


# ------------------------------------------------------------------------ Merge and export.

MERGEABLE = ("lora", "bitfit")  # export as a plain model; every other method's export keeps
                                # its parameters and config.peft (load_pretrained re-wraps)


def merge_lora(params, p: Peft):
  """`params` with every LoRA pair folded into its kernel, W + p.lora_scale * A B (A [*in, r]
  and B [r, *out] contracted over r and reshaped to W [*in, *out]), lora_a / lora_b removed:
  the parameters of the plain model whose outputs equal the LoRA model's up to rounding
  (tests/test_peft_export.py). jnp: it runs under jit and on sharded arrays (numpy leaves,
  host-side loading, stay numpy), and scan-stacked blocks (the same leading layers axis on W,
  A and B) merge per layer. The merged kernel takes the dtype of W + A B (f32 for a frozen
  kernel stored in bf16)."""
  import flax.traverse_util as tu  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  flat = tu.flatten_dict(params)
  out = {k: v for k, v in flat.items() if k[-1] not in ("lora_a", "lora_b")}
  for key in (k[:-1] for k in flat if k[-1] == "lora_a"):
    a, b, w = flat[key + ("lora_a",)], flat[key + ("lora_b",)], flat[key + ("kernel",)]
    lead = a.ndim + b.ndim - 2 - w.ndim  # leading (layers) axes of all three
    if lead < 0 or not (a.shape[:lead] == b.shape[:lead] == w.shape[:lead]) or (
        a.shape[-1] != b.shape[lead] or a.shape[lead:-1] + b.shape[lead + 1:] != w.shape[lead:]):
      raise ValueError(f"{'/'.join(key)}: lora_a {a.shape} and lora_b {b.shape} do not fit "
                       f"its kernel {w.shape}")
    xp = np if all(isinstance(x, np.ndarray) for x in (a, b, w)) else jnp
    dtype = xp.result_type(w.dtype, a.dtype, b.dtype)
    lhs = xp.reshape(a, a.shape[:lead] + (-1, a.shape[-1])).astype(dtype)  # [*L, in, r]
    rhs = xp.reshape(b, b.shape[:lead + 1] + (-1,)).astype(dtype)  # [*L, r, out]
    delta = (lhs @ rhs if xp is np else
             jnp.matmul(lhs, rhs, precision=jax.lax.Precision.HIGHEST)).reshape(w.shape)
    out[key + ("kernel",)] = w.astype(dtype) + p.lora_scale * delta
  return tu.unflatten_dict(out)


def for_export(params, config):
  """(params, config) as checkpoint.export writes them. LoRA and BitFit export a plain model:
  LoRA merged (merge_lora), and config.peft.method 'none' (the rest of config.peft stays as a
  record; frozen_dtype '', an export's params being f32). Any other method keeps its
  parameters and config.peft, and checkpoint.load_pretrained wraps the model again (`wrap`)."""
  p = from_config(config)
  if p is None or p.method not in MERGEABLE:
    return params, config
  config = config.copy_and_resolve_references()
  config.peft.method = "none"
  if "frozen_dtype" in config.peft:
    config.peft.frozen_dtype = ""
  return (merge_lora(params, p) if p.method == "lora" else params), config


def check_added(config, params) -> None:
  """Raises ValueError naming peft.target_regex when config.peft's method added no parameter
  to `params` (a model's, e.g. the abstract ones train.py traces before compiling): a target
  that matches no module would otherwise train the head alone, silently."""
  import flax.traverse_util as tu  # pylint: disable=g-import-not-at-top
  p = from_config(config)
  if p is None or p.method == "bitfit":
    return
  keys = ["/".join(k) for k in tu.flatten_dict(params)]
  if any(re.search(rf"(^|/){ADDED}$", k) for k in keys):
    return
  modules = sorted({k.rpartition("/")[0] for k in keys if "/" in k
                    and not re.search(r"encoderblock_[1-9]", k)})  # block 0 stands for all
  given = config.peft.get("target_regex", "")
  target = repr(given) if given else f"'' (the {p.method} default {p.target!r})"
  raise ValueError(f"peft.target_regex={target} matches no module that peft.method="
                   f"{p.method!r} adds parameters to (a full match on the module path); "
                   f"module paths here: {modules[:8]}")
