"""`bigadapt estimate`: per-rank memory and storage before a run, for people (rich) and tools (--json)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math

from rich.console import Console
from rich.table import Table

from . import accounting, layout
from .accounting import GIB, Layout
from .config import load_config
from .errors import ConfigError
from .layout import parse_size  # noqa: F401  (re-exported: bigadapt.jobs reads sizes with it)


def add_args(p) -> None:
    p.add_argument("--config", help="run config YAML (default: the embedded tiny run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.micro_batch=4 (repeatable)")
    p.add_argument("--nodes", type=int, default=1, help="nodes of the planned run")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (ranks) per node")
    p.add_argument("--world", type=int, help="ranks in all (default: nodes x gpus-per-node)")
    p.add_argument("--gpu-memory", help="per GPU, e.g. 80GB: adds 'fits?', the fewest GPUs that fit, and the layout "
                                        "zero.stage auto takes (default: zero.memory_budget)")
    p.add_argument("--micro-batch", type=int, help="default: train.micro_batch")
    p.add_argument("--seq-len", type=int, help="default: data.seq_len")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="override train.activation_checkpointing (default: the config's; the run does what this "
                        "assumes only with the key set in its config)")
    p.add_argument("--fit", action="store_true", help="also the largest micro-batch that fits")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON instead of tables")


def main(args) -> int:
    cfg = load_config(args.config, args.overrides)
    for key in ("nodes", "gpus_per_node", "world", "micro_batch", "seq_len"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise ConfigError(f"--{key.replace('_', '-')}={value}: must be at least 1")
    world = args.world or args.nodes * args.gpus_per_node
    ac = cfg.train.activation_checkpointing if args.activation_checkpointing is None else args.activation_checkpointing
    lay = Layout(world, 3, args.micro_batch or cfg.train.micro_batch,
                 args.seq_len or cfg.data.seq_len, ac, checkpoint_every=cfg.train.checkpoint_every)
    budget = parse_size(args.gpu_memory) if args.gpu_memory else None
    choice = _choose(cfg, lay, budget)
    budget = budget or choice.budget  # --gpu-memory, else zero.memory_budget (or this machine's GPU)
    if args.fit and not budget:  # else --fit would be silently ignored: nothing to fit into
        raise ConfigError("--fit: no memory to fit into; add --gpu-memory (e.g. --gpu-memory 80GB) or set "
                          "zero.memory_budget")
    lay.stage = choice.stage
    cfg = layout.with_zero(cfg, stage=choice.stage, **(choice.windows or {}))  # what the run would give DeepSpeed
    est = accounting.estimate(cfg, lay, budget, args.fit)
    est["zero_stage"] = choice.record()
    if cfg.model.quantization != "none":  # what the trainer holds while the quantized base loads
        from . import quantized
        est["quantized_load"] = quantized.load_peak(accounting.shapes(cfg)[0].tensors, cfg, world, lay.stage,
                                                    accounting.BYTES[cfg.model.dtype])
    if args.json:
        print(json.dumps(est, indent=1))
    else:
        report(est, args.gpus_per_node, budget)
    return 0


def _choose(cfg, lay: Layout, budget: int | None) -> layout.Choice:
    """The layout a run would take (layout.choose) with --gpu-memory as its budget. Where zero.stage auto finds
    nothing that fits, the estimate still prints the fixed rule's rows, with the run's refusal as its line."""
    where = "--gpu-memory" if budget else ""
    try:
        return layout.choose(cfg, lay, budget=budget, budget_from=where)
    except ConfigError as e:
        choice = layout.choose(layout.with_zero(cfg, stage=None), lay, budget=budget, budget_from=where)
        return dataclasses.replace(choice, requested="auto", reason=f"zero.stage auto: a run refuses this: {e}",
                                   windows=None)


def _offload_note(offload: dict) -> str:
    """The offload the rows assume (offload_* rows: what leaves the GPU for host RAM or NVMe)."""
    on = [f"{what} -> {dev}" for what, dev in offload.items() if dev != "none"]
    return f", offload {', '.join(on)}" if on else ""


def _activation_note(est: dict) -> str:
    """The activation levers the rows assume: attention implementation and checkpointing (every k-th block)."""
    lay = est["layout"]
    every = lay.get("checkpoint_every", 1)
    ac = (f", activation checkpointing{f' every {every} blocks' if every > 1 else ''}"
          if lay["activation_checkpointing"] else "")
    return f", attention {est.get('attn_implementation')}{ac}"


def _gib(b: int) -> str:
    return f"{b / GIB:,.2f}"


def report(est: dict, gpus_per_node: int, budget: int | None) -> None:
    con = Console()
    m, f, lay = est["method"], est["full_finetune"], est["layout"]
    con.print(est["zero_stage"]["reason"], highlight=False)
    con.print(f"[bold]{m['name']}[/]: {m['trainable']:,} trainable of {m['params_total']:,} "
              f"({m['trainable_pct']:.4f}%); {lay['world']} ranks, ZeRO stage {lay['stage']}, "
              f"micro-batch {lay['micro_batch']} x {lay['seq_len']} tokens"
              f"{_offload_note(est['offload'])}{_activation_note(est)}")
    if "quantized_load" in est:
        q = est["quantized_load"]
        con.print(f"loading the quantized base: {q['path']}: per-rank peak ~{_gib(q['peak'])} GiB "
                  f"(whole quantized base {_gib(q['whole'])} GiB)", highlight=False)
    t = Table(title="per-rank memory (GiB)")
    for col in ("component", m["name"], "full fine-tuning"):
        t.add_column(col, justify="right")
    for key in m["per_rank"]:
        t.add_row(key, _gib(m["per_rank"][key]), _gib(f["per_rank"][key]))
    t.add_row("ratio (total)", f"{est['ratio_total']:.3f}", "1")
    con.print(t)
    s = m["storage"]
    st = Table(title="storage")
    st.add_column("what")
    st.add_column("bytes", justify="right")
    for key, what in (("adapter_fp32", "adapter checkpoint (fp32 masters)"),
                      ("adapter_fp16", "adapter in fp16 (the paper's unit)"),
                      ("resume_state", "resume state (Adam moments)"), ("merged_model", "merged model")):
        st.add_row(what, f"{s[key]:,} ({s[key] / 1e6:,.1f} MB)")
    st.add_row(f"{s['n_tasks']} tasks: base + adapters", f"{s['n_tasks_adapters'] / 1e9:,.1f} GB")
    st.add_row(f"{s['n_tasks']} tasks: full copies", f"{s['n_tasks_full_copies'] / 1e12:,.2f} TB")
    con.print(st)
    if budget:
        for entry in (m, f):
            con.print(_fit_line(entry, lay, budget, gpus_per_node))


def _fit_line(entry: dict, lay: dict, budget: int, gpus_per_node: int) -> str:
    total = entry["per_rank"]["total"]
    few = entry.get("fewest_ranks")
    where = (f"fewest GPUs that fit: {few} ({math.ceil(few / gpus_per_node)} nodes of {gpus_per_node})"
             if few else "does not fit on any number of GPUs at this batch shape (try a smaller micro-batch)")
    verdict = ("fits" if total <= budget else
               f"does NOT fit: {_gib(total)} GiB per GPU, over by {_gib(total - budget)} GiB")
    mb = f"; largest micro-batch that fits: {entry['largest_micro_batch']}" if "largest_micro_batch" in entry else ""
    return f"{entry['name']}: {verdict} on {lay['world']} x {_gib(budget)} GiB; {where}{mb}"
