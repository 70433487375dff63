"""Decode reads only the filled cache rows, in blocks, and equals prefill."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from helpers import normal, prefill_then_decode
from sessa_jax.kernels import cached_attention
from sessa_jax.models import LanguageModel, MixerBlock, ModelConfig


def _reference(q, k, v, length, scale):
  """Plain masked softmax over rows < length, in float64 NumPy."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bkgd,bskd->bkgs", q, k)[..., :length] * scale
  if length == 0:
    return np.zeros(q.shape[:3] + v.shape[-1:])
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bkgs,bske->bkge", w, v[:, :length])


@pytest.mark.parametrize("length", [0, 1, 3, 4, 5, 12, 20, 21])
def test_attend_matches_masked_softmax_across_blocks(length):
  # Capacity 21 is not a multiple of the 4-row block: the last block overhangs.
  q, k, v = (normal(0, (2, 2, 3, 8)), normal(1, (2, 21, 2, 8)),
             normal(2, (2, 21, 2, 5)))
  # Rows at and beyond `length` hold garbage that must not be read.
  out = jax.jit(cached_attention.attend, static_argnames=("scale", "block"))(
      q, k, v, jnp.int32(length), scale=0.3, block=4)
  np.testing.assert_allclose(out, _reference(q, k, v, length, 0.3),
                             rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("mixer", ["sessa", "attention"])
def test_decode_equals_forward_across_cache_blocks(mixer, monkeypatch):
  monkeypatch.setattr(cached_attention, "DECODE_BLOCK", 4)
  cfg = ModelConfig(mixer=mixer, d_model=16, n_heads=4, n_kv_heads=2,
                    n_layers=1, vocab_size=32)
  block = MixerBlock(cfg, rngs=nnx.Rngs(0))
  x = normal(3, (2, 19, 16))
  want = nnx.jit(lambda m, x: m(x))(block, x)
  # Prompts ending inside, at and right after a block; capacity 23 overhangs.
  for prompt_len in (1, 4, 6):
    got = prefill_then_decode(block, x, prompt_len, max_len=23)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5,
                               err_msg=f"prompt {prompt_len}")


def test_generate_matches_greedy_forward_across_cache_blocks(monkeypatch):
  monkeypatch.setattr(cached_attention, "DECODE_BLOCK", 4)
  model = LanguageModel(ModelConfig(mixer="sessa", d_model=16, n_heads=2,
                                    n_layers=2, vocab_size=32),
                        rngs=nnx.Rngs(0))
  prompt = jnp.asarray(np.random.default_rng(4).integers(0, 32, (2, 3)),
                       jnp.int32)
  out = model.generate(prompt, 10)
  # Each generated token is the argmax of the full forward over its prefix.
  logits = nnx.jit(lambda m, t: m(t))(model, out[:, :-1])
  np.testing.assert_array_equal(out[:, 3:], jnp.argmax(logits[:, 2:], -1))


def test_bench_decode_helpers():
  from experiments import bench  # pylint: disable=g-import-not-at-top
  model = LanguageModel(ModelConfig(mixer="sessa", d_model=16, n_heads=2,
                                    n_layers=1, vocab_size=32),
                        rngs=nnx.Rngs(0))
  # Per token: keys and values (H x d = D each), feedback keys and outputs
  # (D each), float32.
  assert bench.cache_bytes(model, 20) - bench.cache_bytes(model, 10) == (
      10 * 4 * 16 * 4)
  timing = bench.decode_step_ms(model, 2, 5, 16, steps=2)
  assert timing["ms_per_token"] > 0 and timing["steps"] == 2


def test_generate_compiles_once_for_new_prompts_of_a_shape():
  from sessa_jax.models import lm  # pylint: disable=g-import-not-at-top
  model = LanguageModel(ModelConfig(mixer="attention", d_model=16, n_heads=2,
                                    n_layers=1, vocab_size=32),
                        rngs=nnx.Rngs(0))
  prompt = jnp.asarray(np.random.default_rng(5).integers(0, 32, (2, 3)),
                       jnp.int32)
  model.generate(prompt, 7)
  model.generate(prompt, 7, rng=jax.random.key(1), temperature=0.5, top_k=4)
  # One program for greedy decoding, one for sampling; new prompt values,
  # keys, temperatures and top_k reuse them.
  compiled = lm._generate._cache_size()  # pylint: disable=protected-access
  model.generate((prompt + 1) % 32, 7)
  model.generate(prompt, 7, rng=jax.random.key(2), temperature=0.9, top_k=8)
  assert lm._generate._cache_size() == compiled  # pylint: disable=protected-access
