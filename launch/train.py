"""Entry for launchers: `deepspeed [--num_gpus N] launch/train.py [--config X] [--set k=v] [--resume auto]`;
under `bigadapt launch deepspeed ...` a SIGTERM/SIGUSR1 to the command checkpoints every rank (docs/slurm.md).

Also works under torchrun and srun (it reads RANK/WORLD_SIZE/LOCAL_RANK) and as plain `python`.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from bigadapt.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
