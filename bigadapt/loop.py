"""The training loop: one optimizer step at a time, evaluation, the stop signals and the divergence guard.

World-size independent by construction: the global batch, its data, its loss normalisation and the RNG of each
step are functions of (seed, step), so a run checkpointed on N ranks resumes on M. The learning rate is a pure
function of the step too (`lr_at`), so a resume needs no scheduler state.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time

import torch

from . import checkpoint, display, evaluate, methods, objectives, records, zero
from .config import RunConfig
from .data import prefetch
from .data.batching import collate, count_targets
from .errors import DivergedError
from .tracking import Trackers

# Fault injection for tests that signal a run mid-flight (SLURM preemption): once this step is logged, the run
# waits for a stop signal (at most HOLD_LIMIT_S), so the signal the test sends on seeing the step lands at that
# step however fast or loaded the machine is. Unset (0) in real runs.
HOLD_AT_STEP = int(os.environ.get("BIGADAPT_FAULT_HOLD_AT_STEP", "0"))
HOLD_LIMIT_S = 300

# The loss-spike check (train.max_loss_spike) compares a step's loss with an exponential mean of the earlier ones
# (a plain mean over the first SPIKE_WINDOW): it starts once SPIKE_WARMUP steps have run in this process, since
# early losses fall fast and a resumed process has no history.
SPIKE_WARMUP, SPIKE_WINDOW = 10, 20

# A rank whose peak memory passes the prediction made before the run by more than this fraction is warned about
# at the step it happens, naming the rank: on a GPU the next step may be the one that runs out. The accounting
# lands within it on the runs it is checked on (docs/accounting.md); beyond it the prediction is wrong.
MEMORY_TOLERANCE = 0.15


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


def _hold_for_stop(stop: StopRequest) -> None:
    """BIGADAPT_FAULT_HOLD_AT_STEP: wait for SIGUSR1/SIGTERM (bounded, so a test that never sends one still ends)."""
    deadline = time.monotonic() + HOLD_LIMIT_S
    while stop.signal is None and time.monotonic() < deadline:
        time.sleep(0.05)


def _memory_limit_mb(predicted: dict | None) -> float | None:
    """The prediction in the units display.memory_mb measures (GPUs report allocated memory, which leaves out the
    CUDA context that the overhead constant covers), plus the tolerance; None = nothing to watch."""
    if not predicted or not predicted.get("total"):
        return None
    total = predicted["total"] - (predicted.get("framework_overhead", 0) if torch.cuda.is_available() else 0)
    return total * (1 + MEMORY_TOLERANCE) / 2**20


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


class Loop:
    # the training clock: only differences are used; tests replace it to make clock-driven stops deterministic
    clock = staticmethod(time.perf_counter)

    def __init__(self, cfg, eng, optimizer, task, sampler, total, run_dir, pad, manifest, train_s=0.0,
                 marks_done=None, tracker: Trackers | None = None, predicted: dict | None = None):
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
        # the divergence guard's view (_guard): steps DeepSpeed skipped (in all, and in a row), the loss's level
        self.skipped, self.skipped_in_row, self.applied = 0, 0, True
        self.loss_level, self.losses_seen = 0.0, 0
        self.memory_limit_mb = _memory_limit_mb(predicted)

    def state(self, step: int) -> dict:
        """*Collective.* What a resume needs besides the tensors. Adam's step count and the fp16 loss scaler
        are read from the optimizer: a step DeepSpeed skipped (overflow) advanced neither."""
        return {"step": step, "optimizer_step": zero.optimizer_step(self.optimizer),
                "loss_scale": zero.loss_scale_state(self.optimizer), "skipped_steps": self.skipped,
                "samples_seen": step * self.cfg.train.batch_size,
                "world_size_at_save": self.world, "seed": self.cfg.train.seed,
                "elapsed_s": round(time.time() - self.started, 3), "train_s": self.train_s,
                "marks_done": self.marks_done}

    def train(self, start: int, stop: StopRequest) -> tuple[int, str]:
        t = self.cfg.train
        bar = display.progress(self.total, start)
        eta = display.Eta(start, self.total)
        if bar:
            bar.start()
        # every run step is one optimizer step, unless DeepSpeed skipped it: what a resume's Adam count lacks
        self.skipped = start - zero.optimizer_step(self.optimizer)
        batches = prefetch.step_batches(self.cfg, self.task, self.sampler, self.pad, self.rank, self.world, start,
                                        self.total)
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
                record = self.step(step, next(batches), watch=start + 2 <= step < start + 4)
                self._guard(record)  # raises DivergedError on every rank before anything is saved from the step
                done = step + 1
                if bar:
                    bar.update(0, completed=done, eta=eta.text(done),
                               info=f"loss {record['loss']:.4f} lr {record['lr']:.2e} "
                                    f"{record['tokens_per_s']:.0f} tok/s")
                self._watch_memory(record, done)
                if t.log_every and (done % t.log_every == 0 or done == self.total):
                    # *Collective* (every rank logs at the same steps): the largest rank's peak, not rank 0's
                    record["mem_mb_max"] = zero.all_reduce_max_list([record["mem_mb"]])[0]
                    self._log(record, f"eta={eta.text(done)}")
                if done == HOLD_AT_STEP:
                    _hold_for_stop(stop)
                if t.eval_every and done % t.eval_every == 0 and done < self.total:
                    self.evaluate(done)
                if t.save_every and done % t.save_every == 0 and done < self.total:
                    checkpoint.save(self.run_dir / "checkpoints", done, self.eng.module, self.optimizer,
                                    self.state(done), self.manifest, t.keep_last)
            return self.total, "finished"
        finally:
            if bar:
                bar.stop()

    def _watch_memory(self, record: dict, done: int) -> None:
        """Warn once per process, on the rank it happens to, when its peak passes the prediction (MEMORY_TOLERANCE)."""
        if self.memory_limit_mb is None or record["mem_mb"] <= self.memory_limit_mb:
            return
        limit, self.memory_limit_mb = self.memory_limit_mb, None
        print(f"bigadapt: warning: rank {self.rank} at step {done}: peak memory {record['mem_mb']:.0f} MiB is above "
              f"the prediction + {MEMORY_TOLERANCE:.0%} ({limit:.0f} MiB); check `bigadapt estimate` for this config "
              f"and docs/accounting.md before a larger run relies on it", file=sys.stderr, flush=True)

    def _agree(self, stop: StopRequest) -> tuple[bool, bool, int]:
        """*Collective.* (preempted?, budget spent?, eval marks passed) as the most advanced rank sees them:
        a signal may reach one rank only and clocks differ a little, but every rank must stop, save or
        evaluate at the same step, for the same reason."""
        t = self.cfg.train
        over = bool(t.time_budget_s and self.train_s >= t.time_budget_s)
        marks = sum(m <= self.train_s for m in t.eval_at_s)
        signal, over, marks = zero.all_reduce_max_list([stop.signal is not None, over, marks])
        return bool(signal), bool(over), int(marks)

    def step(self, step: int, prepared: dict, watch: bool = False) -> dict:
        """One optimizer step on `prepared`, this rank's share of the step's global batch (data/prefetch.py)."""
        assert prepared["step"] == step, (prepared["step"], step)  # the stream and the loop must never drift
        t0 = self.clock()
        if self.gathered:
            self.gathered.active = watch
        # dropout masks depend only on (seed, step, rank): an exact resume needs no saved RNG state
        torch.manual_seed(self.cfg.train.seed * 1_000_003 + step * 4099 + self.rank)
        lr = lr_at(step, self.cfg, self.total)
        for group in zero.torch_optimizer(self.optimizer).param_groups:
            group["lr"] = lr * group.get("lr_ratio", 1.0)  # LoRA+: B's groups run at lr_ratio x the schedule
        n_terms = prepared["n_terms"]
        # engine.backward divides by accumulation steps and the all-reduce averages over ranks: undo both
        scale = self.world * self.eng.gradient_accumulation_steps() / n_terms
        loss_sum = 0.0
        for micro in prepared["micro"]:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in micro.items()}
            labels = batch.pop("labels")
            loss = objectives.loss_sum(self.eng(**batch).logits, labels, self.task.objective,
                                       self.cfg.train.label_smoothing)
            self.eng.backward(loss * scale)
            self.eng.step()
            loss_sum += loss.item()
        if self.gathered:
            self.gathered.active = False
        # read at the accumulation boundary (the last eng.step()): DeepSpeed's verdict on this optimizer step
        self.applied = self.eng.was_step_applied()
        norm = self.eng.get_global_grad_norm()  # None where DeepSpeed computes none (fp32 without ZeRO)
        total_loss = zero.all_reduce_sum([loss_sum])[0] / n_terms
        tokens = prepared["tokens"]
        dt = self.clock() - t0
        self.train_s += dt
        record = {"step": step + 1, "loss": total_loss, "lr": lr, "samples": (step + 1) * self.cfg.train.batch_size,
                  "step_s": round(dt, 4), "train_s": self.train_s, "tokens_per_s": tokens / dt,
                  "mem_mb": round(display.memory_mb(), 1)}
        if norm is not None:
            record["grad_norm"] = float(norm)
        return record

    def _guard(self, record: dict) -> None:
        """*Collective.* Stop a diverging run: a non-finite loss or gradient norm, a loss spike, or too many steps
        in a row skipped on overflow. Every rank reaches the same verdict (one reduction) and raises, so nothing
        is saved from the state and no good checkpoint is pruned for it (docs/checkpoints.md)."""
        t = self.cfg.train
        self.skipped += not self.applied
        self.skipped_in_row = 0 if self.applied else self.skipped_in_row + 1
        if self.skipped:
            record["skipped_steps"] = self.skipped
        loss, norm = record["loss"], record.get("grad_norm")
        spike = (t.max_loss_spike and self.losses_seen >= SPIKE_WARMUP and math.isfinite(loss)
                 and loss > t.max_loss_spike * self.loss_level)
        verdict = zero.all_reduce_max_list([
            not math.isfinite(loss),
            self.applied and norm is not None and not math.isfinite(norm),  # a skipped step's norm is moot
            bool(spike),
            bool(t.max_skipped_steps) and self.skipped_in_row >= t.max_skipped_steps])
        if any(verdict):
            self._log(record)  # the step that diverged, for the record (a resume trims it)
            raise DivergedError(self._diverged(record, verdict))
        if self.applied:  # the running level: an exponential mean, from the first steps this process ran
            self.losses_seen += 1
            self.loss_level += (loss - self.loss_level) / min(self.losses_seen, SPIKE_WINDOW)

    def _diverged(self, record: dict, verdict: list[float]) -> str:
        t, n = self.cfg.train, record["step"]
        why = [f"the loss is {record['loss']}", f"the gradient norm is {record.get('grad_norm')}",
               f"the loss {record['loss']:.4g} is over train.max_loss_spike={t.max_loss_spike:g} x its running "
               f"mean {self.loss_level:.4g}",
               f"DeepSpeed skipped the last {self.skipped_in_row} steps on overflow (train.max_skipped_steps="
               f"{t.max_skipped_steps})"]
        reason = next(w for w, v in zip(why, verdict) if v)
        return (f"step {n}: diverged: {reason}; nothing was saved from it, the newest checkpoint is the last good "
                f"one: lower train.lr and continue with --resume auto --allow-config-change train.lr")

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
        records.append(self.run_dir / "metrics.jsonl", record)  # a full disk: one line, not a traceback
        self.tracker.log(record)
        fields = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()]
        display.log(" ".join(fields + ([extra] if extra else [])))
