"""Inference-only copies of a network: batch norm folded into the preceding convolution, channels-last memory format.

In eval mode a batch norm is a fixed per-channel affine map, so it can be folded into the weights and bias of the
convolution that feeds it: one pass over the feature map less per conv block, and the same outputs up to float
rounding (about 1e-7 in float32). The convolutions then dominate the CPU time, and oneDNN (CPU) and cuDNN (CUDA) run
them fastest on channels-last (NHWC) tensors, which a model whose weights are channels-last produces and keeps
through pooling, interpolation and concatenation. Measured on M2UNet (64 features, one 464x288 slice, 2 AVX2 cores):
folding alone gains nothing, folding plus channels-last about 1.6x.

The copies are for inference only: the batch norms are gone, so they must not be trained.

Example::

    fast = inference_copy(net)            # net itself is left untouched
    with torch.no_grad():
        logits = fast.segment(x.contiguous(memory_format=torch.channels_last))
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["fuse_conv_bn", "inference_copy", "to_channels_last"]

# Convolutions whose output a batch norm of the same dimensionality can be folded into. Exact types only: a subclass
# may change the forward (weight standardisation, for example), and folding would then change the results.
_FOLDABLE = {
    nn.Conv1d: (nn.BatchNorm1d, nn.SyncBatchNorm),
    nn.Conv2d: (nn.BatchNorm2d, nn.SyncBatchNorm),
    nn.Conv3d: (nn.BatchNorm3d, nn.SyncBatchNorm),
}


def _check_module(module: object) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}.")
    if isinstance(module, torch.jit.ScriptModule):
        # a compiled graph cannot be rewritten module by module; fold before scripting (or use torch.jit.freeze)
        raise TypeError(
            f"cannot rewrite a TorchScript module ({type(module).__name__}): fuse the Python module before scripting."
        )
    if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        # a copied wrapper would not be registered with the process group: copy the network it wraps
        raise TypeError(f"expected the network itself, got a {type(module).__name__} wrapper: pass its .module.")


def fuse_conv_bn(module: nn.Module) -> nn.Module:
    """An eval-mode deep copy of ``module`` in which every batch norm that directly follows a convolution inside an
    ``nn.Sequential`` (at any depth) is folded into that convolution.

    A ``Conv1d`` / ``Conv2d`` / ``Conv3d`` immediately followed, in the same ``nn.Sequential``, by a ``BatchNorm1d`` /
    ``BatchNorm2d`` / ``BatchNorm3d`` of the same dimensionality (or a ``SyncBatchNorm``) is replaced by one
    convolution with the folded weights and bias, and the batch norm by ``nn.Identity`` (so indices and the other
    children keep their place). Only ``nn.Sequential`` pairs are folded because only there is the convolution's
    output known to go nowhere but into the batch norm; a convolution or batch norm that is shared (the same module
    reached twice) is left as it is, as are convolution subclasses and transposed convolutions. Eval-mode outputs are
    unchanged up to float rounding; the running statistics are used, never those of a batch.

    Args:
        module: any network (plain PyTorch module, not TorchScript); it is not modified, and its mode does not
            matter (the copy is in eval mode).

    Returns:
        the folded copy, in eval mode, on the device and dtype of ``module``. For inference only: it has no batch
        norms left to train.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``, or is a TorchScript module or a ``DistributedDataParallel`` /
            ``DataParallel`` wrapper.
        ValueError: a batch norm to fold has no running statistics (``track_running_stats=False``): in eval mode it
            normalises with each batch's own statistics, which no fixed weights can reproduce.
    """
    _check_module(module)
    fused = copy.deepcopy(module).eval()
    uses: dict[int, int] = {}
    for _, child in fused.named_modules(remove_duplicate=False):
        uses[id(child)] = uses.get(id(child), 0) + 1
    names = {id(m): name for name, m in fused.named_modules()}
    for sequential in [m for m in fused.modules() if isinstance(m, nn.Sequential)]:
        children = list(sequential.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            norms = _FOLDABLE.get(type(conv))
            if norms is None or type(bn) not in norms or uses[id(conv)] > 1 or uses[id(bn)] > 1:
                continue
            if bn.running_mean is None or bn.running_var is None:
                raise ValueError(
                    f"cannot fold batch norm {names[id(bn)]!r} into the convolution before it: it has no running "
                    f"statistics (track_running_stats={bn.track_running_stats}), so it uses each batch's own."
                )
            if bn.num_features != conv.out_channels:
                raise ValueError(
                    f"batch norm {names[id(bn)]!r} has {bn.num_features} features but the convolution "
                    f"{names[id(conv)]!r} before it gives {conv.out_channels} channels."
                )
            setattr(sequential, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(sequential, bn_name, nn.Identity())
    return fused


def to_channels_last(module: nn.Module) -> nn.Module:
    """Converts, in place, the 4D parameters and buffers of ``module`` to ``torch.channels_last`` and the 5D ones to
    ``torch.channels_last_3d`` (``module.to(memory_format=torch.channels_last)`` fails on 5D tensors); returns it.

    Convolutions with channels-last weights give channels-last outputs whatever the memory format of their input.
    """
    _check_module(module)

    def convert(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        if t.dim() == 5:
            return t.contiguous(memory_format=torch.channels_last_3d)
        return t

    return module._apply(convert)  # the function Module.to itself applies to every parameter and buffer


def inference_copy(network: nn.Module, channels_last: bool = True) -> nn.Module:
    """A fast eval-mode copy of ``network`` for inference: :func:`fuse_conv_bn`, then :func:`to_channels_last`.

    Gives the same outputs as ``network.eval()`` up to float rounding, with every method of ``network`` (``forward``
    and any other entry point, e.g. ``M2UNet.segment`` / ``classify``). Inputs may stay in the default memory format:
    the first convolution's channels-last weights switch the feature maps to channels-last (converting a 4D input
    with ``x.contiguous(memory_format=torch.channels_last)`` saves one reorder where it has several channels).
    Outputs of convolutions are channels-last tensors: call ``.contiguous()`` where a caller needs the default layout
    (``view`` on channel or spatial dimensions, for example).

    Args:
        network: any network (plain PyTorch module, not TorchScript); not modified. Unwrap ``DistributedDataParallel``
            / ``DataParallel`` first.
        channels_last: convert the copy's parameters to channels-last memory format.

    Returns:
        the copy, in eval mode, on the device and dtype of ``network``. For inference only.

    Raises:
        TypeError: as :func:`fuse_conv_bn`, or a ``channels_last`` that is not a bool.
        ValueError: as :func:`fuse_conv_bn`.
    """
    if not isinstance(channels_last, bool):
        raise TypeError(f"channels_last must be a bool, got {channels_last!r}.")
    fused = fuse_conv_bn(network)
    return to_channels_last(fused) if channels_last else fused
