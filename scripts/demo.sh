#!/usr/bin/env bash
# The README's command (a): set up, build the Debian data, train the demo, print dev nDCG@10
# before and after. runs/demo is the demo's scratch directory and is replaced on each run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ ! -f data/debian/stats.json ]; then
  .venv/bin/python -m jaxembed.data.debian --out data/debian --langs de,fr,es,it,pt_BR,ja,pl \
    --max-per-task 4000 --max-eval 300 --max-corpus 1000
fi
rm -rf runs/demo
.venv/bin/python -m jaxembed.train --config configs/demo.py --workdir runs/demo
