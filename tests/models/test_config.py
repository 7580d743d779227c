"""The LongNet configs: validated once, where they are made; the modules built from them or from
their fields as keywords are the same modules."""

import dataclasses

import pytest
import torch

from mmlongnet.attention import MultiheadDilatedAttention
from mmlongnet.models import (
    LongNet,
    LongNetConfig,
    LongNetDecoderLayer,
    LongNetEncoder,
    LongNetEncoderLayer,
    LongNetLayerConfig,
    LongNetLM,
    LongNetLMConfig,
)

LAYER = dict(
    d_model=32, nhead=4, dim_feedforward=64, segment_lengths=[4, 8], dilation_rates=[1, 2], dropout=0.0
)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        (dict(nhead=5), ValueError, "nhead must be a positive divisor of d_model=32, got nhead=5"),
        (dict(d_model="32"), TypeError, r"LongNetLayerConfig\.d_model must be an int, got '32'"),
        (dict(dim_feedforward=0), ValueError, "dim_feedforward must be a positive int, got 0"),
        (dict(attention_dropout=1.0), ValueError, r"attention_dropout must be in \[0, 1\), got 1.0"),
        (dict(activation="tanh"), ValueError, "activation must be one of"),
        (dict(layer_norm_eps=0.0), ValueError, "layer_norm_eps must be positive"),
        (dict(positions="alibi"), ValueError, "positions must be one of"),
        (
            dict(positions="xpos", segment_lengths=[4, 6], dilation_rates=[1, 2]),
            ValueError,
            "divide the largest",
        ),
        (dict(attention="sparse"), ValueError, "attention must be 'dilated' or 'dense'"),
        (dict(backend="triton"), ValueError, "backend must be one of"),
        (dict(dilation_rates=[1]), ValueError, "segment_lengths and dilation_rates"),
    ],
)
def test_a_bad_layer_field_is_refused_when_the_config_is_made(fields, error, match):
    with pytest.raises(error, match=match):
        LongNetLayerConfig(**(LAYER | fields))


def test_the_schedule_is_checked_into_lists_and_fields_are_keyword_only():
    config = LongNetLayerConfig(**(LAYER | dict(segment_lengths=(4, 8), dilation_rates=(1, 2))))
    assert config.segment_lengths == [4, 8] and config.dilation_rates == [1, 2]
    with pytest.raises(TypeError):
        LongNetLayerConfig(32, 4)  # only LongNetLMConfig's num_tokens is positional
    assert LongNetLMConfig(61).num_tokens == 61


def test_model_configs_extend_the_layer_config_with_their_own_defaults_and_checks():
    lm = LongNetLMConfig(61)
    assert isinstance(lm, LongNetLayerConfig)
    assert (lm.d_model, lm.nhead, lm.num_layers, lm.dim_feedforward, lm.dropout, lm.positions) == (
        768, 12, 12, 3072, 0.0, "rope"
    )  # fmt: skip
    with pytest.raises(ValueError, match="num_layers must be a positive int, got 0"):
        LongNetLMConfig(61, num_layers=0)
    with pytest.raises(ValueError, match="num_decoder_layers must be a positive int"):
        LongNetConfig(num_decoder_layers=0)
    with pytest.raises(ValueError, match="cross_attention must be 'dilated' or 'dense'"):
        LongNetConfig(cross_attention="sparse")


def test_a_layer_from_its_config_equals_the_layer_from_its_fields():
    config = LongNetLayerConfig(**LAYER, positions="rope")
    torch.manual_seed(0)
    from_config = LongNetEncoderLayer(config, num_ways=2)
    torch.manual_seed(0)
    from_fields = LongNetEncoderLayer(32, 4, 64, [4, 8], [1, 2], dropout=0.0, positions="rope", num_ways=2)
    _same_state(from_config, from_fields)
    with pytest.raises(TypeError, match="not both"):
        LongNetEncoderLayer(config, dropout=0.1)
    with pytest.raises(ValueError, match="cross_attention must be"):
        LongNetDecoderLayer(config, cross_attention="sparse")


def test_the_attention_from_a_config_equals_the_attention_from_its_arguments():
    config = LongNetLayerConfig(**LAYER, positions="xpos", attention_dropout=0.1, backend="reference")
    torch.manual_seed(0)
    from_config = MultiheadDilatedAttention.from_config(config, gamma_init=2.0)
    torch.manual_seed(0)
    direct = MultiheadDilatedAttention(
        32, 4, [4, 8], [1, 2], dropout=0.1, gamma_init=2.0, positions="xpos", backend="reference"
    )
    _same_state(from_config, direct)
    assert repr(from_config) == repr(direct)
    cross = MultiheadDilatedAttention.from_config(config, cross_attention="dense")
    assert cross.attention == "dense" and cross.positions is None
    with pytest.raises(ValueError, match="num_ways must be a positive int"):
        MultiheadDilatedAttention.from_config(config, num_ways=0)


def test_relative_positions_of_a_decoder_layer_look_at_past_keys_only():
    config = LongNetLayerConfig(**LAYER, positions="relative")
    assert not LongNetDecoderLayer(config, cross_attention=None).self_attn.positions.bidirectional
    assert LongNetEncoderLayer(config).self_attn.positions.bidirectional


def test_models_from_a_config_equal_models_from_keywords_and_keep_it():
    fields = dict(d_model=32, nhead=4, dim_feedforward=64, segment_lengths=[4, 8], dilation_rates=[1, 2])
    config = LongNetLMConfig(61, num_layers=2, **fields)
    torch.manual_seed(0)
    lm = LongNetLM(config)
    torch.manual_seed(0)
    _same_state(lm, LongNetLM(61, num_layers=2, **fields))
    assert lm.config is config
    with pytest.raises(TypeError, match="not both"):
        LongNetLM(config, num_layers=3)

    config = LongNetConfig(num_encoder_layers=1, num_decoder_layers=2, **fields)
    torch.manual_seed(0)
    model = LongNet(config)
    torch.manual_seed(0)
    _same_state(model, LongNet(num_encoder_layers=1, num_decoder_layers=2, **fields))
    assert len(model.encoder.layers) == 1 and len(model.decoder.layers) == 2

    layer = LongNetLayerConfig(**fields)
    torch.manual_seed(0)
    stack = LongNetEncoder(2, layer)
    torch.manual_seed(0)
    _same_state(stack, LongNetEncoder(2, 32, 4, 64, [4, 8], [1, 2]))


def test_an_lm_saved_and_loaded_keeps_its_config(tmp_path):
    config = LongNetLMConfig(61, d_model=32, nhead=4, num_layers=1, dim_feedforward=64,
                             segment_lengths=[4, 8], dilation_rates=[1, 2], tie_embeddings=True)  # fmt: skip
    lm = LongNetLM(config).eval()
    lm.save_pretrained(tmp_path)
    loaded = LongNetLM.from_pretrained(tmp_path).eval()
    assert loaded.config == config and dataclasses.asdict(loaded.config) == dataclasses.asdict(config)
    tokens = torch.randint(0, 61, (2, 12))
    torch.testing.assert_close(loaded(tokens), lm(tokens), rtol=0, atol=0)
