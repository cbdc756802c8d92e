#!/usr/bin/env bash
# The GPU paths in one short script, for a machine with CUDA: bf16 + channels_last, compile,
# DDP on GPUs when there are two or more, the packed cache and batched augmentation on the GPU,
# and the speed benchmarks on the GPU (whether loading starves it).
#   bash experiments/gpu_check.sh [OUT]      (a few minutes on one recent GPU)
# Each run writes metrics.json under OUT; the last step prints them all side by side.
set -euo pipefail
out="${1:-/tmp/covidqu-gpu-check}"
py="${PYTHON:-python}"
n_gpu=$("$py" -c "import torch; print(torch.cuda.device_count())")
if [[ "$n_gpu" -lt 1 ]]; then
    echo "gpu_check: no CUDA device visible; nothing to check" >&2
    exit 2
fi
"$py" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0), 'bf16:', torch.cuda.is_bf16_supported())"
"$py" -m covidqu.data synth "$out/data" --per-class 40 --size 256 --seed 0 --force
common=(data.root="$out/data" encoder=resnet34 encoder.weights=null data.image_size=256
        data.batch_size=16 data.num_workers=8 trainer.max_epochs=3 callbacks.progress_bar=null)

# bf16 mixed precision with channels-last convolutions, on every task
"$py" -m covidqu.train trainer=gpu module.channels_last=true "${common[@]}" hydra.run.dir="$out/lung_bf16_cl"
"$py" -m covidqu.train task=infection trainer=gpu module.channels_last=true "${common[@]}" \
    hydra.run.dir="$out/infection_bf16_cl"
"$py" -m covidqu.train task=classify trainer=gpu "${common[@]}" hydra.run.dir="$out/classify_bf16"
# the packed cache and batched augmentation on the device
"$py" -m covidqu.data pack "$out/data" --size 256 --cache-dir "$out/cache"
"$py" -m covidqu.train trainer=gpu module.channels_last=true data.cache=packed \
    data.cache_dir="$out/cache" data.normalise=device augment=gpu_light "${common[@]}" hydra.run.dir="$out/lung_packed_gpu_light"
"$py" -m covidqu.train task=infection trainer=gpu data.cache=packed data.cache_dir="$out/cache" \
    augment=gpu_strong "${common[@]}" hydra.run.dir="$out/infection_packed_gpu_strong"
# torch.compile
"$py" -m covidqu.train trainer=gpu module.compile=true "${common[@]}" hydra.run.dir="$out/lung_compile"
# DDP on GPUs, a single run and inside a sweep
if [[ "$n_gpu" -ge 2 ]]; then
    "$py" -m covidqu.train trainer=ddp trainer.devices=2 "${common[@]}" hydra.run.dir="$out/lung_ddp"
    "$py" -m covidqu.train -m trainer=ddp trainer.devices=2 model=unet,fpn "${common[@]}" \
        hydra.sweep.dir="$out/sweep_ddp"
else
    echo "gpu_check: one GPU only: DDP on GPUs skipped (trainer=ddp needs two devices)"
fi
# evaluation on the GPU from a checkpoint
"$py" -m covidqu.eval ckpt_path="$out/lung_bf16_cl/checkpoints/best.ckpt" data.root="$out/data" \
    trainer.precision=bf16-mixed hydra.run.dir="$out/eval"
# the framework's overhead on the GPU, and data loading with 8 workers
"$py" experiments/bench_train.py --device cuda --size 256 --batch 16 --steps 30
# a larger tree for the speed figures: 1,200 training images a subset
"$py" -m covidqu.data synth "$out/bench" --per-class 400 --size 256 --seed 1 --force
"$py" experiments/bench_data.py --workers 8 --root "$out/bench" --skip-scan --cache-dir "$out/cache"
"$py" experiments/bench_augment.py --device cuda --root "$out/bench" --strong
# U-Net ResNet-34, 256 px, bf16, channels-last: an epoch from PNG files and from the packed
# cache, each against a hand-written loop and against the compute alone (whether the GPU waits)
for aug in light gpu_light; do
    for data in "data.cache=none" "data.cache=packed" "data.cache=packed data.normalise=device"; do
        # shellcheck disable=SC2086  # $data holds several overrides
        "$py" experiments/bench_epoch.py --device cuda --root "$out/bench" --task lung \
            --size 256 --batch 32 --per-class 400 --encoder resnet34 --workers 8 --repeats 2 \
            --set augment=$aug $data data.cache_dir="$out/cache"
    done
done
"$py" -m covidqu.report "$out"
