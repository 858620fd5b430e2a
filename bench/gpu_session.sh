#!/usr/bin/env bash
# The GPU measurement of issue 8 as one prepared command, for a lent GPU machine with no package index.
#
# Here, once:   bash bench/gpu_wheels.sh && echo /.whl/ >> .git/info/exclude
# There:        bash bench/gpu_session.sh            (the device tool: carry [".whl"], timeout_s 600)
#
# It installs the carried wheels (TRL, datasets) beside the machine's own PyTorch stack, prints the versions, then
# runs bench/bench_gpu_scale.py: SFT and DPO of lit_align and TRL on a random DeepSeek-Coder-1.3B-shaped model at 4096
# tokens in bf16, with gradient checkpointing (the issue's setting), then lit_align with torch_compile and without
# checkpointing, then lit_align with the LM head in chunks (--logits-chunk-size 1024), then lit_align's DPO without
# packed pairs, then both without checkpointing, as far as time allows, then the hf
# backend's KV caches (bench/bench_grpo.py --kv-cache) and its batch-row savings (--batch-rows). Results land in $OUT
# (or ./gpu-session-out): gpu_scale*.json, gpu_kv_cache.json, gpu_batch_rows.json and their .txt, and the worker logs
# as logs.tar.gz.
#
# Environment: PYTHON (default python3), WHEELS (the wheel folder, default .whl), BUDGET_S (seconds for the whole script, default 540), BENCH_ARGS (added to
# every bench run, e.g. "--shape tiny --seq-len 256 --steps 4 --warmup 1 --device cpu" for a CPU rehearsal), KV_SHAPE
# and KV_DEVICE (the KV-cache run's model shape and device; tiny and cpu for a rehearsal).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-session-out}
python=${PYTHON:-python3}
budget=${BUDGET_S:-540}
start=$SECONDS
mkdir -p "$out"
export PYTHONUNBUFFERED=1

wheels=${WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site \
        "$wheels"/*.whl || exit 1
    export PYTHONPATH=/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
"$python" - <<'PY' || exit 1
import importlib.metadata as md
names = ["torch", "transformers", "trl", "datasets", "accelerate", "peft", "lightning", "pyarrow", "fsspec", "dill"]
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "missing"
print("versions:", ", ".join(f"{n} {version(n)}" for n in names))
import datasets, lightning, peft, transformers, trl  # noqa: E401,F401  (fail here, not inside a worker)
PY

work=/tmp/gpu-scale-work
run_bench() {  # name, extra args...; skipped when less than 150 s of the budget is left
    local name=$1; shift
    local left=$((budget - (SECONDS - start)))
    if [ "$left" -lt 150 ]; then echo "skipped $name: ${left}s of the budget left"; return; fi
    echo "== $name ($left s left)"
    timeout "$((left - 10))" "$python" bench/bench_gpu_scale.py --work-dir "$work" --timeout "$((left - 20))" \
        --json "$out/$name.json" "$@" ${BENCH_ARGS:-} 2>&1 | tee "$out/$name.txt"
}
run_bench gpu_scale
# lit_align's best setting for the MFU target: blocks compiled (torch_compile), no recomputation
run_bench gpu_scale_compile --runs lit_align:sft lit_align:dpo --compile --no-gradient-checkpointing
# lit_align with the LM head and log-softmax 1024 tokens at a time (logits_chunk_size), as TRL's fused head is chunked
run_bench gpu_scale_chunked --runs lit_align:sft lit_align:dpo --logits-chunk-size 1024
# lit_align's DPO under checkpointing without packed pairs (the policy's full sequences), to decide packed_pairs' default
run_bench gpu_scale_dpo_nopack --runs lit_align:dpo --no-packed-pairs
run_bench gpu_scale_no_ckpt --no-gradient-checkpointing
# then, with 180 s left: the hf backend's reserved KV cache against transformers' default on the same random model
# (64 rows, up to 512 new tokens, bf16), which decides whether reserve_cache should default to on for GPUs
left=$((budget - (SECONDS - start)))
if [ "$left" -ge 180 ]; then
    echo "== gpu_kv_cache ($left s left)"
    PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} timeout "$((left - 10))" "$python" bench/bench_grpo.py --kv-cache \
        --model "shape:${KV_SHAPE:-deepseek-1.3b}" --device "${KV_DEVICE:-cuda}" --dtype bfloat16 \
        --prompts 16 --k 4 --max-new-tokens 512 --repeats 1 \
        --out "$out/gpu_kv_cache.json" 2>&1 | tail -30 | tee "$out/gpu_kv_cache.txt"
else
    echo "skipped gpu_kv_cache: ${left}s of the budget left"
fi
# then, with 120 s left: the hf backend's prefill once per prompt and dropping of ended rows, on and off (a random
# model decodes to the budget, so this measures the prefill saving on a GPU; dropping needs rows that end)
left=$((budget - (SECONDS - start)))
if [ "$left" -ge 120 ]; then
    echo "== gpu_batch_rows ($left s left)"
    PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} timeout "$((left - 10))" "$python" bench/bench_grpo.py --batch-rows \
        --model "shape:${KV_SHAPE:-deepseek-1.3b}" --device "${KV_DEVICE:-cuda}" --dtype bfloat16 \
        --prompts 16 --k 4 --max-new-tokens 128 --repeats 1 --prompt-stride 14 \
        --out "$out/gpu_batch_rows.json" 2>&1 | tail -30 | tee "$out/gpu_batch_rows.txt"
else
    echo "skipped gpu_batch_rows: ${left}s of the budget left"
fi
tar -czf "$out/logs.tar.gz" -C "$work" logs 2>/dev/null
echo "done in $((SECONDS - start)) s"
