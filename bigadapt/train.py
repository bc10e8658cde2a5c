"""The training run, top to bottom: validate -> shard-load the base -> inject -> DeepSpeed -> loop -> save.

The loop is world-size independent by construction: the global batch, its data, its loss normalisation
and the RNG of each step are functions of (seed, step), so a run checkpointed on N ranks resumes on M.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import torch

from . import __version__, accounting, checkpoint, display, engine, evaluate, methods, objectives, targets, zero
from . import model as base_model
from .config import RunConfig, check_world, dump_config
from .data import build_task
from .data.batching import StepSampler, collate, count_targets
from .errors import EXIT_PREEMPTED
from .tracking import Trackers


class StopRequest:
    """SIGUSR1 (SLURM's warning) or SIGTERM (preemption): finish the step, checkpoint, exit EXIT_PREEMPTED.

    The handler only sets a flag, so a second signal during the save changes nothing.
    """

    def __init__(self):
        self.signal: int | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum


def warmup_steps(cfg: RunConfig, total: int) -> int:
    """train.warmup_steps, or train.warmup_ratio of the run's steps rounded up (a ratio > 0 warms up >= 1 step)."""
    # rounded first: 0.07 * 100 is 7.000000000000001 in floating point, and means 7 steps
    return cfg.train.warmup_steps or math.ceil(round(cfg.train.warmup_ratio * total, 9))


def lr_at(step: int, cfg: RunConfig, total: int) -> float:
    """Linear warmup, then linear or cosine decay to min_lr_ratio x lr at the last step, or constant: a pure
    function of the step, so resume needs no state. Constant suits a time budget: the run's length is
    unknown, and a budget of T then trains exactly the first T seconds of a longer run."""
    t, warm = cfg.train, warmup_steps(cfg, total)
    if step < warm:
        return t.lr * (step + 1) / warm
    if t.schedule == "constant":
        return t.lr
    left = max(0.0, (total - step) / max(1, total - warm))  # 1 at the end of warmup, 0 at the last step
    shape = left if t.schedule == "linear" else 0.5 * (1 - math.cos(math.pi * left))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * shape)


def run(cfg: RunConfig, resume: str | None = None, overwrite: bool = False) -> int:
    # the meta-device copy finds bad targets before any process or file exists, and feeds the accounting
    shape, _ = accounting.shapes(cfg)
    accounting.check_positions(shape, cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = check_world(cfg, world)
    layout = accounting.Layout(world, engine.zero_stage(cfg, world), cfg.train.micro_batch, cfg.data.seq_len,
                               device="gpu" if torch.cuda.is_available() else "cpu")
    predicted = accounting.per_rank(shape, cfg, layout)
    stop = StopRequest()
    engine.init_distributed()
    rank = zero.rank()
    conf = engine.ds_config(cfg, world, accumulation, shape)
    run_dir, ckpt_root = Path(cfg.run_dir), Path(cfg.run_dir) / "checkpoints"

    zero.register_for_loading(conf)
    model = base_model.build_base(cfg.model, cfg.train.seed)
    base_fp = checkpoint.fingerprint(model, exclude=targets.head_prefixes(model))
    methods.apply_seeded(model, cfg)  # the same adapter init on every rank
    eng, optimizer = engine.initialize(model, cfg, conf)
    zero.unregister()

    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:  # only now, once the base, method and engine are built (config errors came first)
            checkpoint.clear_for_overwrite(run_dir)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        (run_dir / "estimate.json").write_text(json.dumps({"layout": vars(layout), "per_rank": predicted}, indent=1))
        checkpoint.clean_stale(ckpt_root)
    zero.barrier()
    ckpt = checkpoint.find_resume(ckpt_root, resume, log=display.log)
    resumed = checkpoint.restore(ckpt, eng.module, optimizer, base_fp) if ckpt else {}
    start = resumed.get("step", 0)
    if not ckpt and cfg.method.init_from:
        source = checkpoint.init_from(Path(cfg.method.init_from), eng.module, base_fp,
                                      targets.head_prefixes(eng.module))
        display.log(f"method tensors start from {source} (task head fresh)")

    holdings = zero.rank_holdings(eng.module, optimizer)
    display.start_table(holdings, _trainable_rows(eng.module, cfg), engine.zero_stage(cfg, world), accumulation)
    display.estimate_line(predicted)
    if rank == 0:
        (run_dir / "layout.json").write_text(json.dumps(holdings, indent=1))
        _trim_metrics(run_dir / "metrics.jsonl", start)
    if ckpt:
        display.log(f"resumed from {ckpt} at step {start}")

    task = build_task(cfg, eng.module.config.vocab_size)
    if task.summary:
        display.log(task.summary)
    if rank == 0 and task.label_names is not None:  # what the classifier's ids mean, for whoever uses the adapter
        (run_dir / "labels.json").write_text(json.dumps({"labels": task.label_names}, indent=1))
    if cfg.data.packing:  # a KV cache hides packed rows from transformers' per-example masking
        eng.module.config.use_cache = False
    sampler = StepSampler(len(task.train), cfg.train.batch_size, cfg.train.seed)
    total = cfg.train.max_steps or max(1, math.floor(cfg.train.epochs * sampler.steps_per_epoch))
    manifest = _manifest(cfg, base_fp, world)
    # the trackers open (rank 0) once every check that can refuse the run has passed
    tracker = Trackers(cfg.train.track, run_dir, start, cfg.to_dict(), rank)
    loop = Loop(cfg, eng, optimizer, task, sampler, total, run_dir, base_model.pad_id(eng.module), manifest,
                train_s=resumed.get("train_s", 0.0), marks_done=resumed.get("marks_done"), tracker=tracker)
    try:
        return _train_and_save(loop, start, stop, predicted, holdings)
    finally:
        tracker.close()  # on preemption and on errors too: the event files end flushed


def _train_and_save(loop: Loop, start: int, stop: StopRequest, predicted: dict, holdings: dict) -> int:
    cfg, eng, optimizer, manifest = loop.cfg, loop.eng, loop.optimizer, loop.manifest
    ckpt_root = loop.run_dir / "checkpoints"
    step, outcome = loop.train(start, stop)
    if outcome == "preempted":
        checkpoint.save(ckpt_root, step, eng.module, optimizer, loop.state(step), manifest, cfg.train.keep_last)
        display.log(f"stop requested (signal {stop.signal}): checkpointed step {step}; "
                    f"rerun with --resume auto to continue")
        return EXIT_PREEMPTED
    final_eval = loop.evaluate(step)
    state = dict(loop.state(step), eval=final_eval)
    path = checkpoint.save(ckpt_root, step, eng.module, optimizer, state, manifest, cfg.train.keep_last)
    _accounting_report(loop.run_dir, predicted, eng, optimizer, loop.gathered)
    _summary(path, holdings, final_eval, outcome)
    return 0


def _accounting_report(run_dir: Path, predicted: dict, eng, optimizer, gathered) -> None:
    """*Collective.* Measured model-state bytes of every rank beside the prediction made before the run."""
    mine = dict(zero.measure_model_states(eng, optimizer), peak_memory=int(display.memory_mb() * 2**20))
    if gathered is not None and gathered.peak:
        mine["zero3_gather_buffers"] = gathered.peak
    ranks = zero.all_gather_object(mine)
    if zero.rank() != 0:
        return
    rows = [accounting.compare(predicted, {k: v for k, v in r.items() if k != "peak_memory"}) for r in ranks]
    worst = max(abs(e) for rr in rows for key, _, _, e in rr if key == "model_states")
    (run_dir / "accounting.json").write_text(json.dumps(
        {"predicted": predicted, "measured": ranks, "model_states_max_rel_error": worst}, indent=1))
    # GPUs report allocated memory, which leaves out the CUDA context that the overhead constant covers
    on_gpu = torch.cuda.is_available()
    display.accounting_table(rows[0], predicted["total"] - (predicted["framework_overhead"] if on_gpu else 0),
                             ranks[0]["peak_memory"])


class Loop:
    # the training clock: only differences are used; tests replace it to make clock-driven stops deterministic
    clock = staticmethod(time.perf_counter)

    def __init__(self, cfg, eng, optimizer, task, sampler, total, run_dir, pad, manifest, train_s=0.0,
                 marks_done=None, tracker: Trackers | None = None):
        self.cfg, self.eng, self.optimizer, self.task = cfg, eng, optimizer, task
        self.sampler, self.total, self.run_dir, self.pad = sampler, total, run_dir, pad
        self.manifest = manifest
        self.tracker = tracker or Trackers([], run_dir, 0, {})
        self.world, self.rank = zero.world_size(), zero.rank()
        self.device = eng.device
        self.started = time.time()
        self.train_s = train_s  # the training clock: seconds spent in steps, over all resumes
        # marks evaluated so far; a preemption at a mark's boundary leaves it for the resumed run to evaluate
        self.marks_done = marks_done if marks_done is not None else sum(m <= train_s for m in cfg.train.eval_at_s)
        zero3 = any(zero.is_zero(p) for p in eng.module.parameters())
        self.gathered = zero.GatheredPeak(eng.module) if zero3 else None

    def state(self, step: int) -> dict:
        return {"step": step, "optimizer_step": step, "samples_seen": step * self.cfg.train.batch_size,
                "world_size_at_save": self.world, "seed": self.cfg.train.seed,
                "elapsed_s": round(time.time() - self.started, 3), "train_s": self.train_s,
                "marks_done": self.marks_done}

    def train(self, start: int, stop: StopRequest) -> tuple[int, str]:
        t = self.cfg.train
        bar = display.progress(self.total, start)
        eta = display.Eta(start, self.total)
        if bar:
            bar.start()
        try:
            for step in range(start, self.total):
                preempted, over, marks = self._agree(stop)  # every rank stops and evaluates at the same boundary
                if preempted:  # a mark passed here is evaluated by the resumed run (marks_done is saved)
                    return step, "preempted"
                if over:
                    self.marks_done = marks  # the final eval, at this same step, stands for them
                    return step, "time budget"
                if marks > self.marks_done:
                    self.marks_done = marks
                    self.evaluate(step)
                # gathers in steady state: DeepSpeed prefetches along the trace it records in the first two steps
                record = self.step(step, watch=start + 2 <= step < start + 4)
                done = step + 1
                if bar:
                    bar.update(0, completed=done, eta=eta.text(done),
                               info=f"loss {record['loss']:.4f} lr {record['lr']:.2e} "
                                    f"{record['tokens_per_s']:.0f} tok/s")
                if t.log_every and (done % t.log_every == 0 or done == self.total):
                    self._log(record, f"eta={eta.text(done)}")
                if t.eval_every and done % t.eval_every == 0 and done < self.total:
                    self.evaluate(done)
                if t.save_every and done % t.save_every == 0 and done < self.total:
                    checkpoint.save(self.run_dir / "checkpoints", done, self.eng.module, self.optimizer,
                                    self.state(done), self.manifest, t.keep_last)
            return self.total, "finished"
        finally:
            if bar:
                bar.stop()

    def _agree(self, stop: StopRequest) -> tuple[bool, bool, int]:
        """*Collective.* (preempted?, budget spent?, eval marks passed) as the most advanced rank sees them:
        a signal may reach one rank only and clocks differ a little, but every rank must stop, save or
        evaluate at the same step, for the same reason."""
        t = self.cfg.train
        over = bool(t.time_budget_s and self.train_s >= t.time_budget_s)
        marks = sum(m <= self.train_s for m in t.eval_at_s)
        signal, over, marks = zero.all_reduce_max_list([stop.signal is not None, over, marks])
        return bool(signal), bool(over), int(marks)

    def step(self, step: int, watch: bool = False) -> dict:
        t0 = self.clock()
        if self.gathered:
            self.gathered.active = watch
        # dropout masks depend only on (seed, step, rank): an exact resume needs no saved RNG state
        torch.manual_seed(self.cfg.train.seed * 1_000_003 + step * 4099 + self.rank)
        lr = lr_at(step, self.cfg, self.total)
        for group in zero.torch_optimizer(self.optimizer).param_groups:
            group["lr"] = lr
        examples = [self.task.train[i] for i in self.sampler.global_indices(step)]
        n_terms = count_targets(examples, self.task.objective)
        # engine.backward divides by accumulation steps and the all-reduce averages over ranks: undo both
        scale = self.world * self.eng.gradient_accumulation_steps() / n_terms
        loss_sum = 0.0
        for idx in self.sampler.rank_micro_batches(step, self.rank, self.world, self.cfg.train.micro_batch):
            batch = self._batch([self.task.train[i] for i in idx])
            labels = batch.pop("labels")
            loss = objectives.loss_sum(self.eng(**batch).logits, labels, self.task.objective,
                                       self.cfg.train.label_smoothing)
            self.eng.backward(loss * scale)
            self.eng.step()
            loss_sum += loss.item()
        if self.gathered:
            self.gathered.active = False
        total_loss = zero.all_reduce_sum([loss_sum])[0] / n_terms
        tokens = sum(len(e["input_ids"]) for e in examples)
        dt = self.clock() - t0
        self.train_s += dt
        return {"step": step + 1, "loss": total_loss, "lr": lr, "samples": (step + 1) * self.cfg.train.batch_size,
                "step_s": round(dt, 4), "train_s": self.train_s, "tokens_per_s": tokens / dt,
                "mem_mb": round(display.memory_mb(), 1)}

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        """Sharded over ranks; every rank runs the same number of forwards (ZeRO-3 gathers are collective)."""
        self.eng.eval()
        ex = self.task.eval
        per_rank = math.ceil(len(ex) / self.world)
        mine = list(range(self.rank, len(ex), self.world))
        mine += [-1] * (per_rank - len(mine))  # padding slots: run, but count nothing
        sums = [0.0, 0.0, 0.0, 0.0]  # loss, terms, correct, predictions
        outputs = []  # (prediction, label) pairs for the task metric
        mb = self.cfg.train.micro_batch
        with display.eval_progress(math.ceil(per_rank / mb)) as advance:
            for i in range(0, per_rank, mb):
                self._eval_batch(mine[i:i + mb], sums, outputs)
                advance()
        loss, terms, right, n = zero.all_reduce_sum(sums)
        self.eng.train()
        result = {"step": step, "split": "eval", "train_s": self.train_s, "eval_loss": loss / max(terms, 1)}
        if n:
            result["accuracy"] = right / n
        result.update(evaluate.task_metrics(self.cfg.data.task, outputs))  # collective for GLUE tasks
        self._log(result)
        return result

    def _eval_batch(self, idx: list[int], sums: list[float], outputs: list) -> None:
        """One forward over eval examples `idx` (-1: a padding slot), adding into sums and outputs."""
        ex = self.task.eval
        real = [j for j in idx if j >= 0]
        batch = self._batch([ex[j if j >= 0 else 0] for j in idx])
        labels = batch.pop("labels")
        logits = self.eng(**batch).logits[:len(real)]  # padding slots come last
        if real:
            labels = labels[:len(real)]
            sums[0] += objectives.loss_sum(logits, labels, self.task.objective).item()
            sums[1] += count_targets([ex[j] for j in real], self.task.objective)
            c, n = objectives.correct(logits, labels, self.task.objective)
            sums[2] += c
            sums[3] += n
            outputs += evaluate.predictions(logits, labels, self.task.objective)

    def _batch(self, examples: list[dict]) -> dict:
        batch = collate(examples, self.task.objective, self.pad)
        batch.update(methods.extra_inputs(self.cfg, examples))
        return {k: v.to(self.device) for k, v in batch.items()}

    def _log(self, record: dict, extra: str = "") -> None:
        """One record to metrics.jsonl (the source of truth) and the trackers; `extra` (the eta) goes to the log
        line only, so records stay numeric and comparable across runs."""
        if self.rank != 0:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.tracker.log(record)
        fields = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()]
        display.log(" ".join(fields + ([extra] if extra else [])))


def _trainable_rows(model, cfg) -> list[tuple[str, str, int]]:
    heads = targets.head_prefixes(model)
    rows: dict[str, list] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            kind = "task head" if any(n.startswith(h + ".") for h in heads) else cfg.method.name
            row = rows.setdefault(kind, [f"{str(p.dtype).replace('torch.', '')} / fp32", 0])
            row[1] += zero.full_numel(p)
    return [(k, d, n) for k, (d, n) in rows.items()]


def _manifest(cfg: RunConfig, base_fp: dict, world: int) -> dict:
    import deepspeed
    import transformers
    return {"config": cfg.to_dict(), "base": base_fp, "world_size_at_save": world,
            "versions": {"bigadapt": __version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
                         "transformers": transformers.__version__}}


def _trim_metrics(path: Path, start: int) -> None:
    """On resume, drop records the interrupted run wrote after its last checkpoint (they will be redone)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= start]
    path.write_text("".join(line + "\n" for line in keep))


def _summary(path: Path, holdings: dict, final_eval: dict, outcome: str) -> None:
    if zero.rank() != 0:
        return
    size = (path / "adapter.safetensors").stat().st_size
    n = holdings["trainable_numel_total"]
    total = holdings["base_numel_total"] + n
    metric = f"accuracy {final_eval['accuracy']:.3f}, " if "accuracy" in final_eval else ""
    display.log(f"done ({outcome}): {metric}eval loss {final_eval['eval_loss']:.4f}")
    display.log(f"adapter: {path / 'adapter.safetensors'} ({size / 1024:.1f} KiB); trainable {n:,} params = "
                f"{100 * n / max(total, 1):.3f}% of all {total:,}")
