#!/usr/bin/env bash
# Every GPU check this project has never run, in one prepared command for a lent GPU machine (docs/benchmarks.md,
# "GPU validation"). Most valuable first, each step under its own timeout, all of them inside GPU_CHECKS_BUDGET
# seconds (540 by default: the device tool stops a command at 600 s). A failed step does not stop the next.
#
#   bash launch/gpu_checks.sh --prepare   # here (PyPI reachable): the wheels the GPU image lacks -> build/gpu-wheels
#   bash launch/gpu_checks.sh             # there, with build/gpu-wheels carried; here it is a dry run (no CUDA:
#                                         # every GPU step is "skipped: no CUDA")
#
# Writes $OUT/summary.md (device, versions, each step's status, exit code and wall time, failures' tails, the
# benches' tables) and $OUT/results.tar.gz (every log, junit XML, JSON and accounting.json), both rewritten after
# each step so a killed command still returns what had finished. OUT defaults to ./gpu-out. Only two files: the
# device tool returns at most 8. Never changes GPU settings: nvidia-smi is only queried.
#
# Environment: GPU_CHECKS_BUDGET (seconds, 540), GPU_CHECKS_ONLY (comma list of steps, e.g. to rerun the failed
# ones), GPU_CHECKS_PYTHON (the interpreter that holds torch: python3), GPU_CHECKS_PY_VERSION (--prepare's target
# Python, 3.12: the GPU image's), GPU_CHECKS_WHEELS (the wheel folder, build/gpu-wheels), GPU_CHECKS_FORCE=1 (run
# the GPU steps without CUDA: only to test this script on a CPU machine), GPU_CHECKS_KEEP=1 (keep the work folder).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO=$PWD
PY=${GPU_CHECKS_PYTHON:-python3}
WHEELS=$REPO/${GPU_CHECKS_WHEELS:-build/gpu-wheels}
STEPS="env install gpu-tests precision-fp16 qlora-nf4 accounting latency throughput peft"
# what the GPU image ('cuda': torch, transformers, peft, accelerate, pytest, ...) lacks or has at another version
# than CI tests: deepspeed, bitsandbytes and deepspeed's pydantic are not there; transformers/peft/accelerate at
# CI's versions. Versions are read from the environment that runs --prepare (the one CI's constraints installed).
CARRIED="deepspeed transformers peft accelerate bitsandbytes pydantic pydantic_core annotated-types
typing-inspection hjson typing_extensions regex"

prepare() {
    # build/ is ignored by the tracked .gitignore, so build/gpu-wheels can be named in the device tool's carry
    git check-ignore -q "$WHEELS/x.whl" || { echo "$WHEELS is not ignored by git: carry needs an ignored path"; return 2; }
    rm -rf "$WHEELS" && mkdir -p "$WHEELS" || return 2
    local pins
    pins=$("$PY" -c 'import sys
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in sys.argv[1:]))' $CARRIED) || { echo "install the project first"; return 2; }
    echo "pins: $pins"
    local ds=${pins%% *} rest=${pins#* }
    # DeepSpeed is an sdist on PyPI: a pure-Python wheel with no prebuilt ops (they are JIT-built where needed)
    "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" "$ds" || return 1
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_CHECKS_PY_VERSION:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d "$WHEELS" $rest || return 1
    # bitsandbytes ships a library per CUDA/ROCm/XPU release (~125 MiB unpacked); the image's torch is a CUDA 13
    # build: keep the CPU and CUDA 13.x libraries, and drop the others from the wheel's RECORD too
    "$PY" - "$WHEELS"/bitsandbytes-*.whl <<'EOF' || return 1
import re, sys, zipfile
path = sys.argv[1]
drop = re.compile(r"bitsandbytes/libbitsandbytes_(?!cpu|cuda13)\w+\.(so|dll|dylib)$")
with zipfile.ZipFile(path) as src:
    items = [(i, src.read(i)) for i in src.infolist() if not drop.search(i.filename)]
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
    for info, data in items:
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(l for l in data.splitlines(True) if not drop.search(l.split(b",")[0].decode()))
        dst.writestr(info, data, zipfile.ZIP_DEFLATED)
EOF
    ls -l "$WHEELS"
    echo "$(du -sm "$WHEELS" | cut -f1) MiB in $WHEELS (the device tool carries 64 MiB with the tree); run with"
    echo "carry [\"${WHEELS#"$REPO"/}\"]"
}

case "${1:-}" in
    --prepare) prepare; exit $? ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    "") ;;
    *) echo "unknown argument $1 (--prepare, --help)"; exit 2 ;;
esac

ONLY=${GPU_CHECKS_ONLY:-}
for name in ${ONLY//,/ }; do
    [[ " $STEPS " == *" $name "* ]] || { echo "GPU_CHECKS_ONLY: no step '$name' (steps: $STEPS)"; exit 2; }
done
BUDGET=${GPU_CHECKS_BUDGET:-540}
RESERVE=15  # seconds kept for the last summary and bundle after a step's timeout (and its 10 s kill grace)
if [ -z "${OUT:-}" ]; then
    OUT=$REPO/gpu-out
    mkdir -p "$OUT" && echo '*' >"$OUT/.gitignore"  # so a dry run here leaves nothing for git or the next carry
fi
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
WORK=$(mktemp -d /tmp/bigadapt-gpu-checks.XXXXXX) || exit 2
[ "${GPU_CHECKS_KEEP:-}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
RESULTS=$WORK/results  # bundled into $OUT/results.tar.gz
mkdir -p "$RESULTS/logs"
ROWS=$WORK/rows.tsv    # step, status, exit code, wall s, timeout s, what
FACTS=$RESULTS/facts.txt
: >"$ROWS"
: >"$FACTS"

# --- what this machine has: said first, since everything below depends on it --------------------------------------
PYBIN=$(dirname "$(command -v "$PY" 2>/dev/null || echo "/nonexistent/$PY")")
TORCH=$("$PY" -c 'import torch
c = torch.cuda.is_available()
where = " (%s, sm_%d%d)" % (torch.cuda.get_device_name(0), *torch.cuda.get_device_capability(0)) if c else ""
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuda available: {c}{where}")' 2>&1 | tail -1)
case "$TORCH" in
    *"cuda available: True"*) CUDA=1 ;;
    *) CUDA=${GPU_CHECKS_FORCE:-0} ;;
esac
case "$TORCH" in torch\ *) ;; *) TORCH="torch: NOT importable by $PY ($TORCH): no GPU step can run" ;; esac
{
    echo "python: $(command -v "$PY" || echo "$PY not found") ($("$PY" -V 2>&1))"
    echo "$TORCH"
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "wheels: $(cd "$WHEELS" && ls ./*.whl | sed 's|^\./||; s/-py3.*//; s/-cp3.*//' | tr '\n' ' ')"
    else
        echo "wheels: none at ${WHEELS#"$REPO"/}: deepspeed and bitsandbytes are not on the GPU image (run" \
            "'bash launch/gpu_checks.sh --prepare' where PyPI is reachable and carry that folder)"
    fi
} | tee -a "$FACTS"
echo "budget ${BUDGET}s; work in $WORK; results to $OUT"

# --- the steps: each a function run under its own timeout in its own process group ------------------------------
PYTEST_WRAP='import signal, sys, pytest
def stop(*_):  # a step timeout (SIGTERM) ends pytest as ^C does: it still writes the junit XML and the summary
    raise KeyboardInterrupt
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
sys.exit(pytest.main(sys.argv[1:]))'

pytest_step() {  # NAME PER_TEST_TIMEOUT ARGS...: pytest in the checks' environment, junit XML into the results
    local name=$1 per_test=$2 extra=()
    shift 2
    "$VPY" -c 'import pytest_timeout' 2>/dev/null && extra=(--timeout="$per_test")
    "$VPY" -c "$PYTEST_WRAP" -v -rA -p no:xdist --basetemp="$WORK/tmp-$name" \
        --junitxml="$RESULTS/junit-$name.xml" "${extra[@]}" "$@"
}

step_env() {
    date -u
    uname -a
    echo "cores: $(nproc), memory: $(free -g 2>/dev/null | awk '/^Mem/ {print $2 " GiB"}')"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi  # read only: no -pm, -mig, -r, -c, -lgc here or anywhere
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader |
            sed 's/^/gpu: /' >>"$FACTS"
        nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/driver CUDA: \1/p' | head -1 >>"$FACTS"
    else
        echo "gpu: none (no nvidia-smi)" | tee -a "$FACTS"
    fi
    command -v nvcc >/dev/null && nvcc --version | tail -2
    "$PY" -m pip --version
    echo "image packages (before the carried wheels):"
    versions "$PY" | tee -a "$RESULTS/versions-image.txt"
}

versions() {  # the packages the checks depend on, as PYTHON sees them
    "$1" - <<'EOF'
from importlib.metadata import PackageNotFoundError, version
for name in ("torch", "deepspeed", "transformers", "bitsandbytes", "peft", "accelerate", "pydantic", "numpy",
             "pytest", "pytest-timeout", "bigadapt"):
    try:
        print(f"{name} {version(name)}")
    except PackageNotFoundError:
        print(f"{name} -")
EOF
}

step_install() {
    # A venv over the image's interpreter: its own site-packages (the carried wheels, bigadapt) first, then the
    # image's, so torch with CUDA is the image's and nothing of the image is changed. Console scripts (deepspeed,
    # bigadapt, torchrun) land next to its python, where the tests and benches look for them.
    local venv=$WORK/venv
    "$PY" -m venv --without-pip "$venv" || return 1
    local sp
    sp=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
    "$PY" -c 'import site, sys
dirs = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
print("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs))' >"$sp/zz-image-site-packages.pth" || return 1
    printf '#!%s\nimport sys\nfrom torch.distributed.run import main\nsys.exit(main())\n' "$venv/bin/python" \
        >"$venv/bin/torchrun" && chmod +x "$venv/bin/torchrun"
    local pip=("$venv/bin/python" -m pip install -q --no-index --no-deps --no-cache-dir --disable-pip-version-check)
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        "${pip[@]}" --no-compile --ignore-installed "$WHEELS"/*.whl || return 1
    fi
    "${pip[@]}" --no-build-isolation -e "$REPO" || return 1  # the project from the copied tree, offline
    echo "checks' environment ($venv):"
    versions "$venv/bin/python" | tee "$RESULTS/versions.txt"
    "$venv/bin/python" -c 'import torch, deepspeed, transformers, peft, bigadapt, bitsandbytes
print("imports ok; deepspeed accelerator:", deepspeed.get_accelerator()._name)'
}

step_gpu_tests() {
    pytest_step gpu-tests 120 -m gpu tests/gpu
}

step_precision_fp16() {
    # BIGADAPT_TEST_FRESH_CLI=1: run_cli's fork server imports DeepSpeed with the CPU accelerator (conftest.env()),
    # and DeepSpeed keeps the accelerator it chose at import, so a forked call would never reach CUDA
    BIGADAPT_TEST_FRESH_CLI=1 pytest_step precision-fp16 75 -m gpu tests/distributed/test_precision_resume.py
}

step_qlora_nf4() {
    # bigadapt train with a 4-bit NF4 base under ZeRO-3 on the GPU (tests/gpu only checks an NF4 forward). The same
    # run on 1 CPU rank: mean loss of the last 10 steps 0.52x the first 10's, eval accuracy 0.77, streamed load
    local run=$WORK/runs/qlora-nf4
    cat >"$WORK/qlora-nf4.yaml" <<EOF
run_dir: $run
model:
  arch: {model_type: gpt2, n_layer: 2, n_embd: 128, n_head: 4, vocab_size: 96, n_positions: 64,
         resid_pdrop: 0.0, embd_pdrop: 0.0, attn_pdrop: 0.0, bos_token_id: 0, eos_token_id: 0, pad_token_id: 0}
  objective: seq_cls
  quantization: nf4
method: {name: qlora, r: 8, alpha: 16, targets: [q, v]}
data: {task: synthetic_cls, seq_len: 16, num_train: 2048, num_eval: 128}
train: {batch_size: 16, micro_batch: 16, lr: 0.01, max_steps: 100, log_every: 1}
zero: {stage: 3, param_persistence_threshold: 0}
EOF
    "$VPY" -m torch.distributed.run --standalone --nproc-per-node 1 launch/train.py --config "$WORK/qlora-nf4.yaml" \
        2>&1 | tee "$WORK/qlora-nf4.log"
    [ "${PIPESTATUS[0]}" = 0 ] || return 1
    cp "$run/metrics.jsonl" "$RESULTS/qlora-nf4-metrics.jsonl"
    "$VPY" - "$run/metrics.jsonl" "$WORK/qlora-nf4.log" <<'EOF'
import json, re, sys
records = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
losses = [r["loss"] for r in records if "loss" in r]
evals = [r for r in records if "loss" not in r]
first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
print(f"qlora nf4: mean loss of the first 10 steps {first:.4f}, of the last 10 {last:.4f} ({last / first:.2f}x; "
      f"must be < 0.8x); last eval {json.dumps(evals[-1]) if evals else 'none'}")
log = " ".join(open(sys.argv[2], errors="replace").read().split())  # the console wraps long lines
streamed = re.search(r"4-bit base read and quantized tensor by tensor.*?bytes\)", log)
fallback = re.findall(r"quantized by transformers[^)]*\)", log) or ["no load line found"]
print("load:", streamed.group(0) if streamed else "NOT streamed: " + fallback[0])
sys.exit(0 if len(losses) == 100 and last < 0.8 * first and streamed else 1)
EOF
}

step_accounting() {
    # peak allocated against the prediction (total less the framework constant, which allocated memory leaves
    # out) on GPT-2 medium's shape, and on the ~100M shape tests/gpu trained (its accounting.json, if it ran)
    local run=$WORK/runs/accounting-medium
    cat >"$WORK/accounting-medium.yaml" <<EOF
run_dir: $run
model:
  arch: {model_type: gpt2, n_layer: 24, n_embd: 1024, n_head: 16, vocab_size: 50257, n_positions: 512,
         resid_pdrop: 0.0, embd_pdrop: 0.0, attn_pdrop: 0.0, bos_token_id: 0, eos_token_id: 0, pad_token_id: 0}
  objective: seq_cls
  dtype: bf16
method: {name: lora, r: 4, alpha: 8, targets: [q, v]}
data: {task: synthetic_cls, seq_len: 256, num_train: 512, num_eval: 32}
train: {batch_size: 16, micro_batch: 16, lr: 0.002, max_steps: 3, log_every: 1}
zero: {stage: 3, param_persistence_threshold: 0}
EOF
    "$VPY" -m torch.distributed.run --standalone --nproc-per-node 1 launch/train.py \
        --config "$WORK/accounting-medium.yaml"
    local rc=$? found=()
    [ -f "$run/accounting.json" ] && cp "$run/accounting.json" "$RESULTS/accounting-gpt2-medium.json" &&
        found+=("$RESULTS/accounting-gpt2-medium.json")
    local f copy
    while read -r f; do  # .../tmp-gpu-tests/<test>/run/accounting.json
        copy=$RESULTS/accounting-$(basename "$(dirname "$(dirname "$f")")").json
        cp "$f" "$copy" && found+=("$copy")
    done < <(find "$WORK/tmp-gpu-tests" -name accounting.json 2>/dev/null)
    [ ${#found[@]} -gt 0 ] || { echo "no accounting.json produced"; return 1; }
    "$VPY" - "${found[@]}" <<'EOF' || rc=1
import json, os, sys
bad = False
print("| run | predicted MiB (total - framework) | peak allocated MiB | error | model states worst rank |")
print("|---|---:|---:|---:|---:|")
for path in sys.argv[1:]:
    r = json.load(open(path))
    pred = r["predicted"]["total"] - r["predicted"]["framework_overhead"]
    meas = r["measured"][0]["peak_memory"]
    err, states = (meas - pred) / pred, r["model_states_max_rel_error"]
    bad |= abs(err) > 0.15 or states > 0.02
    print(f"| {os.path.basename(path)[11:-5]} | {pred / 2**20:,.0f} | {meas / 2**20:,.0f} | {100 * err:+.1f}% "
          f"| {100 * states:.2f}% |")
print("target: peak within 15% of the prediction, model states within 2%:", "MISSED" if bad else "met")
sys.exit(1 if bad else 0)
EOF
    return $rc
}

step_latency() {
    # Table 1's cells in bf16 on GPT-2 medium (the GPU defaults), 40 trials: enough for the median's 95% interval
    "$VPY" -m bigadapt bench latency --dtype bf16 --cells table1 --trials 40 --warmup 5 --json "$RESULTS/latency.json"
}

step_throughput() {
    # DeepSpeed's bf16 at ZeRO stage 0 with the torch AdamW client optimizer was never run: stage 1 if it refuses
    local args=(bench throughput --dtype bf16 --steps 20 --warmup 3)
    "$VPY" -m bigadapt "${args[@]}" --stage 0 --json "$RESULTS/throughput.json" && return 0
    echo "--- stage 0 failed: the same at --stage 1"
    "$VPY" -m bigadapt "${args[@]}" --stage 1 --json "$RESULTS/throughput-stage1.json"
}

step_peft() {
    # as many rounds as the time left allows (each launches both sides through the deepspeed launcher); under 8
    # rounds the ratio is a first reading, its interval not a result (docs/benchmarks.md)
    "$VPY" -m bigadapt bench peft --ranks 1 --rounds "$PEFT_ROUNDS" --sides bigadapt,peft --json "$RESULTS/peft.json"
}

# --- running, recording and summarising ------------------------------------------------------------------------
run_step() {  # NAME CAP_S MIN_S WHAT: the step's function under min(CAP, time left), its output in logs/NAME.log
    local name=$1 cap=$2 min=$3 what=$4 fn=step_${1//-/_} status rc=- wall=0 limit=-
    local left=$((BUDGET - SECONDS - RESERVE))
    if [ -n "${GPU_CHECKS_ONLY:-}" ] && [[ ",$GPU_CHECKS_ONLY," != *",$name,"* ]] && [ "$name" != env ] &&
        [ "$name" != install ]; then
        status="skipped: not in GPU_CHECKS_ONLY"
    elif [ "$name" != env ] && [ "$CUDA" != 1 ]; then
        status="skipped: no CUDA"
    elif [ "$left" -lt "$min" ]; then
        status="skipped: no time left (${left}s of the ${min}s it needs)"
    else
        limit=$((cap < left ? cap : left))
        echo "=== $name: $what (timeout ${limit}s, $((BUDGET - SECONDS))s of the budget left)"
        local t0=$SECONDS
        # in timeout's process group: TERM to all of it at the limit, KILL 10 s later; then whatever it left behind
        # is ended before the next step takes the GPU (torchrun starts its ranks in process groups of their own, so
        # they are found by the tag in their environment)
        GPU_CHECKS_TAG="$name-$$" timeout -k 10 -s TERM "$limit" bash -c "$fn" >"$RESULTS/logs/$name.log" 2>&1 \
            </dev/null &
        local group=$!
        wait "$group"
        rc=$?
        kill -KILL -- "-$group" 2>/dev/null
        reap "$name-$$"
        wall=$((SECONDS - t0))
        case $rc in
            0) status=ok ;;
            124|137) status="TIMEOUT after ${limit}s" ;;
            *) status=FAILED ;;
        esac
        local counts  # pytest's closing counts, so "ok" with every test skipped does not read as a pass
        counts=$(pytest_lines "$RESULTS/logs/$name.log" | tail -1 | grep -oE '[0-9]+ (passed|failed|errors?|skipped|deselected)' |
            grep -v deselected | paste -sd, - | sed 's/,/, /g')
        [ -n "$counts" ] && status="$status ($counts)"
        tail -n 25 "$RESULTS/logs/$name.log" | sed 's/^/    /'
    fi
    echo "--- $name: $status (exit $rc, ${wall}s)"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$wall" "$limit" "$what" >>"$ROWS"
    summarize
}

reap() {  # TAG: end (KILL) the processes whose environment carries GPU_CHECKS_TAG=TAG: those one step started
    local pid
    for pid in $(grep -lsa "GPU_CHECKS_TAG=$1" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3); do
        [ "$pid" != $$ ] && kill -KILL "$pid" 2>/dev/null && echo "    ended process $pid, left by the step"
    done
}

pytest_lines() {  # a pytest log's outcome per test (-rA) and its closing line
    grep -E '^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) ' "$1" | cut -c1-240
    grep -E '^=+ .*(passed|failed|error|skipped|no tests ran).* =+$' "$1" | tail -1
}

summarize() {
    {
        echo "# GPU checks ($(date -u '+%Y-%m-%d %H:%M UTC'), ${SECONDS}s of the ${BUDGET}s budget used)"
        echo
        sed 's/^/- /' "$FACTS"
        [ -f "$RESULTS/versions.txt" ] && echo "- checks ran with: $(tr '\n' ',' <"$RESULTS/versions.txt" | sed 's/,$//; s/,/, /g')"
        echo
        echo "| step | status | exit | wall s | timeout s | what |"
        echo "|---|---|---|---|---|---|"
        awk -F'\t' '{printf "| %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6}' "$ROWS"
        local name status rc log
        while IFS=$'\t' read -r name status rc _; do
            log=$RESULTS/logs/$name.log
            [ -f "$log" ] || continue
            echo
            echo "## $name: $status"
            echo
            echo '```'
            case $name in
                gpu-tests|precision-fp16) pytest_lines "$log" ;;
                env|install) tail -n 40 "$log" ;;
                *) tail -n 30 "$log" ;;
            esac
            if [[ $status != ok* && ( $name == gpu-tests || $name == precision-fp16 ) ]]; then
                echo "--- last lines of the log:"
                tail -n 30 "$log"
            fi
            echo '```'
        done <"$ROWS"
        echo
        echo "Full logs, junit XML, the benches' JSON and every accounting.json: results.tar.gz"
    } >"$OUT/summary.md.tmp" && mv "$OUT/summary.md.tmp" "$OUT/summary.md"
    tar -czf "$OUT/results.tar.gz.tmp" -C "$WORK" results && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
}

export REPO PY WHEELS WORK RESULTS FACTS PYTEST_WRAP
export -f versions pytest_step step_env step_install step_gpu_tests step_precision_fp16 step_qlora_nf4 \
    step_accounting step_latency step_throughput step_peft
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
case "$TORCH" in *"cuda available: True"*) export DS_ACCELERATOR=cuda ;; esac
# the checks' interpreter: the venv the install step makes, else the image's own
export VPY=$WORK/venv/bin/python VBIN=$WORK/venv/bin
export PATH="$VBIN:$PYBIN:$PATH"

run_step env 40 5 "machine, nvidia-smi, the image's versions"
run_step install 120 20 "venv over the image's python, carried wheels, pip install -e . (offline)"
"$VPY" -c 'import torch' 2>/dev/null || VPY=$(command -v "$PY")  # no venv (or a broken one): the image's python
run_step gpu-tests 170 60 "pytest -m gpu tests/gpu: LoRA bf16 numerics, merge, 1-GPU ZeRO-3 run + accounting, NF4"
run_step precision-fp16 130 40 "pytest -m gpu tests/distributed/test_precision_resume.py: fp16 resume at stages 0-3"
run_step qlora-nf4 80 30 "bigadapt train: QLoRA NF4 base under ZeRO-3 on the GPU, 100 steps, loss must fall"
run_step accounting 90 30 "peak allocated within 15% of the prediction: GPT-2 medium bf16 ZeRO-3 + tests/gpu's run"
run_step latency 90 30 "bench latency: Table 1 cells (32x512, 16x256, 1x128), GPT-2 medium bf16, 40 trials"
run_step throughput 100 30 "bench throughput: LoRA vs full, GPT-2 medium bf16, 8x512, 20 steps"
PEFT_ROUNDS=$(((BUDGET - SECONDS - RESERVE - 20) / 60))
PEFT_ROUNDS=$((PEFT_ROUNDS > 8 ? 8 : PEFT_ROUNDS < 1 ? 1 : PEFT_ROUNDS))
export PEFT_ROUNDS
run_step peft 600 90 "bench peft --ranks 1 --sides bigadapt,peft: the peer ratio, $PEFT_ROUNDS round(s)"

echo "done in ${SECONDS}s: $OUT/summary.md, $OUT/results.tar.gz"
awk -F'\t' '{printf "  %-15s %s (exit %s, %ss)\n", $1, $2, $3, $4}' "$ROWS"
