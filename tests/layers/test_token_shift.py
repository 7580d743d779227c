"""The causal token shift: the per-channel sum it defines, its history for decoding, its start."""

import pytest
import torch

from mmlongnet.layers import TokenShift


def shifted(width: int, dim: int = 6) -> TokenShift:
    shift = TokenShift(dim, width, dtype=torch.float64)
    with torch.no_grad():
        shift.weight.normal_(generator=torch.Generator().manual_seed(width))
    return shift


@pytest.mark.parametrize("width", [1, 2, 5])
def test_each_token_adds_a_per_channel_mix_of_itself_and_its_predecessors(width):
    shift = shifted(width)
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    expected = x.clone()
    for t in range(9):
        for j in range(min(width, t + 1)):
            expected[:, t] += shift.weight[:, j] * x[:, t - j]
    torch.testing.assert_close(shift(x), expected, rtol=1e-12, atol=1e-12)


def test_history_continues_the_sequence_and_the_future_does_not_leak():
    shift = shifted(4)
    x = torch.randn(3, 11, 6, dtype=torch.float64)
    whole = shift(x)
    history, parts = None, []
    for start, stop in [(0, 2), (2, 3), (3, 9), (9, 11)]:  # chunks shorter and longer than W - 1
        parts.append(shift(x[:, start:stop], history))
        history = shift.last_inputs(x[:, start:stop], history)
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=1e-12, atol=1e-12)
    changed = x.clone()
    changed[:, 7] += 1.0
    torch.testing.assert_close(shift(changed)[:, :7], whole[:, :7], rtol=0, atol=0)
    assert (shift(changed)[:, 7:] - whole[:, 7:]).abs().amax((0, 2)).min() > 0  # tokens 7..10 see it


def test_a_new_shift_is_the_identity_and_bad_arguments_name_the_problem():
    shift = TokenShift(6, 3)
    x = torch.randn(2, 5, 6)
    assert torch.equal(shift(x), x)
    for width in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="width"):
            TokenShift(6, width)
    with pytest.raises(ValueError, match=r"x must be \(B, N, 6\)"):
        shift(torch.randn(5, 6))
    with pytest.raises(ValueError, match="history must be"):
        shift(x, torch.zeros(2, 1, 6))
