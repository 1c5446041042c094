#!/usr/bin/env bash
# One prepared run for a machine with an NVIDIA GPU, with no network and its own python3 + torch (the
# development workplace lends one to some sessions). In order, each step bounded in time:
#   1. the CUDA tests (bf16/fp16 against float32, the GPU path really on the GPU);
#   2. pixel-sail-bench --suite model on CUDA (tiny, 0.5b at 640x480 and 1024x768), once per BENCH_RUNS entry
#      (decoding mode:speculative on|off, and a third field of extras joined by "+": "compile" for
#      --compile-image on, "unfused" for --fuse-first-turn off);
#   2a. with WARMUP_PROBE=1 (default): the first frame with and without a warm-up (scripts/warmup_probe.py);
#   3. with TRAIN_MINUTES > 0: a training stage of the bundled model on the GPU, its learning rate on a cosine over
#      that time (--schedule-over-time), then its held-out eval (EVAL_SAMPLES=0 skips it: evaluate on the CPU).
#      With DEADLINE_S > 0, training gets whatever is left of that many seconds after steps 1-2 (minus a margin
#      for start-up and saving), so the whole run ends inside one device call's limit.
# Everything lands in $OUT (default outputs/device): log.txt, bench_cuda_<mode>_<on|off>[_<extras>].json,
# warmup_probe.jsonl, and with training eval.json, metrics.jsonl, config.json and the model split into
# model.safetensors.part-* (rejoin with `cat`).
#
# Pinned pure-python packages the machine lacks travel as wheels in .whl/ (`make device-wheels` fills it).
# CPU dry run of the whole script (about a minute): DEVICE=cpu BENCH_RUNS="dynamic:off static:on" TRAIN_MINUTES=0.2 EVAL_SAMPLES=4 PYTHON=.venv/bin/python \
#   BENCH_ARGS="--quick --presets tiny" bash scripts/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/device}
DEVICE=${DEVICE:-cuda}
TRAIN_MINUTES=${TRAIN_MINUTES:-0}
TRAIN_STEPS=${TRAIN_STEPS:-100000}
DEADLINE_S=${DEADLINE_S:-0}
BATCH=${BATCH:-32}
LR=${LR:-8e-4}
T0=$(date +%s)
INIT=${INIT:-pixel_sail_ros/checkpoints/shapesref_tiny}
BENCH_ARGS=${BENCH_ARGS:-}
EVAL_SAMPLES=${EVAL_SAMPLES:-500}
TESTS=${TESTS:-tests/model}  # the pytest selection for step 1 (its CUDA-marked tests run)
BENCH=${BENCH:-1}            # 0 skips step 2
BENCH_RUNS=${BENCH_RUNS:-"dynamic:off dynamic:on graphs:on graphs:on:compile graphs:on:unfused"}  # one bench JSON per mode:speculative[:extras]
OVERRIDES=${OVERRIDES:-'{}'}   # training: --model-overrides JSON, e.g. '{"mrope_layout": "interleaved"}'
AUX_OBJECT=${AUX_OBJECT:-1.5} # training: --aux-object-weight (stage 6)
AUX_PLACE=${AUX_PLACE:-5.0}   # training: --aux-place-weight (stage 6)
AUX_QUERY_PLACE=${AUX_QUERY_PLACE:-5.0}  # training: --aux-query-place-weight (stage 7)
AUX_MASK_PLACE=${AUX_MASK_PLACE:-1.0}    # training: --aux-mask-place-weight (stage 8; the model needs pixel_positions)
QUERY_PLACE_ON=${QUERY_PLACE_ON:-embedding}  # training: --aux-query-place-on (stage 8)
P_ABSENT=${P_ABSENT:-0.4}    # training: --p-absent (stage 9)
LR_SCALE=${LR_SCALE:-}       # training: --lr-scale, e.g. patch_stem=10 (empty: one rate for all)
PROFILE=${PROFILE:-0}        # 1: also profile one segmentation request (scripts/profile_segment.py) into profile.txt
WARMUP_PROBE=${WARMUP_PROBE:-1}  # 1: the first frame with and without a warm-up (scripts/warmup_probe.py) into warmup_probe.jsonl
mkdir -p "$OUT"
LOG="$OUT/log.txt"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

say() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }

if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/pixel_sail_site .whl/*.whl \
        >>"$LOG" 2>&1 || { say "installing .whl/ failed"; exit 1; }
    export PYTHONPATH=/tmp/pixel_sail_site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# DataLoader workers hand batches over through /dev/shm; a small one (as in containers) kills them.
df -m /dev/shm >>"$LOG" 2>&1
if [ "$(id -u)" = 0 ] && [ "$(df -m --output=avail /dev/shm 2>/dev/null | tail -1)" -lt 8192 ] 2>/dev/null; then
    mount -o remount,size=16G /dev/shm >>"$LOG" 2>&1 && df -m /dev/shm >>"$LOG" 2>&1
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >>"$LOG" 2>&1
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import torch, transformers
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, GPU: {gpu}")
EOF

say "1. CUDA tests"
timeout 180 "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs $TESTS 2>&1 | tail -15 | tee -a "$LOG"

if [ "$BENCH" = 1 ]; then
    for run in $BENCH_RUNS; do
        IFS=: read -r mode spec extras <<<"$run"
        compile=off; fuse=on
        case "+$extras+" in *+compile+*) compile=on ;; esac
        case "+$extras+" in *+unfused+*) fuse=off ;; esac
        say "2. model bench ($DEVICE, decoding $mode, speculative $spec, compile_image $compile, fuse_first_turn $fuse)"
        # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
        timeout 200 "$PY" -m pixel_sail_ros.bench --suite model --json --device "$DEVICE" --decoding "$mode" \
            --speculative "$spec" --compile-image "$compile" --fuse-first-turn "$fuse" $BENCH_ARGS \
            --output "$OUT/bench_cuda_${mode}_$spec${extras:+_${extras//+/_}}.json" >/dev/null 2>>"$LOG" \
            || say "bench ($run) failed or timed out"
    done
fi
if [ "$WARMUP_PROBE" = 1 ]; then  # the first frame with and without a warm-up, each in a cold process
    probe_decoding=graphs; [ "$DEVICE" = cpu ] && probe_decoding=auto  # graphs are CUDA's
    for warm in "" "--warm-up"; do
        say "2a. warm-up probe ($DEVICE, decoding $probe_decoding${warm:+, warmed up})"
        timeout 120 "$PY" scripts/warmup_probe.py --device "$DEVICE" --decoding "$probe_decoding" $warm \
            >>"$OUT/warmup_probe.jsonl" 2>>"$LOG" || say "warm-up probe failed"
    done
fi
if [ "$PROFILE" = 1 ]; then
    say "2b. profile of one segmentation request ($DEVICE)"
    timeout 120 "$PY" scripts/profile_segment.py --device "$DEVICE" >"$OUT/profile.txt" 2>>"$LOG" || say "profile failed"
fi

if [ "$DEADLINE_S" -gt 0 ]; then
    TRAIN_MINUTES=$(awk "BEGIN { m = ($DEADLINE_S - ($(date +%s) - $T0) - 75) / 60; print (m > 0 ? m : 0) }")
fi
if awk "BEGIN { exit !($TRAIN_MINUTES > 0) }"; then
    say "3. training ${TRAIN_MINUTES} min from $INIT"
    RUN=/tmp/pixel_sail_device_run
    rm -rf "$RUN"
    timeout $(( ${TRAIN_MINUTES%.*} * 60 + 150 )) "$PY" -m pixel_sail_ros.training.train --init "$INIT" --data shapesref \
        --device "$DEVICE" --seed 5 --batch-size "$BATCH" --turns-per-image 16 --lr "$LR" --warmup-steps "${WARMUP:-100}" \
        --model-overrides "$OVERRIDES" --aux-object-weight "$AUX_OBJECT" --aux-place-weight "$AUX_PLACE" \
        --aux-query-place-weight "$AUX_QUERY_PLACE" --aux-mask-place-weight "$AUX_MASK_PLACE" \
        --aux-query-place-on "$QUERY_PLACE_ON" ${LR_SCALE:+--lr-scale "$LR_SCALE"} \
        --min-lr-ratio 0.05 --aux-weight 0.5 --p-absent "$P_ABSENT" --num-points 2048 --num-workers "$(( $(nproc) - 2 ))" \
        --max-steps "$TRAIN_STEPS" --time-budget-minutes "$TRAIN_MINUTES" --schedule-over-time --log-every 50 \
        --eval-every 0 --save-every 0 --no-progress \
        --mix referring=0.5,vp_segment=0.15,vp_describe=0.2,text_describe=0.05,vp_qa=0.1 \
        --prompt-probs point=0.5,box=0.2,mask=0.3 --output-dir "$RUN" >>"$LOG" 2>&1 || say "training failed"
    if [ -f "$RUN/model.safetensors" ]; then
        cp "$RUN/config.json" "$OUT/"
        [ -f "$RUN/metrics.jsonl" ] && cp "$RUN/metrics.jsonl" "$OUT/"
        split -b 15M -d "$RUN/model.safetensors" "$OUT/model.safetensors.part-"
        if [ "$EVAL_SAMPLES" -gt 0 ]; then
            timeout 300 "$PY" -m pixel_sail_ros.training.evaluate --model "$RUN" --data shapesref --num-samples "$EVAL_SAMPLES" \
                --seed 424242 --device "$DEVICE" --output "$OUT/eval.json" >/dev/null 2>>"$LOG" || say "eval failed"
        fi
    fi
fi
say "done"
