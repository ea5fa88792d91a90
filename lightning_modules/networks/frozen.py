"""Running networks without training them: eval mode for a block, and forward passes that leave BatchNorm alone.

Pure helpers over ``nn.Module``s, used by the methods (a frozen judge, a decoder pass that must not move running
statistics) and by the metrics (every evaluation network runs under :func:`evaluating`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["evaluating", "without_stat_update"]


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Inside: every submodule of ``modules`` in eval mode and autograd off; on exit each submodule's
    ``training`` flag is restored exactly (a partly frozen model comes back partly frozen).

    Every evaluation network (predictors, VAE, feature extractors, distances) runs under it: left in training
    mode (the reference code's behaviour) they would normalise with batch statistics, update BatchNorm running
    statistics and keep dropout on, so scores would depend on the batch.
    """
    flags = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def without_stat_update(module: nn.Module, *args: torch.Tensor,
                        parameters: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``module(*args)`` with COPIES of its buffers, so BatchNorm running statistics (and counters) are not updated
    by this call; in training mode it still normalises with the batch statistics. ``parameters`` replaces the
    module's own (e.g. detached copies, so that the call sends no gradient to them)."""
    state = dict(module.named_parameters()) if parameters is None else dict(parameters)
    state.update({n: b.clone() for n, b in module.named_buffers()})
    return functional_call(module, state, args)
