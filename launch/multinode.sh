#!/usr/bin/env bash
# Run this same command on every node. Nodes find each other through c10d rendezvous at RDZV_ENDPOINT
# (host:port of any one node, reachable from all); ranks are assigned at rendezvous. After a crash on any node,
# every node restarts (up to MAX_RESTARTS) and `checkpoint.resume: auto` continues. output_dir must be on a
# filesystem every node sees (checkpoints are written by all ranks into one folder).
# SIGTERM / SIGINT to this script reach the training processes (launch/forward_signals.sh): they checkpoint
# together and the script exits 0.
#
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0:29500 launch/multinode.sh RECIPE [key=value ...]
set -euo pipefail
PYTHON=${PYTHON:-python}
here=$(dirname "$0")
: "${NNODES:?set NNODES (number of nodes)}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of one node}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
# shellcheck source=launch/forward_signals.sh
. "$here/forward_signals.sh"
run_forwarding_signals "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-trainer}" \
  --max-restarts="${MAX_RESTARTS:-3}" ${RDZV_CONF:+--rdzv-conf="$RDZV_CONF"} -m trainer train "$@"
