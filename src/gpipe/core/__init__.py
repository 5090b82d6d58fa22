"""What both pipes share: the plan, one step's bookkeeping, the executor loop, the loss
reduction, precision, clipping and meta-model materialization.
"""
