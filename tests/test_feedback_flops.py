"""FLOP audit of the Pallas feedback solve: the matmul work its kernels do.

Counted, not estimated: every matmul inside the kernels goes through
`blocks.tile_dot`, which the test wraps so that each executed product
reports its FLOPs (2 * M * N * contraction) through a host callback. The
forward+backward then runs in interpret mode on concrete inputs, so the
count covers exactly the programs and loop trips that do work (programs
that exit early count nothing), whatever the grids or run-time extents.

Unit: one causal pass P, a product over every pair (t, j) with j < t that
contracts K = D features: P = 2 * K * T (T - 1) / 2 FLOPs per sequence.
The pass kernels cover the pairs outside the chunks' diagonal blocks,
(T² - n C²) / 2 of them for n chunks of C rows, so m passes over them count
m * K * (T² - n C²) FLOPs, i.e. m (T - C) / (T - 1) passes of P. The GPU
kernels do m = 8 (forward: row statistics 1, rectangles 2; backward: one
column pass of 5 with dq by atomic adds); the TPU kernels m = 10 (dq in its
own pass of 3; no atomics on TPU). Flash-attention's forward+backward is 7.
The leaf kernels add the diagonal blocks' solves, one (C, C) x (C, D)
product per chunk and direction (with one tile per chunk, as here): 4 n C² D
FLOPs. The diagonal blocks' logits, inverses and gradients are batched JAX,
outside this count.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax.kernels import blocks
from sessa_jax.kernels.feedback import pallas as feedback_pallas
from sessa_jax.kernels.feedback import pallas_gpu as feedback_pallas_gpu
from sessa_jax.kernels.feedback import pallas_tpu as feedback_pallas_tpu


def _counting_tile_dot(total):
  def tile_dot(a, b, *, trans_a=False, trans_b=False):
    out = blocks.tile_dot(a, b, trans_a=trans_a, trans_b=trans_b)
    flops = 2 * out.shape[0] * out.shape[1] * a.shape[0 if trans_a else 1]

    def add():
      total[0] += flops

    jax.debug.callback(add)
    return out
  return tile_dot


@pytest.mark.parametrize("backend,module,passes", [
    ("gpu", feedback_pallas_gpu, 8), ("tpu", feedback_pallas_tpu, 10)])
def test_kernel_matmul_flops_in_causal_passes(backend, module, passes,
                                              monkeypatch):
  total = [0]
  monkeypatch.setattr(module, "tile_dot", _counting_tile_dot(total))
  t, width, chunk = 128, 16, 16
  rng = np.random.default_rng(0)
  q, k, f, cot = (jnp.asarray(rng.normal(size=(1, t, width)), jnp.float32)
                  for _ in range(4))
  gamma = jnp.asarray(rng.uniform(-0.9, 0.9, size=(1, t)), jnp.float32)

  def fwd_bwd(q, k, gamma, f, cot):
    solve = lambda *a: feedback_pallas.feedback_solve_pallas(
        *a, chunk=chunk, tile=chunk, backend=backend)
    s, vjp = jax.vjp(solve, q, k, gamma, f)
    return s, vjp(cot)

  jax.block_until_ready(jax.jit(fwd_bwd)(q, k, gamma, f, cot))
  n = t // chunk
  causal_pass = width * t * (t - 1)
  off_diagonal_pass = width * (t * t - n * chunk * chunk)
  leaves = 4 * n * chunk * chunk * width
  assert total[0] == passes * off_diagonal_pass + leaves
  print(f"{backend}: {total[0] / causal_pass:.2f} causal passes")
  assert backend != "gpu" or total[0] / causal_pass <= 8
