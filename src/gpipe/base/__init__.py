"""The bottom layer: option checks, pytrees of micro-batches, text tables, model snapshots and
the torch.compile guard. Imports nothing else of gpipe.
"""
