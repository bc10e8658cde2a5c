"""`python -m bigadapt ...` without paying the interpreter's start on every call.

A test's `run_cli` used to start a new interpreter, which spent ~9 of a tiny run's ~14 CPU-seconds importing torch,
transformers, DeepSpeed and datasets; the suite makes over a hundred such calls on a 2-core machine. Here a
multiprocessing fork server imports those libraries once per pytest worker, and each call is a fresh process
forked from it that runs the `bigadapt` package as `__main__` (what `python -m bigadapt` does) with the call's
argv, environment and working directory, its stdout/stderr captured to files, and its exit code (or the signal
that killed it) returned as a CompletedProcess. bigadapt itself is imported fresh in every call, never by the
server, so nothing bigadapt reads from the environment at import time goes stale.

What a forked call does not repeat is the libraries' import-time work, which saw the server's environment
(`conftest.env()` at the first call). A test about process start itself (import noise, install, environment
read at library import) must pass `fresh=True` to `run_cli`, which starts a real interpreter as before;
BIGADAPT_TEST_FRESH_CLI=1 makes every call fresh (to rule the server out when a test fails)."""
from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

# what every CLI call imports before it does anything (the modelling modules are imported lazily by transformers)
PRELOAD = ["torch", "transformers", "deepspeed", "deepspeed.runtime.engine", "deepspeed.ops.op_builder", "datasets",
           "safetensors.torch", "yaml", "rich.console", "rich.progress", "torch.utils.tensorboard",
           "transformers.models.gpt2.modeling_gpt2", "transformers.models.llama.modeling_llama"]
_context = None


def _server(env: dict) -> multiprocessing.context.BaseContext:
    """The fork server, started once with the environment the calls share (libraries read parts of it at
    import, e.g. DS_ACCELERATOR and HF_HUB_OFFLINE)."""
    global _context
    if _context is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(env)
        try:
            from multiprocessing import forkserver
            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _context = ctx
    return _context


def _child(argv: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    """In the forked process: become `python -m bigadapt argv` and exit with its code."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    sys.path[:0] = [cwd]  # `python -m` puts the working directory first
    sys.argv = [str(Path(cwd) / "bigadapt" / "__main__.py"), *argv]
    code = 0
    try:
        runpy.run_module("bigadapt", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    _log_cpu(argv)
    atexit._run_exitfuncs()  # the interpreter runs these at exit; multiprocessing's child exit does not
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _log_cpu(argv: list[str]) -> None:
    """With BIGADAPT_TEST_CPU_LOG=FILE, each call appends its CPU seconds (its own and its waited children's):
    a forked call is not the test process's child, so `time` around pytest does not count it."""
    path = os.environ.get("BIGADAPT_TEST_CPU_LOG")
    if path:
        import resource
        cpu = sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage,
                                                        (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))
        with open(path, "a") as f:
            f.write(f"{cpu:.2f} {' '.join(argv[:2])}\n")


def run(args: list[str], env: dict, cwd: Path, timeout: float, server_env: dict) -> subprocess.CompletedProcess:
    ctx = _server(server_env)
    with tempfile.TemporaryDirectory(prefix="bigadapt-cli-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        proc = ctx.Process(target=_child, args=(list(args), env, str(cwd), str(out), str(err)))
        proc.start()
        proc.join(timeout)
        cmd = [sys.executable, "-m", "bigadapt", *args]
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(cmd, timeout, out.read_text(errors="replace"),
                                            err.read_text(errors="replace"))
        return subprocess.CompletedProcess(cmd, proc.exitcode, out.read_text(errors="replace"),
                                           err.read_text(errors="replace"))
