#!/usr/bin/env bash
# Re-make every measured table of a testbed checkpoint, in one command, into one folder:
#
#   bash testbed/remake_tables.sh MODEL OUT [quick]
#
# MODEL: `testbed` (the embedded checkpoint) or a llava-hf directory trained by `lucid testbed train`.
# OUT:   where each table's JSON / report goes (created). `quick` shrinks every size (a smoke run, not a table).
# Each step is a documented command (docs/testbed.md, docs/grounding.md, docs/evals.md); they run one after
# the other (the machine has 2 cores) and a step's output is kept when a later one fails. About 2 h
# on the 2-core machine for the full sizes.
set -euo pipefail
MODEL=${1:?usage: remake_tables.sh MODEL OUT [quick]}
OUT=${2:?usage: remake_tables.sh MODEL OUT [quick]}
QUICK=${3:-}
LUCID=${LUCID:-lucid}
PY=${PY:-python}
mkdir -p "$OUT"
if [[ $QUICK == quick ]]; then N=12 NEVAL=12 NCAL=20 NFOREIGN=6 NTABLE=6 NDYVTE=16; else N=300 NEVAL=200 NCAL=150 NFOREIGN=150 NTABLE=200 NDYVTE=512; fi
step() { echo "== $(date -u +%H:%M:%S) $1" >&2; }

step "foundation: POPE splits, colour / count, captions (short and detailed), CHAIR (docs/testbed.md)"
$LUCID testbed eval --model "$MODEL" --n "$N" --out "$OUT/metrics.json" > /dev/null

step "the benchmarks' own prompts: POPE with LLaVA-1.5's suffix, CHAIR's detail prompt, localization, SAM"
$LUCID eval --model "$MODEL" --workers 0 --batch-size 16 \
  --suite "testbed-pope:n=$N" --suite "testbed-chair:n=$N" --suite "testbed-qa:n=$N,n_foreign=$NFOREIGN" \
  --suite "testbed-locate:n=$N,n_foreign=$NFOREIGN" --suite "testbed-segment:n=$N" --out "$OUT/foundation"

step "localization heads and the locate rules on calibration / held-out / foreign scenes (docs/grounding.md)"
$PY -m testbed.studies.localization --model "$MODEL" --calib-scenes "$NCAL" --scenes "$NEVAL" --foreign "$NFOREIGN" \
  --out "$OUT/localization.json"

step "attention -> SAM (docs/grounding.md)"
$LUCID testbed eval-sam --model "$MODEL" --attention --n "$N" --foreign "$NFOREIGN" --out "$OUT/sam.json"

step "the segmentation tables as eval suites: heads / READ / VL-SAM referring, VL-SAM open-ended (docs/grounding.md, docs/evals.md)"
# a method's own options are separated by ';' inside a suite spec (the spec splits on ','); the sizes of the tables
# in docs/grounding.md (200 + 100 scenes referring, 100 open-ended)
if [[ $QUICK == quick ]]; then SEGF=$NFOREIGN SEGD=$NTABLE; else SEGF=100 SEGD=100; fi
NAIVE="flow=none;head_weights=uniform;regularize=none"
$LUCID eval --model "$MODEL" --workers 0 --batch-size 16 \
  --suite "testbed-segment:n=$NEVAL,n_foreign=$SEGF" --suite "testbed-segment:n=$NEVAL,n_foreign=$SEGF,method=read" \
  --suite "testbed-segment:n=$NEVAL,n_foreign=$SEGF,method=read:token=target" \
  --suite "testbed-segment:n=$NEVAL,n_foreign=$SEGF,method=read:preset=paper" \
  --suite "testbed-segment:n=$NEVAL,n_foreign=$SEGF,method=vl-sam:multiscale=false" \
  --suite "testbed-segment:n=$NEVAL,n_foreign=$SEGF,method=vl-sam" \
  --suite "testbed-segment:n=$NEVAL,n_foreign=$SEGF,method=vl-sam:multiscale=false;$NAIVE" \
  --suite "testbed-detect:n=$SEGD,method=vl-sam:multiscale=false;questions=1" --suite "testbed-detect:n=$SEGD" \
  --suite "testbed-detect:n=$SEGD,method=vl-sam:multiscale=false;questions=1;$NAIVE" \
  --suite "testbed-detect:n=$SEGD,method=vl-sam:$NAIVE" --out "$OUT/segment"

step "the hallucination-risk score's AUROC (docs/testbed.md)"
$LUCID testbed calibrate-risk --model "$MODEL" --n "$NCAL" --n-eval "$NEVAL" --out "$OUT/lucid_risk.json"

step "the method table with the presets (docs/evals.md, docs/methods.md)"
$LUCID eval --model "$MODEL" --workers 0 --batch-size 16 \
  --suite "testbed-pope:n=$NTABLE" --suite "testbed-chair:n=$NTABLE" \
  --method pai --method pai:preset=paper --method paint --method paint:preset=paper --method paint:heads=sensitive \
  --method vhr --method var --method var:preset=paper --method vcd --method vcd:preset=paper \
  --out "$OUT/eval-presets"

step "VCD against both baselines: the same suites decoded by sampling at temperature 1 (docs/methods.md; greedy: eval-presets)"
$LUCID eval --model "$MODEL" --workers 0 --batch-size 16 --temperature 1 \
  --suite "testbed-pope:n=$NTABLE" --suite "testbed-chair:n=$NTABLE" --method vcd --method vcd:preset=paper \
  --out "$OUT/vcd-sampling"

step "look closer: CARVE and the magnifier on testbed-detail (full and oracle view) and what they cost on POPE (docs/methods.md)"
$LUCID eval --model "$MODEL" --workers 0 --batch-size 16 \
  --suite "testbed-detail:n=$NTABLE" --suite "testbed-detail:n=$NTABLE,view=oracle" --suite "testbed-pope:n=$NTABLE" \
  --suite "testbed-chair:n=$NTABLE" \
  --method carve --method carve:suffix=false --method carve:preset=paper --method carve:preset=paper,attention=heads \
  --method carve:attention=heads,suffix=false --method magnifier --method magnifier:preset=paper \
  --method magnifier:tokens=image --method magnifier:region=component \
  --method magnifier:region=component,tokens=image --out "$OUT/look-closer"

step "DyVTE: labels, calibration and routers for these weights, then every rule and the static layer sweep (docs/methods.md)"
# (written to Lucid's cache for these weights; weights that ship theirs beside them, the embedded ones, use those)
$LUCID dyvte fit --model "$MODEL" --n "$NDYVTE" --hidden 256 > /dev/null
$LUCID eval --model "$MODEL" --workers 0 --batch-size 16 \
  --suite "testbed-pope:n=$NTABLE" --suite "testbed-qa:n=$NTABLE" --suite "testbed-chair:n=$NTABLE" \
  --method dyvte --method dyvte:safe=agreement --method dyvte:rule=attention \
  --method dyvte:rule=attention,safe=agreement --method dyvte:rule=static,safe=agreement \
  --method dyvte:layer=0 --method dyvte:layer=1 --method dyvte:layer=2 --method dyvte:layer=3 --method dyvte:layer=4 \
  --out "$OUT/dyvte"

step "done: $OUT"
