#!/usr/bin/env bash
# The GPU paths in one script, for a machine with CUDA: bf16 with channels-last (the default on
# a GPU) on every task, the packed cache with uint8 batches and batched augmentation on the
# device, DDP on the GPU (one process per GPU; with one GPU, a world of one: NCCL, the distributed
# sampler and the gathered test rows), evaluation in bf16, and the speed benchmarks on the GPU
# (the framework against a hand-written loop, how much of an epoch waits on data, and one
# training eager, in channels-last and compiled with torch.compile, side by side).
#
#   bash experiments/gpu_check.sh [OUT]          # meant to take under 8 minutes on one H100 / H200
#   GPU_CHECK_FULL=1 bash experiments/gpu_check.sh [OUT]   # larger benchmarks, more configs
#
# Each run writes metrics.json under OUT; the last step prints them side by side
# (python -m covidqu.report OUT). A step that fails is reported and the others go on; the script
# exits 1 if any failed. Every step's output goes to OUT/<step>.log, and a summary with each
# step's status and seconds to OUT/summary.txt.
set -uo pipefail
out="${1:-/tmp/covidqu-gpu-check}"
py="${PYTHON:-python}"
full="${GPU_CHECK_FULL:-0}"
mkdir -p "$out"
summary="$out/summary.txt"
: >"$summary"
failed=0

step() {  # step NAME COMMAND...: run it, log it, time it, never stop the script
    local name=$1
    shift
    local t0=$SECONDS
    echo "== $name: $*" | tee -a "$out/$name.log"
    if "$@" >>"$out/$name.log" 2>&1; then
        echo "ok     $((SECONDS - t0))s  $name" | tee -a "$summary"
    else
        echo "FAILED $((SECONDS - t0))s  $name (see $name.log)" | tee -a "$summary"
        tail -n 30 "$out/$name.log"
        failed=1
    fi
}

n_gpu=$("$py" -c "import torch; print(torch.cuda.device_count())")
if [[ "$n_gpu" -lt 1 ]]; then
    echo "gpu_check: no CUDA device visible; nothing to check" >&2
    exit 2
fi
"$py" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0), \
'bf16:', torch.cuda.is_bf16_supported(), 'GPUs:', torch.cuda.device_count())" | tee -a "$summary"
workers=$(("$(nproc)" < 8 ? "$(nproc)" : 8))

step synth "$py" -m covidqu.data synth "$out/data" --per-class 40 --size 256 --seed 0 --force
common=(data.root="$out/data" encoder=resnet34 encoder.weights=null data.image_size=256
    data.batch_size=16 data.num_workers="$workers" trainer.max_epochs=2
    callbacks.progress_bar=null logger=csv)
# shellcheck disable=SC2329  # called through step
train() { "$py" -m covidqu.train "$@"; }

# bf16 mixed precision on every task, with channels-last convolutions: module.channels_last=null,
# the default, turns them on where the module runs on a GPU
step lung_bf16_cl train trainer=gpu "${common[@]}" hydra.run.dir="$out/lung_bf16_cl"
step infection_bf16_cl train task=infection trainer=gpu "${common[@]}" \
    hydra.run.dir="$out/infection_bf16_cl"
step classify_bf16 train task=classify trainer=gpu "${common[@]}" hydra.run.dir="$out/classify_bf16"
step multitask_bf16 train task=multitask trainer=gpu "${common[@]}" \
    hydra.run.dir="$out/multitask_bf16"
# the packed cache, uint8 batches normalised on the device, batched augmentation there (and
# with augment=gpu_light in the speed runs below)
step pack "$py" -m covidqu.data pack "$out/data" --size 256 --cache-dir "$out/cache"
step infection_packed_gpu_strong train task=infection trainer=gpu data.cache=packed \
    data.cache_dir="$out/cache" augment=gpu_strong "${common[@]}" trainer.max_epochs=1 \
    hydra.run.dir="$out/infection_packed_gpu_strong"
# DDP on GPUs: every GPU there is (a world of one on a one-GPU machine), then a DDP sweep
step lung_ddp train trainer=ddp trainer.devices="$n_gpu" "${common[@]}" \
    hydra.run.dir="$out/lung_ddp"
if [[ "$n_gpu" -ge 2 || "$full" == 1 ]]; then  # with one GPU no process is re-launched
    step sweep_ddp train -m trainer=ddp trainer.devices="$n_gpu" model=unet,fpn "${common[@]}" \
        trainer.max_epochs=1 hydra.sweep.dir="$out/sweep_ddp"
fi
# evaluation on the GPU from a checkpoint, in bf16 and under DDP
step eval_bf16 "$py" -m covidqu.eval ckpt_path="$out/lung_bf16_cl/checkpoints/best.ckpt" \
    data.root="$out/data" trainer=gpu hydra.run.dir="$out/eval_bf16"
step eval_ddp "$py" -m covidqu.eval ckpt_path="$out/lung_bf16_cl/checkpoints/best.ckpt" \
    data.root="$out/data" trainer=ddp trainer.devices="$n_gpu" hydra.run.dir="$out/eval_ddp"
step analyze_gpu "$py" -m covidqu.analyze \
    lung_ckpt="$out/lung_bf16_cl/checkpoints/best.ckpt" \
    infection_ckpt="$out/infection_bf16_cl/checkpoints/best.ckpt" data.root="$out/data" \
    split=test trainer=gpu hydra.run.dir="$out/analyze_gpu"

# the framework's overhead on the GPU: a training step against a hand-written loop
step bench_train "$py" experiments/bench_train.py --device cuda --size 256 --batch 16 --steps 30
# an epoch from PNG files and from the packed cache with uint8 batches, each against a
# hand-written loop and against the compute alone (how much of the epoch waits on data)
per_class=$([[ "$full" == 1 ]] && echo 400 || echo 100)
step bench_synth "$py" -m covidqu.data synth "$out/bench" --per-class "$per_class" --size 256 \
    --seed 1 --force
configs=("data.cache=none" "data.cache=packed data.normalise=device")
augments=("gpu_light")
[[ "$full" == 1 ]] && configs+=("data.cache=packed") && augments+=("light")
for aug in "${augments[@]}"; do
    for data in "${configs[@]}"; do
        name="bench_epoch_${aug}_$(echo "$data" | tr ' =.' '___')"
        # shellcheck disable=SC2086  # $data holds several overrides
        step "$name" "$py" experiments/bench_epoch.py --device cuda --root "$out/bench" \
            --task lung --size 256 --batch 32 --per-class "$per_class" --encoder resnet34 \
            --workers "$workers" --repeats 2 --set augment=$aug $data \
            data.cache_dir="$out/cache"
    done
done
# One training three ways: eager (contiguous), channels-last (the default on a GPU) and compiled
# (module.compile=true, contiguous, so each ratio to eager shows one switch; GPU_CHECK_FULL=1 adds
# both at once). Full batches only (a last, smaller one would compile again) from the packed cache
# with uint8 batches and gpu_light, so that the model, not the loader, sets the pace; the table
# gives each run's samples a second and data wait over its epochs after the first (which holds
# the compilation) and its speed against eager's.
speed=(data.root="$out/bench" encoder=resnet34 encoder.weights=null data.image_size=256
    data.batch_size=32 data.num_workers="$workers" data.cache=packed data.cache_dir="$out/cache"
    data.normalise=device augment=gpu_light trainer=gpu trainer.max_epochs=4
    trainer.limit_train_batches=$((3 * per_class / 32)) trainer.limit_val_batches=1 test=false
    postprocess=none callbacks.progress_bar=null logger=csv)
runs=(speed_eager speed_channels_last speed_compiled)
step speed_eager train module.channels_last=false "${speed[@]}" hydra.run.dir="$out/speed_eager"
step speed_channels_last train module.channels_last=null "${speed[@]}" \
    hydra.run.dir="$out/speed_channels_last"
step speed_compiled train module.channels_last=false module.compile=true "${speed[@]}" \
    hydra.run.dir="$out/speed_compiled"
if [[ "$full" == 1 ]]; then
    runs+=(speed_compiled_channels_last)
    step speed_compiled_channels_last train module.compile=true "${speed[@]}" \
        hydra.run.dir="$out/speed_compiled_channels_last"
fi
step speed_table "$py" experiments/perf_table.py "${runs[@]/#/$out/}"
if [[ "$full" == 1 ]]; then
    step bench_data "$py" experiments/bench_data.py --workers "$workers" --root "$out/bench" \
        --skip-scan --cache-dir "$out/cache"
    step bench_augment "$py" experiments/bench_augment.py --device cuda --root "$out/bench" \
        --strong
fi
step report "$py" -m covidqu.report "$out"
{
    grep -h -A4 "^lung, U-Net" "$out"/bench_epoch_*.log
    grep -h "ms/step" "$out/bench_train.log"
    grep -h "^|" "$out/speed_table.log"
} >>"$summary" 2>/dev/null
cat "$summary"
exit "$failed"
