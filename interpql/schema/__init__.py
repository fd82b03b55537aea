"""Strawberry types only; `build.py` assembles them into the Schema with its extensions."""
