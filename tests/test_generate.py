"""`bigadapt generate`, `eval` on tasks without a paper metric, `results` errors, and a merge directory that
serves as is: real CLI runs on a tiny GPT-2 with a real (BPE, trained here) tokenizer. Training runs as its own
process; every other command runs in this one (`cli.main(argv)` returns the exit code): one CPU process, so the
same code a `python -m bigadapt` would run, without paying an interpreter start per call."""
import io
import json
import stat
import sys
from pathlib import Path

import pytest
import torch

from bigadapt import cli
from tests.bpe import train_bpe
from tests.conftest import TINY_GPT2, TINY_LLAMA, check, run_cli, tiny_config, write_config

PROMPTS = ["the cat sat on", "a dog ran to the", "hello world"]
CORPUS = ["the cat sat on the mat", "a dog ran to the park", "hello world, hello cat", "the end of the story"] * 20


def tiny_tokenizer_base(folder: Path) -> Path:
    """A random-init GPT-2 saved with a byte-level BPE tokenizer trained on a few sentences: a base directory
    that `model.name_or_path` loads like a hub model, tokenizer included."""
    from transformers import GPT2Config, GPT2LMHeadModel
    tok = train_bpe(folder, CORPUS, 300, ["<|endoftext|>"], "<|endoftext|>")
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=len(tok), n_positions=64, bos_token_id=0,
                        eos_token_id=0, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def make_lm_run(tmp: Path) -> Path:
    """A few LoRA steps of a causal LM (synthetic copy task) on the tokenizer base above."""
    base = tiny_tokenizer_base(tmp / "base")
    run = tmp / "lm-run"
    cfg = tiny_config(run, model={"name_or_path": str(base), "objective": "causal_lm"},
                      data={"task": "synthetic_lm", "seq_len": 16, "num_train": 64, "num_eval": 12},
                      train={"max_steps": 3, "lr": 2e-2, "batch_size": 8, "micro_batch": 4})
    check(run_cli("train", "--config", str(write_config(tmp / "lm.yaml", cfg))))
    return run


def write_prompts(path: Path) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


def bigadapt(capsys, *argv: str) -> tuple[int, str, str]:
    """`bigadapt argv` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def ok(capsys, *argv: str) -> str:
    code, out, err = bigadapt(capsys, *argv)
    assert code == 0, err[-4000:]
    return out


def outputs(path: Path) -> list[str]:
    return [json.loads(line)["output"] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> Path:
    return make_lm_run(tmp_path_factory.mktemp("generate"))


def test_generate_greedy_merged_equals_unmerged_and_batched_equals_alone(lm_run, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    for merged, batch in ((False, 1), (True, 1), (False, 3)):
        out = tmp_path / f"out-{merged}-{batch}.jsonl"
        ok(capsys, "generate", str(lm_run), "--file", str(prompts), "--out", str(out), "--max-new-tokens", "8",
           "--batch-size", str(batch), *(["--merged"] if merged else []))
    unmerged, merged = outputs(tmp_path / "out-False-1.jsonl"), outputs(tmp_path / "out-True-1.jsonl")
    assert len(unmerged) == 3 and unmerged == merged and any(unmerged)
    assert outputs(tmp_path / "out-False-3.jsonl") == unmerged  # three prompts of three lengths, left-padded
    rows = [json.loads(line) for line in (tmp_path / "out-False-1.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2]  # the input row comes back with its output
    one = ok(capsys, "generate", str(lm_run), "--prompt", PROMPTS[0], "--max-new-tokens", "8")
    assert one.strip() == unmerged[0]
    sampled = [ok(capsys, "generate", str(lm_run), "--prompt", PROMPTS[0], "--max-new-tokens", "8", "--do-sample",
                  "--temperature", "0.8", "--top-k", "20", "--seed", str(seed)) for seed in (3, 3)]
    assert sampled[0] == sampled[1]  # the seed decides the draw


@pytest.mark.parametrize("arch", [TINY_GPT2, TINY_LLAMA], ids=["gpt2", "llama"])
def test_each_row_of_a_batch_decodes_as_its_prompt_alone(arch):
    """Left padding done right: a greedy batch of prompts of different lengths gives, row by row, the tokens each
    prompt gives alone (position ids and the attention mask must both skip the pad)."""
    from bigadapt.config import config_from_dict
    from bigadapt.evaluate import GenerationSettings, generate_sharded
    from bigadapt.model import build_base
    cfg = config_from_dict(tiny_config("unused", arch=arch, model={"objective": "causal_lm"},
                                       data={"task": "synthetic_lm"}))
    model = build_base(cfg.model, 0).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (2, 9, 5, 1)]
    settings = GenerationSettings(num_beams=1, length_penalty=1.0, no_repeat_ngram_size=0, max_new_tokens=6,
                                  batch_size=len(prompts))
    batched = generate_sharded(model, prompts, settings, pad_id=0, eos_id=None)
    alone = [generate_sharded(model, [p], settings, pad_id=0, eos_id=None)[0] for p in prompts]
    assert batched == alone and all(len(row) == 6 for row in alone)
    assert len({tuple(row) for row in alone}) > 1  # the prompts matter


def test_merge_directory_serves_as_is(lm_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "merged"
    ok(capsys, "merge", str(lm_run), str(out))
    names = {f.name for f in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    for f in out.iterdir():  # the umask's mode (022 here), not safetensors' private temp file's 0600
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    model, tok = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    ids = tok(PROMPTS[1], return_tensors="pt")
    with torch.no_grad():
        new = model.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].size(1):]
    ours = ok(capsys, "generate", str(lm_run), "--prompt", PROMPTS[1], "--max-new-tokens", "8").strip()
    assert tok.decode(new, skip_special_tokens=True).strip() == ours

    code, _, err = bigadapt(capsys, "merge", str(lm_run), str(out))  # not empty: refused, one line
    assert code == 2 and err.count("\n") == 1 and "--overwrite" in err
    ok(capsys, "merge", str(lm_run), str(out), "--overwrite")
    peft = tmp_path / "peft"
    ok(capsys, "export", str(lm_run), str(peft))
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in peft.iterdir())
    assert bigadapt(capsys, "export", str(lm_run), str(peft))[0] == 2


def test_merge_of_a_byte_fallback_run_says_so(trained_run, tmp_path, capsys):
    out = ok(capsys, "merge", str(trained_run), str(tmp_path / "m"))
    assert "byte-level fallback tokenizer" in out and not (tmp_path / "m" / "tokenizer.json").exists()


def test_eval_reports_loss_and_accuracy_without_a_paper_metric(trained_run, lm_run, capsys):
    out = ok(capsys, "eval", str(trained_run))  # synthetic_cls, the README's default task
    result = json.loads((trained_run / "eval-dev.json").read_text())
    assert set(result["metrics"]) == {"eval_loss", "accuracy"} and result["n"] == 64 and "accuracy=" in out
    ok(capsys, "eval", str(lm_run))
    lm = json.loads((lm_run / "eval-dev.json").read_text())["metrics"]
    assert set(lm) == {"eval_loss", "perplexity", "token_accuracy"}
    assert lm["perplexity"] == pytest.approx(__import__("math").exp(lm["eval_loss"]))


def test_results_and_generate_errors_are_one_line(trained_run, tmp_path, capsys):
    code, _, err = bigadapt(capsys, "results", str(tmp_path / "nope"))
    assert code == 2 and err.count("\n") == 1 and "no such run directory" in err
    empty = tmp_path / "fresh"
    empty.mkdir()
    assert "no eval yet" in ok(capsys, "results", str(empty))
    code, _, err = bigadapt(capsys, "generate", str(trained_run), "--prompt", "hi")
    assert code == 2 and err.count("\n") == 1 and "cannot generate" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n')
    code, _, err = bigadapt(capsys, "generate", str(trained_run), "--file", str(bad))
    assert code == 2 and err.count("\n") == 1


def test_sft_run_chats_with_its_template_and_evals_as_it_trained(tmp_path, capsys, monkeypatch):
    from tests.conftest import metrics
    rows = [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"ok {i}"}]}
            for i in range(40)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    run = tmp_path / "sft"
    cfg = tiny_config(run, model={"arch": dict(TINY_GPT2, vocab_size=300), "objective": "causal_lm"},
                      data={"task": "sft", "seq_len": 32, "path": str(tmp_path / "chat.jsonl"),
                            "chat_template": template}, train={"max_steps": 2, "batch_size": 8, "micro_batch": 4})
    check(run_cli("train", "--config", str(write_config(tmp_path / "sft.yaml", cfg))))
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nagain\n\n"))
    chat = ok(capsys, "generate", str(run), "--chat", "--max-new-tokens", "4")
    assert chat.count("> ") == 3  # two turns answered, then the empty line ends the loop
    ok(capsys, "eval", str(run))  # the same eval split and loss as the run's own final eval
    final = [m for m in metrics(run) if m.get("split") == "eval"][-1]
    assert json.loads((run / "eval-dev.json").read_text())["metrics"]["eval_loss"] == pytest.approx(
        final["eval_loss"], rel=1e-5)


def test_chat_needs_an_sft_run(lm_run, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\n"))
    code, _, err = bigadapt(capsys, "generate", str(lm_run), "--chat")
    assert code == 2 and "data.task: sft" in err
