#!/usr/bin/env bash
# One node, NPROC_PER_NODE processes (default: one per visible GPU, else 1). A crashed rank brings the whole
# job back up to MAX_RESTARTS times, and `checkpoint.resume: auto` continues from the newest complete
# checkpoint: no user action needed.
#
#   launch/local.sh recipes/quickstart.yaml train.max_steps=200
#   NPROC_PER_NODE=2 MAX_RESTARTS=3 launch/local.sh RECIPE [key=value ...]
set -euo pipefail
PYTHON=${PYTHON:-python}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC_PER_NODE" \
  --max-restarts="${MAX_RESTARTS:-3}" -m trainer train "$@"
