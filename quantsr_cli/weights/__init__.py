"""Bundled packed models (package data): ``default`` (x4 W4A4) and ``default-w2`` (x4 W2A2).

See ``README.md`` in this folder for how each file was trained.
"""
