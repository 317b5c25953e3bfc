"""Integrations with training frameworks (import the submodule you need, e.g. ``.transformers``)."""
