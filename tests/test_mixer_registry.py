"""The mixer registry: a fourth mixer defined here runs everywhere a mixer does.

`CausalConvMixer` (a depthwise causal convolution of width `ssm_conv` and a
projection) is written and registered in this file only; the tests build,
train, decode, count and budget-match it through the code that serves the
built-in mixers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sessa_jax import budget
from sessa_jax.models import LanguageModel, ModelConfig, make_mixer, mixers
from sessa_jax.models.layers import Linear, param, torch_uniform
from sessa_jax.train import config as config_lib
from sessa_jax.train import trainer

NAME = "causal_conv"


class CausalConvMixer(nnx.Module):
  """y_t = W (sum_i taps_i * x_{t-K+1+i}) + b; caches the last K-1 inputs."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.width = cfg.ssm_conv
    self.taps = param(rngs, torch_uniform(cfg.ssm_conv),
                      (cfg.ssm_conv, cfg.d_model), (None, "embed"),
                      jnp.dtype(cfg.param_dtype))
    self.proj = Linear(cfg.d_model, cfg.d_model, rngs=rngs,
                       axes=("embed", "embed"), dtype=jnp.dtype(cfg.dtype),
                       param_dtype=jnp.dtype(cfg.param_dtype))

  def _conv(self, x_btd, history_bkd):
    full = jnp.concatenate([history_bkd.astype(x_btd.dtype), x_btd], axis=1)
    t = x_btd.shape[1]
    taps = self.taps[...].astype(x_btd.dtype)
    mixed = sum(full[:, i:i + t] * taps[i] for i in range(self.width))
    return self.proj(mixed), full[:, -(self.width - 1):]

  def __call__(self, x_btd):
    return self.prefill(x_btd, x_btd.shape[1])[0]

  def init_cache(self, batch_size, max_len):
    del max_len
    return {"history": jnp.zeros((batch_size, self.width - 1,
                                  self.taps.shape[1]))}

  def prefill(self, x_btd, max_len):
    y, history = self._conv(x_btd, self.init_cache(x_btd.shape[0], max_len)
                            ["history"])
    return y, {"history": history}

  def decode_step(self, x_bd, cache):
    y, history = self._conv(x_bd[:, None], cache["history"])
    return y[:, 0], {"history": history}


def _validate(cfg: ModelConfig) -> None:
  if cfg.ssm_conv < 2:
    raise ValueError(f"model.ssm_conv={cfg.ssm_conv} must be >= 2 for "
                     f"mixer {NAME!r}")


def _mixer_params(cfg: ModelConfig) -> int:
  """taps (K, D), projection kernel (D, D) and bias (D,)."""
  d = cfg.d_model
  return cfg.ssm_conv * d + d * d + d


# Every weight of this mixer is dense (the taps too, by the FLOP convention),
# so it has no products along the sequence beyond them.
SPEC = mixers.MixerSpec(build=CausalConvMixer,
                        causal_macs=lambda cfg, seq_len: 0.0,
                        width_step=lambda cfg: 4, validate=_validate)


@pytest.fixture(autouse=True, scope="module")
def registered():
  """Registers the mixer for this module's tests and unregisters it after."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(mixers, "_SPECS", dict(mixers._SPECS))  # pylint: disable=protected-access
    mixers.register(NAME, SPEC)
    yield


def _cfg(**changes) -> ModelConfig:
  return ModelConfig(**{**dict(mixer=NAME, vocab_size=32, d_model=16,
                               n_layers=2, ssm_conv=3), **changes})


def test_registered_after_the_built_in_mixers():
  assert mixers.names() == ("sessa", "attention", "mamba2", NAME)
  assert mixers.get(NAME) is SPEC


def test_unknown_mixer_lists_the_choices():
  choices = f"sessa, attention, mamba2, {NAME}"
  with pytest.raises(ValueError, match=f"unknown mixer 'rwkv'; registered "
                     f"mixers: {choices}"):
    mixers.get("rwkv")
  with pytest.raises(ValueError,
                     match=f"model.mixer='rwkv' is not one of: {choices}"):
    ModelConfig(mixer="rwkv")
  with pytest.raises(ValueError, match="neither a mixer .*causal_conv"):
    config_lib.parse_arg("rwkv", {"tiny": {}}, "tiny")
  assert config_lib.parse_arg(f"{NAME},tiny", {"tiny": {}}, "x") == (NAME,
                                                                     "tiny")


def test_register_rejects_duplicates_and_commas():
  with pytest.raises(ValueError, match="already registered"):
    mixers.register(NAME, SPEC)
  with pytest.raises(ValueError, match="without commas"):
    mixers.register("a,b", SPEC)


def test_the_spec_validates_configs_that_use_it():
  with pytest.raises(ValueError, match=r"model\.ssm_conv=1 must be >= 2"):
    _cfg(ssm_conv=1)
  with pytest.raises(ValueError, match=r"model\.ssm_conv=1"):
    _cfg(mixer=f"sessa,{NAME}", ssm_conv=1)
  ModelConfig(mixer="sessa", ssm_conv=1)  # Not checked where unused.


def test_a_module_without_the_protocol_is_refused(monkeypatch):
  monkeypatch.setattr(mixers, "_SPECS", dict(mixers._SPECS))  # pylint: disable=protected-access
  broken = mixers.MixerSpec(build=lambda cfg, rngs: nnx.Module(),
                            causal_macs=SPEC.causal_macs,
                            width_step=SPEC.width_step)
  mixers.register("broken", broken)
  with pytest.raises(TypeError, match="lacks a method of the mixers.Mixer"):
    make_mixer(_cfg(mixer="broken"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("block", ["gated", "prenorm_mlp"])
@pytest.mark.parametrize("mixer", [NAME, f"{NAME},sessa"])
def test_decode_after_prefill_matches_the_full_forward(mixer, block):
  cfg = _cfg(mixer=mixer, block=block, n_heads=2)
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
  full = model(tokens)
  logits, cache = model.prefill(tokens[:, :4], tokens.shape[1])
  steps = [logits[:, -1]]
  for t in range(4, tokens.shape[1] - 1):
    step, cache = model.decode_step(tokens[:, t], cache)
    steps.append(step)
  np.testing.assert_allclose(logits, full[:, :4], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jnp.stack(steps, 1), full[:, 3:-1], rtol=1e-5,
                             atol=1e-5)


def test_parameters_and_flops_are_counted():
  cfg = _cfg()
  mixer = make_mixer(cfg, rngs=nnx.Rngs(0))
  sizes = [x.size for x in jax.tree.leaves(nnx.state(mixer, nnx.Param))]
  assert sum(sizes) == _mixer_params(cfg)
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  real = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert budget.count_params(cfg) == real
  d, k = cfg.d_model, cfg.ssm_conv
  # Gated block: in_proj D x 2D, out_proj D x D, the mixer's taps and kernel.
  dense_per_block = 2 * d * d + d * d + k * d + d * d
  assert budget.flops_per_token(cfg, 64) == 2.0 * (
      cfg.n_layers * dense_per_block + d * cfg.vocab_size)


def test_budget_matching_keeps_the_width_step():
  cfg = _cfg()
  assert budget.width_step(cfg) == 4
  assert budget.width_step(cfg.replace(mixer=f"{NAME},sessa",
                                       n_heads=4)) == 8
  matched = budget.match(cfg, 20_000, tol=0.05)
  assert matched.d_model % 4 == 0
  assert abs(budget.count_params(matched) / 20_000 - 1) <= 0.05


def test_trains_through_the_trainer(tmp_path):
  config = config_lib.base_config(
      model=dict(mixer=NAME, d_model=16, n_layers=1, ssm_conv=3),
      data=dict(task="mqar", seq_len=16, vocab_size=16, num_kv_pairs=2,
                num_train=64, num_val=16, num_test=16),
      train=dict(steps=3, batch_size=8, lr=1e-2, warmup_steps=1,
                 eval_every=0, eval_batches=1, test_batches=1,
                 checkpoint_every=3, log_every=1))
  summary = trainer.train(config, tmp_path)
  assert summary["steps"] == 3 and summary["model"] == NAME
  assert np.isfinite(summary["test/loss"])
