"""bigadapt: LoRA and the LoRA paper's baselines on a DeepSpeed ZeRO-3-sharded, frozen base.

Every user error is one line on stderr and exit code 2; a run stopped by SIGUSR1/SIGTERM checkpoints and exits 3.
"""
from __future__ import annotations

import argparse
import os
import sys

from .bench.cli import DELEGATED as DELEGATED_BENCHES
from .errors import EXIT_USER_ERROR, BigadaptError, ConfigError


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run config YAML (default: the embedded tiny run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=2e-4 (repeatable)")
    p.add_argument("--resume", default="none", help="none | auto (newest complete checkpoint) | a checkpoint dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run_dir that already holds a run (its checkpoints and metrics go)")
    p.add_argument("--allow-config-change", metavar="KEY,...",
                   help="resume although these keys (dotted, or whole sections) differ from the checkpoint's "
                        "config, e.g. train.lr,train.schedule; keys that change nothing computed (run_dir, "
                        "*_every, keep_last, track, max_steps, epochs, time_budget_s, micro_batch, zero) need none")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher


def _submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run config YAML (default: the embedded tiny run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=2e-4 (repeatable)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (one launcher per node)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; 0 = a CPU job")
    p.add_argument("--ranks-per-node", type=int, help="default: one per GPU, or 1 on CPU")
    p.add_argument("--cpus-per-node", type=int, help="default: 4 per GPU rank, 1 per CPU rank")
    p.add_argument("--mem", help="memory per node in SLURM syntax (64G; 0 = all of it); default: the cluster's")
    p.add_argument("--time", default="01:00:00", help="wall-clock limit, [D-]HH:MM:SS")
    for opt, what in (("--partition", "partition"), ("--account", "account to charge"), ("--qos", "QOS"),
                      ("--constraint", "node features (sbatch --constraint)"), ("--name", "job name")):
        p.add_argument(opt, help=f"SLURM {what}")
    p.add_argument("--signal-lead", type=int, default=120, help="seconds of warning (SIGUSR1) before the limit")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="one array task per combination, e.g. --sweep method.r=4,8 --sweep train.seed=0,1")
    p.add_argument("--dry-run", action="store_true", help="print the job script; submit nothing")


class _OneLineParser(argparse.ArgumentParser):
    """argparse's refusal as every other user error here: one line naming what is wrong, exit 2 (argparse prints
    its whole usage first, which for `train` or `submit` is a screenful above the line that matters). The
    subcommands' parsers are of this class too (add_subparsers makes them of the parent's type)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="bigadapt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    _train_args(sub.add_parser("train", help="train (use through `deepspeed launch/train.py` for several ranks)"))
    e = sub.add_parser("export", help="write a checkpoint in another format")
    e.add_argument("run", help="run directory or checkpoint directory")
    e.add_argument("out")
    e.add_argument("--format", choices=["peft"], default="peft")
    e.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    ip = sub.add_parser("import-peft", help="a peft LoRA adapter directory as a bigadapt run directory (the config's "
                                             "run_dir, step 0), for eval/generate/merge/export/--resume auto")
    ip.add_argument("peft_dir", help="directory with adapter_config.json and adapter_model.safetensors (or .bin)")
    ip.add_argument("--config", help="the run config whose base and method the adapter must match")
    ip.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set method.r=16 (repeatable)")
    ip.add_argument("--overwrite", action="store_true", help="replace a run already in run_dir")
    m = sub.add_parser("merge", help="write a Hugging Face model directory that serves as is: the adapter merged "
                                     "into the base, config, tokenizer files, generation_config.json")
    m.add_argument("run", help="run directory or checkpoint directory")
    m.add_argument("out")
    m.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    from .generate import add_args as _generate_args
    _generate_args(sub.add_parser("generate", help="try a trained run on prompts or in a chat (one process, or "
                                                   "sharded: deepspeed --num_gpus N launch/bigadapt.py generate ...)"))
    ev = sub.add_parser("eval", help="the task's metric (else eval loss and accuracy) on a trained run; writes "
                                     "RUN/eval-<split>.json; sharded: deepspeed --num_gpus N launch/bigadapt.py eval")
    ev.add_argument("run", help="run directory or checkpoint directory")
    ev.add_argument("--split", default="dev", help="dev (E2E: valid) | test | train")
    ev.add_argument("--limit", type=int, default=0, help="score only the first N examples (sources); 0 = all")
    ev.add_argument("--beams", type=int, default=10, help="beam size (generation tasks; Table 11: 10)")
    ev.add_argument("--length-penalty", type=float, default=None,
                    help="default: Table 11's for the task, 0.9 (E2E), 0.8 (WebNLG/DART), else 1.0")
    ev.add_argument("--no-repeat-ngram-size", type=int, default=4)
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--batch-size", type=int, default=1, help="prompts per generate call")
    ev.add_argument("--merged", action="store_true",
                    help="fold the adapter into the base first (LoRA, BitFit), as deployed; "
                         "writes eval-<split>-merged.json")
    ev.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    rs = sub.add_parser("results", help="a Markdown table of the eval-*.json files of runs")
    rs.add_argument("runs", nargs="+", metavar="RUN", help="run directories (e.g. runs/*)")
    from .estimate_cli import add_args as _estimate_args
    _estimate_args(sub.add_parser("estimate", help="per-rank memory and storage before a run (meta device)"))
    from .launcher import add_args as _launch_args
    _launch_args(sub.add_parser("launch", help="run a launcher (deepspeed, torchrun) so that SIGTERM/SIGUSR1 to "
                                               "this command checkpoint every rank and exit 3 (docs/slurm.md)"))
    _submit_args(sub.add_parser("submit", help="submit a run to SLURM (job array for --sweep)"))
    st = sub.add_parser("status", help="job state and progress of a run directory")
    st.add_argument("run", help="run directory")
    from .bench.cli import add_parser as _bench_parser
    _bench_parser(sub)
    a = sub.add_parser("analyze", help="LoRA paper §7 analyses of trained LoRA runs")
    a.add_argument("what", choices=["subspace", "amplification"],
                   help="subspace RUN_A RUN_B: φ grids (eq. 4); amplification RUN: Table 7")
    a.add_argument("runs", nargs="+", metavar="RUN", help="run or checkpoint directories")
    a.add_argument("--png", help="subspace: write the φ heat map here")
    p.commands = sub.choices  # name -> its parser: an error names the command whose --help to read
    return p


# Library noise that is not the user's business, silenced once for every subcommand. DeepSpeed calls torch's
# deprecated collective names on every step; a default "once" filter does not hold them back, because
# libraries reset the warning registry whenever they mutate filters (catch_warnings), so a 250-step run
# printed ~500 copies. A user who wants them back sets BIGADAPT_WARNINGS=1.
_NOISE = (
    (FutureWarning, r"`torch\.distributed\.\w+` is deprecated"),
)


def quiet_library_noise() -> None:
    if os.environ.get("BIGADAPT_WARNINGS"):
        return
    import warnings
    for category, message in _NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)


def main(argv: list[str] | None = None) -> int:
    quiet_library_noise()
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra and not (args.command == "bench" and args.what in DELEGATED_BENCHES):
        p.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    args.rest = extra
    try:
        return _dispatch(args)
    except BigadaptError as e:
        rank = int(os.environ.get("RANK", "0"))
        # a config error is the same on every rank: rank 0 says it once. Anything else (a data file or
        # checkpoint one node cannot see) may be this rank's alone, and a silent rank leaves only its peers'
        # "connection closed" to read: every rank says it, naming itself.
        if rank == 0 or not isinstance(e, ConfigError):
            print(f"bigadapt: error{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


def _dispatch(args) -> int:
    if args.command == "train":
        from . import launcher
        from .config import load_config
        from .rundir import parse_allowed
        from .train import run
        cfg = load_config(args.config, args.overrides)
        code = run(cfg, args.resume, overwrite=args.overwrite, allow_change=parse_allowed(args.allow_config_change))
        launcher.record_exit(code)  # for `bigadapt launch`, which torchrun would otherwise tell 1
        return code
    if args.command == "launch":
        from .launcher import run as launch
        return launch(args.launcher)
    if args.command == "estimate":
        from .estimate_cli import main as estimate
        return estimate(args)
    if args.command in ("submit", "status"):
        from . import jobs
        return jobs.submit(args) if args.command == "submit" else jobs.status(args.run)
    if args.command in ("eval", "results"):
        from . import evaluate
        if args.command == "results":
            print(evaluate.results_table(args.runs))
            return 0
        settings = evaluate.GenerationSettings(args.beams, args.length_penalty, args.no_repeat_ngram_size,
                                               args.max_new_tokens, args.batch_size)
        result = evaluate.evaluate_run(args.run, args.split, args.limit, settings, args.merged)
        if int(os.environ.get("RANK", "0")) == 0:
            print(" ".join(f"{k}={v:.4g}" for k, v in result["metrics"].items()), f"(n={result['n']}, {args.split})")
        return 0
    if args.command == "generate":
        from .generate import main as generate
        return generate(args)
    if args.command == "bench":
        from .bench.cli import main as bench
        return bench(args)
    if args.command == "analyze":
        return _analyze(args)
    if args.command == "import-peft":
        from .config import load_config
        from .peft_import import import_run
        return import_run(args.peft_dir, load_config(args.config, args.overrides), args.overwrite)
    from . import export
    if args.command == "export":
        return export.to_peft(args.run, args.out, args.overwrite)
    return export.merged(args.run, args.out, args.overwrite)


def _analyze(args) -> int:
    from .analysis import amplification, subspace
    want = 2 if args.what == "subspace" else 1
    if len(args.runs) != want:
        raise BigadaptError(f"analyze {args.what}: expects {want} run director{'ies' if want > 1 else 'y'}, "
                            f"got {len(args.runs)}")
    return subspace.report(*args.runs, png=args.png) if want == 2 else amplification.report(args.runs[0])


def entry() -> None:
    sys.exit(main())
