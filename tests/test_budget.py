"""Parameter counts, FLOPs per token and width matching."""

import jax
import pytest
from flax import nnx

from sessa_jax import budget
from sessa_jax.models import build_model
from sessa_jax.models.config import ModelConfig

MIXERS = ("sessa", "attention", "mamba2")
HYBRIDS = ("sessa,attention", "attention,mamba2")
SMALL = dict(d_model=16, n_heads=4, vocab_size=23, n_layers=2, ssm_head_dim=8,
             ssm_state=4, ssm_chunk=8)


@pytest.mark.parametrize("d", [16, 24])
def test_sessa_block_has_9d2_11d_1_params(d):
  cfg = ModelConfig(mixer="sessa", d_model=d, n_heads=4, n_layers=1,
                    vocab_size=37)
  expected = 9 * d * d + 11 * d + 1
  assert budget.block_params(cfg) == expected
  # The whole model: embedding (tied head) + one block + final LayerNorm.
  assert budget.count_params(cfg) == 37 * d + expected + 2 * d


@pytest.mark.parametrize("mixer", MIXERS + HYBRIDS)
@pytest.mark.parametrize("block,tie", [("gated", True), ("prenorm_mlp", False)])
def test_count_matches_instantiated_model(mixer, block, tie):
  cfg = ModelConfig(mixer=mixer, block=block, tie_embeddings=tie, **SMALL)
  model = build_model(cfg, rngs=nnx.Rngs(0))
  real = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert budget.count_params(cfg) == real


def test_count_of_large_model_allocates_nothing():
  # About 430M float32 parameters (1.7 GB) if they were allocated.
  d, v = 4096, 50_000
  cfg = ModelConfig(mixer="sessa", d_model=d, n_heads=32, n_layers=2,
                    vocab_size=v)
  assert (budget.count_params(cfg)
          == v * d + 2 * (9 * d * d + 11 * d + 1) + 2 * d)


def test_flops_follow_the_convention():
  t = 100
  att = ModelConfig(mixer="attention", **SMALL)
  d, v, n = att.d_model, att.vocab_size, att.n_layers
  dense = 2 * d * d + 4 * d * d + d * d  # W_in, q/k/v/o, W_out
  assert budget.flops_per_token(att, t) == 2 * (n * (dense + t * d) + d * v)
  # Sessa adds the feedback projection (2D^2) and two more causal products.
  ses = att.replace(mixer="sessa")
  assert budget.flops_per_token(ses, t) == pytest.approx(
      budget.flops_per_token(att, t) + 2 * n * (2 * d * d + t * d))
  no_fb = ses.replace(feedback=False)
  assert budget.flops_per_token(no_fb, t) == budget.flops_per_token(att, t)


@pytest.mark.parametrize("first, second", [("sessa", "attention"),
                                           ("mamba2", "sessa")])
def test_hybrid_flops_and_params_add_up_per_layer(first, second):
  # Two blocks, one of each mixer: half of each pure stack's block costs.
  hybrid = ModelConfig(mixer=f"{first},{second}", **SMALL)
  pure = [hybrid.replace(mixer=m) for m in (first, second)]
  head = 2 * hybrid.d_model * hybrid.vocab_size
  for t in (8, 100):
    assert budget.flops_per_token(hybrid, t) == pytest.approx(
        head + sum(budget.flops_per_token(c, t) - head for c in pure) / 2)
  embed_norm = budget.count_params(pure[0]) - 2 * budget.block_params(pure[0])
  assert budget.count_params(hybrid) == embed_norm + sum(
      budget.block_params(c) for c in pure)


def test_mamba2_flops():
  cfg = ModelConfig(mixer="mamba2", **SMALL)
  d, e, n, ell = cfg.d_model, cfg.ssm_inner, cfg.ssm_state, cfg.ssm_chunk
  h, k = e // cfg.ssm_head_dim, cfg.ssm_conv
  # W_in, W_out; x, B/C, dt projections; depthwise conv taps; out_proj.
  dense = 3 * d * d + d * (e + 2 * n + h) + k * (e + 2 * n) + e * d
  ssd = (n + e) * ell / 2 + 2 * e * n + e * n / ell
  expected = 2 * (cfg.n_layers * (dense + ssd) + d * cfg.vocab_size)
  assert budget.flops_per_token(cfg, 1000) == pytest.approx(expected)
  # Past one chunk the cost per token no longer grows with T.
  assert budget.flops_per_token(cfg, 1000) == budget.flops_per_token(cfg, 64)
  assert budget.flops_per_token(cfg, 4) < budget.flops_per_token(cfg, 8)


@pytest.mark.parametrize("mixer", MIXERS + HYBRIDS)
def test_match_lands_within_two_percent(mixer):
  cfg = ModelConfig(mixer=mixer, n_layers=4, n_heads=4, ssm_head_dim=16,
                    ssm_state=16)
  step = budget.width_step(cfg)
  for target in (20_000_000, 60_000_000):
    matched = budget.match(cfg, target)
    assert matched.d_model % step == 0
    assert abs(budget.count_params(matched) / target - 1) <= 0.02
    assert matched.replace(d_model=cfg.d_model) == cfg  # only d_model moved


def test_width_step():
  assert budget.width_step(ModelConfig(mixer="sessa", n_heads=8)) == 16
  assert budget.width_step(ModelConfig(mixer="mamba2", ssm_head_dim=64)) == 32
  assert budget.width_step(
      ModelConfig(mixer="mamba2", ssm_head_dim=8, ssm_expand=3)) == 8
  # A hybrid stack needs a width valid for each of its mixers.
  assert budget.width_step(ModelConfig(mixer="sessa,mamba2", n_heads=2,
                                       ssm_head_dim=64)) == 32
  assert budget.width_step(ModelConfig(mixer="sessa,mamba2", d_model=96,
                                       n_heads=6, ssm_head_dim=16)) == 24


@pytest.mark.parametrize("mixer", ("sessa", "mamba2", "attention,sessa"))
def test_match_small_models_use_the_fine_knob(mixer):
  # Near 140k parameters neighbouring widths are >2% apart; the feedback width
  # (Sessa) or state size (Mamba-2) closes the gap.
  target = budget.count_params(
      ModelConfig(mixer="attention", d_model=96, n_layers=2, n_heads=2,
                  vocab_size=64))
  cfg = ModelConfig(mixer=mixer, n_layers=2, n_heads=2, vocab_size=64,
                    ssm_head_dim=16, ssm_state=16)
  for tgt in (target, int(target * 1.07), int(target * 0.93)):
    matched = budget.match(cfg, tgt)
    assert abs(budget.count_params(matched) / tgt - 1) <= 0.02
    assert matched.d_model % budget.width_step(cfg) == 0


def test_match_explains_an_impossible_target():
  cfg = ModelConfig(mixer="attention", n_layers=2, n_heads=4)
  with pytest.raises(ValueError, match=r"no model\.d_model \(a multiple of 8"):
    budget.match(cfg, 100_000)  # widths 8 apart differ by ~10% here
  with pytest.raises(ValueError, match="target_params"):
    budget.match(cfg, 0)
