#!/usr/bin/env bash
# Stage-level lexicon timing on a quickstart-config run: hard-linked copy of a run directory that has rlhf,
# divergence, cache and sae done ($1, default runs/sae-dev), then
# triples, deltas, regression, and lexicon twice: the shared-prefix reader (HEAD) and the full-forward reader
# (irm.sae.splice.codes_at patched to irm.sae.splice.full_forward_codes_at), each as its own process, wall time.
set -e
cd "$(dirname "$0")/.."
R=runs/prefix-bench
rm -rf $R; mkdir -p $R
cp -al ${1:-runs/sae-dev}/. $R/
A="--config configs/quickstart.yaml --run_dir $R --threads 2"
for s in triples deltas regression; do
  /usr/bin/time -f "$s %e s" python -m irm $s $A 2>&1 | grep -v -i "warn\|it/s\|%|" | tail -3
done
/usr/bin/time -f "lexicon (shared prefix) %e s" python -m irm lexicon $A --force 2>&1 | grep -v -i "warn\|it/s\|%|" | tail -10
cp $R/kendall.json /tmp/kendall_new.json
/usr/bin/time -f "lexicon (full forward) %e s" python -c "
import sys, irm.sae.splice as splice
splice.codes_at = splice.full_forward_codes_at  # the lexicon stage imports codes_at from irm.sae.splice when it runs
sys.argv = ['irm', 'lexicon'] + sys.argv[1:]
from irm.cli import main
main()
" $A --force 2>&1 | grep -v -i "warn\|it/s\|%|" | tail -10
python - <<'PY'
import json
a, b = json.load(open('/tmp/kendall_new.json')), json.load(open('runs/prefix-bench/kendall.json'))
for k in ('all', 'heldout'):
    print(k, 'tau shared-prefix', a[k]['tau'], 'full-forward', b[k]['tau'])
PY
