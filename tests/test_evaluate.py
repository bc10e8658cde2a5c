"""Task metrics in one process: prediction pairs, generation, the results table and the CLI's errors."""
import json
import shutil

import pytest
import torch

from bigadapt import evaluate
from bigadapt import model as base_model
from bigadapt.config import config_from_dict
from tests.conftest import TINY_GPT2, run_cli, tiny_config


def test_predictions_and_glue_metrics():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [0.0, 1.0]])
    pairs = evaluate.predictions(logits, torch.tensor([0, 1, 0]), "seq_cls")
    assert pairs == [(0, 0), (1, 1), (1, 0)]
    assert evaluate.task_metrics("glue/mrpc", pairs) == pytest.approx({"accuracy": 2 / 3, "f1": 2 / 3})
    assert evaluate.task_metrics("glue/cola", pairs)["mcc"] == pytest.approx(0.5)
    scores = evaluate.predictions(torch.tensor([[0.5], [2.0]]), torch.tensor([1.0, 3.0]), "seq_cls")
    assert evaluate.task_metrics("glue/stsb", scores) == pytest.approx({"pearson": 1.0, "spearman": 1.0})
    assert evaluate.task_metrics("e2e", []) == {} and evaluate.task_metrics("synthetic_cls", pairs) == {}
    assert evaluate.predictions(logits, torch.tensor([0, 1, 0]), "causal_lm") == []


def tiny_lm():
    cfg = config_from_dict(tiny_config("unused", model={"arch": dict(TINY_GPT2), "objective": "causal_lm"}))
    return base_model.build_base(cfg.model, 0).eval()


def test_generate_sharded_matches_generate_in_one_process():
    model = tiny_lm()
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [20]]
    settings = evaluate.GenerationSettings(num_beams=2, length_penalty=0.9, max_new_tokens=6)
    outs = evaluate.generate_sharded(model, prompts, settings, pad_id=0, eos_id=0)
    assert len(outs) == 3 and all(len(o) <= 6 and 0 not in o for o in outs)
    for p, o in zip(prompts, outs):
        ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             num_beams=2, length_penalty=0.9, no_repeat_ngram_size=4, max_new_tokens=6,
                             do_sample=False, pad_token_id=0, eos_token_id=0)[0, len(p):].tolist()
        assert o == (ref[:ref.index(0)] if 0 in ref else ref)
    batched = evaluate.generate_sharded(model, prompts, evaluate.GenerationSettings(1, 1.0, 0, 6, 2), 0, 0)
    assert len(batched) == 3  # left-padded batches of 2, the last one short
    assert evaluate.generate_sharded(model, [], settings, 0, 0) == []


def test_generation_metrics_per_task():
    assert evaluate.generation_metrics("e2e", ["a cafe near the river ."], [["a cafe near the river ."]])[
        "BLEU"] == pytest.approx(100.0)
    assert evaluate.generation_metrics("wikisql", ["SELECT a FROM table"], [["SELECT a FROM table"]]) == {
        "lf_accuracy": 1.0}
    assert "rouge1" in {k.lower() for k in evaluate.generation_metrics("samsum", ["x y"], [["x y"]])}
    # WebNLG/DART: BLEU, METEOR, the paper's TER (GenerationEval's per-segment mean) and sacrebleu's corpus TER, over
    # all references (TER takes the closest reference's edits); METEOR has another name without Java
    web = evaluate.generation_metrics("web_nlg", ["the cat sat on the mat"],
                                      [["a dog ran", "the cat sat on the mat"]])
    meteor = "METEOR" if shutil.which("java") else "METEOR_exact_stem"
    assert set(web) == {"BLEU", meteor, "TER_segment_mean", "TER_corpus"} and web["BLEU"] == pytest.approx(100.0)
    assert web["TER_segment_mean"] == web["TER_corpus"] == 0.0
    dart = evaluate.generation_metrics("dart", ["the cat sat"], [["the cat sat on the mat"]])
    assert dart["TER_segment_mean"] == dart["TER_corpus"] == pytest.approx(3 / 6)  # 3 deletions, 6 reference words


def test_webnlg_seen_and_unseen_groups():
    hyps = ["the cat sat", "a dog ran", "birds fly high"]
    refs = [["the cat sat"], ["a dog ran fast"], ["birds fly"]]
    out = evaluate.grouped_metrics("web_nlg", hyps, refs, ["S", "U", "S"])
    seen = evaluate.generation_metrics("web_nlg", [hyps[0], hyps[2]], [refs[0], refs[2]])
    # corpus: one edit over five reference words; per-segment mean: (0 + 1/2) / 2
    assert out["TER_corpus_S"] == seen["TER_corpus"] == pytest.approx(1 / 5)
    assert out["TER_segment_mean_S"] == seen["TER_segment_mean"] == pytest.approx(1 / 4)
    assert out["TER_corpus_U"] == pytest.approx(1 / 4) and set(out) == {f"{m}_{g}" for m in seen for g in "SU"}


def test_length_penalty_defaults_per_task():
    penalty = {t: evaluate.task_settings(t, None).length_penalty for t in ("e2e", "web_nlg", "dart", "samsum")}
    assert penalty == {"e2e": 0.9, "web_nlg": 0.8, "dart": 0.8, "samsum": 1.0}
    given = evaluate.GenerationSettings(length_penalty=0.7)
    assert evaluate.task_settings("dart", given).length_penalty == 0.7


def test_results_table(tmp_path):
    run = tmp_path / "mrpc-run"
    run.mkdir()
    (run / "config.yaml").write_text("method: {name: lora}\n")
    (run / "layout.json").write_text(json.dumps({"trainable_numel_total": 2176}))
    (run / "eval-dev.json").write_text(json.dumps(
        {"task": "glue/mrpc", "method": "lora", "split": "dev", "metrics": {"accuracy": 0.8, "f1": 0.85}}))
    lines = evaluate.results_table([run]).splitlines()
    assert lines[0] == "| run | task | method | trainable | split | accuracy | f1 |"
    assert lines[2] == "| mrpc-run | glue/mrpc | lora | 2,176 | dev | 0.8 | 0.85 |"


def test_eval_cli_errors_are_one_line(tmp_path):
    proc = run_cli("eval", str(tmp_path / "missing"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no complete checkpoint" in proc.stderr
