"""A checkpoint saved under one mesh restores under another, and workdir paths are agnostic.

Orbax restores each array straight into the shardings of the abstract state it is given,
so a run may resume on a different topology (more hosts, another rule set).
"""

from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from data import build
from model import sharding as sharding_lib
from model.config import get_preset
from model.transformer import Transformer
from tests.conftest import tiny_config
from train import checkpoint
from train.optim import make_optimizer
from train.state import param_shardings, state_shardings

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py forces 8 CPU devices)"
)

SAVE_MESH, SAVE_RULES = (2, 4, 1), "fsdp"


def state_on(mesh_shape, rules: str):
    """(abstract TrainState, its shardings) of the tiny model on this mesh."""
    model = Transformer(get_preset("tiny"))
    mesh = sharding_lib.make_mesh(mesh_shape)
    abstract_params, p_shardings = param_shardings(model, mesh, sharding_lib.get_rules(rules))
    tx, _ = make_optimizer(tiny_config().optimizer, 10, abstract_params)
    return state_shardings(abstract_params, p_shardings, tx, mesh)


def random_like(abstract, seed: int = 0):
    """Host arrays of random values shaped like `abstract` (no Adam moment stays zero)."""
    rng = np.random.default_rng(seed)

    def fill(a):
        if np.issubdtype(a.dtype, np.integer):
            return rng.integers(0, 1000, a.shape).astype(a.dtype)
        return rng.standard_normal(a.shape).astype(a.dtype)

    return jax.tree.map(fill, abstract)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint of a (random) train state laid out on (2, 4, 1) "fsdp": (workdir, state)."""
    abstract, shardings = state_on(SAVE_MESH, SAVE_RULES)
    expected = random_like(abstract)
    state = jax.device_put(expected, shardings)
    # An epath.Path workdir goes through the same code as a gs:// URI would.
    path = epath.Path(tmp_path_factory.mktemp("reshard"))
    manager = checkpoint.make_manager(path, keep=1, async_save=False)
    checkpoint.save(manager, 1, state, ocp.args.JsonSave({"position": 7}))
    manager.close()
    return path, expected


@pytest.mark.parametrize(
    "mesh_shape, rules", [((1, 2, 4), "fsdp_tp"), ((8, 1, 1), "dp"), ((2, 2, 2), "fsdp_tp")]
)
def test_checkpoint_restores_onto_another_mesh(saved, mesh_shape, rules):
    path, expected = saved
    abstract, shardings = state_on(mesh_shape, rules)
    manager = checkpoint.make_manager(str(path), keep=1, async_save=False)
    restored = checkpoint.restore(manager, abstract, ocp.args.JsonRestore())
    manager.close()

    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), expected)
    with ocp.CheckpointManager(checkpoint.checkpoint_dir(path), item_names=("data",)) as reader:
        data = reader.restore(1, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
    assert data["data"] == {"position": 7}  # the producer's state sits in the same step
    jax.tree.map(assert_sharded_as, restored, shardings)
    assert dict(restored.params["embed"]["embedding"].sharding.mesh.shape) != dict(
        zip(sharding_lib.MESH_AXES, SAVE_MESH, strict=True)
    )


def assert_sharded_as(x: jax.Array, sharding) -> None:
    """`x` lives on `sharding`'s mesh with its partition spec."""
    assert x.sharding.mesh.shape == sharding.mesh.shape
    assert x.sharding.spec == sharding.spec


def test_load_params_without_shardings_lands_on_one_device(saved):
    path, expected = saved
    params, step = checkpoint.load_params(path)
    assert step == 1 and checkpoint.latest_step(str(path)) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), expected.params)
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    assert all(x.sharding == one_device for x in jax.tree.leaves(params))  # not the saved mesh


def test_relative_workdir_becomes_an_absolute_checkpoint_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert checkpoint.checkpoint_dir("run") == epath.Path(tmp_path / "run" / "checkpoints")
    assert checkpoint.checkpoint_dir("gs://bucket/run") == epath.Path("gs://bucket/run/checkpoints")
    assert checkpoint.latest_step("run") is None


def test_remote_workdirs_keep_data_in_a_local_cache(tmp_path):
    assert build.is_remote("gs://bucket/run") and not build.is_remote(str(tmp_path))
    assert build.data_root_for("gs://bucket/run") == epath.Path(build.LOCAL_DATA_CACHE)
    assert build.data_root_for(tmp_path) == epath.Path(tmp_path / "data")
