"""`bigadapt generate`, `eval` on tasks without a paper metric, `results` errors, and a merge directory that
serves as is: real CLI runs on a tiny GPT-2 with a real (BPE, trained here) tokenizer."""
import json
import stat
from pathlib import Path

import pytest

from tests.bpe import train_bpe
from tests.conftest import check, run_cli, tiny_config, write_config

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


def outputs(path: Path) -> list[str]:
    return [json.loads(line)["output"] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> Path:
    return make_lm_run(tmp_path_factory.mktemp("generate"))


def test_generate_greedy_merged_equals_unmerged(lm_run, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    for merged in (False, True):
        out = tmp_path / f"out-{merged}.jsonl"
        check(run_cli("generate", str(lm_run), "--file", str(prompts), "--out", str(out), "--max-new-tokens", "8",
                      *(["--merged"] if merged else [])))
    unmerged, merged = outputs(tmp_path / "out-False.jsonl"), outputs(tmp_path / "out-True.jsonl")
    assert len(unmerged) == 3 and unmerged == merged and any(unmerged)
    rows = [json.loads(line) for line in (tmp_path / "out-False.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2]  # the input row comes back with its output
    one = check(run_cli("generate", str(lm_run), "--prompt", PROMPTS[0], "--max-new-tokens", "8"))
    assert one.stdout.strip() == unmerged[0]
    sampled = check(run_cli("generate", str(lm_run), "--prompt", PROMPTS[0], "--max-new-tokens", "8",
                            "--do-sample", "--temperature", "0.8", "--top-k", "20", "--seed", "3"))
    assert sampled.returncode == 0


def test_merge_directory_serves_as_is(lm_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "merged"
    check(run_cli("merge", str(lm_run), str(out)))
    names = {f.name for f in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    for f in out.iterdir():  # the umask's mode (022 here), not safetensors' private temp file's 0600
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    model, tok = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    ids = tok(PROMPTS[1], return_tensors="pt")
    with torch.no_grad():
        new = model.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].size(1):]
    ours = check(run_cli("generate", str(lm_run), "--prompt", PROMPTS[1], "--max-new-tokens", "8")).stdout.strip()
    assert tok.decode(new, skip_special_tokens=True).strip() == ours

    again = run_cli("merge", str(lm_run), str(out))  # not empty: refused, one line
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--overwrite" in again.stderr
    check(run_cli("merge", str(lm_run), str(out), "--overwrite"))
    peft = tmp_path / "peft"
    check(run_cli("export", str(lm_run), str(peft)))
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in peft.iterdir())
    assert run_cli("export", str(lm_run), str(peft)).returncode == 2


def test_merge_of_a_byte_fallback_run_says_so(trained_run, tmp_path):
    proc = check(run_cli("merge", str(trained_run), str(tmp_path / "m")))
    assert "byte-level fallback tokenizer" in proc.stdout and not (tmp_path / "m" / "tokenizer.json").exists()


def test_eval_reports_loss_and_accuracy_without_a_paper_metric(trained_run, lm_run):
    proc = check(run_cli("eval", str(trained_run)))  # synthetic_cls, the README's default task
    result = json.loads((trained_run / "eval-dev.json").read_text())
    assert set(result["metrics"]) == {"eval_loss", "accuracy"} and result["n"] == 64 and "accuracy=" in proc.stdout
    check(run_cli("eval", str(lm_run)))
    lm = json.loads((lm_run / "eval-dev.json").read_text())["metrics"]
    assert set(lm) == {"eval_loss", "perplexity", "token_accuracy"}
    assert lm["perplexity"] == pytest.approx(__import__("math").exp(lm["eval_loss"]))


def test_results_and_generate_errors_are_one_line(trained_run, tmp_path):
    missing = run_cli("results", str(tmp_path / "nope"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "no such run directory" in missing.stderr
    empty = tmp_path / "fresh"
    empty.mkdir()
    assert "no eval yet" in check(run_cli("results", str(empty))).stdout
    cls = run_cli("generate", str(trained_run), "--prompt", "hi")
    assert cls.returncode == 2 and cls.stderr.count("\n") == 1 and "cannot generate" in cls.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n')
    proc = run_cli("generate", str(trained_run), "--file", str(bad))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1


def test_sft_run_chats_with_its_template_and_evals_as_it_trained(tmp_path):
    from tests.conftest import TINY_GPT2, metrics
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
    chat = check(run_cli("generate", str(run), "--chat", "--max-new-tokens", "4", input="hi\nagain\n\n"))
    assert chat.stdout.count("> ") == 3  # two turns answered, then the empty line ends the loop
    check(run_cli("eval", str(run)))  # the same eval split and loss as the run's own final eval
    final = [m for m in metrics(run) if m.get("split") == "eval"][-1]
    assert json.loads((run / "eval-dev.json").read_text())["metrics"]["eval_loss"] == pytest.approx(
        final["eval_loss"], rel=1e-5)


def test_chat_needs_an_sft_run(lm_run):
    proc = run_cli("generate", str(lm_run), "--chat", input="hello\n\n")
    assert proc.returncode == 2 and "data.task: sft" in proc.stderr
