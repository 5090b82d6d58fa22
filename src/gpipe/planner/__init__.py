"""Planning without running: per-layer cost, the balancer, action timings, the memory model,
the schedule simulator and the autoplanner.
"""
