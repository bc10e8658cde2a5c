"""The training run, top to bottom: validate -> shard-load the base -> inject -> DeepSpeed -> loop -> save.

The loop is world-size independent by construction: the global batch, its data, its loss normalisation
and the RNG of each step are functions of (seed, step), so a run checkpointed on N ranks resumes on M.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

from . import (
    __version__,
    accounting,
    checkpoint,
    display,
    engine,
    fingerprint,
    head_init,
    launcher,
    methods,
    recompute,
    records,
    rundir,
    targets,
    zero,
)
from . import model as base_model
from .config import RunConfig, check_world, dump_config
from .data import build_task
from .data.batching import StepSampler
from .errors import EXIT_DIVERGED, EXIT_PREEMPTED, DivergedError
from .layout import resolve, run_layout
from .loop import Loop, StopRequest
from .tracking import Trackers


def run(cfg: RunConfig, resume: str | None = None, overwrite: bool = False, allow_change: list[str] = ()) -> int:
    # the meta-device copy finds bad targets before any process or file exists, and feeds the accounting
    shape, _ = accounting.shapes(cfg)
    accounting.check_positions(shape, cfg)
    checkpoint.check_init_from(cfg, resume, overwrite)  # an unusable method.init_from: refused before any file
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = check_world(cfg, world)
    # zero.stage auto/null decided once (layout.py; a budget nothing fits in is refused here); the run uses that
    # config, config.yaml keeps what the user wrote, so a resume on another world size decides again
    written, (cfg, choice) = cfg, resolve(cfg, run_layout(cfg, world), shape)
    recompute.check_runnable(cfg, cfg.zero.stage)  # one line, before any process group
    engine.check_runnable(cfg, cfg.zero.stage)  # offload DeepSpeed or this machine cannot run
    # the run's own levers (checkpointing, every k-th block), so measured and predicted compare like with like
    layout = run_layout(cfg, world)
    layout.stage = cfg.zero.stage
    predicted = accounting.per_rank(shape, cfg, layout)
    stop = StopRequest()
    launcher.register_rank()  # a wrapper (bigadapt launch) may pass stop signals on from here
    engine.init_distributed()
    display.log(choice.reason)
    run_dir = Path(cfg.run_dir)
    lock = rundir.claim(run_dir)  # held for the run's life: a second run on this directory is refused
    try:
        started = _prepare(cfg, resume, overwrite, allow_change, world, accumulation, shape)
    except BaseException:
        if lock:
            lock.release(refused=True)  # a refused run leaves no directory it made
        raise
    try:
        _first_writes(written, overwrite, {"layout": vars(layout), "zero_stage": choice.record()}, predicted, started)
        return _start(cfg, started, stop, predicted)
    finally:
        if lock:
            lock.release()


def _prepare(cfg: RunConfig, resume, overwrite, allow_change, world, accumulation, shape) -> dict:
    """*Collective.* Everything that can refuse the run, in order, writing nothing: the run directory's state,
    the base, method and engine, the checkpoint to resume and its config, and the data."""
    run_dir, rank = Path(cfg.run_dir), zero.rank()
    rundir.check_fresh_start(run_dir, resume, overwrite)
    conf = engine.ds_config(cfg, world, accumulation, shape)
    zero.register_for_loading(conf)
    model = base_model.build_base(cfg.model, cfg.train.seed)
    base_fp = fingerprint.fingerprint(model, exclude=targets.head_prefixes(model))
    methods.apply_seeded(model, cfg)  # the same adapter init on every rank
    stage = engine.zero_stage(cfg, world)
    if recompute.enable(model, cfg.train, stage):  # before initialize: ZeRO-3's hooks then wrap the final modules
        display.log(f"activation checkpointing: every {cfg.train.checkpoint_every} block(s), "
                    f"{'reentrant' if recompute.reentrant(cfg.train, stage) else 'non-reentrant'}")
    eng, optimizer = engine.initialize(model, cfg, conf)
    zero.unregister()

    # --overwrite: the old checkpoints are about to go, so none is resumed or compared
    ckpt = None if overwrite else checkpoint.find_resume(run_dir / "checkpoints", resume, log=display.log)
    manifest = _manifest(cfg, base_fp, world)
    resumed = {}
    if ckpt:
        saved = json.loads((ckpt / "manifest.json").read_text())
        changes = rundir.check_resume_config(ckpt, saved, cfg, allow_change)
        # what the run actually used: every change made at a resume, with the step it took effect
        manifest["config_changes"] = saved.get("config_changes", []) + (
            [{"step": saved.get("step"), "changes": {k: list(v) for k, v in changes.items()}}] if changes else [])
        resumed = checkpoint.restore(ckpt, eng.module, optimizer, base_fp)
    elif cfg.method.init_from:
        source = checkpoint.init_from(Path(cfg.method.init_from), eng.module, base_fp,
                                      targets.head_prefixes(eng.module), cfg)
        display.log(f"method tensors start from {source} (task head fresh)")

    task = build_task(cfg, eng.module.config.vocab_size)  # a bad data file is refused here, on every rank
    if not ckpt and cfg.model.num_labels == 1 and cfg.model.objective == "seq_cls":
        # a fresh regression head starts at the training labels' mean (a resumed one is restored)
        head_init.init_regression_bias(eng.module, head_init.training_labels(task.train))
    return dict(eng=eng, optimizer=optimizer, ckpt=ckpt, resumed=resumed, task=task, manifest=manifest,
                rank=rank, accumulation=accumulation, stage=engine.zero_stage(cfg, world))


def _first_writes(cfg: RunConfig, overwrite: bool, layout: dict, predicted: dict, s: dict) -> None:
    """*Collective.* Every check has passed: only now does the run directory change. `cfg` as the user wrote it
    (zero.stage auto stays auto); `layout`: the Layout and the stage taken, with why (layout.Choice.record)."""
    run_dir, start = Path(cfg.run_dir), s["resumed"].get("step", 0)
    if s["rank"] == 0:
        if overwrite:
            rundir.clear_for_overwrite(run_dir)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        (run_dir / "estimate.json").write_text(json.dumps({**layout, "per_rank": predicted}, indent=1))
        checkpoint.clean_stale(run_dir / "checkpoints")
        _trim_metrics(run_dir / "metrics.jsonl", start)
        if s["task"].label_names is not None:  # what the classifier's ids mean, for whoever uses the adapter
            (run_dir / "labels.json").write_text(json.dumps({"labels": s["task"].label_names}, indent=1))
    zero.barrier()


def _start(cfg: RunConfig, s: dict, stop: StopRequest, predicted: dict) -> int:
    run_dir, eng, optimizer, task, resumed = Path(cfg.run_dir), s["eng"], s["optimizer"], s["task"], s["resumed"]
    start = resumed.get("step", 0)
    holdings = zero.rank_holdings(eng.module, optimizer)
    display.start_table(holdings, _trainable_rows(eng.module, cfg), s["stage"], s["accumulation"])
    display.estimate_line(predicted)
    if s["rank"] == 0:
        (run_dir / "layout.json").write_text(json.dumps(holdings, indent=1))
    if s["ckpt"]:
        display.log(f"resumed from {s['ckpt']} at step {start}")
    if task.summary:
        display.log(task.summary)
    if cfg.data.packing:  # a KV cache hides packed rows from transformers' per-example masking
        eng.module.config.use_cache = False
    sampler = StepSampler(len(task.train), cfg.train.batch_size, cfg.train.seed)
    total = cfg.train.max_steps or max(1, math.floor(cfg.train.epochs * sampler.steps_per_epoch))
    tracker = Trackers(cfg.train.track, run_dir, start, cfg.to_dict(), s["rank"])
    loop = Loop(cfg, eng, optimizer, task, sampler, total, run_dir, base_model.pad_id(eng.module), s["manifest"],
                train_s=resumed.get("train_s", 0.0), marks_done=resumed.get("marks_done"), tracker=tracker,
                predicted=predicted)
    try:
        return _train_and_save(loop, start, stop, predicted, holdings)
    finally:
        tracker.close()  # on preemption and on errors too: the event files end flushed


def _train_and_save(loop: Loop, start: int, stop: StopRequest, predicted: dict, holdings: dict) -> int:
    """Train, checkpoint, report; a diverged run ends here with one line and EXIT_DIVERGED on every rank (the
    ranks agreed on it), which job scripts do not requeue: the same run would diverge again."""
    try:
        return _train_then_save(loop, start, stop, predicted, holdings)
    except DivergedError as e:
        if zero.rank() == 0:
            print(f"bigadapt: error: {e}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED


def _train_then_save(loop: Loop, start: int, stop: StopRequest, predicted: dict, holdings: dict) -> int:
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
    """On resume, drop records the interrupted run wrote after its last checkpoint (they will be redone), and a
    line torn by a crash or a full disk (with a warning): a log never stops a run whose checkpoints are intact."""
    records.trim(path, start, warn=display.log)


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
