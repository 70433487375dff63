"""The grain pipeline: shuffled, host-sharded, batched, checkpointable.

Order of operations, all on example indices until the last step:

  range(num_examples) -> shuffle(seed) -> repeat(num_epochs)
    -> global batches of indices -> this host's contiguous slice of each
    -> task.example(split, i) for each index, stacked -> iterator

Host p of P takes rows [p * B/P, (p+1) * B/P) of every global batch of B
indices, so the hosts' local batches concatenated in process order are exactly
the single-host batch: the data a step sees does not depend on the number of
hosts. Shuffling happens before `repeat`, so every epoch has its own order.
"""

from __future__ import annotations

from absl import flags
import grain
import numpy as np

from sessa_jax.data import base


class _HostRows:
  """Picks one host's rows of a global batch of indices."""

  def __init__(self, process_index: int, local_batch_size: int):
    self.start = process_index * local_batch_size
    self.stop = self.start + local_batch_size

  def __call__(self, indices_b: np.ndarray) -> np.ndarray:
    return indices_b[self.start:self.stop]


class _Examples:
  """Turns a batch of indices into a stacked batch of examples."""

  def __init__(self, task: base.Task, split: str):
    self.task = task
    self.split = split

  def __call__(self, indices_b: np.ndarray) -> dict[str, np.ndarray]:
    examples = [self.task.example(self.split, int(i)) for i in indices_b]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def check_split_size(task: base.Task, split: str, batch_size: int) -> int:
  """Returns the number of examples of `split`; raises if under one batch."""
  num = task.num_examples(split)
  if num < batch_size:
    source = task.source(split)
    raise ValueError(
        f"split {split!r} of task {task.name!r}"
        f"{f' ({source})' if source else ''} has {num} examples, fewer than "
        f"one batch of {batch_size} (train.batch_size)")
  return num


def make_iterator(
    task: base.Task,
    split: str,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
    prefetch: int = 2,
) -> grain.DatasetIterator:
  """An iterator of this host's batches, whose state can be saved and restored.

  Args:
    task: the task whose examples to batch.
    split: 'train', 'val' or 'test'.
    batch_size: global batch size B, summed over hosts.
    seed: shuffle seed (epoch e is shuffled with a seed derived from it and e).
    shuffle: whether to shuffle; False keeps index order.
    num_epochs: passes over the split; None repeats forever. The last partial
      global batch of the data is dropped.
    process_index: this host's index p in [0, process_count).
    process_count: number of hosts P; must divide B.
    num_workers: worker processes producing batches; 0 works in-process. With
      workers the calling program needs an `if __name__ == "__main__":` guard.
      The stream is the same as with 0 workers.
    prefetch: batches prepared ahead in a background thread (0: none).

  Returns:
    A `grain.DatasetIterator` of dicts of (B / P, seq_len) numpy arrays;
    `get_state()` / `set_state()` save and restore its exact position.

  Raises:
    ValueError: on inconsistent sizes or an unknown split.
  """
  base.check_split(split)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index={process_index} must be in [0, process_count="
        f"{process_count})")
  if batch_size % process_count:
    raise ValueError(
        f"batch_size={batch_size} is not divisible by process_count="
        f"{process_count}")
  if num_workers < 0:
    raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
  num = check_split_size(task, split, batch_size)
  local_batch_size = batch_size // process_count

  ds = grain.MapDataset.range(num)
  if shuffle:
    ds = ds.shuffle(seed=seed % 2**32)
  ds = ds.repeat(num_epochs)
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.map(_HostRows(process_index, local_batch_size))
  ds = ds.map(_Examples(task, split))
  read_options = grain.ReadOptions(
      num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
  it_ds = ds.to_iter_dataset(read_options)
  if num_workers:
    # grain reads its absl flags when it starts workers; a program that did
    # not parse flags (no absl.app) gets their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(it_ds)

