"""Random draws that read like torch's and that the training step can replay.

`rng.rand(*shape, device=...)` is `torch.rand`, and `rng.randn` is `torch.randn`, drawn from
torch's global generator, or, inside `with rng.source(src):`, from `src`: a torch.Generator, or a
1-D tensor of uniforms drawn beforehand and handed out in order. The training step uses the last:
all its random numbers (views, GMML, drop path) come from one `torch.rand(n, generator=...)` made
just before it, outside the step. So the step is one graph for torch.compile (which cannot take a
torch.Generator inside a graph), replays as a CUDA graph (no generator state inside it), eager and
compiled steps see the same numbers, and --resume continues either from the saved generator.
`count(fn)` says how many numbers fn draws, for sizing that tensor (run fn on the meta device).
"""
import contextlib
import math

import torch


class _Source:
    """Where rand draws from now: None (torch's global generator), a torch.Generator, a tensor of
    uniforms (`used` of them handed out), or COUNT (hand out 0.5, count them)."""
    src, used = None, 0


COUNT = "count"
_now = _Source()


def rand(*shape, device=None):
    """U[0, 1) float32 of `shape`, as torch.rand(*shape, device=device)."""
    if isinstance(_now.src, torch.Tensor) or _now.src is COUNT:
        n = math.prod(shape)
        start, _now.used = _now.used, _now.used + n
        if _now.src is COUNT:
            return torch.full(shape, 0.5, device=device)
        if _now.used > _now.src.numel():
            raise RuntimeError(f"the step drew more random numbers than its stream of {_now.src.numel()}")
        return _now.src[start:start + n].view(shape)
    return torch.rand(shape, generator=_now.src, device=device)


def randn(*shape, device=None):
    """N(0, 1) float32 by the inverse CDF of rand (sqrt(2) erfinv(2u - 1), |z| < 4.9), so that
    every source gives it."""
    u = rand(*shape, device=device)
    return math.sqrt(2) * torch.erfinv((2 * u - 1).clamp(-1 + 1e-6, 1 - 1e-6))


@contextlib.contextmanager
def source(src):
    """Draws inside come from `src` (see the module docstring); a tensor must be used up exactly."""
    before = _now.src, _now.used
    _now.src, _now.used = src, 0
    try:
        yield
        if isinstance(src, torch.Tensor) and _now.used != src.numel():
            raise RuntimeError(f"the step drew {_now.used} random numbers from a stream of {src.numel()}")
    finally:
        _now.src, _now.used = before


def count(fn, *args):
    """How many numbers fn(*args) draws from rand and randn."""
    with source(COUNT):
        fn(*args)
        return _now.used
