"""Run by a launcher on every rank: `bigadapt train --config C` for each config C given, in these same processes
(conftest.launch_each), so the launcher and the imports are paid once for several runs."""
import sys

from tests.conftest import train_each

if __name__ == "__main__":
    sys.exit(train_each(a for a in sys.argv[1:] if not a.startswith("--local_rank")))
