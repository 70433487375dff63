r"""Tables, statistics and plots for a study (a sweep's workdir).

  python experiments/report.py workdirs/my_study [--study=NAME] \
      [--out=DIR] [--sweep=experiments/matched_budget.py:cpu_long] \
      [--memory_tail_task=diffuse_mqar] [--command="python launch.py ..."]

Reads every run directory under the sweep dir (`config.json`,
`metrics.jsonl`, `summary.json`) and writes, under OUT (default
`workdirs/reports/<study>`; the committed `results/` is written
only when named with --out):

  <study>.json  per task and mixer: parameters, FLOPs per token, seeds, the
                test metric per seed and every table column per seed, steps,
                wall times and the shared config; every table cell is
                recomputed from it (`render_tables`).
  <study>.md    one table per task (mean ± sample std over seeds, beside the
                Sessa paper's figure), then for every pair of mixers the
                difference of the test metric with a 95% Welch interval and
                whether it is resolved; for SymbolSoup, the accuracies of
                the reference classifiers of symbol_soup_ceiling.py at the
                study's lengths (the structure a figure needs); plots:
                learning curves per task, diffuse_mqar accuracy against lag,
                and the memory tail of one trained run per mixer.

With --sweep, points of the sweep that have not finished are listed and the
report is marked partial. The tables are also printed.
"""

import collections
import dataclasses
import json
import os
import pathlib
from typing import Any, Mapping, Sequence

from absl import flags
import numpy as np
from scipy import stats

from sessa_jax import cli
from sessa_jax.analysis import plot_style
from sessa_jax.analysis import plots
from sessa_jax.models import mixers
from sessa_jax.train import metrics as metrics_lib

plt = plots.pyplot()

# Columns per task: (summary key, header, format). `test/...` keys fall back to
# `eval/...` when a run has no test evaluation.
COLUMNS = {
    "symbol_soup": [("test/accuracy", "test accuracy", "{:.4f}")],
    "diffuse_mqar": [("eval/accuracy", "val accuracy (train lags)", "{:.4f}"),
                     ("test/accuracy", "test accuracy (lags to 4x)", "{:.4f}")],
    "mqar": [("test/accuracy", "test accuracy", "{:.4f}")],
    "text": [("test/perplexity", "test perplexity", "{:.3f}"),
             ("test/bits_per_byte", "test bits/byte", "{:.4f}")],
}
DEFAULT_COLUMNS = [("test/accuracy", "test accuracy", "{:.4f}"),
                   ("test/loss", "test loss", "{:.4f}")]

# The Sessa paper's results for the matched-budget comparison (its tables);
# the text figures are on SimpleStories, not on the corpus used here.
PAPER = {
    "symbol_soup": ("test/accuracy", {"sessa": 0.8601, "attention": 0.7921,
                                      "mamba2": 0.0500}),
    "diffuse_mqar": ("test/accuracy", {"sessa": 0.1541, "attention": 0.1222,
                                       "mamba2": 0.0021}),
    "text": ("test/perplexity", {"sessa": 8.37, "attention": 7.67,
                                 "mamba2": 7.72}),
}
# The validation metric of learning curves and of unfinished runs, per task.
EVAL_KEY = {"text": "eval/perplexity"}
# The test metric the pairwise comparison uses, per task.
METRIC = {"symbol_soup": "test/accuracy", "diffuse_mqar": "test/accuracy",
          "mqar": "test/accuracy", "text": "test/perplexity"}
LONG_CONTEXT_ORDER = ("diffuse_mqar", "symbol_soup", "mqar", "text")


@dataclasses.dataclass
class Run:
  """One training run's files, read from its workdir.

  `fields` are the point's own (task, variant, setting, seed) from its row in
  the sweep's `sweep_summary.json`; None for a run without them (not trained
  by a sweep, or by one that predates the fields).
  """

  name: str
  path: pathlib.Path
  config: dict[str, Any]
  summary: dict[str, Any] | None
  metrics: list[dict[str, Any]]
  fields: dict[str, Any] | None = None

  @property
  def task(self) -> str:
    return self.config.get("data", {}).get("task") or str(
        (self.summary or {}).get("task", "unknown"))

  @property
  def mixer(self) -> str:
    return self.config.get("model", {}).get("mixer", "unknown")

  @property
  def label(self) -> str:
    """Mixer name, marking the no-feedback ablation, the MLP block and the
    grid setting of a tuning sweep."""
    model = self.config.get("model", {})
    label = self.mixer
    if "sessa" in self.mixer.split(",") and model.get("feedback") is False:
      label += plot_style.ABLATION_SUFFIX
    if model.get("block") == "prenorm_mlp":
      label += " + MLP"
    if self.setting:
      label += f" @ {self.setting}"
    return label

  @property
  def setting(self) -> str | None:
    """The grid setting of the run's point: its field, or for a run without
    fields the third part of a name `<task>.<variant>.<setting>.s<seed>`."""
    if self.fields is not None:
      return self.fields.get("setting")
    parts = pathlib.PurePath(self.name).name.split(".")
    if len(parts) == 4 and parts[3][:1] == "s" and parts[3][1:].isdigit():
      return parts[2]
    return None

  @property
  def seed(self) -> int:
    return int(self.config.get("train", {}).get("seed", 0))

  def value(self, key: str) -> float | None:
    """A summary figure; `test/...` falls back to `eval/...`."""
    if self.summary is None:
      return None
    for k in (key, key.replace("test/", "eval/", 1)):
      if isinstance(self.summary.get(k), (int, float)):
        return float(self.summary[k])
    return None


def _point_fields(path: pathlib.Path) -> dict[str, Any] | None:
  """The fields of the run in `path` from its sweep's row, if it has any."""
  summary_path = path.parent / "sweep_summary.json"
  if not summary_path.exists():
    return None
  row = json.loads(summary_path.read_text()).get(path.name, {})
  return row.get("fields")


def load_runs(root: pathlib.Path) -> list[Run]:
  """Every directory under root holding a config.json, sorted by name."""
  runs = []
  for config_path in sorted(root.rglob("config.json")):
    path = config_path.parent
    summary_path = path / "summary.json"
    metrics_path = path / "metrics.jsonl"
    runs.append(Run(
        name=str(path.relative_to(root)), path=path,
        config=json.loads(config_path.read_text()),
        summary=(json.loads(summary_path.read_text())
                 if summary_path.exists() else None),
        metrics=(metrics_lib.read_metrics(metrics_path)
                 if metrics_path.exists() else []),
        fields=_point_fields(path)))
  return runs


def _label_key(label: str) -> tuple[int, str]:
  base = label.split(" ")[0]
  order = mixers.names()
  rank = order.index(base) if base in order else len(order)
  return rank, label


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
  values = np.asarray(values, np.float64)
  std = float(values.std(ddof=1)) if values.size > 1 else None
  return float(values.mean()), std


def _fmt(values: Sequence[float | None], fmt: str) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "—"
  mean, std = _mean_std(values)
  return fmt.format(mean) + ("" if std is None else " ± " + fmt.format(std))


def _human(n: float | None) -> str:
  if n is None:
    return "—"
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.2f}{unit}"
  return f"{n:.0f}"


def _portable(path: str) -> str:
  """A comma-separated list of paths with absolute ones made relative to cwd."""
  return ",".join(os.path.relpath(p) if os.path.isabs(p) else p
                  for p in path.split(","))


def _shared_config(runs: Sequence[Run]) -> dict[str, Any]:
  """The config of a group of seeds: the first run's, without its seed."""
  config = json.loads(json.dumps(runs[0].config))
  config.get("train", {}).pop("seed", None)
  data = config.get("data", {})
  for key, value in data.items():
    if key.endswith("path") and isinstance(value, str) and value:
      data[key] = _portable(value)
  return config


def _latest(run: Run, key: str) -> list[float] | None:
  """[step, value] of the newest logged `key` of a run, or None."""
  steps, values = _curve(run, key)
  return [int(steps[-1]), float(values[-1])] if steps.size else None


def mixer_results(task: str, runs: Sequence[Run]) -> dict[str, Any]:
  """The JSON entry of one mixer of one task (its seeds' runs)."""
  done = sorted((r for r in runs if r.summary is not None),
                key=lambda r: r.seed)
  first = done[0].summary if done else {}
  keys = [c[0] for c in COLUMNS.get(task, DEFAULT_COLUMNS)]
  metric = METRIC.get(task, "test/accuracy")
  return {
      "params": first.get("params"),
      "flops_per_token": first.get("flops_per_token"),
      "seeds": [r.seed for r in done],
      "test": [r.value(metric) for r in done],
      "values": {k: [r.value(k) for r in done]
                 for k in dict.fromkeys(keys + [metric])},
      "steps": first.get("steps"),
      "wall_time_s": [r.summary.get("wall_time_s") for r in done],
      "launched": len(runs),
      "runs": sorted(r.name for r in runs),
      "latest_eval": {r.name: _latest(r, EVAL_KEY.get(task, "eval/accuracy"))
                      for r in runs if r.summary is None},
      "config": _shared_config(done or runs),
  }


def study_results(runs: Sequence[Run], study: str, *, source: str = "",
                  commands: Sequence[str] = (),
                  planned: Sequence[str] = ()) -> dict[str, Any]:
  """The study's machine-readable results (the module docstring's JSON).

  Args:
    runs: every run of the study.
    study: the study's name.
    source: where the runs were read from, as shown to a reader.
    commands: shell commands that produced the runs.
    planned: every point name of the sweep, when known; those without a
      finished run are listed under "not_finished".
  """
  by_task = collections.defaultdict(lambda: collections.defaultdict(list))
  for run in runs:
    by_task[run.task][run.label].append(run)
  tasks = {}
  for task in sorted(by_task, key=lambda t: (t not in LONG_CONTEXT_ORDER, t)):
    metric = METRIC.get(task, "test/accuracy")
    paper_key, paper = PAPER.get(task, (None, {}))
    groups = by_task[task]
    tasks[task] = {
        "metric": metric.split("/")[-1],
        "metric_key": metric,
        "eval_key": EVAL_KEY.get(task, "eval/accuracy"),
        "columns": [list(c) for c in COLUMNS.get(task, DEFAULT_COLUMNS)],
        "paper": {"key": paper_key, "values": dict(paper)} if paper else None,
        "mixers": {label: mixer_results(task, groups[label])
                   for label in sorted(groups, key=_label_key)},
    }
  points = set(planned) | {r.name for r in runs}
  finished = {r.name for r in runs if r.summary is not None}
  return {"study": study, "source": source, "commands": list(commands),
          "points": len(points), "runs": len(runs), "finished": len(finished),
          "not_finished": sorted(points - finished), "tasks": tasks}


def task_table(entry: Mapping[str, Any]) -> list[str]:
  """Markdown lines of one task's table, from its JSON entry."""
  columns, paper = entry["columns"], entry["paper"]
  header = ["mixer", "params", "FLOPs/token"] + [c[1] for c in columns]
  if paper:
    header.append(f"paper {paper['key'].split('/')[-1]}")
  header += ["seeds", "steps", "wall time (s)"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for label, mixer in entry["mixers"].items():
    row = [label, _human(mixer["params"]), _human(mixer["flops_per_token"])]
    row += [_fmt(mixer["values"][key], fmt) for key, _, fmt in columns]
    if paper:
      ref = paper["values"].get(label)
      row.append("—" if ref is None else f"{ref:g}")
    row += [f"{len(mixer['seeds'])}/{mixer['launched']}",
            str(mixer["steps"] if mixer["steps"] is not None else "—"),
            _fmt(mixer["wall_time_s"], "{:.0f}")]
    lines.append("| " + " | ".join(row) + " |")
  return lines


def welch_interval(a: Sequence[float], b: Sequence[float],
                   level: float = 0.95) -> tuple[float, float, float] | None:
  """mean(a) - mean(b) and its Welch t interval; None below 2 values each."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.size < 2 or b.size < 2:
    return None
  diff = float(a.mean() - b.mean())
  va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
  se = float(np.sqrt(va + vb))
  if se == 0.0:
    return diff, diff, diff
  dof = se ** 4 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
  half = float(stats.t.ppf(0.5 + level / 2, dof)) * se
  return diff, diff - half, diff + half


def comparison_lines(entry: Mapping[str, Any]) -> list[str]:
  """Pairwise differences of the test metric, with 95% Welch intervals."""
  metric = entry["metric_key"]
  values = {label: [v for v in m["values"][metric] if v is not None]
            for label, m in entry["mixers"].items()}
  labels = list(values)
  rows, resolved, unresolved, too_few = [], [], [], []
  for i, a in enumerate(labels):
    for b in labels[i + 1:]:
      interval = welch_interval(values[a], values[b])
      if interval is None:
        too_few.append(f"{a} − {b}")
        continue
      diff, lo, hi = interval
      sure = lo > 0 or hi < 0
      (resolved if sure else unresolved).append(f"{a} − {b}")
      rows.append(f"| {a} − {b} | {diff:+.4f} | [{lo:+.4f}, {hi:+.4f}] | "
                  f"{'yes' if sure else 'no'} |")
  if not rows and not too_few:
    return []
  lines = [f"Differences of {metric} (row mixer minus column mixer, mean over "
           "seeds) with 95% Welch t intervals over seeds; resolved when the "
           "interval excludes 0.", ""]
  if rows:
    lines += ["| difference | mean | 95% interval | resolved |",
              "|---|---|---|---|"] + rows + [""]
  words = []
  if resolved:
    words.append("Resolved: " + ", ".join(resolved) + ".")
  if unresolved:
    words.append("Not resolved (the interval includes 0): "
                 + ", ".join(unresolved) + ".")
  if too_few:
    words.append("Fewer than two finished seeds, no interval: "
                 + ", ".join(too_few) + ".")
  return lines + [" ".join(words), ""]


def settings_line(entry: Mapping[str, Any]) -> str:
  """One line with the training settings every mixer of a task shares."""
  keys = (("data", "seq_len", "seq_len {}"), ("train", "steps", "{} steps"),
          ("train", "batch_size", "batch {}"), ("train", "lr", "peak lr {}"))
  configs = [m["config"] for m in entry["mixers"].values()]
  parts = []
  for section, key, fmt in keys:
    values = {json.dumps(c.get(section, {}).get(key)) for c in configs}
    if len(values) == 1 and values != {"null"}:
      parts.append(fmt.format(json.loads(values.pop())))
  return ("Shared by every run of this task: " + ", ".join(parts) + "."
          if parts else "")


def progress_lines(entry: Mapping[str, Any]) -> list[str]:
  """The newest validation figure of each unfinished run of a task."""
  key = entry["eval_key"]
  cells = [f"{name} {latest[1]:.4f} at step {latest[0]}"
           for mixer in entry["mixers"].values()
           for name, latest in mixer["latest_eval"].items() if latest]
  if not cells:
    return []
  return [f"Unfinished runs, newest {key}: " + "; ".join(cells) + ".", ""]


def render_tables(results: Mapping[str, Any]) -> dict[str, list[str]]:
  """Markdown lines per task (settings, table, comparison) from the JSON."""
  return {task: [settings_line(entry), ""] + task_table(entry) + [""]
          + reference_lines(entry) + progress_lines(entry)
          + comparison_lines(entry)
          for task, entry in results["tasks"].items()}


def _curve(run: Run, key: str) -> tuple[np.ndarray, np.ndarray]:
  points = [(m["step"], m[key]) for m in run.metrics
            if key in m and "step" in m]
  if not points:
    return np.zeros(0), np.zeros(0)
  steps, values = zip(*points)
  return np.asarray(steps), np.asarray(values, np.float64)


def _legend_outside(ax) -> None:
  ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)


def _seed_band(runs: Sequence[Run], key: str):
  """Steps every run logged `key` at, with the mean, min and max over runs."""
  curves = [dict(zip(*_curve(run, key))) for run in runs]
  curves = [c for c in curves if c]
  if not curves:
    return None
  steps = sorted(set.intersection(*(set(c) for c in curves)))
  if not steps:
    return None
  values = np.asarray([[c[s] for s in steps] for c in curves])
  return (np.asarray(steps), values.mean(0), values.min(0), values.max(0),
          len(curves))


def plot_learning_curves(task: str, runs: Sequence[Run],
                         path: pathlib.Path) -> bool:
  """Training loss and the main eval metric against step, one line per model.

  Each line is the mean over the model's seeds at the steps all of them
  logged, in a band from their minimum to their maximum.
  """
  eval_key = EVAL_KEY.get(task, "eval/accuracy")
  by_label: dict[str, list[Run]] = {}
  for run in runs:
    by_label.setdefault(run.label, []).append(run)
  fig, axes = plt.subplots(1, 2, figsize=(12, 4))
  drawn = False
  for label in sorted(by_label, key=_label_key):
    for ax, key in zip(axes, ("train/loss", eval_key)):
      band = _seed_band(by_label[label], key)
      if band is None:
        continue
      steps, mean, low, high, seeds = band
      drawn = True
      style = plot_style.line_style(label)
      if steps.size < 20:
        style.setdefault("marker", ".")
      ax.plot(steps, mean, alpha=0.9, **style,
              label=f"{label} ({seeds} seed{'s' * (seeds > 1)})")
      if seeds > 1:
        ax.fill_between(steps, low, high, color=style["color"], alpha=0.2,
                        lw=0)
  for ax, key in zip(axes, ("train/loss", eval_key)):
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
  _legend_outside(axes[-1])
  fig.suptitle(f"{task}: learning curves (mean over seeds, band: min..max)")
  fig.tight_layout()
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return drawn


def plot_accuracy_by_lag(runs: Sequence[Run], path: pathlib.Path) -> bool:
  """diffuse_mqar test accuracy against lag bin, mean over seeds per mixer."""
  by_label = collections.defaultdict(list)
  for run in runs:
    table = (run.summary or {}).get("test/accuracy_by_lag")
    if table:
      by_label[run.label].append({int(k): float(v) for k, v in table.items()})
  if not by_label:
    return False
  train_max = _train_max_lag(runs)
  fig, ax = plt.subplots(figsize=(8.5, 4))
  for label in sorted(by_label, key=_label_key):
    bins = sorted(set().union(*by_label[label]))
    acc = np.array([[t.get(b, np.nan) for b in bins] for t in by_label[label]])
    ax.plot(bins, np.nanmean(acc, axis=0), **{"marker": "o",
                                              **plot_style.line_style(label)},
            label=label)
    if acc.shape[0] > 1:
      ax.fill_between(bins, np.nanmin(acc, 0), np.nanmax(acc, 0), alpha=0.15,
                      color=plot_style.color(label))
  if train_max:
    ax.axvline(train_max, color="gray", ls=":", lw=1,
               label="longest training lag")
  ax.set_xscale("log")
  ax.set_xlabel("lag (upper edge of bin, tokens)")
  ax.set_ylabel("test token accuracy")
  ax.set_title("diffuse_mqar: accuracy against lag (band: min..max over seeds)")
  ax.grid(alpha=0.3)
  _legend_outside(ax)
  fig.tight_layout()
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return True


def _train_max_lag(runs: Sequence[Run]) -> int | None:
  for run in runs:
    data = run.config.get("data", {})
    for key in ("max_lag", "lag_max"):
      if isinstance(data.get(key), int):
        return data[key]
  return None


def symbol_soup_reference(entry: Mapping[str, Any], num_examples: int
                         ) -> dict[str, Any] | None:
  """The reference classifiers' accuracies at a SymbolSoup task's lengths.

  Args:
    entry: the task's JSON entry.
    num_examples: test examples each classifier is scored on.

  Returns:
    {"tokens": [min, max], "num_examples": N, "accuracy": {classifier:
    accuracy}} (experiments/symbol_soup_ceiling.py), or None when the runs
    read files or differ in their lengths.
  """
  lengths = {(c["data"].get("min_tokens"), c["data"].get("max_tokens"),
              c["data"].get("path") or "")
             for c in (m["config"] for m in entry["mixers"].values())}
  if len(lengths) != 1:
    return None
  lo, hi, path = lengths.pop()
  if path or lo is None or hi is None:
    return None
  from experiments import symbol_soup_ceiling  # pylint: disable=g-import-not-at-top
  accuracy = symbol_soup_ceiling.accuracies(lo, hi, num_examples)
  return {"tokens": [lo, hi], "num_examples": num_examples,
          "accuracy": accuracy}


def reference_lines(entry: Mapping[str, Any]) -> list[str]:
  """One line naming the reference classifiers' accuracies, if any."""
  ref = entry.get("reference")
  if not ref:
    return []
  cells = ", ".join(f"{name} {acc:.3f}"
                    for name, acc in ref["accuracy"].items())
  return [f"Reference classifiers at {ref['tokens'][0]}..{ref['tokens'][1]} "
          f"tokens (`experiments/symbol_soup_ceiling.py`, "
          f"{ref['num_examples']} test examples; what each needs is in its "
          f"docstring): {cells}.", ""]


def memory_tail_section(runs: Sequence[Run], task_choice: str,
                        out_dir: pathlib.Path, study: str) -> list[str]:
  """Measures influence vs lag on every finished seed of one task; md lines."""
  done = [r for r in runs if r.summary is not None]
  tasks = {r.task for r in done}
  if task_choice == "none" or not done:
    return []
  if task_choice == "auto":
    task = next((t for t in LONG_CONTEXT_ORDER if t in tasks), sorted(tasks)[0])
  elif task_choice in tasks:
    task = task_choice
  else:
    raise ValueError(f"--memory_tail_task={task_choice!r}: no finished run of "
                     "that task; choices: auto, none, "
                     + ", ".join(sorted(tasks)))
  chosen = {f"{run.label} s{run.seed}": run
            for run in sorted(done, key=lambda r: (_label_key(r.label), r.seed))
            if run.task == task
            and plot_style.ABLATION_SUFFIX not in run.label}
  if not chosen:
    return []
  from experiments import memory_tail  # pylint: disable=g-import-not-at-top
  prefix = out_dir / f"{study}_memory_tail"
  results = memory_tail.measure_workdirs(
      {name: run.path for name, run in chosen.items()}, prefix=prefix,
      title=f"memory tail after training on {task}")
  slopes: dict[str, list[float]] = {}
  for name, run in chosen.items():
    slopes.setdefault(run.label, []).append(results[name]["influence"]["slope"])
  window = next(iter(results.values()))["influence"]["window"]
  lines = [f"## Memory tail ({task}, every seed's final checkpoint)", "",
           f"![memory tail]({prefix.name}.png)", "",
           "Fitted log-log slope of the influence against lag, fit window "
           f"lags {window[0]}..{window[1]}.", "",
           "| mixer | slope per seed | mean ± std |", "|---|---|---|"]
  for label in sorted(slopes, key=_label_key):
    per_seed = ", ".join(f"{v:+.3f}" for v in slopes[label])
    mean, std = _mean_std(slopes[label])
    spread = "" if std is None else f" ± {std:.3f}"
    lines.append(f"| {label} | {per_seed} | {mean:+.3f}{spread} |")
  impulses = [(name, entry) for name, result in results.items()
              for entry in result.get("layers", [])]
  if impulses:
    lines += ["", "Feedback impulse response of each Sessa layer (recorded "
              "routing and gains): fitted exponent beside the paper's "
              "1 − γ_max·c₂; a guaranteed tail needs γ_min ≥ 0, and the "
              "paper's regime assumes γ ≥ 0.", "",
              "| run | layer | fitted exponent | c₂ | 1 − γ_max·c₂ | γ_min | "
              "negative gains |", "|---|---|---|---|---|---|---|"]
    for name, entry in impulses:
      b = entry["bound"]
      lines.append(f"| {name} | {entry['layer']} | "
                   f"{b['fitted_exponent']:.3f} | {b['c2']:.3g} | "
                   f"{b['paper_exponent']:.3f} | {b['gamma_min']:.3f} | "
                   f"{b['negative_gain_fraction']:.0%} |")
  return lines + [""]


def _shown(path: pathlib.Path) -> str:
  """A path as a reader of the report should see it: relative, not absolute."""
  path = path.resolve()
  try:
    return str(path.relative_to(pathlib.Path.cwd()))
  except ValueError:
    return path.name


def write_report(root: pathlib.Path, out_dir: pathlib.Path, study: str,
                 memory_tail_task: str = "auto",
                 commands: Sequence[str] = (),
                 planned: Sequence[str] = (),
                 reference_examples: int = 1000) -> pathlib.Path:
  """Writes OUT/<study>.json, OUT/<study>.md and its PNGs; returns the .md.

  Args:
    root: the sweep directory (run directories below it).
    out_dir: where the .json, .md and PNGs go.
    study: file-name stem and title.
    memory_tail_task: see `memory_tail_section`.
    commands: shell commands that produced `root`, listed in the report.
    planned: every point name of the sweep, if known (marks a partial study).
    reference_examples: test examples the SymbolSoup reference classifiers
      are scored on (`symbol_soup_reference`); 0 skips them.
  """
  runs = load_runs(root)
  if not runs:
    raise FileNotFoundError(f"no run directories (config.json) under {root}")
  out_dir.mkdir(parents=True, exist_ok=True)
  cwd = str(pathlib.Path.cwd()) + os.sep
  results = study_results(runs, study, source=_shown(root),
                          commands=[c.replace(cwd, "") for c in commands],
                          planned=planned)
  if reference_examples and "symbol_soup" in results["tasks"]:
    entry = results["tasks"]["symbol_soup"]
    entry["reference"] = symbol_soup_reference(entry, reference_examples)
  json_path = out_dir / f"{study}.json"
  json_path.write_text(json.dumps(results, indent=1) + "\n")
  lines = [f"# {study}", ""]
  if results["not_finished"]:
    lines += [f"**Partial**: {results['finished']} of "
              f"{results['points']} points finished; the "
              "others are listed at the end.", ""]
  lines += [f"Runs read from `{results['source']}`: {results['runs']} "
            f"({results['finished']} finished). Metrics are mean ± sample "
            "std over seeds; `seeds` counts finished/launched runs. Paper "
            "figures are from the Sessa paper's matched-budget tables (text: "
            "SimpleStories, not the corpus here). Every number is in "
            f"`{json_path.name}`.", ""]
  if results["commands"]:
    lines += ["Produced by:", "", "```"] + results["commands"] + ["```", ""]
  by_task = collections.defaultdict(list)
  for run in runs:
    by_task[run.task].append(run)
  for task, table in render_tables(results).items():
    print(f"\n{task}\n" + "\n".join(table))
    lines += [f"## {task}", ""] + table
    png = out_dir / f"{study}_curves_{task}.png"
    if plot_learning_curves(task, by_task[task], png):
      lines += [f"![{task} learning curves]({png.name})", ""]
  if "diffuse_mqar" in by_task:
    png = out_dir / f"{study}_accuracy_by_lag.png"
    if plot_accuracy_by_lag(by_task["diffuse_mqar"], png):
      lines += ["## diffuse_mqar: accuracy against lag", "",
                f"![accuracy by lag]({png.name})", ""]
  lines += memory_tail_section(runs, memory_tail_task, out_dir, study)
  if results["not_finished"]:
    lines += ["Not finished (failed, running or not started): "
              + ", ".join(results["not_finished"]), ""]
  md = out_dir / f"{study}.md"
  md.write_text("\n".join(lines))
  print(f"\nwrote {md} and {json_path}")
  return md


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("study", None, "study name; defaults to DIR's name",
                      flag_values=fv)
  flags.DEFINE_string(
      "out", None, "where the .json, .md and PNGs are written (default "
      "workdirs/reports/<study>); name results to update the committed "
      "results", flag_values=fv)
  flags.DEFINE_string(
      "sweep", None, "the sweep spec that made DIR (e.g. "
      "experiments/matched_budget.py:cpu_long): its unfinished points are "
      "listed and the report is marked partial", flag_values=fv)
  flags.DEFINE_string(
      "memory_tail_task", "auto",
      "task whose runs (every seed) get the memory-tail plot; 'auto' picks "
      "the longest-context task present, 'none' skips it", flag_values=fv)
  flags.DEFINE_integer(
      "reference_examples", 1000,
      "test examples the SymbolSoup reference classifiers are scored on (0 "
      "skips them)", flag_values=fv)
  flags.DEFINE_multi_string(
      "command", [],
      "a command that produced DIR, recorded in the report (repeatable)",
      flag_values=fv)


def main(argv: Sequence[str] | None = None) -> None:
  args, positional = cli.parse(argv, _define_flags,
                               __doc__.split("\n\n")[0], positional="DIR")
  if len(positional) != 1:
    cli.error("one DIR, the study's sweep dir, is expected")
  workdir = pathlib.Path(positional[0])
  study = args.study or workdir.name
  planned = ()
  if args.sweep:
    from sessa_jax.sweeps import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
    planned = tuple(sweep_lib.load_sweep(args.sweep))
  out = pathlib.Path(args.out or f"workdirs/reports/{study}")
  write_report(workdir, out, study, args.memory_tail_task, args.command,
               planned, args.reference_examples)


if __name__ == "__main__":
  main()
