#!/usr/bin/env bash
# The benchmark suite on a GPU machine (H100 / H200), in one call: build the CUDA extension, check that its kernels
# run, measure, draw the plots, print the headline numbers last.
#
#   benchmarks/gpu_run.sh [STAGE ...]        (default: all)
#
# Stages, in this order for `all`:
#   build         TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 pip install --no-build-isolation --no-deps -e . (every other
#                 stage builds first if the kernels are not usable, and stops if they still are not)
#   adapter       micro benchmark of fastpeft.adapter (issue 3's grid)
#   prefix        micro benchmark of fastpeft.prefix_attention (issue 4's grid)
#   e2e           RoBERTa-base, BART-large, Llama-1B: fastpeft, fastpeft's reference path, peft, full fine-tuning
#                 (`e2e:MODEL`, e.g. `e2e:llama-1b`: one model; models roberta-base, bart-large, llama-1b)
#   e2e-adapters  the same models with AdapterHub `adapters` and fastpeft again (same run, so the ratios hold);
#                 needs the wheels of `make bench-wheels` carried in .whl/ (transformers 4.57.6 shadows 5.x in
#                 /tmp/site-tf4 for this stage only); skipped with a message without them
#   plots         PNGs of everything in the results folder
#   summary       the headline numbers against the kernel issues' targets
#
# Results: $BENCH_RESULTS, else $OUT (the device tool's folder), else benchmarks/results/. Logs in <results>/logs/.
#                 (`e2e-adapters:MODEL`: one model)
# A stage takes minutes (never measured yet: no GPU so far; e2e is likely the longest, over 10 minutes for the three
# models). With a per-call time limit run a few stages per call, e.g.
#   gpu_run.sh build adapter | gpu_run.sh prefix | gpu_run.sh e2e:roberta-base e2e:bart-large | gpu_run.sh e2e:llama-1b
#   gpu_run.sh e2e-adapters plots summary
# Extra arguments for every `python -m benchmarks` call: $BENCH_ARGS (e.g. BENCH_ARGS="--model llama-1b").
# The copy of the tree on the GPU machine may have no .git: pass FASTPEFT_GIT_COMMIT=<commit> to tag the records.
# Dry run without a GPU (tests this script; CPU numbers): BENCH_ALLOW_REFERENCE=1 BENCH_ARGS="--quick --reps 2".
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
RESULTS=${BENCH_RESULTS:-${OUT:-benchmarks/results}}
mkdir -p "$RESULTS/logs"
BENCH_ARGS=${BENCH_ARGS:-}

log() { echo "== $(date -u +%H:%M:%S) $*"; }

build() {
    log "build: TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 pip install --no-build-isolation --no-deps -e ."
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 FASTPEFT_BUILD_CUDA=1 \
        $PYTHON -m pip install --no-build-isolation --no-deps -e . >"$RESULTS/logs/build.log" 2>&1 \
        || { tail -40 "$RESULTS/logs/build.log"; exit 1; }
    $PYTHON -m fastpeft.info | tee "$RESULTS/logs/info.txt"
}

kernels_usable() {
    $PYTHON -c 'import sys, torch, fastpeft._extension as e
sys.exit(0 if torch.cuda.is_available() and e.kernels_usable(torch.device("cuda")) else 1)'
}

ensure_kernels() {
    [ "${BENCH_ALLOW_REFERENCE:-0}" = 1 ] && return 0  # a dry run of this script without a GPU
    kernels_usable || build
    kernels_usable || { echo "fastpeft's CUDA kernels are not usable here: not measuring its reference path" >&2
                        exit 1; }
}

bench() {  # bench LOGNAME ARGS...: one run of the suite into $RESULTS
    local name=$1
    shift
    log "python -m benchmarks $* $BENCH_ARGS"
    # shellcheck disable=SC2086
    $PYTHON -m benchmarks "$@" --out "$RESULTS" --no-progress $BENCH_ARGS 2>&1 | tee "$RESULTS/logs/$name.log"
}

e2e_adapters() {
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        log "e2e-adapters: no wheels in .whl/ (make bench-wheels, then carry .whl): skipped"
        return 0
    fi
    rm -rf /tmp/site-tf4
    $PYTHON -m pip install --quiet --no-index --no-deps --target /tmp/site-tf4 .whl/*.whl
    PYTHONPATH=/tmp/site-tf4${PYTHONPATH:+:$PYTHONPATH} bench e2e-adapters e2e --provider adapters,fastpeft "$@"
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(all)
[ "${stages[*]}" = "all" ] && stages=(build adapter prefix e2e e2e-adapters plots summary)

for stage in "${stages[@]}"; do
    case $stage in
        build) build ;;
        adapter | prefix) ensure_kernels && bench "$stage" "$stage" ;;
        e2e) ensure_kernels && bench e2e e2e --provider fastpeft,fastpeft_ref,peft,full ;;
        e2e:*) ensure_kernels && bench "e2e-${stage#e2e:}" e2e --model "${stage#e2e:}" \
                   --provider fastpeft,fastpeft_ref,peft,full ;;
        e2e-adapters) ensure_kernels && e2e_adapters ;;
        e2e-adapters:*) ensure_kernels && e2e_adapters --model "${stage#e2e-adapters:}" ;;
        plots) log "plots"; $PYTHON -m benchmarks.plot "$RESULTS" --out "$RESULTS/plots" ;;
        summary) log "summary"; $PYTHON -m benchmarks.summary "$RESULTS" | tee "$RESULTS/logs/summary.txt" ;;
        *) echo "unknown stage $stage; stages: build adapter prefix e2e[:MODEL] e2e-adapters[:MODEL] plots summary" \
                "(or all)" >&2
           exit 2 ;;
    esac
done
