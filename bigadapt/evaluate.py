"""The paper's metric for a task, on a trained run (`bigadapt eval RUN`) or on the model in training.

GLUE tasks score the classifier's predictions (metrics.glue_metrics). Generation tasks (E2E and the hub NLG
tasks) decode with beam search — Table 11's defaults: beam 10, length penalty 0.9 (E2E) / 0.8 (WebNLG, DART),
no-repeat 4-grams, 64 new tokens — and score each output against all references of its source.

Under ZeRO-3 every forward gathers parameters collectively, so `generate_sharded` makes every rank call
`generate` the same number of times with `synced_gpus=True` (ranks that finish early keep stepping) and
gathers the outputs to rank 0.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import display, zero

GENERATION_TASKS = ("e2e", "e2e_nlg", "web_nlg", "dart", "wikisql", "samsum")
# Table 11: 0.9 for E2E (the released README decodes E2E with 0.8), 0.8 for WebNLG and DART; 1.0 (none) elsewhere
LENGTH_PENALTY = {"e2e": 0.9, "e2e_nlg": 0.9, "web_nlg": 0.8, "dart": 0.8}


@dataclass
class GenerationSettings:
    num_beams: int = 10
    length_penalty: float | None = None  # None: Table 11's for the task (LENGTH_PENALTY)
    no_repeat_ngram_size: int = 4
    max_new_tokens: int = 64
    batch_size: int = 1  # prompts per generate call (left-padded)
    do_sample: bool = False  # `bigadapt generate --do-sample`: sampling instead of greedy/beam search
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50

    def generate_kwargs(self) -> dict:
        """What `model.generate` takes for these settings (sampling knobs only when sampling: transformers warns
        about them otherwise)."""
        kw = dict(do_sample=self.do_sample, num_beams=self.num_beams, max_new_tokens=self.max_new_tokens,
                  length_penalty=1.0 if self.length_penalty is None else self.length_penalty,
                  no_repeat_ngram_size=self.no_repeat_ngram_size)
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kw


def task_settings(task: str, settings: GenerationSettings | None) -> GenerationSettings:
    """The settings given, with the task's Table 11 length penalty where none was given."""
    settings = settings or GenerationSettings()
    if settings.length_penalty is None:
        settings = replace(settings, length_penalty=LENGTH_PENALTY.get(task, 1.0))
    return settings


def glue_name(task: str) -> str | None:
    return task.split("/", 1)[1] if task.startswith("glue/") else None


# ---------------------------------------------------------------- in-training (Loop.evaluate)

def predictions(logits: torch.Tensor, labels: torch.Tensor, objective: str) -> list[tuple[float, float]]:
    """(prediction, label) pairs of a seq_cls batch: the argmax class, or the score for regression."""
    if objective != "seq_cls":
        return []
    pred = logits.float().squeeze(-1) if logits.size(-1) == 1 else logits.argmax(-1)
    return list(zip(pred.tolist(), labels.tolist()))


def task_metrics(task: str, outputs: list[tuple[float, float]]) -> dict[str, float]:
    """*Collective for GLUE tasks* (gathers every rank's pairs): the paper's metric, {} for other tasks.

    Generation tasks report only the teacher-forced loss in training: beam search is `bigadapt eval`'s job.
    """
    name = glue_name(task)
    if name is None:
        return {}
    from .metrics import glue_metrics
    pairs = [p for part in zero.all_gather_object(outputs) for p in part]
    if not pairs:
        return {}
    preds, labels = zip(*pairs)
    return glue_metrics(name, preds, labels)


# ---------------------------------------------------------------- generation under ZeRO-3

@contextlib.contextmanager
def progress_bar(total: int, what: str):
    """Yields `advance()`; a rich bar on rank 0 (display.progress: a terminal, or BIGADAPT_FORCE_PROGRESS) when
    total > 0, else nothing shown."""
    bar = display.progress(total, 0) if total > 0 else None
    done = [0]

    def advance() -> None:
        done[0] += 1
        if bar:
            bar.update(0, completed=done[0], info=what)

    if bar:
        bar.start()
    try:
        yield advance
    finally:
        if bar:
            bar.stop()


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def _until_eos(row: list[int], eos_id: int | list[int] | None) -> list[int]:
    """The row up to its first stop token (eos, or any of a list: a chat's end-of-turn marker too)."""
    stops = set(eos_id) if isinstance(eos_id, list) else {eos_id}
    return next((row[:i] for i, t in enumerate(row) if t in stops), row)


@torch.no_grad()
def generate_sharded(model, prompts: list[list[int]], settings: GenerationSettings, pad_id: int,
                     eos_id: int | list[int] | None, progress: bool = False) -> list[list[int]] | None:
    """*Collective.* New token ids per prompt (cut at eos), on rank 0; None on the other ranks.

    Rank r decodes prompts r, r+W, ...; every rank runs ceil(len/W / batch) generate calls, repeating a
    prompt when it has run out of work, because a rank that skipped a call would leave the others
    waiting in a parameter gather. `progress`: a bar on rank 0 (generate calls done).
    """
    world, rank = zero.world_size(), zero.rank()
    if not prompts:
        return [] if rank == 0 else None
    mine = list(range(rank, len(prompts), world))
    bs = max(1, settings.batch_size)
    calls = math.ceil(math.ceil(len(prompts) / world) / bs)
    device = next(model.parameters()).device
    done: dict[int, list[int]] = {}
    with progress_bar(calls if progress else 0, "generating") as advance:
        for c in range(calls):
            idx = mine[c * bs:(c + 1) * bs]
            ids, mask = _left_pad([prompts[i] for i in idx] or [prompts[0]], pad_id)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), pad_token_id=pad_id,
                                 eos_token_id=eos_id, synced_gpus=world > 1, **settings.generate_kwargs())
            for i, row in zip(idx, out[:, ids.size(1):].tolist()):
                done[i] = _until_eos(row, eos_id)
            advance()
    parts = zero.all_gather_object(done)
    if rank != 0:
        return None
    merged = {i: row for part in parts for i, row in part.items()}
    return [merged[i] for i in range(len(prompts))]


def generation_metrics(task: str, hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """The paper's metrics per generation task, from the [nlg-eval] extra's tools (bigadapt.metrics): E2E's five
    (Table 3: BLEU, NIST, METEOR, ROUGE_L, CIDEr); for WebNLG and DART (Tables 13, 14) BLEU, METEOR and TER — the
    paper's TER is `TER_segment_mean` (GenerationEval: mean per-segment pyter TER), `TER_corpus` is sacrebleu's;
    logical-form accuracy for WikiSQL; ROUGE-1/2/L for SAMSum. Without Java, METEOR is keyed `METEOR_exact_stem`."""
    from . import metrics
    if task in ("web_nlg", "dart"):
        return metrics.data2text_metrics(hypotheses, references)
    if task == "wikisql":
        return {"lf_accuracy": metrics.logical_form_accuracy(hypotheses, [r[0] for r in references])}
    if task == "samsum":
        return metrics.rouge_scores(hypotheses, [r[0] for r in references])
    return metrics.e2e_metrics(hypotheses, references)


def grouped_metrics(task: str, hypotheses: list[str], references: list[list[str]],
                    groups: list[str]) -> dict[str, float]:
    """The task's metrics over each group of examples, keyed METRIC_GROUP (WebNLG: BLEU_S, TER_segment_mean_U, ...)."""
    out = {}
    for g in sorted(set(groups)):
        idx = [i for i, x in enumerate(groups) if x == g]
        part = generation_metrics(task, [hypotheses[i] for i in idx], [references[i] for i in idx])
        out.update({f"{k}_{g}": v for k, v in part.items()})
    return out


# ---------------------------------------------------------------- a trained run

@torch.no_grad()
def classify(model, examples: list[dict], pad_id: int, batch: int = 32) -> list[float]:
    from .data.batching import collate
    preds: list[float] = []
    for i in range(0, len(examples), batch):
        b = collate(examples[i:i + batch], "seq_cls", pad_id)
        labels = b.pop("labels")
        logits = model(**b).logits
        preds += [p for p, _ in predictions(logits, labels, "seq_cls")]
    return preds


def evaluate_model(model, cfg, split: str, limit: int = 0, settings: GenerationSettings | None = None,
                   tokenizer=None) -> dict:
    """*Collective for generation tasks.* {"metrics", "n", ...} for cfg.data.task on `split` (dev | test)."""
    from .data import tasks
    from .model import pad_id as model_pad_id
    task, vocab = cfg.data.task, model.config.vocab_size
    tok = tasks.task_tokenizer(cfg, vocab, tokenizer)
    pad = model_pad_id(model)
    name = glue_name(task)
    if name is not None:
        from .data.glue import glue_task
        from .metrics import glue_metrics
        split = tasks.glue_eval_split(name) if split == "dev" else split
        records = tasks.glue_records(name, split, cfg)[:limit or None]
        examples = tasks.encode_glue(records, tok, cfg.data.seq_len, glue_task(name).num_labels == 1)
        preds = classify(model, examples, pad)
        return {"n": len(examples), "metrics": glue_metrics(name, preds, [e["label"] for e in examples])}
    if task not in GENERATION_TASKS:  # no paper metric (synthetic_*, the user's cls/text/sft): loss and accuracy
        from .data import build_task
        data = build_task(cfg, vocab, tok)
        rows = data.train if split == "train" else data.eval  # a list, or a datasets.Dataset (user data)
        examples = [rows[i] for i in range(min(limit, len(rows)))] if limit else rows
        return {"n": len(examples), "metrics": loss_metrics(model, cfg, examples, data.objective, pad)}
    settings = task_settings(task, settings)
    pairs = tasks.generation_pairs(task, split, cfg)[:limit or None]
    # leave room for the continuation within the model's positions
    room = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 0)
    keep = max(1, min(cfg.data.seq_len, room - settings.max_new_tokens) if room else cfg.data.seq_len)
    prompts = [p[:keep] for p in tasks.encode_prompts([s for s, _ in pairs], tok, cfg.data.seq_len)]
    eos = tok.eos_token_id
    outs = generate_sharded(model, prompts, settings, pad, eos, progress=True)
    if outs is None:
        return {}
    hyps = [tok.decode(o, skip_special_tokens=True).strip() for o in outs]
    refs = [r for _, r in pairs]
    scores = generation_metrics(task, hyps, refs)
    if task == "web_nlg":  # Table 14: also over the categories seen in training (S) and the others (U)
        category = tasks.source_categories(task, split, cfg)
        seen = set(tasks.source_categories(task, "train", cfg).values())
        groups = ["S" if category.get(src) in seen else "U" for src, _ in pairs]
        scores.update(grouped_metrics(task, hyps, refs, groups))
    return {"n": len(pairs), "metrics": scores, "generation": asdict(settings),
            "samples": [{"source": s, "output": h, "reference": r[0]} for (s, r), h in zip(pairs[:3], hyps)]}


@torch.no_grad()
def loss_metrics(model, cfg, examples: list[dict], objective: str, pad: int) -> dict[str, float]:
    """*Collective.* eval_loss and accuracy (seq_cls), or eval_loss, perplexity and token_accuracy (causal_lm),
    over `examples` sharded over the ranks as training evaluates (every rank runs the same number of forwards)."""
    from . import methods, objectives
    from .data.batching import collate, count_targets
    world, rank, mb = zero.world_size(), zero.rank(), max(1, cfg.train.micro_batch)
    per_rank = math.ceil(len(examples) / world)
    mine = list(range(rank, len(examples), world))
    mine += [-1] * (per_rank - len(mine))  # padding slots (last): run, but count nothing
    sums = [0.0, 0.0, 0.0, 0.0]  # loss, terms, correct, predictions
    device = next(model.parameters()).device
    with progress_bar(math.ceil(per_rank / mb), "evaluating") as advance:
        for i in range(0, per_rank, mb):
            real = [j for j in mine[i:i + mb] if j >= 0]
            batch = collate([examples[j if j >= 0 else 0] for j in mine[i:i + mb]], objective, pad)
            batch.update(methods.extra_inputs(cfg, [examples[j if j >= 0 else 0] for j in mine[i:i + mb]]))
            labels = batch.pop("labels")[:len(real)]
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits[:len(real)].cpu()
            if real:
                sums[0] += objectives.loss_sum(logits, labels, objective).item()
                sums[1] += count_targets([examples[j] for j in real], objective)
                c, n = objectives.correct(logits, labels, objective)
                sums[2], sums[3] = sums[2] + c, sums[3] + n
            advance()
    loss, terms, right, n = zero.all_reduce_sum(sums)
    out = {"eval_loss": loss / max(terms, 1)}
    if objective == "causal_lm":
        out["perplexity"] = math.exp(min(out["eval_loss"], 700.0))
    if n:
        out["token_accuracy" if objective == "causal_lm" else "accuracy"] = right / n
    return out


def evaluate_run(run: str | Path, split: str = "dev", limit: int = 0,
                 settings: GenerationSettings | None = None, merged: bool = False) -> dict:
    """*Collective under a launcher.* Rebuild the trained model (on the CPU in one process, or sharded with ZeRO-3
    over the launcher's ranks), score it, and write RUN/eval-<split>.json (eval-<split>-merged.json when `merged`:
    the adapter folded into the base first, as deployed — no extra latency; methods that cannot merge say why in
    one line). Every rank returns the result; rank 0 writes it."""
    from .export import fold, load_model
    model, manifest, cfg = load_model(run)
    if merged:
        fold(model, cfg)
    result = {"run": str(run), "task": cfg.data.task, "method": cfg.method.name, "split": split, "merged": merged,
              "step": manifest.get("step"), "limit": limit, "world_size": zero.world_size(),
              **evaluate_model(model, cfg, split, limit, settings)}
    if zero.rank() == 0:
        out = _run_dir(Path(run)) / f"eval-{split}{'-merged' if merged else ''}.json"
        out.write_text(json.dumps(result, indent=1))
    return result


def _run_dir(path: Path) -> Path:
    """A checkpoint directory (…/checkpoints/step-N) reports into its run directory."""
    return path.parent.parent if path.parent.name == "checkpoints" else path


# ---------------------------------------------------------------- tables

def results_table(runs: list[str | Path]) -> str:
    """Markdown: one row per (run, eval file), columns run | task | method | trainable | split | metrics; a run
    without eval files gets a row saying so. A path that does not exist is a one-line DataError."""
    import yaml

    from .errors import DataError
    rows, names = [], []
    for run in map(Path, runs):
        if not run.is_dir():
            raise DataError(f"{run}: no such run directory")
        cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
        layout = run / "layout.json"
        trainable = json.loads(layout.read_text()).get("trainable_numel_total") if layout.is_file() else None
        for f in sorted(run.glob("eval-*.json")):
            r = json.loads(f.read_text())
            split = r.get("split", "") + (" (merged)" if r.get("merged") else "")
            rows.append((run.name, r.get("task", ""), r.get("method", cfg.get("method", {}).get("name", "")),
                         trainable, split, r.get("metrics", {})))
            names += [k for k in r.get("metrics", {}) if k not in names]
        if not any(run.glob("eval-*.json")):
            rows.append((run.name, cfg.get("data", {}).get("task", ""), cfg.get("method", {}).get("name", ""),
                         trainable, f"no eval yet (bigadapt eval {run})", {}))
    head = ["run", "task", "method", "trainable", "split", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, task, method, trainable, split, m in rows:
        cells = [run, task, method, f"{trainable:,}" if trainable else "?", split]
        cells += [f"{m[k]:.4g}" if k in m else "" for k in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
