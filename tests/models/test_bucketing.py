"""Length buckets change no sample's outputs: the padding they add is masked exactly (float64)."""

import pytest
import torch

from mmlongnet.data.collate import Batch, LengthBuckets, collate_samples
from mmlongnet.models import MMLongNet, MMLongNetConfig

TOLERANCE = dict(rtol=1e-10, atol=1e-10)
MISALIGNED = LengthBuckets(
    text_multiple=5,
    text_minimum=7,
    audio_multiple=1000,
    audio_minimum=3000,
    video_multiple=7,
    video_minimum=7,
)
"""Buckets that end off the token, hop and tubelet boundaries: padding still changes nothing."""


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MMLongNet(MMLongNetConfig.tiny()).double().eval()


def samples(model) -> list[dict]:
    """Five samples: text + audio + video, audio only, text + video, text + audio, text + video."""
    inputs, lengths = model.example_inputs(5, seed=3)
    lengths["audio"][[2, 4]] = 0  # samples 2 and 4: no audio
    lengths["video"] = torch.tensor([5, 0, 3, 0, 6])  # 5 and 3 end inside a tubelet of 2 frames
    texts = ["what is the first digit?", None, "count the sevens", "hi", "which digit comes last?"]
    return [
        {
            "id": f"s{row}",
            "text": texts[row],
            **{
                name: inputs[name][row, :n] if (n := int(lengths[name][row])) else None
                for name in ("audio", "video")
            },
            "label": row,
        }
        for row in range(5)
    ]


def run(model, batch: Batch):
    inputs = {name: x if name == "text" else x.double() for name, x in batch.inputs.items()}
    return model(inputs, batch.lengths)


@pytest.mark.parametrize("buckets", [LengthBuckets(), MISALIGNED], ids=["default", "misaligned"])
def test_bucketed_padding_leaves_every_sample_unchanged(model, buckets):
    plain = collate_samples(samples(model))
    bucketed = collate_samples(samples(model), buckets=buckets)
    for name in plain.inputs:  # the buckets do add padding, to every modality
        assert bucketed.inputs[name].shape[1] > plain.inputs[name].shape[1]
    with torch.no_grad():
        want, got = run(model, plain), run(model, bucketed)
    assert got.tokens.shape[1] > want.tokens.shape[1]
    assert set(got.modality_pooled) == set(want.modality_pooled) == {"text", "audio", "video"}
    for row in range(len(plain)):
        valid_want = want.tokens[row][~want.padding_mask[row]]  # (L_b, E) the sample's fused tokens
        valid_got = got.tokens[row][~got.padding_mask[row]]
        assert valid_got.shape == valid_want.shape and valid_want.shape[0] > 0
        torch.testing.assert_close(valid_got, valid_want, **TOLERANCE)
        torch.testing.assert_close(got.pooled[row], want.pooled[row], **TOLERANCE)
        for name, pooled in want.modality_pooled.items():
            torch.testing.assert_close(got.modality_pooled[name][row], pooled[row], **TOLERANCE)
            assert bool(got.modality_present[name][row]) == bool(want.modality_present[name][row])
    assert want.modality_present["audio"].tolist() == [True, True, False, True, False]
    assert want.modality_present["video"].tolist() == [True, False, True, False, True]


@pytest.mark.parametrize("name, extra", [("text", 13), ("audio", 2345), ("video", 5)])
def test_extra_padding_leaves_each_modality_stack_unchanged(model, name, extra):
    """One modality's encoder and LongNet stack alone: extra zero padding keeps the valid tokens."""
    inputs, lengths = model.example_inputs(3, seed=4)
    x = inputs[name] if name == "text" else inputs[name].double()
    x = x.masked_fill(  # zero (the pad id 0 for text) beyond each length, as a collate leaves it
        (torch.arange(x.shape[1]) >= lengths[name][:, None]).view(
            *lengths[name].shape, -1, *[1] * (x.dim() - 2)
        ),
        0,
    )
    longer = torch.cat([x, x.new_zeros(x.shape[0], extra, *x.shape[2:])], dim=1)
    encode = getattr(model, f"encode_{name}")
    with torch.no_grad():
        (want, want_pad), (got, got_pad) = encode(x, lengths[name]), encode(longer, lengths[name])
    assert got.shape[1] > want.shape[1] and got_pad[:, want.shape[1] :].all()
    assert torch.equal(got_pad[:, : want.shape[1]], want_pad)
    torch.testing.assert_close(got[:, : want.shape[1]][~want_pad], want[~want_pad], **TOLERANCE)


def test_half_precision_media_give_the_outputs_of_their_values():
    """A batch collated with `media_dtype=torch.float16` runs in a float32 model as its values do:
    the encoders cast their input, so the only difference is the rounding of the inputs."""
    torch.manual_seed(0)
    model = MMLongNet(MMLongNetConfig.tiny()).eval()  # float32
    half = collate_samples(samples(model), media_dtype=torch.float16)
    rounded = {name: x if name == "text" else x.float() for name, x in half.inputs.items()}
    assert half.inputs["audio"].dtype == torch.float16 and half.inputs["video"].dtype == torch.float16
    with torch.no_grad():
        got, want = model(half.inputs, half.lengths), model(rounded, half.lengths)
    assert torch.equal(got.pooled, want.pooled) and torch.equal(got.tokens, want.tokens)
