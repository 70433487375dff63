r"""Tables and plots for a finished study (a sweep's workdir).

  python experiments/report.py /path/to/sweep_dir [--study=NAME] \
      [--out=experiments/results] [--memory_tail_task=diffuse_mqar] \
      [--command="python launch.py --sweep=..."]

Reads every run directory under DIR (`config.json`, `metrics.jsonl`,
`summary.json`) and writes `OUT/<study>.md`: one table per task with mixer,
parameters, FLOPs per token, each metric's mean ± std over seeds and the wall
time, beside the Sessa paper's figure where the paper has one; plus PNGs:
learning curves per task, diffuse_mqar accuracy against lag, and the memory
tail (influence against lag) of one trained run per mixer. The tables are
also printed.
"""

import collections
import dataclasses
import importlib.util
import json
import pathlib
from typing import Any, Sequence

import argparse

import numpy as np

from sessa_jax.analysis import plots

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
MIXER_ORDER = ("sessa", "attention", "mamba2")
LONG_CONTEXT_ORDER = ("diffuse_mqar", "symbol_soup", "mqar", "text")


@dataclasses.dataclass
class Run:
  """One training run's files, read from its workdir."""

  name: str
  path: pathlib.Path
  config: dict[str, Any]
  summary: dict[str, Any] | None
  metrics: list[dict[str, Any]]

  @property
  def task(self) -> str:
    return self.config.get("data", {}).get("task") or str(
        (self.summary or {}).get("task", "unknown"))

  @property
  def mixer(self) -> str:
    return self.config.get("model", {}).get("mixer", "unknown")

  @property
  def label(self) -> str:
    """Mixer name, marking the no-feedback ablation and the MLP block."""
    model = self.config.get("model", {})
    label = self.mixer
    if self.mixer == "sessa" and model.get("feedback") is False:
      label += " (no feedback)"
    if model.get("block") == "prenorm_mlp":
      label += " + MLP"
    return label

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


def load_runs(root: pathlib.Path) -> list[Run]:
  """Every directory under root holding a config.json, sorted by name."""
  runs = []
  for config_path in sorted(root.rglob("config.json")):
    path = config_path.parent
    summary_path = path / "summary.json"
    metrics_path = path / "metrics.jsonl"
    metrics = []
    if metrics_path.exists():
      for line in metrics_path.read_text().splitlines():
        if line.strip():
          metrics.append(json.loads(line))
    runs.append(Run(
        name=str(path.relative_to(root)), path=path,
        config=json.loads(config_path.read_text()),
        summary=(json.loads(summary_path.read_text())
                 if summary_path.exists() else None),
        metrics=metrics))
  return runs


def _label_key(label: str) -> tuple[int, str]:
  base = label.split(" ")[0]
  rank = MIXER_ORDER.index(base) if base in MIXER_ORDER else len(MIXER_ORDER)
  return rank, label


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
  values = np.asarray(values, np.float64)
  std = float(values.std(ddof=1)) if values.size > 1 else None
  return float(values.mean()), std


def _fmt(values: Sequence[float], fmt: str) -> str:
  if not values:
    return "—"
  mean, std = _mean_std(values)
  return fmt.format(mean) + ("" if std is None else " ± " + fmt.format(std))


def _human(n: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.2f}{unit}"
  return f"{n:.0f}"


def task_table(task: str, runs: Sequence[Run]) -> list[str]:
  """Markdown lines: one row per mixer label, seeds aggregated."""
  columns = COLUMNS.get(task, DEFAULT_COLUMNS)
  paper_key, paper = PAPER.get(task, (None, {}))
  header = ["mixer", "params", "FLOPs/token"] + [c[1] for c in columns]
  if paper:
    header.append(f"paper {paper_key.split('/')[-1]}")
  header += ["seeds", "steps", "wall time (s)"]
  lines = ["| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  by_label = collections.defaultdict(list)
  for run in runs:
    by_label[run.label].append(run)
  for label in sorted(by_label, key=_label_key):
    group = by_label[label]
    done = [r for r in group if r.summary is not None]
    first = done[0].summary if done else {}
    row = [label] + [_human(first[k]) if k in first else "—"
                     for k in ("params", "flops_per_token")]
    for key, _, fmt in columns:
      values = [r.value(key) for r in done]
      row.append(_fmt([v for v in values if v is not None], fmt))
    if paper:
      ref = paper.get(label)
      row.append("—" if ref is None else f"{ref:g}")
    row.append(f"{len(done)}/{len(group)}")
    row.append(str(first.get("steps", "—")))
    row.append(_fmt([r.summary["wall_time_s"] for r in done
                     if "wall_time_s" in r.summary], "{:.0f}"))
    lines.append("| " + " | ".join(row) + " |")
  return lines


def _settings(runs: Sequence[Run]) -> str:
  """One line with the training settings the runs of a task share."""
  keys = (("data", "seq_len", "seq_len {}"), ("train", "steps", "{} steps"),
          ("train", "batch_size", "batch {}"), ("train", "lr", "peak lr {}"))
  parts = []
  for section, key, fmt in keys:
    values = {json.dumps(r.config.get(section, {}).get(key)) for r in runs}
    if len(values) == 1 and values != {"null"}:
      parts.append(fmt.format(json.loads(values.pop())))
  return ("Shared by every run of this task: " + ", ".join(parts) + "."
          if parts else "")


def _curve(run: Run, key: str) -> tuple[np.ndarray, np.ndarray]:
  points = [(m["step"], m[key]) for m in run.metrics
            if key in m and "step" in m]
  if not points:
    return np.zeros(0), np.zeros(0)
  steps, values = zip(*points)
  return np.asarray(steps), np.asarray(values, np.float64)


def plot_learning_curves(task: str, runs: Sequence[Run],
                         path: pathlib.Path) -> bool:
  """Training loss and the main eval metric against step, one line per run."""
  eval_key = {"text": "eval/perplexity"}.get(task, "eval/accuracy")
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  colors = {}
  drawn = False
  for run in sorted(runs, key=lambda r: (_label_key(r.label), r.seed)):
    color = colors.setdefault(run.label, f"C{len(colors)}")
    for ax, key in zip(axes, ("train/loss", eval_key)):
      steps, values = _curve(run, key)
      if steps.size:
        drawn = True
        ax.plot(steps, values, color=color, alpha=0.85, marker="." if
                steps.size < 20 else None,
                label=run.label if run.seed == min(
                    r.seed for r in runs if r.label == run.label) else None)
  for ax, key in zip(axes, ("train/loss", eval_key)):
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.suptitle(f"{task}: learning curves (one line per seed)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
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
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for label in sorted(by_label, key=_label_key):
    bins = sorted(set().union(*by_label[label]))
    acc = np.array([[t.get(b, np.nan) for b in bins] for t in by_label[label]])
    mean = np.nanmean(acc, axis=0)
    ax.plot(bins, mean, marker="o", label=label)
    if acc.shape[0] > 1:
      ax.fill_between(bins, np.nanmin(acc, 0), np.nanmax(acc, 0), alpha=0.2)
  if train_max:
    ax.axvline(train_max, color="gray", ls="--", lw=1,
               label="longest training lag")
  ax.set_xscale("log")
  ax.set_xlabel("lag (upper edge of bin, tokens)")
  ax.set_ylabel("test token accuracy")
  ax.set_title("diffuse_mqar: accuracy against lag")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def _train_max_lag(runs: Sequence[Run]) -> int | None:
  for run in runs:
    data = run.config.get("data", {})
    for key in ("max_lag", "lag_max"):
      if isinstance(data.get(key), int):
        return data[key]
  return None


def _memory_tail_module():
  """experiments/memory_tail.py, loaded beside this file."""
  path = pathlib.Path(__file__).with_name("memory_tail.py")
  spec = importlib.util.spec_from_file_location("memory_tail", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def memory_tail_section(runs: Sequence[Run], task_choice: str,
                        out_dir: pathlib.Path, study: str) -> list[str]:
  """Measures influence vs lag on one trained run per mixer; md lines."""
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
                     f"that task; choices: auto, none, {', '.join(sorted(tasks))}")
  chosen = {}
  for run in sorted(done, key=lambda r: (_label_key(r.label), r.seed)):
    if run.task == task and run.label in MIXER_ORDER:
      chosen.setdefault(run.label, run)
  if not chosen:
    return []
  memory_tail = _memory_tail_module()
  prefix = out_dir / f"{study}_memory_tail"
  results = memory_tail.measure_workdirs(
      {label: run.path for label, run in chosen.items()}, prefix=prefix,
      title=f"memory tail after training on {task}")
  lines = [f"## Memory tail ({task}, seed-{min(r.seed for r in chosen.values())}"
           " checkpoints)", "",
           f"![memory tail]({prefix.name}.png)", "",
           "| mixer | fitted log-log slope | fit window (lags) |", "|---|---|---|"]
  for label in sorted(results, key=_label_key):
    curve = results[label]["influence"]
    lines.append(f"| {label} | {curve['slope']:.3f} | "
                 f"{curve['window'][0]}..{curve['window'][1]} |")
  for label, result in results.items():
    if result.get("bound"):
      b = result["bound"]
      lines += ["", f"{label} feedback impulse response (layer 0, recorded "
                f"routing): fitted exponent {b['fitted_exponent']:.3f}; "
                f"c₂ = {b['c2']:.3g}, γ_max = {b['gamma_max']:g}, "
                f"1 − γ_max·c₂ = {b['paper_exponent']:.3f}; recorded "
                f"γ_min = {b['gamma_min']:.3f}, 1 − γ_min·c₂ = "
                f"{b['floor_exponent']:.3f}; negative gains on "
                f"{b['negative_gain_fraction']:.0%} of tokens (the paper's "
                "regime assumes γ ≥ 0)."]
  return lines + [""]


def write_report(root: pathlib.Path, out_dir: pathlib.Path, study: str,
                 memory_tail_task: str = "auto",
                 commands: Sequence[str] = ()) -> pathlib.Path:
  """Writes OUT/<study>.md and its PNGs; prints the tables; returns the .md.

  Args:
    root: the sweep directory (run directories below it).
    out_dir: where the .md and PNGs go.
    study: file-name stem and title.
    memory_tail_task: see `memory_tail_section`.
    commands: shell commands that produced `root`, listed in the report.
  """
  runs = load_runs(root)
  if not runs:
    raise FileNotFoundError(f"no run directories (config.json) under {root}")
  out_dir.mkdir(parents=True, exist_ok=True)
  by_task = collections.defaultdict(list)
  for run in runs:
    by_task[run.task].append(run)
  lines = [f"# {study}", "",
           f"Runs read from `{root}`: {len(runs)} "
           f"({sum(r.summary is not None for r in runs)} finished). Metrics "
           "are mean ± sample std over seeds; `seeds` counts finished/launched "
           "runs. Paper figures are from the Sessa paper's matched-budget "
           "tables (text: SimpleStories, not the corpus here).", ""]
  if commands:
    lines += ["Produced by:", "", "```"] + list(commands) + ["```", ""]
  for task in sorted(by_task, key=lambda t: (t not in LONG_CONTEXT_ORDER, t)):
    table = task_table(task, by_task[task])
    print(f"\n{task}\n" + "\n".join(table))
    lines += [f"## {task}", "", _settings(by_task[task]), ""] + table + [""]
    png = out_dir / f"{study}_curves_{task}.png"
    if plot_learning_curves(task, by_task[task], png):
      lines += [f"![{task} learning curves]({png.name})", ""]
  if "diffuse_mqar" in by_task:
    png = out_dir / f"{study}_accuracy_by_lag.png"
    if plot_accuracy_by_lag(by_task["diffuse_mqar"], png):
      lines += ["## diffuse_mqar: accuracy against lag", "",
                f"![accuracy by lag]({png.name})", ""]
  lines += memory_tail_section(runs, memory_tail_task, out_dir, study)
  failed = [r.name for r in runs if r.summary is None]
  if failed:
    lines += ["Unfinished or failed runs: " + ", ".join(failed), ""]
  md = out_dir / f"{study}.md"
  md.write_text("\n".join(lines))
  print(f"\nwrote {md}")
  return md


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("dir", type=pathlib.Path, help="the study's sweep dir")
  parser.add_argument("--study", help="study name; defaults to DIR's name")
  parser.add_argument("--out", type=pathlib.Path,
                      default=pathlib.Path(__file__).parent / "results",
                      help="where the .md and PNGs are written")
  parser.add_argument(
      "--memory_tail_task", default="auto",
      help="task whose seed-0 runs get the memory-tail plot; 'auto' picks "
      "the longest-context task present, 'none' skips it")
  parser.add_argument(
      "--command", action="append", default=[],
      help="a command that produced DIR, recorded in the report (repeatable)")
  args = parser.parse_args(argv)
  write_report(args.dir, args.out, args.study or args.dir.name,
               args.memory_tail_task, args.command)


if __name__ == "__main__":
  main()
