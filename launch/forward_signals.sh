# Sourced by the launch scripts: run torchrun so that a preemption signal reaches the training processes, once.
#
# torchrun's agent treats SIGTERM/SIGINT as its own failure: it stops the workers, then exits 1 with a
# SignalException traceback, although they saved a checkpoint. So the agent runs in a process group of its own,
# where a terminal's Ctrl-C (sent to the whole foreground group) or a signal to this script's group does not reach
# it, and this script passes the signal to the training processes, the agent's children: they finish the step,
# save a checkpoint together and exit 0; the agent sees them succeed and exits 0, and so does this script.
# A second Ctrl-C stops at once (exit 130, the work since the last checkpoint lost), the agent first, so that it
# restarts nothing.

run_forwarding_signals() {
  set +e
  trap '' PIPE  # a closed console (`| tee log`, ended by the same Ctrl-C) must not end this script mid-forward
  set -m        # job control: the background job below gets a process group of its own
  "$@" &
  local agent=$!
  set +m
  local forwarded=0 stopped=0
  forward() {
    local workers
    workers=$(pgrep -P "$agent")
    if [ "$1" = INT ] && [ "$forwarded" = 1 ]; then
      stopped=1
      kill -KILL "$agent" 2>/dev/null
      [ -n "$workers" ] && kill -INT $workers 2>/dev/null
      echo "$(date '+%H:%M:%S') launch: Ctrl-C again: stopping now, without a checkpoint" >&2
      return
    fi
    forwarded=1
    if [ -n "$workers" ]; then
      kill "-$1" $workers 2>/dev/null
    else  # between restarts: no training process to save anything
      kill "-$1" "$agent" 2>/dev/null
    fi
    echo "$(date '+%H:%M:%S') launch: $1 received: asking every training process to checkpoint and stop" >&2
  }
  trap 'forward TERM' TERM
  trap 'forward INT' INT
  local status=0
  wait "$agent"; status=$?
  while kill -0 "$agent" 2>/dev/null; do  # `wait` returns early when a trap runs: wait for the real end
    wait "$agent"; status=$?
  done
  trap - TERM INT
  [ "$stopped" = 1 ] && status=130
  return "$status"
}
