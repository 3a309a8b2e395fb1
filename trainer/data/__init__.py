"""The data room: sources.py reads rows (streaming), examples.py tokenizes them, store.py keeps the tokens in a
memory-mapped token store built once, order.py is the lazy epoch order, batches.py cuts this rank's micro-batches.
Importing the package loads nothing."""
