"""Entry for launchers, any subcommand: `deepspeed [--num_gpus N] launch/bigadapt.py generate|eval|train RUN ...`.

The deepspeed launcher puts --local_rank=N before the subcommand; it is dropped here (every rank also has
LOCAL_RANK in its environment). Also works under torchrun and srun, and as plain `python`.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from bigadapt.cli import main  # noqa: E402


def _without_local_rank(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--local_rank", "--local-rank"):
            skip = True
        elif not a.startswith(("--local_rank=", "--local-rank=")):
            out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main(_without_local_rank(sys.argv[1:])))
