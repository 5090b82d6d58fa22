"""``gpipe.Pipe``: one process, several devices — worker threads, CUDA streams, the autograd
bridge and the tuner. Never imports :mod:`gpipe.dist`.
"""
