"""Continuations of a text prompt by a loaded run (launch.py --mode=sample)."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from sessa_jax.loading import LoadedRun


def continue_text(run: LoadedRun, prompt: str, num_tokens: int, *,
                  num_samples: int = 1, temperature: float = 0.0,
                  top_k: int | None = None, seed: int = 0) -> list[str]:
  """Continuations of `prompt` by the run's model, as text.

  The prompt is encoded after the document separator, as a document starts
  in training, and extended by `num_tokens` tokens in one compiled
  `generate` call (all samples in one batch).

  Args:
    run: from `sessa_jax.load`; its task must have a tokenizer (text).
    prompt: the text to continue (may be empty).
    num_tokens: tokens to generate.
    num_samples: continuations to draw (identical when greedy).
    temperature: 0 decodes greedily; otherwise samples softmax(logits / T).
    top_k: sample among the k most likely tokens only.
    seed: PRNG seed of the samples.

  Returns:
    One decoded continuation (without the prompt) per sample.

  Raises:
    ValueError: the run's task has no tokenizer.
  """
  if run.tokenizer is None:
    raise ValueError(
        f"sampling text needs a text task with a tokenizer; this run's task "
        f"is {run.task.name!r}" + (" over token files" if run.task.name ==
                                   "text" else ""))
  tokens = np.concatenate([[run.tokenizer.separator_id],
                           run.tokenizer.encode(prompt)]).astype(np.int32)
  prompt_bt = np.tile(tokens[None], (num_samples, 1))
  out = run.model.generate(prompt_bt, num_tokens, rng=jax.random.key(seed),
                           temperature=temperature, top_k=top_k)
  return [run.tokenizer.decode(row) for row in
          np.asarray(out)[:, len(tokens):]]


def format_samples(prompt: str, samples: Sequence[str]) -> str:
  """The prompt, then each continuation after it, separated by rules."""
  rule = "-" * 72
  return "\n".join(f"{rule}\n{prompt}{s}" for s in samples) + "\n" + rule
