"""Bad input to the public API: each kind gets a ValueError / TypeError naming the argument, the
silent cases are consistent (NaN policy, empty inputs, giant segments), and a rejected call changes
no state."""

from __future__ import annotations

import math

import pytest
import torch
from devices import DEVICES

from mmlongnet.attention import MultiheadDilatedAttention, dilated_attention
from mmlongnet.attention import dilated as dilated_module
from mmlongnet.modalities import AudioEncoderConfig, TextEncoderConfig, VisionEncoderConfig
from mmlongnet.models import LongNetLM, MMLongNet, MMLongNetConfig
from mmlongnet.models.longnet import LongNetLMConfig
from mmlongnet.models.multimodal import StackConfig

SCHEDULE = ([4, 8], [1, 2])


def qkv(shape=(1, 8, 2, 4)):
    torch.manual_seed(0)
    return [torch.randn(*shape) for _ in range(3)]


def lm():
    torch.manual_seed(0)
    return LongNetLM(11, d_model=16, nhead=2, num_layers=1, dim_feedforward=32, segment_lengths=[4, 8],
                     dilation_rates=[1, 2]).eval()  # fmt: skip


def mha():
    return MultiheadDilatedAttention(16, 2, segment_lengths=[4, 8], dilation_rates=[1, 2])


CASES = {
    "attention D=0": (lambda: dilated_attention(*qkv((1, 8, 2, 0)), *SCHEDULE), ValueError, "head dim D"),
    "attention softmax_scale=inf": (
        lambda: dilated_attention(*qkv(), *SCHEDULE, softmax_scale=math.inf),
        ValueError,
        "softmax_scale",
    ),
    "attention softmax_scale=nan": (
        lambda: dilated_attention(*qkv(), *SCHEDULE, softmax_scale=math.nan),
        ValueError,
        "softmax_scale",
    ),
    "attention softmax_scale=True": (
        lambda: dilated_attention(*qkv(), *SCHEDULE, softmax_scale=True),
        ValueError,
        "softmax_scale",
    ),
    "multihead key of another width": (
        lambda: mha()(torch.randn(2, 8, 16), torch.randn(2, 8, 12), torch.randn(2, 8, 16)),
        ValueError,
        "key",
    ),
    "multihead key of another batch": (
        lambda: mha()(torch.randn(2, 8, 16), torch.randn(3, 8, 16), torch.randn(3, 8, 16)),
        ValueError,
        "key must have the query's batch",
    ),
    "multihead value of another length": (
        lambda: mha()(torch.randn(2, 8, 16), torch.randn(2, 8, 16), torch.randn(2, 7, 16)),
        ValueError,
        "key and value",
    ),
    "multihead key not a tensor": (
        lambda: mha()(torch.randn(2, 8, 16), [1.0], torch.randn(2, 8, 16)),
        TypeError,
        "key must be a torch",
    ),
    "lm token id = V": (lambda: lm()(torch.tensor([[1, 11]])), ValueError, r"tokens\[0, 1\] = 11"),
    "lm token id < 0": (lambda: lm()(torch.tensor([[-1, 2]])), ValueError, r"tokens\[0, 0\] = -1"),
    "lm generate from an id = V": (
        lambda: lm().generate(torch.tensor([[11]]), 2),
        ValueError,
        "outside the vocabulary",
    ),
    "lm max_new_tokens=2.5": (lambda: lm().generate(torch.tensor([[1]]), 2.5), TypeError, "max_new_tokens"),
    "lm temperature=nan": (
        lambda: lm().generate(torch.tensor([[1]]), 2, temperature=math.nan),
        ValueError,
        "temperature",
    ),
    "lm temperature=inf": (
        lambda: lm().generate(torch.tensor([[1]]), 2, temperature=math.inf),
        ValueError,
        "temperature",
    ),
    "lm temperature='1'": (
        lambda: lm().generate(torch.tensor([[1]]), 2, temperature="1"),
        TypeError,
        "temperature",
    ),
    "lm top_k=2.0": (lambda: lm().generate(torch.tensor([[1]]), 2, top_k=2.0), TypeError, "top_k"),
    "config checkpoint_activations='no'": (
        lambda: MMLongNetConfig.tiny(checkpoint_activations="no"),
        TypeError,
        "checkpoint_activations",
    ),
    # a string where a config wants a number: a TypeError naming the field, before any comparison
    "config d_model='512'": (
        lambda: MMLongNetConfig.tiny(d_model="512"),
        TypeError,
        r"MMLongNetConfig\.d_model must be an int, got '512' \(str\)",
    ),
    "config dropout='abc'": (
        lambda: MMLongNetConfig.tiny(dropout="abc"),
        TypeError,
        r"MMLongNetConfig\.dropout must be a number, got 'abc'",
    ),
    "config audio given as a dict with n_fft='400'": (
        lambda: MMLongNetConfig(audio={"n_fft": "400"}),
        TypeError,
        r"AudioEncoderConfig\.n_fft must be an int",
    ),
    "audio config f_min='0'": (
        lambda: AudioEncoderConfig(f_min="0"),
        TypeError,
        r"AudioEncoderConfig\.f_min",
    ),
    "audio config conv_channels='8'": (
        lambda: AudioEncoderConfig(conv_channels="8"),
        TypeError,
        r"AudioEncoderConfig\.conv_channels must be an int or None",
    ),
    "audio config resample=1": (
        lambda: AudioEncoderConfig(resample=1),
        TypeError,
        r"AudioEncoderConfig\.resample must be a bool",
    ),
    "conformer config dropout='0.1'": (
        lambda: AudioEncoderConfig(conformer={"dropout": "0.1"}),
        TypeError,
        r"ConformerConfig\.dropout must be a number",
    ),
    "vision config frame_rate='25'": (
        lambda: VisionEncoderConfig(frame_rate="25"),
        TypeError,
        r"VisionEncoderConfig\.frame_rate must be a number or None",
    ),
    "text config vocab_size='259'": (
        lambda: TextEncoderConfig(vocab_size="259"),
        TypeError,
        r"TextEncoderConfig\.vocab_size must be an int",
    ),
    "stack config num_layers=None": (
        lambda: StackConfig(num_layers=None),
        TypeError,
        r"StackConfig\.num_layers must be an int, got None",
    ),
    "lm config num_tokens='abc'": (
        lambda: LongNetLMConfig("abc"),
        TypeError,
        r"LongNetLMConfig\.num_tokens must be an int",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_an_error_naming_the_argument(name):
    call, error, match = CASES[name]
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_empty_batch_and_giant_segments_work_like_their_plain_twins(backend):
    q, k, v = qkv((0, 8, 2, 4))
    assert dilated_attention(q, k, v, *SCHEDULE, backend=backend).shape == (0, 8, 2, 4)
    q, k, v = qkv()
    giant = dilated_attention(q, k, v, [4, 2**62], [1, 2], backend=backend)
    torch.testing.assert_close(giant, dilated_attention(q, k, v, [4, 8], [1, 2], backend=backend))


@pytest.mark.parametrize("layout", ["branch calls", "dense call"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tensor", ["q", "k", "v"])
def test_nan_policy_is_the_same_on_both_backends(tensor, device, layout, monkeypatch):
    """A query row holding NaN outputs NaN, and so does every row that attends to a NaN key or value,
    on the reference and the fused backend alike (see `dilated_attention`'s docstring); the fused
    op's branch calls spread it no further than the reference, one dense call within its head."""
    monkeypatch.setattr(dilated_module, "DENSE_SMALL_INPUTS", layout == "dense call")
    monkeypatch.setattr(dilated_module, "DENSE_MAX_WORK", math.inf)
    inputs = {name: t.to(device) for name, t in zip("qkv", qkv(), strict=True)}
    inputs[tensor][0, 3, 0, 1] = math.nan
    outputs = {
        b: dilated_attention(*inputs.values(), *SCHEDULE, backend=b).cpu() for b in ("reference", "sdpa")
    }
    reading = torch.zeros(8, dtype=torch.bool)  # head 0's rows that read position 3
    reading[3 if tensor == "q" else slice(0, 4)] = True
    for out in outputs.values():
        assert out[0, reading, 0].isnan().any(-1).all()
        assert torch.isfinite(out[0, :, 1]).all()  # the other head never reads it
    fused_nan = outputs["sdpa"].isnan()
    if layout == "branch calls":
        assert (outputs["reference"].isnan() | ~fused_nan).all()  # the reference is NaN wherever the fused is


def test_a_sample_without_modality_is_rejected_before_any_encoder_runs():
    torch.manual_seed(0)
    audio = AudioEncoderConfig(
        embed_dim=32, n_fft=256, hop_length=160, n_mels=16, conv_channels=8, trunk="conformer",
        conformer={"num_heads": 2, "ffn_dim": 32, "num_layers": 1, "depthwise_conv_kernel_size": 3},
    )  # fmt: skip
    model = MMLongNet(MMLongNetConfig.tiny(audio=audio)).train()
    inputs, lengths = model.example_inputs(3, seed=0)
    for name in lengths:
        lengths[name][1] = 0  # sample 1 has nothing
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with pytest.raises(ValueError, match="sample 1 has no modality"):
        model(inputs, lengths)
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # BatchNorm statistics too


def test_a_string_for_a_number_in_config_json_names_the_field(tmp_path):
    """A hand-edited export: `from_pretrained` names the file, `LongNetLMConfig`'s type check the field."""
    import json

    lm().save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["config"]["d_model"] = "16"
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(
        ValueError, match=r"config\.json: .*LongNetLMConfig\.d_model must be an int, got '16'"
    ):
        LongNetLM.from_pretrained(tmp_path)


def test_bool_and_float_in_int_fields_keep_their_value_errors():
    """The type check leaves numbers to the range checks, which say what is allowed."""
    with pytest.raises(ValueError, match="d_model must be a positive int, got True"):
        MMLongNetConfig.tiny(d_model=True)
    with pytest.raises(ValueError, match="n_fft must be a positive int, got 2.5"):
        AudioEncoderConfig(n_fft=2.5)
    assert VisionEncoderConfig(frame_rate=25).frame_rate == 25  # an int where a float is wanted
