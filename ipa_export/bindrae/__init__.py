"""BINDRAE compatibility: its adapter API, its state-dict names and checkpoint conversion."""
