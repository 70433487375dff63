r"""Memory tails: influence of an old token against lag, per mixer, on one plot.

Trained runs (a workdir each, e.g. from the matched-budget sweep):

  python experiments/memory_tail.py --out=workdirs/memory_tail/trained \
      --workdir=sessa=/path/run_a --workdir=attention=/path/run_b \
      --workdir=mamba2=/path/run_c

Fresh initialisation (same width for every mixer, random tokens):

  python experiments/memory_tail.py --out=results/memory_tail_init \
      --seq_len=1024

For each model the influence ||d h_{tau+l} / d x_tau||_F of the embedding at
an early source tau on the final hidden state at tau + l is averaged over
four sources and the batch (`sessa_jax.analysis.influence`), with its fitted
log-log slope. For Sessa every layer's feedback solve is also driven by a
unit impulse with the routing and gains recorded on the same batch, and the
fitted exponent is set beside the paper's 1 - gamma_max * c2. Writes
PREFIX.png and PREFIX.json.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sessa_jax
from sessa_jax import cli
from sessa_jax import data as data_lib
from sessa_jax import models
from sessa_jax.analysis import influence
from sessa_jax.analysis import plot_style
from sessa_jax.analysis import plots
from sessa_jax.models.config import ModelConfig

plt = plots.pyplot()


def fresh_model(cfg: ModelConfig, seed: int = 0) -> models.LanguageModel:
  """A freshly initialised model, its feedback solve switched to `dense`.

  The dense solve is the one with a forward-mode derivative, so the
  influence can be taken with one JVP per source instead of one VJP per
  output position; the parameters and the function are unchanged.
  """
  if "sessa" in cfg.layer_mixers:
    cfg = cfg.replace(feedback_impl="dense")
  return models.build_model(cfg, rngs=nnx.Rngs(seed))


def task_tokens(data_cfg: Mapping[str, Any], batch_size: int) -> np.ndarray:
  """The first `batch_size` validation inputs of a run's task, (B, T)."""
  task = data_lib.get_task(data_cfg)
  return np.stack([task.example("val", i)["inputs"]
                   for i in range(batch_size)])


def sessa_routing(model: models.LanguageModel, tokens_bt: jax.Array,
                  layer: int):
  """Feedback queries, keys, gains and logit scale of one Sessa layer.

  Replays the forward pass up to `layer` and reads the mixer's routing inputs
  exactly as its own forward computes them.

  Returns:
    (q_fb (B, T, K), k_fb (B, T, K), gamma (B, T), scale).
  """
  x = model.embed(tokens_bt)
  for block in model.blocks[:layer]:
    x = block(x)
  block = model.blocks[layer]
  # pylint: disable=protected-access
  a, _ = block.mixer_input(x.astype(jnp.dtype(block.cfg.dtype)))
  q_fb, k_fb, gamma = block.mixer.feedback_inputs(a)
  # pylint: enable=protected-access
  return q_fb, k_fb, gamma, block.mixer.fb_scale


def measure(model: models.LanguageModel, tokens_bt: np.ndarray, *,
            window: tuple[int, int] | None = None,
            probes: int = 16) -> dict[str, Any]:
  """Influence against lag (and, for Sessa, impulse responses per layer).

  Args:
    model: the language model.
    tokens_bt: the batch (B, T).
    window: lag window of the slope fits; default the top decade of lags.
    probes: Gaussian probes per source for the Jacobian norm (an unbiased
      estimate of its square; see `influence.influence_vs_lag`).

  Returns:
    {'influence': curve dict, 'layers': [impulse curve and bound check dict
    of each Sessa layer with feedback, with its 'layer' index], 'bound': the
    first such layer's check}.
  """
  tokens_bt = jnp.asarray(tokens_bt)
  x_btd = model.embed(tokens_bt)
  curve = influence.influence_vs_lag(model.hidden, x_btd, window=window,
                                     probes=probes, chunk=probes)
  result: dict[str, Any] = {"influence": curve.to_dict(), "layers": []}
  cfg = model.cfg
  sessa_layers = [i for i, m in enumerate(cfg.layer_mixers) if m == "sessa"]
  for layer in sessa_layers if cfg.feedback else ():
    q_fb, k_fb, gamma, scale = sessa_routing(model, tokens_bt, layer)
    impulse, check = influence.bound_check(
        q_fb, k_fb, gamma, cfg.gamma_max, window=curve.window, scale=scale)
    result["layers"].append({"layer": layer, "impulse": impulse.to_dict(),
                             "bound": check.to_dict()})
  if result["layers"]:
    result["bound"] = result["layers"][0]["bound"]
  return result


def plot(results: Mapping[str, Mapping[str, Any]], path: pathlib.Path,
         title: str) -> None:
  """One log-log figure: influence per model with its fit; Sessa impulses."""
  fig, ax = plt.subplots(figsize=(10, 4.6))
  for label, result in results.items():
    color = plot_style.color(label)
    curve = result["influence"]
    lags = np.asarray(curve["lags"])
    ax.loglog(lags, curve["influence"], marker=".",
              **plot_style.line_style(label),
              label=f"{label}: slope {curve['slope']:.2f}")
    lo, hi = curve["window"]
    fit = lags[(lags >= lo) & (lags <= hi)]
    if fit.size and np.isfinite(curve["slope"]):
      ax.loglog(fit, np.exp(curve["intercept"]) * fit ** curve["slope"],
                color=color, ls="--", lw=1)
    for k, entry in enumerate(result.get("layers", [])):
      impulse, layer = entry["impulse"], entry.get("layer", k)
      ax.loglog(impulse["lags"], impulse["influence"], color=color,
                alpha=0.8, **plot_style.layer_style(k),
                label=(f"{label} feedback impulse, layer {layer}: exponent "
                       f"{entry['bound']['fitted_exponent']:.2f} "
                       f"(1-γmax·c₂ = {entry['bound']['paper_exponent']:.2f})"))
  ax.set_xlabel("lag ℓ (tokens)")
  ax.set_ylabel("‖∂h[τ+ℓ] / ∂x[τ]‖  (mean over τ, batch)")
  ax.set_title(title)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  fig.tight_layout()
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)


def measure_workdirs(workdirs: Mapping[str, str | pathlib.Path], *,
                     prefix: pathlib.Path, title: str, batch_size: int = 2
                    ) -> dict[str, dict[str, Any]]:
  """Measures trained runs on their own validation batch; writes PNG + JSON."""
  results = {}
  for label, workdir in workdirs.items():
    # The dense solve, as in `fresh_model`; the parameters are the same.
    run = sessa_jax.load(workdir, model_overrides={"feedback_impl": "dense"})
    results[label] = measure(run.model,
                             task_tokens(run.config.data, batch_size))
  _write(results, prefix, title)
  return results


def measure_fresh(mixers: Sequence[str], *, seq_len: int, d_model: int,
                  n_layers: int, vocab_size: int, batch_size: int, seed: int,
                  prefix: pathlib.Path) -> dict[str, dict[str, Any]]:
  """Measures freshly initialised models on random tokens; writes PNG + JSON."""
  tokens = np.asarray(jax.random.randint(
      jax.random.key(seed), (batch_size, seq_len), 0, vocab_size))
  results = {}
  for mixer in mixers:
    cfg = ModelConfig(mixer=mixer, d_model=d_model, n_layers=n_layers,
                      vocab_size=vocab_size, n_heads=max(1, d_model // 32),
                      ssm_head_dim=min(64, d_model // 2), ssm_state=16)
    results[mixer] = measure(fresh_model(cfg, seed), tokens)
  _write(results, prefix,
         f"memory tail at initialisation (D={d_model}, {n_layers} layers)")
  return results


def _write(results, prefix: pathlib.Path, title: str) -> None:
  prefix.parent.mkdir(parents=True, exist_ok=True)
  plot(results, prefix.with_suffix(".png"), title)
  prefix.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
  for label, result in results.items():
    line = f"{label:>10}: influence slope {result['influence']['slope']:+.3f}"
    if "bound" in result:
      b = result["bound"]
      line += (f"; layer-0 feedback impulse exponent "
               f"{b['fitted_exponent']:.3f} vs 1-γmax·c₂ = "
               f"{b['paper_exponent']:.3f} (c₂ = {b['c2']:.3g})")
    print(line)


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_multi_string("workdir", [],
                            "LABEL=DIR of a trained run (repeatable); none: "
                            "fresh models", flag_values=fv)
  flags.DEFINE_string("out", "workdirs/memory_tail/memory_tail",
                      "output prefix (.png, .json); the committed results/ "
                      "is written only when named here", flag_values=fv)
  for name, default in [("seq_len", 1024), ("d_model", 64), ("n_layers", 2),
                        ("vocab_size", 64)]:
    flags.DEFINE_integer(name, default, "the fresh models' " + name,
                         flag_values=fv)
  flags.DEFINE_integer("batch_size", 2, "sequences averaged over",
                       flag_values=fv)
  flags.DEFINE_integer("seed", 0, "the fresh models' initialisation seed",
                       flag_values=fv)


def main(argv: Sequence[str] | None = None) -> None:
  args, _ = cli.parse(argv, _define_flags, __doc__.split("\n\n")[0])
  out = pathlib.Path(args.out)
  if args.workdir:
    bad = [w for w in args.workdir if "=" not in w]
    if bad:
      cli.error(f"--workdir expects LABEL=DIR, got {bad[0]!r}")
    measure_workdirs(dict(w.split("=", 1) for w in args.workdir),
                     prefix=out, batch_size=args.batch_size,
                     title="memory tail of trained models")
  else:
    measure_fresh(models.mixers.names(), seq_len=args.seq_len,
                  d_model=args.d_model, n_layers=args.n_layers,
                  vocab_size=args.vocab_size, batch_size=args.batch_size,
                  seed=args.seed, prefix=out)


if __name__ == "__main__":
  main()
