"""Backends own one loaded model each and answer batched forward/backward requests.

Start with `base.py`: it is the page a backend author reads.
"""
