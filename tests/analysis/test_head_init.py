"""A fresh regression head starts at the training labels' mean (bigadapt.head_init), for every method."""
import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, RobertaConfig

from bigadapt import head_init, methods
from bigadapt.config import config_from_dict
from tests.conftest import tiny_config

TINY_BERT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=32)
LABELS = [0.0, 1.5, 2.7, 4.0, 5.0, 3.0]  # STS-B-like, mean 2.7


def _model(config_class, num_labels=1):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config_class(num_labels=num_labels, **TINY_BERT))


@pytest.mark.parametrize("config_class", [BertConfig, RobertaConfig])
def test_regression_bias_starts_at_the_label_mean(config_class):
    model = _model(config_class)
    mean = head_init.init_regression_bias(model, LABELS)
    assert mean == pytest.approx(2.7)
    assert head_init.regression_output(model).bias.item() == pytest.approx(2.7)
    # the untrained model then predicts about the mean (the head's random weights are small)
    out = model(input_ids=torch.randint(0, 64, (4, 8))).logits
    assert out.mean().item() == pytest.approx(2.7, abs=0.3)


def test_classification_heads_are_left_alone():
    model = _model(BertConfig, num_labels=3)
    before = model.classifier.bias.detach().clone()
    assert head_init.init_regression_bias(model, [0, 1, 2]) is None
    assert torch.equal(model.classifier.bias, before)


@pytest.mark.parametrize("method", ["lora", "bitfit", "adapter_h", "full"])
def test_every_method_keeps_the_bias_trainable_and_at_the_mean(method, tmp_path):
    model = _model(BertConfig)
    arch = {"model_type": "bert", **TINY_BERT}
    cfg = config_from_dict(tiny_config(tmp_path, arch, method={"name": method}, model={"objective": "seq_cls",
                                                                                       "num_labels": 1}))
    names = methods.apply(model, cfg)
    head_init.init_regression_bias(model, head_init.training_labels([{"label": v} for v in LABELS]))
    assert "classifier.bias" in names
    assert model.classifier.bias.item() == pytest.approx(2.7)


def test_study_plot_draws_the_seed_spread(tmp_path):
    from PIL import Image

    from bigadapt.bench import study
    from bigadapt.bench.study_plot import figure, write_plot
    from tests.test_budget import _row
    rows = [_row("mrpc", "lora", 1.0, [{"accuracy": a} for a in (0.6, 0.7, 0.8)]),
            dict(_row("mrpc", "lora", 1.0, [{"accuracy": a} for a in (0.64, 0.72, 0.78)]), seed=1)]
    fig = figure(rows, study.MAIN_METRIC, {"mrpc": 0.68})
    ax = fig.axes[0]
    mean = [line for line in ax.get_lines() if line.get_label().startswith("lora")][0]
    assert list(mean.get_ydata()) == pytest.approx([0.62, 0.71, 0.79])
    assert len(ax.collections) == 1  # the min..max band
    assert "2 seeds" in fig._suptitle.get_text() and ax.get_xlabel() == "training budget (s)"
    out = write_plot(tmp_path / "study.png", rows, study.MAIN_METRIC)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 300
