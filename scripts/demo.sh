#!/usr/bin/env bash
# The README's command (a): set up, build the Debian data, train the demo, print dev nDCG@10
# before and after, for languages never trained on and for trained ones. runs/demo is the
# demo's scratch directory and is replaced on each run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The same data as the Debian example (examples/debian_retrofit): six trained languages,
# and the seven zero-shot ones for evaluation only.
if [ ! -f data/debian/stats.json ]; then
  .venv/bin/python -m examples.debian_retrofit.debian --out data/debian \
    --langs da,it,fr,de,es,pt_BR,pl,cs,ja,ko,ru,uk,zh_CN --max-per-task 40000
fi
rm -rf runs/demo
.venv/bin/python -m jaxembed.train --config configs/demo.py --workdir runs/demo
