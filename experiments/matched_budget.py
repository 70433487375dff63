r"""Matched-budget study: Sessa, attention and Mamba-2 at equal parameter count.

  python launch.py --sweep=experiments/matched_budget.py:cpu \
      --workdir=workdirs/matched_budget_cpu
  python experiments/report.py workdirs/matched_budget_cpu

The Sessa paper's protocol: every mixer sits in the same gated macro-block
(docs/design.md#baselines-in-the-same-block); within a task all models have
the same parameter count (within 2%; `budget.match` picks each width against
the Sessa model at the preset's reference width) and the same optimizer,
schedule, steps, batch and sequence length; two or more seeds (initialisation
and data order; the datasets are fixed). Tasks: symbol_soup, diffuse_mqar
(whose test split carries lags up to 4x the longest training lag: the
length-generalisation split) and byte-level text on Austen-6 when
`../shared/data/austen` exists beside the checkout or a corpus is given. The
paper's ablation, Sessa without its feedback branch, runs on the long-context
tasks (on diffuse_mqar alone in the `cpu` preset, the one task that a CPU
budget learns).

A mixer may be a hybrid stack, a per-layer pattern such as
`sessa,attention` (`model.mixer`); its points are named with `+`
(`symbol_soup.sessa+attention.s0`).

Presets (the argument after ':'):
  tiny      a few steps; sessa, attention and their hybrid; one seed;
            diffuse_mqar (tests).
  cpu       the short study: 400 steps, 2 seeds, three tasks, about an hour
            on a 2-core CPU; too short to learn SymbolSoup.
  tune      the tuning sweep for `cpu_long`: attention and Sessa under the
            same grid of learning rates, one seed, both long-context tasks.
  cpu_long  the long-context study on a 2-core CPU: Sessa, attention,
            Mamba-2 and the sessa,attention hybrid, 3 seeds, SymbolSoup at
            250..350 tokens and diffuse MQAR; its learning rate is the tune
            grid's first setting until the tuning sweep has finished.
  horizon   `cpu_long`'s SymbolSoup runs of Sessa, attention and Mamba-2,
            3 seeds, with 5x the steps: whether the mixers' ordering holds
            across seeds once the CPU budget starts to learn the task.
  device    one GPU in about 8 minutes: the paper's SymbolSoup lengths
            (400..600) and diffuse MQAR, Sessa, attention and Mamba-2 at
            width 128, 3 seeds, 1,000 steps in bfloat16; its points run
            concurrently, each in its own process
            (`python experiments/device_study.py`).
  device_tiny  `device`'s tasks and mixers at a CPU's size (tests).
  paper     longer sequences and bigger models, for a GPU or TPU slice.
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
AUSTEN = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
          / "austen")
# Austen-6's suggested split: whole novels held out.
AUSTEN_SPLIT = {
    "path": ("emma.txt,mansfieldpark.txt,prideprejudice.txt,"
             "sensesensibility.txt"),
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
    grid: named settings, each a mapping of `train.*` fields that replace
      the preset's; every variant runs under every setting (a tuning sweep).
      Empty: one setting, the preset's own.
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
  grid: Mapping[str, Mapping[str, Any]] = dataclasses.field(
      default_factory=dict)


# Shared by `tune` and `cpu_long`. SymbolSoup at 250..350 tokens: there the
# reference classifiers of experiments/symbol_soup_ceiling.py score 0.23
# pooling every letter, 0.45 reading each stylized block's letters apart and
# 0.62 with its letter pairs (at the `cpu` preset's 110..160: 0.19 / 0.30 /
# 0.43), so 0.5 is within reach of a model that keeps the blocks apart.
_CPU_LONG_MODEL = dict(n_layers=2, n_heads=4, ssm_head_dim=16, ssm_state=16)
_CPU_LONG_TRAIN = dict(steps=1200, batch_size=32, lr=3e-3, warmup_steps=100,
                       eval_every=200, eval_batches=0, test_batches=0,
                       checkpoint_every=400, log_every=50)
_CPU_LONG_DATA = {
    "symbol_soup": dict(seq_len=352, min_tokens=250, max_tokens=350,
                        num_val=256, num_test=1024),
    "diffuse_mqar": dict(seq_len=136, num_pairs=4, max_lag=32, num_val=256,
                         num_test=1024)}

PRESETS = {
    "tiny": Preset(
        mixers=("sessa", "attention", "sessa,attention"),
        tasks=("diffuse_mqar",), seeds=(0,), ablation=(), width=32,
        model=dict(n_layers=2, n_heads=2, ssm_head_dim=16, ssm_state=8),
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
    # The tuning sweep for `cpu_long`: the same grid for attention and Sessa.
    "tune": Preset(
        mixers=("sessa", "attention"), tasks=LONG_CONTEXT, seeds=(0,),
        ablation=(), width=64, model=_CPU_LONG_MODEL, train=_CPU_LONG_TRAIN,
        data=_CPU_LONG_DATA,
        grid={"lr3e-3": dict(lr=3e-3), "lr1e-2": dict(lr=1e-2)}),
    "cpu_long": Preset(
        mixers=("sessa", "attention", "mamba2", "sessa,attention"),
        tasks=LONG_CONTEXT, seeds=(0, 1, 2), ablation=(), width=64,
        model=_CPU_LONG_MODEL, train=_CPU_LONG_TRAIN, data=_CPU_LONG_DATA),
    "horizon": Preset(
        mixers=("sessa", "attention", "mamba2"), tasks=("symbol_soup",),
        seeds=(0, 1, 2),
        ablation=(), width=64, model=_CPU_LONG_MODEL,
        train={**_CPU_LONG_TRAIN, "steps": 6000, "eval_every": 500,
               "checkpoint_every": 500},
        data=_CPU_LONG_DATA),
    # One GPU in about 8 minutes, the points run concurrently in their own
    # processes (`experiments/device_study.py`): the paper's SymbolSoup
    # lengths and diffuse MQAR, three mixers, three seeds.
    "device": Preset(
        mixers=("sessa", "attention", "mamba2"), tasks=LONG_CONTEXT,
        seeds=(0, 1, 2), ablation=(), width=128,
        model=dict(n_layers=2, n_heads=4, ssm_head_dim=32, ssm_state=32),
        train=dict(steps=2500, batch_size=32, lr=3e-3, warmup_steps=100,
                   eval_every=500, eval_batches=0, test_batches=0,
                   checkpoint_every=500, log_every=100, dtype="bfloat16"),
        data={"symbol_soup": dict(seq_len=600, min_tokens=400,
                                  max_tokens=600, num_val=256, num_test=1024),
              "diffuse_mqar": dict(seq_len=1100, num_pairs=16, max_lag=256,
                                   key_vocab=64, value_vocab=64,
                                   filler_vocab=16, num_val=256,
                                   num_test=1024)}),
    # `device` at a size a CPU runs in seconds (tests): same tasks, mixers
    # and one seed; short sequences, a few steps.
    "device_tiny": Preset(
        mixers=("sessa", "attention", "mamba2"), tasks=LONG_CONTEXT,
        seeds=(0,), ablation=(), width=32,
        model=dict(n_layers=1, n_heads=2, ssm_head_dim=16, ssm_state=8),
        train=dict(steps=3, batch_size=4, lr=3e-3, warmup_steps=1,
                   eval_every=3, eval_batches=1, test_batches=1,
                   checkpoint_every=3, log_every=1),
        data={"symbol_soup": dict(seq_len=64, min_tokens=40, max_tokens=60,
                                  num_val=8, num_test=8),
              "diffuse_mqar": dict(seq_len=64, num_pairs=2, max_lag=14,
                                   num_val=8, num_test=8)}),
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
  variants = {mixer.replace(",", "+"): dict(mixer=mixer)
              for mixer in preset.mixers}
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
  """Points `<task>.<variant>[.<setting>].s<seed>` (see module docstring).

  Each point's "fields" name its task, variant, grid setting (None without a
  grid) and seed; the sweep's rows repeat them for the report.

  Points are ordered seed by seed (then grid setting, task, variant), so a
  study stopped part-way has every variant of every task at its first seeds.
  """
  preset, text_path = parse_preset(preset)
  settings = preset.grid or {"": {}}
  tasks = {}
  for task in preset.tasks:
    data = task_data(preset, task, text_path)
    if data is not None:
      tasks[task] = (data, matched_models(
          preset, data_lib.get_task(data).vocab_size))
  points = {}
  for seed in preset.seeds:
    for setting, overrides in settings.items():
      for task, (data, models) in tasks.items():
        for variant, cfg in models.items():
          if variant == "sessa_nofb" and task not in preset.ablation:
            continue
          name = ".".join(p for p in (task, variant, setting) if p)
          points[f"{name}.s{seed}"] = {
              "config": CONFIG_FILES[task],
              "fields": {"task": task, "variant": variant,
                         "setting": setting or None, "seed": seed},
              **model_overrides(cfg),
              **{f"data.{k}": v for k, v in data.items() if k != "task"},
              **{f"train.{k}": v for k, v in preset.train.items()},
              **{f"train.{k}": v
                 for k, v in preset.evaluation.get(task, {}).items()},
              **{f"train.{k}": v for k, v in overrides.items()},
              "train.seed": seed,
          }
  return points
