#!/usr/bin/env bash
# Train sparse predictors for every layer a collect directory holds (DejaVu's
# run_c4_mlp_llama.sh / run_c4_att.sh, with layers read from the manifest, not hard-coded).
#
#   launch/train_predictors.sh DATA_DIR MODEL_DIR OUT_DIR [sparse_predictor.train flags...]
#
# KINDS   predictor kinds, in order (default "mlp att"); extra flags go to every kind, so
#         pass kind-specific ones (--target-sparsity, --att-keep) with KINDS set to one kind.
# PYTHON  interpreter (default: python)
set -euo pipefail

if [[ $# -lt 3 ]]; then
    sed -n '2,10p' "$0" >&2
    exit 2
fi
DATA_DIR=$1 MODEL_DIR=$2 OUT_DIR=$3
shift 3
PYTHON=${PYTHON:-python}
KINDS=${KINDS:-mlp att}

# Recorded layers that hold rows, through the trainer's own manifest reader.
LAYERS=$("$PYTHON" -c '
import sys
from sparse_predictor.data import Collection
c = Collection.open(sys.argv[1])
empty = [layer for layer in c.layers if c.rows[layer] <= 0]
if empty:
    print(f"skipping recorded layers without rows: {empty}", file=sys.stderr)
print(",".join(str(layer) for layer in c.layers if c.rows[layer] > 0))
' "$DATA_DIR")
if [[ -z $LAYERS ]]; then
    echo "error: no layer in $DATA_DIR's manifest holds rows" >&2
    exit 1
fi
echo "layers: $LAYERS"

for kind in $KINDS; do
    "$PYTHON" -m sparse_predictor.train --data-dir "$DATA_DIR" --model-name "$MODEL_DIR" --out "$OUT_DIR" \
        --layers "$LAYERS" --kind "$kind" "$@"
done
