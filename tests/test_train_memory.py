"""Memory per device follows the mesh (XLA's compiled memory analysis)."""

import jax
import pytest

from experiments import memory_per_device


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
@pytest.mark.parametrize("mixer", [
    "sessa",
    pytest.param("attention", marks=pytest.mark.slow),
    pytest.param("mamba2", marks=pytest.mark.slow),
])
def test_state_splits_over_fsdp_and_activations_over_tensor(mixer):
  measure = memory_per_device.measure
  one = measure(mixer, (1, 1, 1))
  fsdp = measure(mixer, (1, 8, 1))
  tensor = measure(mixer, (1, 1, 2))
  # Parameters and AdamW moments: an eighth each, but for the few vectors
  # (biases over 'hidden', scalars) that stay whole.
  assert one["state_bytes"] > 30 * 2**20  # A model big enough to matter.
  assert fsdp["state_bytes"] <= 1.05 * one["state_bytes"] / 8
  # Heads, the MLP hidden and Mamba-2's inner width split over 'tensor'.
  assert tensor["temp_bytes"] < 0.8 * one["temp_bytes"]
