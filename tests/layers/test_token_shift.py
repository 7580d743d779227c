"""The causal token shift: the per-channel sum it defines, its history for decoding, its start, its
fixed window channels."""

import pytest
import torch

from mmlongnet.layers import TokenShift


def shifted(width: int, dim: int = 6, window_share: float = 0.0) -> TokenShift:
    shift = TokenShift(dim, width, window_share=window_share, dtype=torch.float64)
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


@pytest.mark.parametrize("window_share", [0.0, 0.5])
def test_history_continues_the_sequence_and_the_future_does_not_leak(window_share):
    shift = shifted(4, window_share=window_share)
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


@pytest.mark.parametrize(("share", "channels"), [(0.5, [0, 2, 4]), (1 / 3, [0, 3]), (1.0, list(range(6)))])
def test_window_channels_sum_the_last_w_tokens_and_learn_nothing(share, channels):
    shift = shifted(3, window_share=share)
    x = torch.randn(2, 9, 6, dtype=torch.float64, requires_grad=True)
    y = shift(x)
    learned = [c for c in range(6) if c not in channels]
    padded = torch.nn.functional.pad(x, (0, 0, 2, 0))  # (2, 11, 6): two zeros before the first token
    expected_window = padded[:, 0:9] + padded[:, 1:10] + padded[:, 2:11]  # x_{t-2} + x_{t-1} + x_t
    torch.testing.assert_close(y[..., channels], expected_window[..., channels], rtol=1e-12, atol=1e-12)
    expected = x.detach().clone()
    for t in range(9):
        for j in range(min(3, t + 1)):
            expected[:, t] += shift.weight[:, j].detach() * x.detach()[:, t - j]
    torch.testing.assert_close(y[..., learned], expected[..., learned], rtol=1e-12, atol=1e-12)
    y.square().sum().backward()
    assert torch.equal(shift.weight.grad[channels], torch.zeros(len(channels), 3, dtype=torch.float64))
    if learned:
        assert shift.weight.grad[learned].abs().min() > 0
    moved = shifted(3, window_share=share).to(torch.float32)  # the fixed kernel follows the module
    assert moved.window.dtype == torch.float32 and moved.learned.dtype == torch.float32


def test_window_share_is_validated_and_shown():
    assert "window_share=0.5" in repr(TokenShift(6, 3, window_share=0.5))
    assert "window_share" not in repr(TokenShift(6, 3))
    for bad in (-0.5, 1.5, True, "half"):
        with pytest.raises(ValueError, match="window_share"):
            TokenShift(6, 3, window_share=bad)
