r"""Memory per device of one train step as the mesh changes.

Compiles (never runs) the trainer's step for a d_model=512, 4-layer model of
each mixer on several meshes of fake CPU devices and prints XLA's compiled
memory analysis per device (`sessa_jax.train.compiled.analyze`, as
`launch.py --dry_run` prints it): `state` (the parameters, AdamW moments,
step and RNG the step takes as arguments, batch excluded) and `temporaries`
(XLA's scratch: activations kept for the backward pass, gradients,
workspace).

  python experiments/memory_per_device.py
  python experiments/memory_per_device.py --mixers=sessa --seq_len=512

With fsdp=8 the state per device should be about 1/8 of one device's (plus
the few vectors that stay whole); with tensor=2 the temporaries should drop
(attention heads, the MLP hidden and Mamba-2's inner width split in two).
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

# Eight fake CPU devices unless the caller chose a platform or device count.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from sessa_jax import cli  # pylint: disable=g-import-not-at-top
from sessa_jax.models import mixers  # pylint: disable=g-import-not-at-top
from sessa_jax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
from sessa_jax.train import compiled  # pylint: disable=g-import-not-at-top
from sessa_jax.train import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
from sessa_jax.train import trainer  # pylint: disable=g-import-not-at-top
from sessa_jax.train.config import MeshConfig, TrainConfig  # pylint: disable=g-import-not-at-top

# (data, fsdp, tensor) per column of the table.
MESHES = {"1 device": (1, 1, 1), "fsdp=8": (1, 8, 1), "tensor=2": (1, 1, 2),
          "fsdp=4 tensor=2": (1, 4, 2)}


def measure(mixer: str, mesh_shape: tuple[int, int, int], *,
            d_model: int = 512, n_layers: int = 4, seq_len: int = 256,
            batch_size: int = 8, vocab_size: int = 256) -> dict[str, int]:
  """Compiles one train step and returns its memory per device in bytes.

  Args:
    mixer: a registered mixer (`mixers.names()`).
    mesh_shape: (data, fsdp, tensor); uses the first prod(shape) devices.
    d_model: model width (8 heads; Mamba-2 heads of 64).
    n_layers: depth.
    seq_len: tokens per sequence.
    batch_size: global batch.
    vocab_size: vocabulary.

  Returns:
    {'state_bytes', 'temp_bytes'} for one device.
  """
  model_cfg = ModelConfig(mixer=mixer, d_model=d_model, n_layers=n_layers,
                          n_heads=8, vocab_size=vocab_size, ssm_head_dim=64,
                          ssm_state=64)
  tc = TrainConfig(batch_size=batch_size)
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  mesh = sharding_lib.make_mesh(MeshConfig(*mesh_shape), devices)
  state_spec = trainer.make_state_spec(model_cfg, tc, mesh)
  step = trainer.make_train_step(state_spec, tc, mesh)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  batch = {name: jax.ShapeDtypeStruct((batch_size, seq_len), dtype,
                                      sharding=batch_sharding)
           for name, dtype in (("inputs", np.int32), ("targets", np.int32),
                               ("loss_mask", np.float32))}
  memory = compiled.analyze(step.lower(state_spec.abstract, batch).compile())
  batch_bytes = sum(
      int(np.prod(s.sharding.shard_shape(s.shape))) * np.dtype(s.dtype).itemsize
      for s in batch.values())
  return {"state_bytes": memory["argument_bytes"] - batch_bytes,
          "temp_bytes": memory["temp_bytes"]}


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("mixers", ",".join(mixers.names()),
                      "comma-separated mixers to measure", flag_values=fv)
  flags.DEFINE_integer("seq_len", 256, "tokens per sequence", flag_values=fv)
  flags.DEFINE_integer("batch_size", 8, "sequences per step", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> None:
  args, _ = cli.parse(argv, _define_flags, __doc__.split("\n")[0])
  if jax.device_count() < 8:
    sys.exit(f"needs 8 devices, found {jax.device_count()}")
  print(f"MiB per device, one train step, d_model=512, 4 layers, batch "
        f"{args.batch_size} x {args.seq_len} tokens, float32")
  header = ["mixer", *(f"{k}: state / temp" for k in MESHES)]
  print(" | ".join(header))
  for mixer in args.mixers.split(","):
    cells = []
    for shape in MESHES.values():
      m = measure(mixer, shape, seq_len=args.seq_len,
                  batch_size=args.batch_size)
      cells.append(f"{m['state_bytes'] / 2**20:.1f} / "
                   f"{m['temp_bytes'] / 2**20:.1f}")
    print(" | ".join([mixer, *cells]), flush=True)


if __name__ == "__main__":
  main()
