r"""Matched-budget study: Sessa, attention and Mamba-2 at equal parameter count.

  python launch.py --sweep=experiments/matched_budget.py:cpu \
      --workdir=workdirs/matched_budget_cpu
  python experiments/report.py workdirs/matched_budget_cpu

The Sessa paper's protocol: every mixer sits in the same gated macro-block
(docs/design.md#baselines-in-the-same-block); within a task all models have the same parameter count (within
2%; `budget.match` picks each width against the Sessa model at the preset's
reference width) and the same optimizer, schedule, steps, batch and sequence
length; two or more seeds (initialisation and data order; the datasets are
fixed). Tasks: symbol_soup, diffuse_mqar (whose test split carries lags up to
4x the longest training lag: the length-generalisation split) and byte-level
text on Austen-6 when `../shared/data/austen` exists beside the checkout or a
corpus is given. The paper's ablation, Sessa without its feedback branch, runs
on the long-context tasks (on diffuse_mqar alone in the `cpu` preset, the one
task that a CPU budget learns).

Presets (the argument after ':'):
  tiny   a few steps, sessa and attention, one seed, diffuse_mqar (tests).
  cpu    the whole study on a 2-core CPU in about an hour.
  paper  longer sequences and bigger models, for a GPU or TPU slice.
Options follow the preset, comma-separated: `text=GLOB` trains the text task
on other files (`cpu,text=/data/corpus/*.txt`), `seeds=N` changes the number
of seeds.
"""

import dataclasses
import pathlib
from typing import Any, Mapping

from sessa_jax import budget
from sessa_jax import data as data_lib
from sessa_jax.models.config import ModelConfig

CONFIG_FILES = {"symbol_soup": "configs/symbol_soup.py",
                "diffuse_mqar": "configs/diffuse_mqar.py",
                "text": "configs/text_lm.py"}
LONG_CONTEXT = ("symbol_soup", "diffuse_mqar")
AUSTEN = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "austen"
# Austen-6's suggested split: whole novels held out.
AUSTEN_SPLIT = {
    "path": "emma.txt,mansfieldpark.txt,prideprejudice.txt,sensesensibility.txt",
    "val_path": "northangerabbey.txt", "test_path": "persuasion.txt"}


@dataclasses.dataclass(frozen=True)
class Preset:
  """One size of the study.

  Attributes:
    mixers: mixers compared.
    tasks: tasks run (text only where a corpus is available).
    seeds: train seeds (initialisation and data order).
    ablation: tasks that also run Sessa without its feedback branch.
    width: Sessa's d_model; the parameter target every model is matched to.
    model: other ModelConfig fields shared by every model.
    train: `train.*` settings shared by every run.
    data: `data.*` knobs per task.
    evaluation: `train.*` evaluation sizes per task (they cap the cost of
      evaluating on long held-out text; every model of a task gets the same).
  """

  mixers: tuple[str, ...]
  tasks: tuple[str, ...]
  seeds: tuple[int, ...]
  ablation: tuple[str, ...]
  width: int
  model: Mapping[str, Any]
  train: Mapping[str, Any]
  data: Mapping[str, Mapping[str, Any]]
  evaluation: Mapping[str, Mapping[str, Any]] = dataclasses.field(
      default_factory=dict)


PRESETS = {
    "tiny": Preset(
        mixers=("sessa", "attention"), tasks=("diffuse_mqar",), seeds=(0,),
        ablation=(), width=32,
        model=dict(n_layers=1, n_heads=2, ssm_head_dim=16, ssm_state=8),
        train=dict(steps=4, batch_size=8, lr=3e-3, warmup_steps=1,
                   eval_every=2, eval_batches=1, test_batches=2,
                   checkpoint_every=4, log_every=1),
        data={"diffuse_mqar": dict(seq_len=64, num_pairs=2, max_lag=14,
                                   num_val=16, num_test=16)}),
    "cpu": Preset(
        mixers=("sessa", "attention", "mamba2"),
        tasks=("symbol_soup", "diffuse_mqar", "text"), seeds=(0, 1),
        ablation=("diffuse_mqar",), width=64,
        model=dict(n_layers=2, n_heads=4, ssm_head_dim=16, ssm_state=16),
        train=dict(steps=400, batch_size=16, lr=3e-3, warmup_steps=40,
                   eval_every=100, eval_batches=0, test_batches=0,
                   checkpoint_every=200, log_every=20),
        data={"symbol_soup": dict(seq_len=160, min_tokens=110, max_tokens=160,
                                  num_val=256, num_test=1024),
              "diffuse_mqar": dict(seq_len=136, num_pairs=4, max_lag=32,
                                   num_val=256, num_test=1024),
              "text": dict(seq_len=128)},
        evaluation={"text": dict(eval_batches=16, test_batches=64)}),
    "paper": Preset(
        mixers=("sessa", "attention", "mamba2"),
        tasks=("symbol_soup", "diffuse_mqar", "text"), seeds=(0, 1),
        ablation=LONG_CONTEXT, width=384,
        model=dict(n_layers=6, n_heads=6, ssm_head_dim=64, ssm_state=64),
        train=dict(steps=20_000, batch_size=64, lr=1e-3, warmup_steps=1000,
                   eval_every=1000, eval_batches=0, test_batches=0,
                   checkpoint_every=1000, log_every=50),
        data={"symbol_soup": dict(seq_len=600, min_tokens=400,
                                  max_tokens=600),
              "diffuse_mqar": dict(seq_len=1100, num_pairs=16, max_lag=256,
                                   key_vocab=64, value_vocab=64,
                                   filler_vocab=16),
              "text": dict(seq_len=512)}),
}


def parse_preset(spec: str | None) -> tuple[Preset, str | None]:
  """'cpu,text=GLOB,seeds=3' -> (the preset with options applied, text glob)."""
  name, *options = (spec or "cpu").split(",")
  if name not in PRESETS:
    raise ValueError(f"matched_budget preset {name!r} is not one of: "
                     f"{', '.join(PRESETS)}")
  preset, text_path = PRESETS[name], None
  for option in options:
    key, _, value = option.partition("=")
    if key == "text" and value:
      text_path = value
    elif key == "seeds" and value.isdigit() and int(value) >= 1:
      preset = dataclasses.replace(preset, seeds=tuple(range(int(value))))
    else:
      raise ValueError(f"matched_budget option {option!r}: expected "
                       "text=GLOB or seeds=N")
  return preset, text_path


def task_data(preset: Preset, task: str, text_path: str | None
             ) -> dict[str, Any] | None:
  """The `data.*` settings of a task, or None when it cannot run here."""
  knobs = {"task": task, **preset.data.get(task, {})}
  if task != "text":
    return knobs
  if text_path:
    return {**knobs, "path": text_path}
  if not AUSTEN.is_dir():
    return None
  split = {k: ",".join(str(AUSTEN / f) for f in v.split(","))
           for k, v in AUSTEN_SPLIT.items()}
  return {**knobs, **split, "val_fraction": 0.0, "test_fraction": 0.0}


def matched_models(preset: Preset, vocab_size: int
                  ) -> dict[str, ModelConfig]:
  """Each variant's ModelConfig, all within 2% of Sessa's parameter count."""
  variants = {mixer: dict(mixer=mixer) for mixer in preset.mixers}
  if preset.ablation:
    variants["sessa_nofb"] = dict(mixer="sessa", feedback=False)
  reference = ModelConfig(mixer="sessa", d_model=preset.width,
                          vocab_size=vocab_size, **preset.model)
  target = budget.count_params(reference)
  return {name: budget.match(reference.replace(**fields), target)
          for name, fields in variants.items()}


def model_overrides(cfg: ModelConfig) -> dict[str, Any]:
  """`model.*` keys pinning every architecture field of cfg.

  The vocabulary is left to the task and dtypes to `train.dtype`.
  """
  skip = {"vocab_size", "dtype", "param_dtype"}
  return {f"model.{f.name}": getattr(cfg, f.name)
          for f in dataclasses.fields(cfg)
          if f.name not in skip and getattr(cfg, f.name) is not None}


def sweep(preset: str | None = None) -> dict[str, dict[str, Any]]:
  """Points `<task>.<variant>.s<seed>` of the study (see module docstring)."""
  preset, text_path = parse_preset(preset)
  points = {}
  for task in preset.tasks:
    data = task_data(preset, task, text_path)
    if data is None:
      continue
    vocab_size = data_lib.get_task(data).vocab_size
    for variant, cfg in matched_models(preset, vocab_size).items():
      if variant == "sessa_nofb" and task not in preset.ablation:
        continue
      for seed in preset.seeds:
        points[f"{task}.{variant}.s{seed}"] = {
            "config": f"{CONFIG_FILES[task]}:{cfg.mixer}",
            **model_overrides(cfg),
            **{f"data.{k}": v for k, v in data.items() if k != "task"},
            **{f"train.{k}": v for k, v in preset.train.items()},
            **{f"train.{k}": v
               for k, v in preset.evaluation.get(task, {}).items()},
            "train.seed": seed,
        }
  return points
