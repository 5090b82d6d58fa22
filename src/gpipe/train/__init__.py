"""The trainer behind ``gpipe train``: the loop, its options, its saved state, the data and one
interface over both pipes.
"""
