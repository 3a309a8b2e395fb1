"""Checkpoints that survive crashes and resume exactly, also on another number of ranks: what one is on disk
(layout), the loop's counters and the run's fingerprint (state), random generators (rng), the atomic commit
(commit), which one a resume picks (choose), whether it may be continued (compat), and the Checkpointer a run uses
(checkpointer)."""
