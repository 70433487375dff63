"""Mamba-2's state-space duality (SSD) scan: chunked form and sequential oracle.

Per head h the scan keeps a state S (P x N) and, for t = 0..T-1,

  S_t = exp(log_a_t) * S_{t-1} + x_t B_t^T,      y_t = S_t C_t,

with x_t (P,) the head's input (already scaled by the step size dt), B_t, C_t
(N,) shared by all heads (one group) and log_a_t <= 0 the head's log decay.

`ssd_chunked` computes the same thing in chunks of L steps (Dao & Gu, 2024,
section 6): inside a chunk the output is a masked quadratic form
(C B^T * decay) x, which is all matmuls; across chunks only the (P x N) states
are carried. `ssd_sequential` runs the recurrence one step at a time and is the
test oracle. Both accumulate in float32 (or float64 for float64 inputs) and
return y in the dtype of x together with the final state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sessa_jax import targets

IMPLS = ("auto", "chunked", "sequential")
STATE_PASSING = ("auto", "scan", "matmul")
# Above this many chunks the matmul form of the state passing (quadratic in
# the number of chunks) costs more than a sequential scan even on accelerators.
_MATMUL_MAX_CHUNKS = 64


def ssd(x_bthp: jax.Array, log_a_bth: jax.Array, b_btn: jax.Array,
        c_btn: jax.Array, *, chunk: int = 64, impl: str = "auto",
        initial_state: jax.Array | None = None
        ) -> tuple[jax.Array, jax.Array]:
  """The SSD scan with an implementation switch.

  Args:
    x_bthp: inputs (B, T, H, P), already multiplied by the step size.
    log_a_bth: log decays (B, T, H), <= 0.
    b_btn: input projections B_t (B, T, N).
    c_btn: output projections C_t (B, T, N).
    chunk: chunk length L of the chunked form.
    impl: one of `IMPLS`; `auto` is `chunked`.
    initial_state: state before step 0 (B, H, P, N); zeros if None.

  Returns:
    y (B, T, H, P) in the dtype of x, and the final state (B, H, P, N) in
    the accumulation dtype.
  """
  if impl not in IMPLS:
    raise ValueError(f"ssd impl={impl!r} is not one of: {', '.join(IMPLS)}")
  if impl == "sequential":
    return ssd_sequential(x_bthp, log_a_bth, b_btn, c_btn,
                          initial_state=initial_state)
  return ssd_chunked(x_bthp, log_a_bth, b_btn, c_btn, chunk=chunk,
                     initial_state=initial_state)


def _acc_dtype(dtype) -> jnp.dtype:
  return jnp.promote_types(dtype, jnp.float32)


def _zeros_state(x_bthp: jax.Array, n: int, dtype) -> jax.Array:
  b, _, h, p = x_bthp.shape
  return jnp.zeros((b, h, p, n), dtype)


def ssd_sequential(x_bthp: jax.Array, log_a_bth: jax.Array, b_btn: jax.Array,
                   c_btn: jax.Array, *, initial_state: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """Step-by-step recurrence (the oracle). Arguments as in `ssd`."""
  acc = _acc_dtype(x_bthp.dtype)
  state = (_zeros_state(x_bthp, b_btn.shape[-1], acc)
           if initial_state is None else initial_state.astype(acc))

  def step(s_bhpn, inputs):
    x_bhp, log_a_bh, b_bn, c_bn = inputs
    s_bhpn = (jnp.exp(log_a_bh)[..., None, None] * s_bhpn
              + jnp.einsum("bhp,bn->bhpn", x_bhp, b_bn))
    return s_bhpn, jnp.einsum("bhpn,bn->bhp", s_bhpn, c_bn)

  xs = tuple(jnp.moveaxis(v.astype(acc), 1, 0)
             for v in (x_bthp, log_a_bth, b_btn, c_btn))
  state, y_tbhp = jax.lax.scan(step, state, xs)
  return jnp.moveaxis(y_tbhp, 0, 1).astype(x_bthp.dtype), state


def ssd_chunked(x_bthp: jax.Array, log_a_bth: jax.Array, b_btn: jax.Array,
                c_btn: jax.Array, *, chunk: int = 64,
                initial_state: jax.Array | None = None,
                state_passing: str = "auto") -> tuple[jax.Array, jax.Array]:
  """Chunked SSD. T need not be a multiple of `chunk`.

  Args:
    x_bthp, log_a_bth, b_btn, c_btn, chunk, initial_state: as in `ssd`.
    state_passing: how chunk states are carried across chunks: `scan` (a
      sequential `lax.scan` over chunks, O(T/L) steps of (P x N) work) or
      `matmul` (one masked product over all chunk pairs, quadratic in T/L but
      a single matmul); `auto` takes `scan` on CPU and `matmul` on GPU/TPU
      when there are at most 64 chunks.

  Returns:
    As `ssd`.
  """
  if state_passing not in STATE_PASSING:
    raise ValueError(f"ssd state_passing={state_passing!r} is not one of: "
                     f"{', '.join(STATE_PASSING)}")
  if chunk < 1:
    raise ValueError(f"ssd chunk must be >= 1, got {chunk}")
  out_dtype = x_bthp.dtype
  acc = _acc_dtype(out_dtype)
  bsz, t, h, p = x_bthp.shape
  n = b_btn.shape[-1]
  ell = min(chunk, t)
  nc = -(-t // ell)
  pad = nc * ell - t
  # Padding steps carry no input and no decay (log_a = 0), so they leave the
  # final state unchanged; their outputs are dropped.
  x, log_a, b_mat, c_mat = (
      jnp.pad(v.astype(acc), [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
      for v in (x_bthp, log_a_bth, b_btn, c_btn))
  x_bclhp = x.reshape(bsz, nc, ell, h, p)
  b_bcln = b_mat.reshape(bsz, nc, ell, n)
  c_bcln = c_mat.reshape(bsz, nc, ell, n)
  cum_bchl = jnp.cumsum(
      jnp.moveaxis(log_a.reshape(bsz, nc, ell, h), -1, 2), axis=-1)

  # Intra-chunk: y_l = sum_{s<=l} exp(cum_l - cum_s) (C_l . B_s) x_s.
  causal_ls = jnp.tril(jnp.ones((ell, ell), bool))
  seg_bchls = cum_bchl[..., :, None] - cum_bchl[..., None, :]
  decay_bchls = jnp.exp(jnp.where(causal_ls, seg_bchls, -jnp.inf))
  scores_bcls = jnp.einsum("bcln,bcsn->bcls", c_bcln, b_bcln)
  y_bclhp = jnp.einsum("bcls,bchls,bcshp->bclhp", scores_bcls, decay_bchls,
                       x_bclhp)

  # Each chunk's contribution to the state at its end.
  to_end_bchl = jnp.exp(cum_bchl[..., -1:] - cum_bchl)
  chunk_states_bchpn = jnp.einsum("bcln,bchl,bclhp->bchpn", b_bcln,
                                  to_end_bchl, x_bclhp)
  chunk_decay_bch = jnp.exp(cum_bchl[..., -1])
  s0_bhpn = (_zeros_state(x_bthp, n, acc) if initial_state is None
             else initial_state.astype(acc))

  if state_passing == "auto":
    on_cpu = targets.platform() == "cpu"
    state_passing = "scan" if on_cpu or nc > _MATMUL_MAX_CHUNKS else "matmul"
  if state_passing == "scan":
    starts_bchpn, final_bhpn = _pass_states_scan(s0_bhpn, chunk_states_bchpn,
                                                 chunk_decay_bch)
  else:
    starts_bchpn, final_bhpn = _pass_states_matmul(s0_bhpn, chunk_states_bchpn,
                                                   cum_bchl[..., -1])

  # Inter-chunk: the state entering the chunk, decayed to each position.
  y_bclhp += jnp.einsum("bcln,bchpn,bchl->bclhp", c_bcln, starts_bchpn,
                        jnp.exp(cum_bchl))
  y_bthp = y_bclhp.reshape(bsz, nc * ell, h, p)[:, :t]
  return y_bthp.astype(out_dtype), final_bhpn


def _pass_states_scan(s0_bhpn, chunk_states_bchpn, chunk_decay_bch):
  """Sequential state passing; returns the states entering each chunk."""

  def step(s_bhpn, inputs):
    new_bhpn, decay_bh = inputs
    return decay_bh[..., None, None] * s_bhpn + new_bhpn, s_bhpn

  final, starts_cbhpn = jax.lax.scan(
      step, s0_bhpn, (jnp.moveaxis(chunk_states_bchpn, 1, 0),
                      jnp.moveaxis(chunk_decay_bch, 1, 0)))
  return jnp.moveaxis(starts_cbhpn, 0, 1), final


def _pass_states_matmul(s0_bhpn, chunk_states_bchpn, chunk_log_decay_bch):
  """State passing as one masked product over chunk pairs.

  The state entering chunk c is sum_{c' < c} exp(Lc'+1 + ... + Lc-1) S_c'
  plus exp(L0 + ... + Lc-1) S_init, with L the chunks' total log decays.
  """
  # Prepend the initial state as chunk -1 (its own decay is irrelevant).
  states_bkhpn = jnp.concatenate([s0_bhpn[:, None], chunk_states_bchpn], 1)
  zero_bh1 = jnp.zeros_like(chunk_log_decay_bch[:, :1])
  # cum[k] = total log decay of chunks 0..k-1 (cum[0] = 0), k = 0..nc.
  cum_bhk = jnp.moveaxis(
      jnp.cumsum(jnp.concatenate([zero_bh1, chunk_log_decay_bch], 1), 1), 1, 2)
  k = cum_bhk.shape[-1]
  # Weight of source k (k=0: initial state, k>=1: chunk k-1) in the state
  # after target chunk c-1 ends (c = 0..nc): exp(cum[c] - cum[k]) if k <= c.
  mask_ck = jnp.tril(jnp.ones((k, k), bool))
  seg_bhck = cum_bhk[..., :, None] - cum_bhk[..., None, :]
  weight_bhck = jnp.exp(jnp.where(mask_ck, seg_bhck, -jnp.inf))
  out_bchpn = jnp.einsum("bhck,bkhpn->bchpn", weight_bhck, states_bkhpn)
  return out_bchpn[:, :-1], out_bchpn[:, -1]
