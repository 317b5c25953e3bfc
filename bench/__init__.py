"""Alias kept for the repository: `python -m bench ...` runs `python -m ringattn.bench ...`.

The suites live in the installed package ``ringattn.bench`` (also the ``ringattn-bench`` command).
"""
