"""The DeepSpeed engine: distributed set-up, DeepSpeed config, optimizer, checkpoints, training loop.

Importing this package selects DeepSpeed's CPU accelerator when no CUDA device exists (it must be
chosen before `deepspeed` is first imported).
"""

from mmtrain.engine.accelerator import configure_accelerator_env

configure_accelerator_env()
