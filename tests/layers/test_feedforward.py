"""FeedForward: fc1 -> activation -> sub-LN -> fc2, MAGNETO initialisation, errors."""

import pytest
import torch
import torch.nn.functional as F

from mmlongnet.layers import FeedForward


@pytest.mark.parametrize(("activation", "function"), [("gelu", F.gelu), ("relu", F.relu), ("silu", F.silu)])
def test_forward_is_the_documented_composition(activation, function):
    torch.manual_seed(0)
    ffn = FeedForward(8, 20, activation, dtype=torch.float64)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    hidden = F.layer_norm(function(x @ ffn.fc1.weight.T + ffn.fc1.bias), (20,), eps=1e-5)
    torch.testing.assert_close(ffn(x), hidden @ ffn.fc2.weight.T + ffn.fc2.bias)
    plain = FeedForward(8, 20, activation, layer_norm=False, dtype=torch.float64)
    assert plain.inner_norm is None
    torch.testing.assert_close(plain(x), plain.fc2(function(plain.fc1(x))))


def test_gamma_scales_the_initialisation():
    torch.manual_seed(0)
    ffn = FeedForward(256, 1024, gamma_init=3.0)
    xavier = (2 / (256 + 1024)) ** 0.5
    assert abs(ffn.fc1.weight.std().item() / (3.0 * xavier) - 1) < 0.03
    assert ffn.fc1.bias.abs().max() == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="activation must be one of"):
        FeedForward(8, 16, "tanh")
    with pytest.raises(ValueError, match="dropout"):
        FeedForward(8, 16, dropout=1.0)
    with pytest.raises(ValueError, match="hidden_dim"):
        FeedForward(8, 0)
