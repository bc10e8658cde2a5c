"""`bigadapt bench windows` through the real launcher on 2 ranks: the gather windows sized from the model hold
a fraction of what DeepSpeed's own hold, within the accounting's prediction, and compute the same numbers."""
from __future__ import annotations

import pytest

from bigadapt.bench.windows import compare

pytestmark = pytest.mark.distributed


def test_windows_change_what_is_held_not_the_losses(bench_launch):
    s = compare(ranks=2, rounds=1, extra=["--steps", "2", "--warmup", "3", "--micro-batch", "2",
                                          "--seq-len", "16", "--lr", "1e-2", "--layers", "8"])
    assert s["same_losses"] and len(s["sized"]["losses"]) == 2, s["sized"]["losses"]
    for side in ("sized", "deepspeed"):
        r = s[side]
        assert 0 < r["gathered_peak_bytes"] <= r["gathered_predicted_bytes"], r
    # DeepSpeed's windows keep nearly the whole base gathered; sized ones about two blocks of eight
    assert s["deepspeed"]["gathered_peak_bytes"] > 0.9 * s["deepspeed"]["gathered_base_bytes"]
    assert s["sized"]["gathered_peak_bytes"] < 0.5 * s["sized"]["gathered_base_bytes"]
