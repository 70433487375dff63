"""ModelConfig validation: a bad config fails when built, naming the key."""

import pytest

from flax import nnx

from sessa_jax.models import ModelConfig, build_model


@pytest.mark.parametrize("kw, key", [
    (dict(d_model=30, n_heads=4), "model.d_model"),
    (dict(d_model=12, n_heads=4), "model.n_heads"),          # head dim 3 is odd
    (dict(d_model=24, n_heads=4, n_kv_heads=3), "model.n_kv_heads"),
    (dict(d_model=24, n_heads=4, n_kv_heads=0), "model.n_kv_heads"),
    (dict(gamma_max=1.0), "model.gamma_max"),
    (dict(gamma_max=0.0), "model.gamma_max"),
    (dict(gamma_max=-0.5), "model.gamma_max"),
    (dict(mixer="rnn"), "model.mixer"),
    (dict(block="post"), "model.block"),
    (dict(gamma_form="sigmoid"), "model.gamma_form"),
    (dict(attention_impl="flash"), "model.attention_impl"),
    (dict(feedback_impl="magic"), "model.feedback_impl"),
    (dict(dtype="float16"), "model.dtype"),
    (dict(d_model=0), "model.d_model"),
    (dict(feedback_dim=0), "model.feedback_dim"),
])
def test_bad_config_names_key(kw, key):
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    ModelConfig(**kw)


def test_choice_errors_list_the_choices():
  with pytest.raises(ValueError, match="sessa, attention, mamba2"):
    ModelConfig(mixer="rnn")


def test_replace_validates():
  with pytest.raises(ValueError, match=r"model\.n_heads"):
    ModelConfig().replace(n_heads=3)


def test_a_model_needs_its_vocabulary_size():
  cfg = ModelConfig(vocab_size=None)  # Allowed: the trainer fills it in.
  with pytest.raises(ValueError, match=r"model\.vocab_size is None"):
    build_model(cfg, rngs=nnx.Rngs(0))


def test_attention_rules_do_not_apply_to_mamba2():
  cfg = ModelConfig(mixer="mamba2", d_model=30, n_heads=4, ssm_head_dim=10)
  assert cfg.d_model == 30


def test_derived_sizes():
  cfg = ModelConfig(d_model=24, n_heads=4, n_kv_heads=2, feedback_dim=8)
  assert (cfg.head_dim, cfg.kv_heads, cfg.fb_dim) == (6, 2, 8)
  assert ModelConfig(d_model=24).fb_dim == 24
