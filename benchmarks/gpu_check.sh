#!/usr/bin/env bash
# GPU check (issue 17.6): on a CUDA machine, in one call of under 10 minutes,
#   1. the tiny pipeline (configs/tiny.yaml) on CUDA in bf16 (model weights bfloat16, PPO bf16, SAE and regression
#      fits in bf16-mixed on the GPU), per-stage times from its own log;
#   2. the SAE throughput benchmark on CUDA, d_in 576, batches 32 and 4096: irm vs the plain PyTorch loop (and
#      SAELens, when the machine has it importable), with the fp32 GEMM rate measured in the same run.
#
# NEEDS CARRIED: .whl/ (run `bash benchmarks/gpu_wheels.sh` here first: trl, datasets, spacy and its helpers,
# vaderSentiment, jsonargparse, snowballstemmer as python-3.12 wheels, ~60 MB; the image's torch, transformers,
# lightning, peft, accelerate, safetensors, scipy, tensorboard are used as they are). Nothing else: the tiny model and
# the generated corpus need no download. Call (device tool):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Results land in $OUT: env.txt, tiny_bf16.log, tiny_bf16_summary.json, sae_gpu.log, sae_gpu.json, gpu_check.md.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed" | tee "$OUT/gpu_check.md"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TQDM_DISABLE=1 IRM_CACHE_DIR=/tmp/irm-cache
export TOKENIZERS_PARALLELISM=false

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 - <<'EOF'
import importlib
for name in ("torch", "transformers", "lightning", "trl", "peft", "accelerate", "spacy", "datasets", "sae_lens"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(name, "NOT IMPORTABLE:", type(e).__name__, str(e).splitlines()[0][:120])
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. Tiny pipeline, bf16, CUDA (budget: 270 s).
TRAINER='{"accelerator": "gpu", "devices": 1, "enable_progress_bar": false, "precision": "bf16-mixed"}'
timeout 270 python3 -m irm pipeline --config configs/tiny.yaml --run_dir /tmp/tiny-bf16 --log_dir /tmp/tiny-logs \
  --device cuda --model.dtype bfloat16 --rlhf.bf16 true --sae.trainer "$TRAINER" --regression.trainer "$TRAINER" \
  > "$OUT/tiny_bf16.log" 2>&1
PIPE_RC=$?
cp /tmp/tiny-bf16/summary.json "$OUT/tiny_bf16_summary.json" 2>/dev/null
echo "tiny pipeline rc=$PIPE_RC at $(elapsed) s"
tail -25 "$OUT/tiny_bf16.log"

# 2. SAE throughput on the GPU (budget: what is left of ~540 s, at most 240 s).
LEFT=$(( 540 - $(elapsed) )); [ "$LEFT" -gt 240 ] && LEFT=240
LIBS="irm plain"
python3 -c "import sae_lens" 2>/dev/null && LIBS="$LIBS saelens"
timeout "$LEFT" python3 benchmarks/sae_throughput.py --device cuda --d-in 576 --batches 32 4096 --reps 3 \
  --libs $LIBS --json "$OUT/sae_gpu.json" > "$OUT/sae_gpu.log" 2>&1
SAE_RC=$?
echo "sae throughput rc=$SAE_RC at $(elapsed) s"
tail -12 "$OUT/sae_gpu.log"

{
  echo "# GPU check ($(date -u +%F))"
  echo
  echo '```'; cat "$OUT/env.txt"; echo '```'
  echo
  echo "## Tiny pipeline, bf16, CUDA (exit $PIPE_RC)"
  echo '```'; grep -v -i "warn" "$OUT/tiny_bf16.log" | tail -30; echo '```'
  echo
  echo "## SAE throughput, CUDA (exit $SAE_RC)"
  echo '```'; tail -8 "$OUT/sae_gpu.log"; echo '```'
  echo
  echo "total $(elapsed) s"
} > "$OUT/gpu_check.md"
