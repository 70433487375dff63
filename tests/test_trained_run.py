"""Using a run: its start report, dry run, profile, load, eval, sample."""

import json

import jax
import pytest

import sessa_jax
from sessa_jax import budget
from sessa_jax import data as data_lib
from sessa_jax import loading
from sessa_jax import sampling
from sessa_jax.train import config as config_lib
from sessa_jax.train import evaluate as evaluate_lib
from sessa_jax.train import trainer
from test_launch import finish, launch
from test_train_loop import tiny_config


def test_dry_run_compiles_reports_and_writes_nothing(tmp_path, capsys):
  config = tiny_config()
  info = trainer.dry_run(config, tmp_path / "run",
                         overrides={"train.lr": 0.01})
  printed = capsys.readouterr().out
  assert "memory per device: arguments" in printed and "FLOPs" in printed
  model_cfg = trainer.setup(config).model_cfg
  assert info["params"]["total"] == budget.count_params(model_cfg)
  assert info["mesh"] == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
  compiled = info["compiled"]
  # Every device holds the replicated params and optimizer state (3x params).
  assert compiled["argument_bytes"] >= 3 * 4 * info["params"]["total"]
  assert compiled["temp_bytes"] > 0 and compiled["flops"] > 0
  assert info["overrides"] == {"train.lr": 0.01}
  assert not (tmp_path / "run" / "checkpoints").exists()
  assert not (tmp_path / "run" / "config.json").exists()


def _eval_loss(model, task, batch_size, batches):
  """Mean token loss of `model` over the first val batches (no jit, no mesh)."""
  it = data_lib.make_iterator(task, "val", batch_size=batch_size, seed=0,
                              shuffle=False, num_epochs=1)
  loss_sum = count = 0.0
  for _, batch in zip(range(batches), it):
    stats = evaluate_lib.token_stats(model(batch["inputs"]), batch)
    loss_sum += float(stats["loss_sum"])
    count += float(stats["count"])
  return loss_sum / count


def test_run_reports_itself_profiles_and_loads_back(tmp_path):
  config = tiny_config(steps=4, eval_every=2, checkpoint_every=2,
                       profile_steps=(1, 2))
  summary = trainer.train(config, tmp_path, overrides={"train.steps": 4})

  info = json.loads((tmp_path / "run_info.json").read_text())
  model_cfg = trainer.setup(config).model_cfg
  assert info["params"]["total"] == budget.count_params(model_cfg)
  assert sum(info["params"]["by_module"].values()) == info["params"]["total"]
  assert set(info["params"]["by_module"]) == {"embedding", "blocks",
                                              "final_norm"}
  assert info["tokens_per_step"] == 8 * 16
  assert info["flops_per_token"] == budget.flops_per_token(model_cfg, 16)
  assert info["dtypes"] == {"compute": "float32", "params": "float32"}
  assert info["overrides"] == {"train.steps": 4}

  traces = list((tmp_path / "tb" / "plugins" / "profile").glob("*/*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0

  logged = {r["step"]: r for r in map(
      json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
  for step, expected in ((2, logged[2]["eval/loss"]),
                         (None, summary["eval/loss"])):
    run = sessa_jax.load(tmp_path, step)
    assert run.step == (step or 4)
    assert run.tokenizer is None and run.task.name == "mqar"
    loss = _eval_loss(run.model, run.task, 8, 2)
    assert loss == pytest.approx(expected, rel=1e-5)

  # --mode=eval from the workdir alone, at a given step.
  again = trainer.evaluate_checkpoint(loading.read_config(tmp_path), tmp_path,
                                      step=2)
  assert again["eval/loss"] == pytest.approx(logged[2]["eval/loss"], rel=1e-6)
  with pytest.raises(FileNotFoundError, match="saved steps: 2, 4"):
    sessa_jax.load(tmp_path, step=3)


def test_sample_mode_prints_text(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  (corpus / "a.txt").write_text("the cat sat on the mat. " * 600)
  config = config_lib.base_config(
      model=dict(mixer="sessa", d_model=16, n_layers=1, n_heads=2),
      data=dict(task="text", path=str(corpus / "*.txt"), seq_len=32),
      train=dict(steps=40, batch_size=8, lr=1e-2, warmup_steps=1,
                 eval_every=0, eval_batches=1, test_batches=1,
                 checkpoint_every=40, log_every=10))
  trainer.train(config, tmp_path / "run")
  out = finish(launch(f"--workdir={tmp_path / 'run'}", "--mode=sample",
                      "--prompt=the cat", "--num_tokens=24",
                      "--temperature=0.5", "--top_k=5", "--num_samples=2"))
  assert "step 40:" in out
  lines = [l for l in out.splitlines() if l.startswith("the cat")]
  assert len(lines) == 2
  assert all(len(l) > len("the cat") + 5 for l in lines), out


def test_sample_mode_refuses_a_task_without_text(tmp_path):
  trainer.train(tiny_config(steps=2, checkpoint_every=2), tmp_path)
  run = sessa_jax.load(tmp_path)
  with pytest.raises(ValueError, match="needs a text task"):
    sampling.continue_text(run, "x", 4)


@pytest.mark.parametrize("bad", [(1,), (1, 2, 3), (-1, 2), (1.5, 2)])
def test_profile_steps_must_be_two_counts(bad):
  with pytest.raises(ValueError, match="train.profile_steps"):
    config_lib.TrainConfig(profile_steps=bad)
