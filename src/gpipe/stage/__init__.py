"""One partition, one micro-batch: the stage's forward and backward, re-materialization, keyed
random streams, deferred weight gradients, shared parameters and the loss.
"""
