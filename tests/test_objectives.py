"""Loss sums: label smoothing against the formula of the authors' GPT-2 code, computed by hand."""
import torch

from bigadapt.data.batching import IGNORE
from bigadapt.objectives import loss_sum


def test_label_smoothing_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :2] = IGNORE  # a masked prompt
    logp = logits[:, :-1].log_softmax(-1)
    gold = labels[:, 1:]
    keep = gold != IGNORE
    nll = -logp.gather(-1, gold.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    uniform = -logp.mean(-1)
    eps = 0.1
    expected = ((1 - eps) * nll + eps * uniform)[keep].sum()
    assert torch.allclose(loss_sum(logits, labels, "causal_lm", eps), expected, atol=1e-5)
    assert torch.allclose(loss_sum(logits, labels, "causal_lm"), nll[keep].sum(), atol=1e-5)
    cls_logits, cls_labels = torch.randn(4, 3, generator=g), torch.tensor([0, 2, 1, 2])
    lp = cls_logits.log_softmax(-1)
    want = ((1 - eps) * -lp[torch.arange(4), cls_labels] + eps * -lp.mean(-1)).sum()
    assert torch.allclose(loss_sum(cls_logits, cls_labels, "seq_cls", eps), want, atol=1e-5)
