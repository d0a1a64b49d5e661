#!/usr/bin/env bash
# The GPU checks and figures of expert-hub in one prepared script, for a machine that comes up bare, offline and
# briefly (one H200 lent through the device tool): it installs expert-hub from this working tree, then
#   (a) the serving correctness tests (merged-checkpoint oracle, mixed batches, hot-swap),
#   (b) benchmarks/bench_serving.py,
#       both only where vLLM imports: the H200 image has no vLLM, cannot download one, and its wheel is far over
#       the 64 MiB a run may carry, so there they are skipped with one line saying so;
#   (c) the ESFT kernel check (benchmarks/gpu/esft_kernel.py) and a few ESFT training steps
#       (benchmarks/bench_training.py) on a random DeepSeek-V2-Lite-shaped model built on the GPU in bfloat16.
# Every figure goes to one file, $OUT/gpu.md; each step's full output also to $OUT/gpu.log.
#
# Through the device tool: `run` with command `bash benchmarks/gpu/run.sh` and timeout_s 600 (about 5 minutes
# expected on an H200 without vLLM, whose steps' own time limits add up to 570 s; where vLLM imports, (a) and (b)
# may take up to 7 minutes each, and the run can pass the 10 minutes of one command); nothing needs carrying.
# gpu.md and gpu.log come back under the reply's files_at: copy gpu.md to benchmarks/results/gpu.md.
# Here, first: `bash benchmarks/gpu/run.sh --dry-run` runs every step on the CPU at a tiny size (about 3
# minutes on 2 cores; the serving tests are only collected, no vLLM server starts) and writes the same file.
#
# Options: --dry-run; --layers N: decoder layers of the V2-Lite-shaped model (default 8: 4.6B parameters, 9 GB
# in bfloat16, the real per-layer shape; all 27 are 15.7B and 31 GB, which every training process of (c) reads
# back from disk, three times over, pushing the run towards the 10-minute limit of one command).
set -uo pipefail
cd "$(dirname "$0")/../.."

DRY_RUN=0
LAYERS=8
while (($#)); do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --layers) LAYERS=$2; shift ;;
        *) echo "usage: $0 [--dry-run] [--layers N]" >&2; exit 2 ;;
    esac
    shift
done

OUT_DIR=${OUT:-$(mktemp -d /tmp/expert-hub-gpu.XXXXXX)}
FIGURES=$OUT_DIR/gpu.md
LOG=$OUT_DIR/gpu.log
PYTHON=python3
[[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python  # here; the GPU machine gets no .venv (it is not carried)
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
STARTED=$SECONDS
FAILED=()

if ((DRY_RUN)); then
    # the same steps, sized to finish in minutes on a CPU
    KERNEL_ARGS=(--layers 2 --tokens 64)
    TRAIN_ARGS=(--layers 2 --steps 2 --seq-len 128 --grad-accumulation 1 --score-tokens 512)
else
    KERNEL_ARGS=(--layers "$LAYERS" --tokens 1024)
    # the paper's sequence length; 6 steps of 2 x 4096 tokens, the median step timed after the first
    TRAIN_ARGS=(--layers "$LAYERS" --steps 6 --seq-len 4096 --grad-accumulation 2 --score-tokens 32768)
fi
# Full fine-tuning is left out: its float32 checkpoint (weights + AdamW moments, 55 GB at 8 layers) would not fit
# the machine's 64 GB disk beside the base.
TRAIN_ARGS+=(--shape v2-lite --dtype bfloat16 --methods esft-token,esft-gate,lora)
SERVING_TESTS=(tests/test_serving.py -k "merged_checkpoint or share_batches or loading_and_unloading or evicts")

note() { echo "$*" | tee -a "$FIGURES"; }

# step TITLE TIMEOUT_S COMMAND...: run it, its output into the log as it comes (a run stopped from outside keeps
# it) and, fenced and without progress bars, into the figures file
step() {
    local title=$1 limit=$2 begun=$SECONDS output rc
    shift 2
    echo "== $title: $*" | tee -a "$LOG"
    output=$(mktemp)
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG" >"$output"
    rc=${PIPESTATUS[0]}
    {
        echo
        echo "## $title"
        echo "\`$*\`: exit $rc$( ((rc == 124)) && echo " (stopped at its ${limit} s limit)"), $((SECONDS - begun)) s"
        echo '```'
        grep -v -e '%|' -e '^\s*$' "$output" | tail -n 60
        echo '```'
    } >>"$FIGURES"
    rm -f "$output"
    ((rc == 0)) || FAILED+=("$title")
    echo "   exit $rc after $((SECONDS - begun)) s"
}

{
    echo "# expert-hub on a GPU$( ((DRY_RUN)) && echo ': DRY RUN on the CPU, tiny sizes, not figures')"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
        "plus the working tree; $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
        2>/dev/null || echo 'no nvidia-smi')"
} >"$FIGURES"
note "$("$PYTHON" -c 'import sys, torch, transformers
cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"python {sys.version.split()[0]}, torch {torch.__version__} ({cuda}),",
      f"transformers {transformers.__version__}")')"
if ! ((DRY_RUN)) && ! "$PYTHON" -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    note "No CUDA device here: nothing run. On a CPU, use --dry-run."
    exit 1
fi

# expert-hub itself, offline: its dependencies are on the image; setuptools (there) builds the editable install,
# which maps expert_hub.cli and expert_hub.registry onto cli/ and registry/ and puts `expert-hub` beside python.
if "$PYTHON" -c 'import expert_hub.registry, pathlib, sys
sys.exit(pathlib.Path(expert_hub.__file__).resolve().parents[1] != pathlib.Path.cwd().resolve())' 2>/dev/null; then
    note "expert-hub: already installed from this working tree"
else
    step "install expert-hub (editable, offline)" 60 \
        env PYTHONWARNINGS=ignore "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation --no-index -e .
fi

if VLLM=$("$PYTHON" -c 'import vllm; print(vllm.__version__)' 2>&1); then
    note "vLLM $VLLM imports here"
    if ((DRY_RUN)); then
        step "(a) serving correctness tests: collected only (a dry run starts no vLLM server)" 300 \
            "$PYTHON" -m pytest -q --collect-only "${SERVING_TESTS[@]}"
        note "(b) bench_serving.py: not run in a dry run (it starts a vLLM server)"
    else
        # The tests and their oracle fix --dtype float32 (tests/serving_client.py, tests/serving_oracle.py).
        step "(a) serving correctness tests (float32)" 420 "$PYTHON" -m pytest -q -x "${SERVING_TESTS[@]}"
        if [[ -d ../shared/esft/expert_configs ]]; then
            step "(b) bench_serving.py (bfloat16)" 420 "$PYTHON" benchmarks/bench_serving.py --dtype bfloat16
        else
            note "(b) bench_serving.py: skipped, the paper's expert sets (../shared/esft/expert_configs) are not here"
        fi
    fi
else
    note "(a) serving correctness tests and (b) bench_serving.py: skipped, vLLM does not import here" \
        "($(tail -n 1 <<<"$VLLM")); this machine cannot install it (no network; the wheel is far over the 64 MiB" \
        "a run may carry)"
fi

step "(c) ESFT kernel vs the standard one, before training" 90 \
    "$PYTHON" benchmarks/gpu/esft_kernel.py "${KERNEL_ARGS[@]}"
step "(c) ESFT training steps (bench_training.py)" 420 "$PYTHON" benchmarks/bench_training.py "${TRAIN_ARGS[@]}"

note ""
note "total $((SECONDS - STARTED)) s; failed steps: ${FAILED[*]:-none}"
echo "figures: $FIGURES (copy to benchmarks/results/gpu.md); full output: $LOG"
((${#FAILED[@]} == 0))
