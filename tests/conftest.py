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
