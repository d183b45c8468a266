"""Other projects' HTS-AT models, patched in place to run on htsat_kernels ops.

    import htsat_kernels.integrations as hki
    handle = hki.patch_clap(model)   # transformers ClapModel / ClapAudioModel*, laion-clap, original HTS-AT
    ...                              # same parameters, state_dict keys and outputs; forward and backward
    handle.undo()                    # the original forwards again (or: ``with hki.patch_clap(model): ...``)

Each Swin block's norm1 + shift + window partition becomes ``layer_norm_window_partition``, its
attention ``window_attention`` (transformers' separate q / k / v Linears are concatenated per call,
so their gradients flow), its merge + unshift + residual ``window_merge_add``, and each patch merge
``patch_merge``. The ops are called without a backend argument, so ``htsat_kernels.use_backend(...)``
and ``HTSAT_KERNELS_BACKEND`` choose, as everywhere. Only the module instances of the given model
are patched (their ``forward`` attribute), never the classes.
"""

from __future__ import annotations

from torch import nn

from . import laion_clap as _laion
from . import transformers_clap as _hf
from ._handle import PatchHandle, describe, is_patched

__all__ = ["PatchHandle", "patch_clap", "patch_htsat_original", "patch_laion_clap", "patch_transformers_clap"]

_TRANSFORMERS = "transformers " + " / ".join(_hf.TOP_LEVEL)
_LAION = "laion-clap CLAP_Module / CLAP / HTSAT_Swin_Transformer, original HTS-AT HTSAT_Swin_Transformer / SEDWrapper"


def _apply(model: nn.Module, library: str, patch, fn_name: str) -> PatchHandle:
    handle = PatchHandle(model, library)
    modules = model.modules() if isinstance(model, nn.Module) else ()
    if any(is_patched(m) for m in modules):
        raise RuntimeError(f"{fn_name}: {describe(model)} is already patched; call undo() on the first handle first")
    patch(model, handle)
    if not handle.counts.get("blocks"):
        handle.undo()
        raise TypeError(f"{fn_name}: found no Swin blocks to patch in {describe(model)}")
    return handle


def _refuse(fn_name: str, model: object, expected: str) -> TypeError:
    return TypeError(f"{fn_name}: unrecognised model type {describe(model)}; expected {expected}")


def patch_transformers_clap(model: nn.Module) -> PatchHandle:
    """Patch a transformers ``ClapModel``, ``ClapAudioModel``, ``ClapAudioModelWithProjection`` or
    ``ClapAudioEncoder`` in place (the text branch of ``ClapModel`` is left as it is)."""
    if not _hf.recognises(model):
        raise _refuse("patch_transformers_clap", model, _TRANSFORMERS)
    return _apply(model, "transformers", _hf.patch, "patch_transformers_clap")


def patch_htsat_original(model: nn.Module) -> PatchHandle:
    """Patch laion-clap's ``CLAP_Module`` / ``CLAP`` / HTSAT audio branch, or the original HTS-AT
    ``HTSAT_Swin_Transformer`` (or its ``SEDWrapper``) in place: the same model code in both."""
    if not _laion.recognises(model):
        raise _refuse("patch_htsat_original", model, _LAION)
    return _apply(model, "laion-clap / original HTS-AT", _laion.patch, "patch_htsat_original")


patch_laion_clap = patch_htsat_original


def patch_clap(model: nn.Module) -> PatchHandle:
    """Patch any model this package recognises (see ``patch_transformers_clap`` and ``patch_htsat_original``)."""
    if _hf.recognises(model):
        return _apply(model, "transformers", _hf.patch, "patch_clap")
    if _laion.recognises(model):
        return _apply(model, "laion-clap / original HTS-AT", _laion.patch, "patch_clap")
    raise _refuse("patch_clap", model, f"one of: {_TRANSFORMERS}; {_LAION}")
