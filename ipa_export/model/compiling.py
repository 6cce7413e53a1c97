"""``torch.compile``-first inference: one compiled graph for every batch size and length.

:func:`compile_encoder` wraps an encoder (an :class:`~ipa_export.IPAEncoder`, or any module
with its call signature) in a :class:`CompiledEncoder`, which runs ``torch.compile(encoder,
fullgraph=True, dynamic=True)``. ``dynamic=True`` alone compiles twice: a size-1 batch
dimension is specialised (the "0/1 specialisation"), so batch size 1 and batch sizes >= 2 get
separate graphs. To get one graph, each call passes the tensor arguments on as aliases
(``detach()``, no copy; ``clone()`` when autograd records; the caller's tensors are not touched)
whose batch dimension is marked *unbacked* with ``min=1`` and one shared ``shape_id``: the
compiler then reasons about the batch size without assuming it is, or is not, 1. The
length N stays an ordinary dynamic dimension: every N >= 2 shares the graph.

While a call runs (and only then) ``torch._dynamo.config.specialize_float`` is set, so the
model's float constants (eps, clip limits) are constants from the start instead of symbolic
floats that make Dynamo trace the model a second time on every compile.

On torch versions whose ``mark_unbacked`` lacks ``min``/``shape_id`` the batch dimension is
left as it is and the bound is plain ``dynamic=True``'s: two graphs (batch 1, batch >= 2),
see :data:`COMPILE_BOUND`. A different call signature (``rotations``, ``residue_index``,
``chain_index`` given or ``None``, ``output_hidden_states``), dtype, device or grad mode compiles
its own graph, as usual; a missing ``trans_sc`` is passed on as ``translations``. Inputs the encoder
rejects raise its own TypeError/ValueError, not Dynamo's ``Unsupported``.

Compile caches (what a process compiled, reused by the next) are kept by
:mod:`ipa_export.export.compile_cache`; ``IPAEncoder.from_pretrained(dir, compile=True)`` loads
the one for its export when present.

>>> encoder = IPAEncoder.from_pretrained("export", compile=True)   # doctest: +SKIP
>>> with torch.inference_mode():                                    # doctest: +SKIP
...     out = encoder(node_embed, translations, node_mask)
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

BATCH_SHAPE_ID = "ipa_export.batch"  #: shape_id shared by every input's batch dimension


def _find_mark_unbacked() -> Callable[..., None] | None:
    """``mark_unbacked`` if this torch has one that takes ``min`` and ``shape_id``."""
    mark = getattr(torch._dynamo, "mark_unbacked", None)
    if mark is None:
        from torch._dynamo import decorators

        mark = getattr(decorators, "mark_unbacked", None)
    if mark is None:
        return None
    try:
        parameters = inspect.signature(mark).parameters
    except (TypeError, ValueError):  # pragma: no cover - C callables
        return None
    return mark if {"min", "shape_id"} <= parameters.keys() else None


_MARK_UNBACKED = _find_mark_unbacked()
#: Compiled graphs per call signature across batch sizes and lengths >= 2: 1 where this
#: torch can mark the batch dimension unbacked, else 2 (batch size 1 and batch size >= 2).
COMPILE_BOUND = 1 if _MARK_UNBACKED is not None else 2


def _unbacked_batch(x: Any) -> Any:
    """An alias of tensor ``x`` with dim 0 marked unbacked (>= 1); anything else, or
    everything where this torch cannot mark it, as it is."""
    if _MARK_UNBACKED is None or not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] == 0:
        return x  # empty batches keep their shape, and the encoder's error
    # Not a view (x.view_as(x)): Dynamo would also guard on the view's base, whose batch
    # size is an ordinary (0/1-specialised) one. detach() shares the storage; clone() keeps
    # the autograd graph when one is being recorded.
    alias = x.clone() if x.requires_grad and torch.is_grad_enabled() else x.detach()
    _MARK_UNBACKED(alias, 0, shape_id=BATCH_SHAPE_ID, min=1)
    return alias


def mark_batch_dynamic(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Aliases of ``tensors`` whose dimension 0 is marked as one shared unbacked batch size
    (>= 1), for a caller's own ``torch.compile`` around a model that holds an encoder: pass
    the aliases to the compiled model and every batch size, 1 included, shares one graph.
    The tensors themselves are not modified; on torch versions that cannot mark it, they are
    returned as they are (see :data:`COMPILE_BOUND`)."""
    return tuple(_unbacked_batch(x) for x in tensors)


def _compile_scope() -> contextlib.AbstractContextManager[Any]:
    """Dynamo settings for the duration of one call: float constants specialised."""
    if hasattr(torch._dynamo.config, "specialize_float"):
        return torch._dynamo.config.patch(specialize_float=True)
    return contextlib.nullcontext()  # pragma: no cover - depends on the torch version


class CompiledEncoder(nn.Module):
    """An encoder (:class:`~ipa_export.IPAEncoder`) behind ``torch.compile(fullgraph=True,
    dynamic=True)`` with one graph for every batch size; made by :func:`compile_encoder`.

    Call it like the encoder. Other attributes (``config``, ``attention_backend``,
    ``embed_residues``, ...) are the encoder's, and ``encoder`` is the encoder itself. Its
    ``state_dict()`` has the encoder's keys (no ``encoder.`` prefix), so state dicts move
    freely between a plain and a compiled encoder, or models holding either. A missing
    ``trans_sc`` is passed on as ``translations``, so that calls with and without it share one
    graph (at the cost of a second kNN search on the same coordinates). Each call sets
    ``torch._dynamo.config.specialize_float`` while it runs, process-wide: do not compile
    other code with a different setting in another thread at the same time.
    """

    def __init__(self, encoder: nn.Module, compiled: Callable[..., Any]):
        super().__init__()
        self.encoder = encoder
        self.__dict__["_compiled"] = compiled  # not a submodule: the parameters are registered once
        self.register_state_dict_post_hook(_drop_encoder_prefix)
        self.register_load_state_dict_pre_hook(_add_encoder_prefix)

    def forward(
        self,
        node_embed: torch.Tensor,
        translations: torch.Tensor,
        node_mask: torch.Tensor,
        rotations: torch.Tensor | None = None,
        trans_sc: torch.Tensor | None = None,
        residue_index: torch.Tensor | None = None,
        chain_index: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        *,
        neighbours: torch.Tensor | None = None,
        sc_neighbours: torch.Tensor | None = None,
        check_ca_spacing: bool = True,
    ) -> Any:
        """As :meth:`IPAEncoder.forward <ipa_export.IPAEncoder.forward>` (value checks, the
        C-alpha spacing check among them, run only in eager mode)."""
        tensors = (node_embed, translations, node_mask, rotations, trans_sc, residue_index, chain_index)
        fixed = {"neighbours": neighbours, "sc_neighbours": sc_neighbours}
        if torch.compiler.is_compiling():  # inside a caller's torch.compile: just trace the encoder
            return self.encoder(*tensors, output_hidden_states, **fixed)
        self.encoder.keep_frozen()
        if trans_sc is None and isinstance(translations, torch.Tensor):
            tensors = (*tensors[:4], translations, *tensors[5:])
            if neighbours is not None and sc_neighbours is None:
                fixed["sc_neighbours"] = neighbours
        everything = (*tensors, *fixed.values())
        batches = {a.shape[0] for a in everything if isinstance(a, torch.Tensor) and a.dim() > 0}
        marked = mark_batch_dynamic(*everything) if len(batches) == 1 else everything
        try:
            with _compile_scope():
                return self._compiled(*marked[:7], output_hidden_states, **dict(zip(fixed, marked[7:], strict=True)))
        except torch._dynamo.exc.Unsupported:
            # Mostly the encoder rejecting its inputs while being traced: run it eagerly so that
            # its own error (TypeError, ValueError) is raised; if eager runs, re-raise.
            self.encoder(*tensors, output_hidden_states, **fixed, check_ca_spacing=check_ca_spacing)
            raise

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            encoder = self.__dict__.get("_modules", {}).get("encoder")
            if encoder is None or name.startswith("__"):
                raise
            return getattr(encoder, name)


def _drop_encoder_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    inner = prefix + "encoder."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)


def _add_encoder_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "encoder.")]:
        state_dict[prefix + "encoder." + key[len(prefix) :]] = state_dict.pop(key)


def compile_encoder(
    encoder: nn.Module,
    *,
    backend: str | Callable[..., Any] = "inductor",
    mode: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> CompiledEncoder:
    """``torch.compile(encoder, fullgraph=True, dynamic=True)`` with :data:`COMPILE_BOUND`
    graphs (1 on current torch) for all batch sizes and lengths of one call signature.

    Compile a frozen encoder (``eval()``) and call it under ``torch.no_grad()`` or
    ``torch.inference_mode()`` consistently: graphs are specialised on the grad mode.
    ``backend``, ``mode`` and ``options`` are passed to ``torch.compile``.
    """
    compiled = torch.compile(
        encoder, fullgraph=True, dynamic=True, backend=backend, mode=mode, options=dict(options) if options else None
    )
    if _MARK_UNBACKED is None:  # pragma: no cover - depends on the torch version
        log.info(
            "torch %s cannot mark the batch dimension unbacked: batch size 1 compiles its own graph", torch.__version__
        )
    return CompiledEncoder(encoder, compiled)
