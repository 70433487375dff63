"""Config validation and files, optimizer pieces, mesh rules (no training)."""

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from sessa_jax.train import config as config_lib
from sessa_jax.train import optimizer as optimizer_lib
from sessa_jax.train import sharding as sharding_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ("default.py", "symbol_soup.py", "diffuse_mqar.py", "mqar.py",
           "text_lm.py")


def _config(**train):
  return config_lib.base_config(
      model=dict(d_model=16, n_layers=1, n_heads=2),
      data=dict(task="mqar", seq_len=16, vocab_size=16, num_kv_pairs=2),
      train=dict(steps=4, **train))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_file_validates(name):
  path = ROOT / "configs" / name
  if not path.exists():
    pytest.skip(f"{name} needs a task that is not registered yet")
  exp = config_lib.validate(config_lib.load_config(str(path)))
  assert exp.train.steps > 0 and exp.data["task"]


def test_config_argument_picks_mixer_and_size():
  config = config_lib.load_config(str(ROOT / "configs/mqar.py:mamba2,small"))
  assert config.model.mixer == "mamba2"
  assert config.model.d_model == config_lib.MODEL_SIZES["small"]["d_model"]
  with pytest.raises(ValueError,
                     match="neither a mixer .*sessa.*nor a size .*tiny"):
    config_lib.load_config(str(ROOT / "configs/mqar.py:transformer"))


@pytest.mark.parametrize("section,key,message", [
    ("train", "learning_rate",
     r"unknown config key 'train\.learning_rate'; known keys of train: .*lr"),
    ("mesh", "model",
     r"unknown config key 'mesh\.model'; known keys of mesh: data, fsdp, "
     r"tensor"),
    ("model", "width",
     r"unknown config key 'model\.width'; known keys of model: .*d_model"),
])
def test_unknown_key_names_choices(section, key, message):
  raw = _config().to_dict()
  raw[section][key] = 1
  with pytest.raises(ValueError, match=message):
    config_lib.validate(raw)


def test_unknown_section_mixer_and_task_name_choices():
  raw = _config().to_dict()
  with pytest.raises(ValueError,
                     match="known sections: model, data, train, mesh"):
    config_lib.validate({**raw, "optim": {}})
  raw["model"]["mixer"] = "rwkv"
  with pytest.raises(ValueError, match="model.mixer='rwkv' is not one of: "
                     "sessa, attention, mamba2"):
    config_lib.validate(raw)
  with pytest.raises(ValueError,
                     match=r"unknown data.task 'wikitext'; choices: .*mqar"):
    config_lib.base_config(model={}, data=dict(task="wikitext"), train={})


def test_bad_values_name_the_key():
  with pytest.raises(ValueError, match="train.dtype='float16' is not one of"):
    config_lib.validate(_config(dtype="float16").to_dict())
  with pytest.raises(ValueError, match="train.batch_size=10 is not divisible "
                     "by train.grad_accum=4"):
    config_lib.validate(_config(batch_size=10, grad_accum=4).to_dict())
  raw = _config().to_dict()
  raw["model"]["n_heads"] = 3
  with pytest.raises(ValueError, match="model.d_model=16 is not divisible by "
                     "model.n_heads=3"):
    config_lib.validate(raw)


def test_overrides_set_dotted_keys_and_reject_unknown_ones():
  config = config_lib.apply_overrides(_config(), {"train.lr": 0.5,
                                                  "model.n_kv_heads": 1})
  assert config.train.lr == 0.5 and config.model.n_kv_heads == 1
  with pytest.raises(ValueError, match="unknown config key 'train.lrr'; "
                     "known keys of train: .*lr"
                     r".* \(did you mean 'train.lr'\?\)"):
    config_lib.apply_overrides(_config(), {"train.lrr": 0.5})


def test_model_config_takes_task_vocab_and_train_dtype():
  exp = config_lib.validate(_config(dtype="bfloat16").to_dict())
  cfg = exp.model_config(vocab_size=16)
  assert (cfg.vocab_size, cfg.dtype, cfg.param_dtype) == (16, "bfloat16",
                                                          "float32")


def test_schedule_warms_up_then_decays_to_min():
  tc = config_lib.TrainConfig(steps=100, lr=1.0, warmup_steps=10,
                              min_lr_ratio=0.1)
  schedule = optimizer_lib.learning_rate_schedule(tc)
  np.testing.assert_allclose(
      [schedule(0), schedule(5), schedule(10), schedule(100)],
      [0.0, 0.5, 1.0, 0.1], atol=1e-6)
  assert schedule(50) < schedule(20)


def test_weight_decay_skips_vectors_and_scalars():
  params = {"w": jnp.ones((4, 4)), "b": jnp.ones((4,)), "g": jnp.ones(())}
  tc = config_lib.TrainConfig(lr=0.0, weight_decay=0.5, warmup_steps=0,
                              grad_clip=0)
  # Zero gradients: only weight decay moves a parameter.
  tx = optax.adamw(0.1, weight_decay=0.5, mask=optimizer_lib.decay_mask)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params),
                         params)
  assert float(jnp.abs(updates["w"]).max()) > 0
  assert float(jnp.abs(updates["b"]).max()) == 0
  assert float(jnp.abs(updates["g"]).max()) == 0
  assert optimizer_lib.decay_mask(params) == {"w": True, "b": False, "g": False}
  tx = optimizer_lib.make_optimizer(tc)  # lr 0 throughout: nothing moves.
  updates, _ = tx.update(params, tx.init(params), params)
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))


def test_mesh_fills_minus_one_and_checks_sizes():
  mesh_shape = lambda **axes: sharding_lib.mesh_shape(
      config_lib.MeshConfig(**axes), 8)
  assert mesh_shape(data=-1, fsdp=2, tensor=2) == (2, 2, 2)
  assert mesh_shape(data=2, fsdp=-1, tensor=1) == (2, 4, 1)
  with pytest.raises(ValueError, match="needs 4 devices, but 8 are available"):
    sharding_lib.mesh_shape(config_lib.MeshConfig(data=4, fsdp=1, tensor=1), 8)
  with pytest.raises(ValueError, match="at most one of mesh"):
    config_lib.MeshConfig(data=-1, fsdp=-1)
  mesh = sharding_lib.make_mesh(config_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_logical_rules_map_names_to_mesh_axes():
  mesh = sharding_lib.make_mesh(config_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  spec = sharding_lib.logical_to_spec
  assert spec(("vocab", "embed"), (32, 16), mesh) == P("tensor", "fsdp")
  assert spec(("embed", "hidden"), (16, 64), mesh) == P("fsdp", "tensor")
  assert spec(("hidden",), (64,), mesh) == P("tensor")
  assert spec((None, "embed"), (3, 16), mesh) == P(None, "fsdp")
  assert spec(("vocab", "embed"), (33, 16), mesh) == P(None, "fsdp")  # 33 odd
  assert spec(None, (4,), mesh) == P()
  # Activations: the batch takes 'fsdp' first, so their embed dim stays whole.
  assert spec(("batch", "sequence", "embed"), (8, 5, 16), mesh) == P(
      ("data", "fsdp"), None, None)
  assert spec(("batch", "sequence", "heads", "head_dim"), (8, 5, 4, 4),
              mesh) == P(("data", "fsdp"), None, "tensor", None)
  with pytest.raises(ValueError, match="unknown logical axis 'layers'"):
    spec(("layers",), (4,), mesh)


def test_config_dict_round_trips_through_json():
  config = _config()
  assert isinstance(config, ml_collections.ConfigDict)
  exp = config_lib.validate(ml_collections.ConfigDict(config.to_dict()))
  assert exp.raw["model"]["n_kv_heads"] is None
