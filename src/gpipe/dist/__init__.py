"""``gpipe.DistributedPipe``: one process per pipeline device — configuration, layout, building,
the step, the point-to-point transport and the ranks' agreement. Never imports :mod:`gpipe.local`.
"""
