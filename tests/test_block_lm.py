"""MixerBlock and LanguageModel: causality, prefill/decode, generate, sizes."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from helpers import forward, normal, prefill_then_decode, rel
from sessa_jax.models import LanguageModel, MixerBlock, ModelConfig, build_model

MIXERS = ("sessa", "attention", "mamba2")
# Hybrid stacks: a per-layer pattern cycled over the depth.
HYBRIDS = ("sessa,attention", "mamba2,sessa,attention")


def _cfg(mixer, block="gated", **kw):
  base = dict(mixer=mixer, block=block, d_model=16, n_heads=2, n_kv_heads=1,
              n_layers=2, vocab_size=32, ssm_head_dim=8, ssm_state=4,
              ssm_chunk=4)
  base.update(kw)
  return ModelConfig(**base)


@pytest.mark.parametrize("block", ["gated", "prenorm_mlp"])
@pytest.mark.parametrize("mixer", MIXERS)
def test_block_causal_and_decode_matches_forward(mixer, block):
  module = MixerBlock(_cfg(mixer, block), rngs=nnx.Rngs(0))
  x = normal(1, (2, 9, 16))
  y = forward(module, x)
  y_pert = forward(module, x.at[:, 5].add(1.0))
  np.testing.assert_array_equal(y[:, :5], y_pert[:, :5])
  assert np.all(np.abs(np.asarray(y_pert - y)[:, 5]).max(-1) > 1e-3)
  # decode_step takes (B, D) or (B, 1, D) and answers in the same shape.
  assert rel(prefill_then_decode(module, x, 3, step_shape=(2, 1, 16)), y) < 1e-5


def test_gated_block_structure():
  block = MixerBlock(_cfg("sessa"), rngs=nnx.Rngs(0))
  assert block.in_proj.kernel.shape == (16, 32)
  assert block.out_proj.kernel.shape == (16, 16)
  assert not hasattr(block, "mlp")
  x = normal(1, (1, 4, 16))
  # With W_out = 0 and b_out = 0 the block is the identity (pure residual).
  block.out_proj.kernel[...] = jnp.zeros((16, 16))
  block.out_proj.bias[...] = jnp.zeros(16)
  np.testing.assert_array_equal(forward(block, x), x)


def test_prenorm_mlp_block_uses_gate_inside_mamba2():
  gated = MixerBlock(_cfg("mamba2"), rngs=nnx.Rngs(0))
  prenorm = MixerBlock(_cfg("mamba2", "prenorm_mlp", mlp_ratio=2),
                       rngs=nnx.Rngs(0))
  assert prenorm.mixer.use_gate and not gated.mixer.use_gate
  assert prenorm.mlp.up.kernel.shape == (16, 32)


# (tests/test_mamba2.py checks the Mamba-2 LM's decode.)
@pytest.mark.parametrize("mixer, tie, layers", [
    ("sessa", True, 2), ("attention", False, 2), (HYBRIDS[0], True, 2),
    (HYBRIDS[1], False, 4)])
def test_lm_decode_matches_forward(mixer, tie, layers):
  model = build_model(_cfg(mixer, tie_embeddings=tie, n_layers=layers),
                      rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 32, (2, 9)),
                       jnp.int32)
  logits = forward(model, tokens)
  assert logits.shape == (2, 9, 32) and logits.dtype == jnp.float32
  pert = forward(model, tokens.at[:, 6].set((tokens[:, 6] + 1) % 32))
  np.testing.assert_array_equal(logits[:, :6], pert[:, :6])
  assert rel(prefill_then_decode(model, tokens, 4), logits) < 1e-5


def test_hybrid_pattern_cycles_over_the_depth():
  cfg = _cfg(HYBRIDS[1], n_layers=4)
  assert cfg.layer_mixers == ("mamba2", "sessa", "attention", "mamba2")
  model = build_model(cfg, rngs=nnx.Rngs(0))
  kinds = [type(b.mixer).__name__ for b in model.blocks]
  assert kinds == ["Mamba2Mixer", "SessaMixer", "AttentionMixer",
                   "Mamba2Mixer"]
  assert all(b.cfg == cfg.layer(i) and b.cfg.mixer == m
             for i, (b, m) in enumerate(zip(model.blocks, cfg.layer_mixers)))
  assert _cfg("sessa").layer(1) == _cfg("sessa")


@pytest.mark.parametrize("mixer, message", [
    ("sessa,rnn", "model.mixer='rnn' (in pattern 'sessa,rnn') is not one of"),
    ("sessa,", "model.mixer='' (in pattern 'sessa,') is not one of"),
    ("sessa,attention,mamba2", "names 3 layers but model.n_layers=2"),
])
def test_bad_hybrid_pattern_names_the_key(mixer, message):
  with pytest.raises(ValueError, match=message.replace(".", r"\.").replace(
      "(", r"\(").replace(")", r"\)")):
    _cfg(mixer)


def test_lm_parts_compose_and_tying():
  cfg = _cfg("sessa")
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 32, (2, 5)),
                       jnp.int32)

  @nnx.jit
  def parts(model, tokens):
    return model(tokens), model.logits(model.hidden(model.embed(tokens)))

  full, composed = parts(model, tokens)
  np.testing.assert_array_equal(full, composed)
  count = lambda m: sum(
      v.size for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
  untied = nnx.eval_shape(
      lambda: LanguageModel(cfg.replace(tie_embeddings=False),
                            rngs=nnx.Rngs(0)))
  assert count(untied) - count(model) == 16 * 32


def test_bfloat16_lm_keeps_float32_params_and_logits():
  model = LanguageModel(_cfg("sessa", dtype="bfloat16"), rngs=nnx.Rngs(0))
  assert all(v.dtype == jnp.float32
             for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 32, (2, 9)),
                       jnp.int32)
  assert forward(model, tokens).dtype == jnp.float32
  assert model.embed(tokens).dtype == jnp.bfloat16


def test_generate_greedy_and_sampled():
  model = LanguageModel(_cfg("sessa", n_layers=1), rngs=nnx.Rngs(0))
  prompt = jnp.asarray(np.random.default_rng(1).integers(0, 32, (2, 3)),
                       jnp.int32)
  out = model.generate(prompt, 5)
  assert out.shape == (2, 8)
  np.testing.assert_array_equal(out[:, :3], prompt)
  # Greedy decoding agrees with argmax of the full forward on its own output.
  logits = forward(model, out)
  np.testing.assert_array_equal(out[:, 3:], jnp.argmax(logits[:, 2:-1], -1))
  # top_k = 1 sampling is greedy; sampling is reproducible given the key and
  # differs between keys.
  key = jax.random.key(7)
  np.testing.assert_array_equal(
      model.generate(prompt, 5, rng=key, temperature=1.0, top_k=1), out)
  sample = lambda key: model.generate(prompt, 5, rng=key, temperature=5.0)
  np.testing.assert_array_equal(sample(key), sample(key))
  assert any(np.any(sample(key) != sample(jax.random.key(i))) for i in range(3))
  with pytest.raises(ValueError, match="rng"):
    model.generate(prompt, 2, temperature=1.0)
  with pytest.raises(ValueError, match="top_k"):
    model.generate(prompt, 2, rng=key, temperature=1.0, top_k=0)


@pytest.mark.parametrize("mixer, block", [("sessa", "gated"),
                                          ("attention", "prenorm_mlp"),
                                          ("mamba2", "gated")])
def test_every_param_has_logical_axes(mixer, block):
  cfg = _cfg(mixer, block, tie_embeddings=False)
  model = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  allowed = {"embed", "hidden", "heads", "vocab", None}
  for path, var in nnx.to_flat_state(params):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == len(var.shape), path
    assert set(axes) <= allowed, (path, axes)
  named = {tuple(str(p) for p in path): var.get_metadata()["out_sharding"]
           for path, var in nnx.to_flat_state(params)}
  assert named[("embedding",)] == ("vocab", "embed")
  assert named[("head", "kernel")] == ("embed", "vocab")
