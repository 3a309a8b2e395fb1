"""The model: building it (load, maybe 4-bit, adapters, INT8 weights, checkpointing), the tokenizer, precision,
the loss, activation offload, and the checks made on it once built."""
