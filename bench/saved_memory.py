"""Exact activation accounting on any device: the bytes autograd keeps for backward.

A training step's activation memory is what its forward saves for backward. This counts it exactly,
without a GPU: every tensor an autograd node saves passes through the pack hook of
``torch.autograd.graph.saved_tensors_hooks``; each distinct storage is counted once, at its full
size (a view keeps its whole storage alive), and the storages of the model's parameters and buffers
are left out (they exist whatever the step saves; the fp16/bf16 copies of weights that autocast makes
and a Linear keeps are counted: they are freed only by backward). The packed tensors are held until
the count is done, so no storage is freed and reused under the same address while counting.

Each storage is attributed to the stage whose module was running when it was first saved (forward
hooks on the stage modules) and to the autograd node that saves it (a walk of the graph from the
step's outputs, reading each node's saved tensors). Tensors saved by nodes the walk does not reach
(graph branches no output depends on) count under "unreached".
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

MIB = 2**20


@dataclass
class SavedBytes:
    """Bytes saved for backward by one forward: total, per stage, per autograd node (op)."""

    total: int = 0
    by_stage: dict[str, int] = field(default_factory=dict)
    by_op: dict[str, int] = field(default_factory=dict)
    storages: int = 0

    def mib(self) -> float:
        return self.total / MIB

    def as_record(self) -> dict:
        return {
            "saved_bytes": self.total,
            "saved_storages": self.storages,
            "saved_by_stage": dict(sorted(self.by_stage.items(), key=lambda kv: -kv[1])),
            "saved_by_op": dict(sorted(self.by_op.items(), key=lambda kv: -kv[1])),
        }


def _key(t: Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def _tensors(value) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)


def _saved_by(node) -> Iterator[Tensor]:
    """The tensors an autograd node keeps: ``_saved_*`` of built-in nodes, ``saved_tensors`` of
    Python functions (custom autograd functions, torch.library ops)."""
    for name in dir(node):
        if name.startswith("_saved_"):
            with contextlib.suppress(Exception):
                yield from _tensors(getattr(node, name))
    saved = getattr(node, "saved_tensors", None)
    if saved is not None and not callable(saved):
        with contextlib.suppress(Exception):
            yield from _tensors(tuple(saved))


def _walk(roots: Iterable[Tensor]) -> Iterator:
    seen: set[int] = set()
    stack = [t.grad_fn for t in roots if isinstance(t, Tensor) and t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)


def op_label(node) -> str:
    """A readable op name for an autograd node: its ``label`` (htsat_kernels.recompute's functions set
    one), else the function's class less "Backward", "Backward0"."""
    label = getattr(node, "label", None)
    if isinstance(label, str):
        return label
    name = node.name()
    for suffix in ("Backward0", "Backward1", "Backward"):
        if name.endswith(suffix):
            return name[: -len(suffix)] or name
    return name


def htsat_stages(model: nn.Module) -> dict[nn.Module, str]:
    """Stage labels of an HTSAT model's modules: front end, patch embed, stage 1..4 (with its patch
    merge), head. Anything outside them (e.g. the fold into an image) counts under "model"."""
    base = getattr(model, "_orig_mod", model)
    labels: dict[nn.Module, str] = {}
    for name in ("spectrogram_extractor", "logmel_extractor", "bn0"):
        if getattr(base, name, None) is not None:
            labels[getattr(base, name)] = "front end"
    labels[base.patch_embed] = "patch embed"
    for i, layer in enumerate(base.layers):
        labels[layer] = f"stage {i + 1}"
    for name in ("norm", "tscam_conv", "audio_projection"):
        if getattr(base, name, None) is not None:
            labels[getattr(base, name)] = "head"
    return labels


def count_saved(
    model: nn.Module, forward: Callable[[], object], stages: dict[nn.Module, str] | None = None, outside: str = "model"
) -> tuple[SavedBytes, object]:
    """Run ``forward()`` (a training forward, loss included) and count what it saves for backward.

    Returns the count and ``forward``'s result (call backward on it, or drop it). ``stages`` maps
    modules to the label their saves count under (innermost wins); saves elsewhere count as ``outside``.
    """
    base = getattr(model, "_orig_mod", model)
    exclude = {_key(t) for t in (*base.parameters(), *base.buffers())}
    stack = [outside]

    def leave(module, args, output) -> None:  # a forward hook returning a value would replace the output
        stack.pop()

    handles = []
    for module, label in (stages or {}).items():
        handles.append(module.register_forward_pre_hook(lambda m, a, label=label: stack.append(label)))
        handles.append(module.register_forward_hook(leave, always_call=True))
    first_stage: dict[tuple[str, int], str] = {}
    nbytes: dict[tuple[str, int], int] = {}
    held: list[Tensor] = []

    def pack(t: Tensor) -> Tensor:
        k = _key(t)
        if k not in exclude and k not in nbytes:
            nbytes[k] = t.untyped_storage().nbytes()
            first_stage[k] = stack[-1]
            held.append(t)
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = forward()
    finally:
        for h in handles:
            h.remove()
    op_of: dict[tuple[str, int], str] = {}
    for node in _walk(_tensors(result if not isinstance(result, dict) else tuple(result.values()))):
        label = None
        for t in _saved_by(node):
            k = _key(t)
            if k in nbytes and k not in op_of:
                label = label or op_label(node)
                op_of[k] = label
    out = SavedBytes(total=sum(nbytes.values()), storages=len(nbytes))
    for k, n in nbytes.items():
        out.by_stage[first_stage[k]] = out.by_stage.get(first_stage[k], 0) + n
        op = op_of.get(k, "unreached")
        out.by_op[op] = out.by_op.get(op, 0) + n
    held.clear()
    return out, result
