"""The run: the one training loop, its metrics and preemption signals."""
