"""TRL integration for optimal-sampling (installed with `pip install optimal-sampling[trl]`).

This is the only package that imports `trl`.
"""
