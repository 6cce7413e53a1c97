"""Worked examples, runnable with ``python -m ipa_export.examples.<name>``."""
