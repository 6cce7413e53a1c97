"""How the current code runs: eagerly, traced by ``torch.compile``, or under ``torch.func``.

One home for the questions the model asks before branching on values or choosing a kernel.
"""

from __future__ import annotations

import torch


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jvp, jacrev, ...) is running: tensors
    are wrapped, so code cannot branch on their values."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def transforms_active() -> bool:
    """Whether a ``torch.func`` transform or forward-mode AD (``torch.autograd.forward_ad``) is
    active, so every op needs its forward derivative and batching rule. Never inside ``torch.compile``."""
    if torch.compiler.is_compiling():
        return False
    return functorch_active() or torch.autograd.forward_ad._current_level >= 0


def inspecting_values() -> bool:
    """Whether data-dependent checks can run: plain eager code, not traced by ``torch.compile``
    and not inside a ``torch.func`` transform (forward-mode AD's dual tensors still have values)."""
    return not torch.compiler.is_compiling() and not functorch_active()
