#!/usr/bin/env bash
# One node, NPROC_PER_NODE processes (default: one per visible GPU, else 1). A crashed rank brings the whole
# job back up to MAX_RESTARTS times, and `checkpoint.resume: auto` continues from the newest complete
# checkpoint: no user action needed.
#
# Preemption: SIGTERM or SIGINT (Ctrl-C in the terminal, also with the output piped into `tee`) to this script is
# passed to the training processes, not to torchrun's agent: every rank finishes its step, they save a checkpoint
# together and exit 0, and so does this script; a second Ctrl-C stops at once (exit 130). (Sent to plain torchrun
# instead, the ranks still save, but the agent itself exits 1 with a SignalException traceback.)
#
#   launch/local.sh recipes/quickstart.yaml train.max_steps=200
#   NPROC_PER_NODE=2 MAX_RESTARTS=3 launch/local.sh RECIPE [key=value ...]
set -euo pipefail
PYTHON=${PYTHON:-python}
here=$(dirname "$0")
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
# shellcheck source=launch/forward_signals.sh
. "$here/forward_signals.sh"
run_forwarding_signals "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC_PER_NODE" \
  --max-restarts="${MAX_RESTARTS:-3}" -m trainer train "$@"
