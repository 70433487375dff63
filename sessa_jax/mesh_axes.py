"""Names of the device-mesh axes, shared by the trainer and the kernels.

The trainer's mesh (`train/sharding.py`) has axes `MESH_AXES`; a batch is
split over `BATCH_AXES`, which is also where the feedback solve runs per
shard (`kernels/feedback/op.py`).
"""

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
