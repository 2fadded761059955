"""Sharded training equals single-device training, and parameters are sharded as the rules say.

Tolerance: the meshes reduce the same float32 sums in different orders (per-device partial
sums, then all-reduce), so losses agree to float32 round-off amplified by a few Adam steps;
we allow rtol=2e-4 on the loss over 6 steps, far below any real divergence (a wrong batch
split or a missing gradient all-reduce changes the loss at the 1e-2 level from step 2).
"""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import tiny_vit_config
from jax_transfer import metrics as metrics_lib, parallel, train

MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]


def _run(data_dir, tmp_path, mesh):
  c = tiny_vit_config(data_dir)
  c.total_steps, c.log_every_steps, c.eval_every_steps = 6, 1, 6
  c.checkpoint_every_steps = 100
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  devices = jax.devices()[:int(np.prod(mesh))]
  workdir = str(tmp_path / ("mesh_" + "x".join(map(str, mesh))))
  state, final = train.train_and_evaluate(c, workdir, devices=devices)
  losses = [m["train/loss"] for m in metrics_lib.read_jsonl(workdir) if "train/loss" in m]
  return state, np.array(losses), final


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("meshes")
  return {mesh: _run(data_dir, tmp, mesh) for mesh in MESHES}


@pytest.mark.parametrize("mesh", MESHES[1:])
def test_meshes_give_same_losses(runs, mesh):
  ref = runs[(1, 1, 1)][1]
  assert len(ref) == 6
  np.testing.assert_allclose(runs[mesh][1], ref, rtol=2e-4)
  np.testing.assert_allclose(runs[mesh][2]["eval/accuracy"], runs[(1, 1, 1)][2]["eval/accuracy"],
                             atol=1 / 64)  # At most one eval example flips.


def test_params_sharded_as_rules_say(runs):
  state = runs[(2, 2, 2)][0]
  p = state.params
  # ('embed' -> fsdp, 'mlp' -> tensor): fc1 kernel [embed, mlp] is split both ways.
  assert p["encoderblock_0"]["mlp"]["fc1"]["kernel"].sharding.spec == P("fsdp", "tensor")
  assert p["encoderblock_0"]["mlp"]["fc2"]["kernel"].sharding.spec == P("tensor", "fsdp")
  # qkv [embed, 3, heads, kv]: heads -> tensor.
  assert p["encoderblock_0"]["attn"]["qkv"]["kernel"].sharding.spec == P("fsdp", None, "tensor", None)
  # Each device holds a quarter of fc1 (fsdp=2 x tensor=2), i.e. it really is split.
  fc1 = p["encoderblock_0"]["mlp"]["fc1"]["kernel"]
  shard = fc1.addressable_shards[0].data
  assert shard.size * 4 == fc1.size
  # Adam moments follow their parameters' sharding.
  # opt_state = (clip, adamw = (scale_by_adam, ...)).
  mu = state.opt_state[1][0].mu
  assert mu["encoderblock_0"]["mlp"]["fc1"]["kernel"].sharding.spec == P("fsdp", "tensor")


def test_pspec_replicates_indivisible_dims():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = parallel.rules_from_config([("classes", "tensor"), ("embed", "fsdp")])
  # 5 classes cannot be split over tensor=2: replicated instead of an error.
  assert parallel.logical_to_pspec(("embed", "classes"), (32, 5), mesh, rules) == P("fsdp", None)
  assert parallel.logical_to_pspec(("embed", "classes"), (32, 6), mesh, rules) == P("fsdp", "tensor")


@pytest.mark.parametrize("mesh_cfg,msg", [
    ({"data": 3, "fsdp": 1, "tensor": 1}, "needs 3 devices, but 8 exist"),
    ({"data": -1, "fsdp": 3, "tensor": 1}, "needs a multiple of 3 devices"),
    ({"data": -1, "fsdp": -1, "tensor": 1}, "at most one axis may be -1"),
    ({"data": 0, "fsdp": 1, "tensor": 1}, "mesh.data"),
])
def test_bad_mesh_messages(mesh_cfg, msg):
  with pytest.raises(ValueError, match=msg):
    parallel.resolve_mesh_shape(mesh_cfg, 8)


def test_global_batch_from_local_slices():
  mesh = parallel.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  g = parallel.global_batch({"x": x}, mesh)["x"]
  assert g.shape == (16, 3) and g.sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(np.asarray(g), x)
  assert len({s.index[0].start for s in g.addressable_shards}) == 8  # 8 distinct row blocks.
