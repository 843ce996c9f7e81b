"""Tests of rng.py: draws that read like torch's, from torch's generator, a given one, or a stream."""
import pytest
import torch

import rng


def test_a_stream_is_handed_out_in_order_and_must_be_used_up():
    """Inside source(tensor), rand takes the next numbers of the tensor in order, shaped as asked;
    leaving with numbers unused (or asking for more than there are) is an error, not a silent drift."""
    with rng.source(torch.arange(10.0)):
        assert rng.rand(2, 2).tolist() == [[0, 1], [2, 3]]
        assert rng.rand(6).tolist() == [4, 5, 6, 7, 8, 9]
    with pytest.raises(RuntimeError, match="drew 3 random numbers from a stream of 10"):
        with rng.source(torch.arange(10.0)):
            rng.rand(3)
    with pytest.raises(RuntimeError):
        with rng.source(torch.arange(4.0)):
            rng.rand(5)


def test_count_and_sources_nest():
    """count() says how many numbers a function draws (randn included); after a source ends, draws
    come from where they came before it."""
    assert rng.count(lambda: (rng.rand(4, 5), rng.randn(3))) == 23
    g = torch.Generator().manual_seed(0)
    with rng.source(g):
        with rng.source(torch.zeros(2)):
            rng.rand(2)
        a = rng.rand(3)
    assert torch.equal(a, torch.rand(3, generator=torch.Generator().manual_seed(0)))
    torch.manual_seed(5)
    b = rng.rand(3)
    torch.manual_seed(5)
    assert torch.equal(b, torch.rand(3))                             # no source: torch's own generator


def test_randn_is_standard_normal_and_the_same_from_either_source():
    """randn is N(0, 1) (inverse CDF of rand), and gives the same numbers from a generator as from a
    stream of that generator's uniforms."""
    with rng.source(torch.Generator().manual_seed(1)):
        z = rng.randn(200_000)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01 and z.abs().max() < 5.5
    with rng.source(torch.rand(200_000, generator=torch.Generator().manual_seed(1))):
        assert torch.equal(rng.randn(200_000), z)
