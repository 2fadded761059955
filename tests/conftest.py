"""Test set-up: 8 simulated CPU devices (set before jax is imported anywhere) and one
embedded-data directory for the whole session."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test session (inherited by the CLI subprocesses): the
# many tiny runs compile the same programs again and again. Cached executables are the same
# binaries, so results do not change.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jax_transfer_cache_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """Embedded datasets (and the shapes_wds shards) built once per session;
  JAX_TRANSFER_DATA_DIR points code at them."""
  from jax_transfer.data import builders
  path = os.environ.get("JAX_TRANSFER_TEST_DATA_DIR") or str(tmp_path_factory.mktemp("tfds"))
  for name in builders.EMBEDDED:
    builders.ensure_embedded(name, path)
  builders.ensure_shapes_wds(path)
  os.environ["JAX_TRANSFER_DATA_DIR"] = path
  return path


def tiny_vit_config(data_dir, arg="runlocal"):
  """The default digits config shrunk to a 'nano' ViT: what most loop tests train."""
  from ml_collections_configs.supervised import digits_vit
  c = digits_vit.get_config(arg)
  c.input.data_dir = data_dir
  c.model.variant = "nano/2"
  c.input.global_batch_size = 16
  c.eval.batch_size = 64
  return c


@pytest.fixture(scope="session")
def exports(tmp_path_factory, data_dir):
  """A tiny digits ViT export (the base) and three 'fine-tunes' of it (perturbed params,
  config.init.export_dir = the base), plus one of another width and one from another base."""
  import flax.linen as nn
  import jax
  import numpy as np
  from jax_transfer import checkpoint, methods
  root = tmp_path_factory.mktemp("merge")
  c = tiny_vit_config(data_dir)
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  method = methods.get_method(c.method)(c, mesh)
  flat = checkpoint.flatten(jax.device_get(nn.unbox(method.init_params(jax.random.key(0)))))
  rng = np.random.default_rng(0)
  for k in ("head/kernel", "head/bias"):  # a zero head would give every other param no grad
    flat[k] = (0.3 * rng.standard_normal(flat[k].shape)).astype(flat[k].dtype)
  params = checkpoint.unflatten(flat)
  base = str(root / "base")
  checkpoint.export(params, c, base)
  out = {"base": base, "models": []}
  for i in range(3):
    ft = {k: v + 0.1 * rng.standard_normal(v.shape).astype(v.dtype) for k, v in flat.items()}
    cf = tiny_vit_config(data_dir)
    cf.init.export_dir = base
    d = str(root / f"ft{i}")
    checkpoint.export(checkpoint.unflatten(ft), cf, d)
    out["models"].append(d)
  wide = tiny_vit_config(data_dir)
  wide.model.variant = "mu/2"
  wm = methods.get_method(wide.method)(wide, mesh)
  out["wide"] = str(root / "wide")
  checkpoint.export(jax.device_get(nn.unbox(wm.init_params(jax.random.key(0)))), wide,
                    out["wide"])
  other = tiny_vit_config(data_dir)
  other.init.export_dir = str(root / "elsewhere")
  out["other_base"] = str(root / "other")
  checkpoint.export(params, other, out["other_base"])
  return out
