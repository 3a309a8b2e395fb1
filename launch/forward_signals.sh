# Sourced by the launch scripts: run torchrun so that a preemption signal reaches the training processes.
#
# torchrun's agent treats SIGTERM/SIGINT as its own failure (it stops the workers, then exits 1 with a
# SignalException). The training processes handle them properly (finish the step, save, exit 0), so the signal is
# sent to them, the agent's children, and the agent sees its workers succeed and exits 0.

run_forwarding_signals() {
  set +e
  "$@" &
  local agent=$!
  forward() {
    echo "$(date '+%H:%M:%S') launch: $1 received: asking every training process to checkpoint and stop" >&2
    pkill "-$1" -P "$agent" 2>/dev/null || kill "-$1" "$agent"
  }
  trap 'forward TERM' TERM
  trap 'forward INT' INT
  local status=0
  wait "$agent"; status=$?
  while kill -0 "$agent" 2>/dev/null; do  # `wait` returns early when a trap runs: wait for the real end
    wait "$agent"; status=$?
  done
  trap - TERM INT
  return "$status"
}
