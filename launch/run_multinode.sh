#!/usr/bin/env bash
# One node's share of a multi-node pipeline, through torchrun's c10d rendezvous: run it on
# every node with the same NNODES and RDZV_ENDPOINT; the rest of the arguments go to
# launch/infer.py. The global rank picks the stage, LOCAL_RANK the GPU on the node.
#
#   NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=node0:29400 bash launch/run_multinode.sh \
#       --model-name DIR --infer-data prompts.jsonl --output-path results.jsonl   # on node0
#   NNODES=2 NODE_RANK=1 RDZV_ENDPOINT=node0:29400 bash launch/run_multinode.sh ...  # on node1
#
# NNODES         number of nodes (required)
# NODE_RANK      this node's index, 0..NNODES-1 (required; the rendezvous may order the
#                nodes otherwise: stages follow the global rank torchrun hands out)
# RDZV_ENDPOINT  HOST:PORT of the rendezvous, reachable from every node (required)
# NPROC_PER_NODE processes (stages) on this node (default: its GPUs, else 1)
# RDZV_ID        a name shared by the nodes of one run (default dejavu)
# PY             python (default python)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:?set NNODES to the number of nodes}" "${NODE_RANK:?set NODE_RANK to this node index}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT to HOST:PORT of the rendezvous}"
gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
NPROC_PER_NODE=${NPROC_PER_NODE:-$([ "${gpus:-0}" -ge 1 ] && echo "$gpus" || echo 1)}
PY=${PY:-python}
exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" \
    --nproc-per-node "$NPROC_PER_NODE" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" \
    --rdzv-id "${RDZV_ID:-dejavu}" launch/infer.py "$@"
