"""The warnings (and, in time, the errors) this package emits on purpose."""

from __future__ import annotations


class FrozenModuleWarning(UserWarning):
    """``.train()`` on a frozen module (as ``from_pretrained`` returns it): it stays in eval mode."""
