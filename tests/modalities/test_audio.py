"""Audio: log-mel + conv subsampling (+ Conformer) tokens, length arithmetic, batch invariance, resampling."""

import pytest
import torch
import torchaudio

from mmlongnet.modalities import AudioEncoder, AudioEncoderConfig, ConformerConfig

SMALL = dict(embed_dim=16, n_mels=20, conv_channels=4)
CONFORMER = dict(num_layers=2, num_heads=2, ffn_dim=32, depthwise_conv_kernel_size=5)


def make_encoder(seed=0, **kwargs):
    torch.manual_seed(seed)
    return AudioEncoder(AudioEncoderConfig(**{**SMALL, **kwargs})).eval()


def waveforms(batch, samples, seed=0):
    return torch.randn(batch, samples, generator=torch.Generator().manual_seed(seed)) * 0.1


@pytest.mark.parametrize("trunk", ["none", "conformer"])
def test_shapes_masks_and_zero_padding(trunk):
    encoder = make_encoder(trunk=trunk, conformer=CONFORMER)
    lengths = torch.tensor([4000, 1, 0, 2345])
    tokens, pad = encoder(waveforms(4, 4000), lengths)
    # 4000 samples: 1 + 4000 // 160 = 26 frames -> 13 -> 7 tokens; 2345 -> 15 frames -> 4 tokens
    assert tokens.shape == (4, 7, 16) and pad.shape == (4, 7) and pad.dtype == torch.bool
    assert (~pad).sum(1).tolist() == [7, 1, 0, 4]
    assert encoder.output_lengths(lengths).tolist() == [7, 1, 0, 4]
    assert pad.tolist()[3] == [False] * 4 + [True] * 3
    assert tokens[pad].abs().sum() == 0
    assert tokens[~pad].abs().sum(-1).min() > 0
    assert torch.isfinite(tokens).all()
    full, full_pad = encoder(waveforms(4, 4000))
    assert not full_pad.any() and full.shape == (4, 7, 16)
    assert encoder.embed_dim == 16


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(subsampling=1),
        dict(subsampling=2, n_fft=401, hop_length=100),
        dict(subsampling=8, n_fft=256, hop_length=64),
    ],
    ids=["default", "sub1", "sub2-odd-fft", "sub8"],
)
def test_token_length_formula_matches_the_output(kwargs):
    encoder = make_encoder(**kwargs)
    cfg = encoder.config
    hop = cfg.hop_length
    lengths = sorted(
        {1, 2, 3, hop - 1, hop, hop + 1, cfg.n_fft, *range(5, 4000, 137), *range(hop * 4 - 2, hop * 4 + 3)}
    )
    wave = waveforms(1, max(lengths))
    for length in lengths:
        tokens, pad = encoder(wave[:, :length])
        expected = encoder.output_lengths(length)
        assert tokens.shape[1] == expected and not pad.any(), length
        frames = 1 + (length + 2 * (cfg.n_fft // 2) - cfg.n_fft) // hop
        assert expected == -(-frames // cfg.subsampling)
    as_tensor = encoder.output_lengths(torch.tensor(lengths))
    assert as_tensor.tolist() == [encoder.output_lengths(length) for length in lengths]
    assert encoder.output_lengths(0) == 0


@pytest.mark.parametrize("trunk", ["none", "conformer"])
def test_batch_invariance_alone_vs_padded_batch(trunk):
    encoder = make_encoder(seed=3, trunk=trunk, conformer=CONFORMER)
    lengths = [6000, 1234, 161, 0, 5999]
    wave = waveforms(len(lengths), 6000, seed=1)
    for row, length in enumerate(lengths):
        wave[row, length:] = 7.0  # loud padding content must not reach the valid tokens
    batched, pad = encoder(wave, torch.tensor(lengths))
    for row, length in enumerate(lengths):
        if length == 0:
            assert pad[row].all() and batched[row].abs().sum() == 0
            continue
        alone, alone_pad = encoder(wave[row : row + 1, :length])
        assert not alone_pad.any()
        valid = alone.shape[1]
        assert (~pad[row]).sum() == valid
        torch.testing.assert_close(batched[row, :valid], alone[0], rtol=0, atol=1e-5)


def one_pass_reference(encoder, wave, lengths):
    """The subsampling in one pass, as the formulas write it: Conv2d with zero padding 1 over time
    and mels, GELU, rows beyond each sample's valid length zeroed after every layer."""
    frames = encoder.frame_lengths(lengths)
    x = encoder.melspec(wave.masked_fill(torch.arange(wave.shape[1]) >= lengths[:, None], 0.0))
    x = x.clamp_min(encoder.config.log_floor).log().transpose(1, 2)[:, None]  # (B, 1, F, M)
    x = x.masked_fill((torch.arange(x.shape[2]) >= frames[:, None])[:, None, :, None], 0.0)
    for conv in encoder.convs:
        x = torch.nn.functional.gelu(
            torch.nn.functional.conv2d(x, conv.weight, conv.bias, stride=2, padding=1)
        )
        frames = -(-frames // 2)
        x = x.masked_fill((torch.arange(x.shape[2]) >= frames[:, None])[:, None, :, None], 0.0)
    tokens = encoder.proj(x.transpose(1, 2).flatten(2))
    return tokens.masked_fill((torch.arange(x.shape[2]) >= frames[:, None])[..., None], 0.0)


@pytest.mark.parametrize("subsampling", [1, 2, 4, 8])
@pytest.mark.parametrize("chunk", [None, 1, 3, 7])
def test_chunked_subsampling_equals_the_one_pass_reference(subsampling, chunk):
    encoder = make_encoder(seed=5, subsampling=subsampling, conv_chunk_tokens=chunk).double()
    lengths = torch.tensor([8000, 3017, 0, 161, 7999])
    wave = waveforms(len(lengths), 8000, seed=2).double().requires_grad_()
    tokens, _ = encoder(wave, lengths)
    expected = one_pass_reference(encoder, wave, lengths)
    torch.testing.assert_close(tokens, expected, rtol=1e-12, atol=1e-12)
    cotangent = torch.randn_like(tokens)
    grads = torch.autograd.grad((tokens * cotangent).sum(), [wave, *encoder.parameters()], allow_unused=True)
    expected_grads = torch.autograd.grad(
        (expected * cotangent).sum(), [wave, *encoder.parameters()], allow_unused=True
    )
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        if expected_grad is None:
            assert grad is None
        else:
            torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_checkpointed_chunks_give_the_same_gradients_and_are_recomputed():
    torch.manual_seed(6)
    config = AudioEncoderConfig(**SMALL, conv_chunk_tokens=4)
    plain = AudioEncoder(config).double()
    checkpointed = AudioEncoder(config, checkpoint_activations=True).double()
    checkpointed.load_state_dict(plain.state_dict())
    calls = []
    checkpointed.convs[0].register_forward_pre_hook(lambda *_: calls.append(1))
    lengths = torch.tensor([6000, 2500])
    wave = waveforms(2, 6000, seed=3).double()
    for encoder in (plain, checkpointed):
        tokens, _ = encoder(wave, lengths)
        tokens.square().sum().backward()
    assert len(calls) == 2 * 3  # 10 tokens in 3 chunks of 4: forward, then again in the backward
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-14, msg=name)


def test_conformer_trunk_respects_lengths_and_trains():
    encoder = make_encoder(seed=4, trunk="conformer", conformer=CONFORMER)
    assert isinstance(encoder.trunk, torchaudio.models.Conformer)
    wave = waveforms(3, 3200, seed=2)
    lengths = torch.tensor([3200, 800, 0])
    tokens, pad = encoder(wave, lengths)
    # changing what lies beyond a length changes nothing; changing a valid sample changes its tokens
    other = wave.clone()
    other[1, 800:] = torch.randn(2400)
    torch.testing.assert_close(encoder(other, lengths)[0], tokens, rtol=0, atol=1e-5)
    other[1, 100] += 1.0
    assert (encoder(other, lengths)[0][1] - tokens[1]).abs().max() > 1e-3
    # the trunk changes the tokens (it is not skipped)
    plain = make_encoder(seed=4)
    assert (plain(wave, lengths)[0] - tokens).abs().max() > 1e-2
    encoder.train()
    tokens, pad = encoder(wave, lengths)
    tokens.square().sum().backward()
    grads = [p.grad for p in encoder.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert encoder._trunk_padding == {}  # no call in flight leaves a mask behind


def test_resampling_equals_resampling_by_hand():
    encoder = make_encoder(seed=5)
    wave8k = waveforms(2, 4000, seed=3)
    tokens, pad = encoder(wave8k, sample_rate=8000)
    by_hand = torchaudio.functional.resample(wave8k, 8000, 16000)
    expected, expected_pad = encoder(by_hand)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-5)
    assert torch.equal(pad, expected_pad)
    # per-sample lengths at 8 kHz: sample 1 alone, resampled by hand, equals its batched row
    lengths = torch.tensor([4000, 1501])
    tokens, pad = encoder(wave8k, lengths, sample_rate=8000)
    alone, _ = encoder(torchaudio.functional.resample(wave8k[1:, :1501], 8000, 16000))
    assert (~pad[1]).sum() == alone.shape[1] == encoder.output_lengths(1501, sample_rate=8000)
    torch.testing.assert_close(tokens[1, : alone.shape[1]], alone[0], rtol=0, atol=1e-5)
    assert encoder.output_lengths(torch.tensor([1501]), sample_rate=8000).tolist() == [
        encoder.output_lengths(3002)
    ]


def test_resample_false_raises_naming_both_rates():
    encoder = make_encoder(resample=False)
    with pytest.raises(ValueError, match="expected waveforms at sample_rate=16000 Hz, got 8000 Hz"):
        encoder(waveforms(1, 800), sample_rate=8000)
    assert encoder(waveforms(1, 800), sample_rate=16000)[0].shape == (1, 2, 16)


def test_front_end_stays_float32_under_module_casts():
    encoder = make_encoder().to(torch.bfloat16)
    assert encoder.melspec.spectrogram.window.dtype == torch.float32
    assert encoder.melspec.mel_scale.fb.dtype == torch.float32
    assert encoder.proj.weight.dtype == torch.bfloat16
    tokens, _ = encoder(waveforms(2, 1600))
    assert tokens.dtype == torch.bfloat16 and torch.isfinite(tokens).all()
    double = AudioEncoder(AudioEncoderConfig(**SMALL), dtype=torch.float64).double()
    assert double(waveforms(1, 1600).double())[0].dtype == torch.float64


def test_empty_waveforms_and_token_rate():
    encoder = make_encoder()
    tokens, pad = encoder(torch.zeros(2, 0), torch.tensor([0, 0]))
    assert tokens.shape == (2, 0, 16) and pad.shape == (2, 0)
    tokens, pad = encoder(torch.zeros(2, 0), sample_rate=8000)
    assert tokens.shape == (2, 0, 16) and pad.shape == (2, 0)
    assert encoder.tokens_per_second == 25.0
    # a waveform shorter than one hop still gives one token
    assert encoder(waveforms(1, 10))[0].shape == (1, 1, 16)


@pytest.mark.parametrize(
    ("waveform", "lengths", "kwargs", "match"),
    [
        (torch.zeros(100), None, {}, r"expected waveform \(B, S\) float, got shape \(100,\)"),
        (torch.zeros(2, 1, 100), None, {}, "squeeze the channel axis"),
        (torch.zeros(2, 100, dtype=torch.int16), None, {}, "dtype torch.int16"),
        ([0.0, 1.0], None, {}, "got list"),
        (torch.zeros(2, 100), torch.tensor([100]), {}, r"lengths must have shape \(B,\) = \(2,\)"),
        (torch.zeros(2, 100), torch.tensor([100, 101]), {}, r"lengths must be in \[0, 100\]"),
        (torch.zeros(2, 100), torch.tensor([-1, 5]), {}, r"got values in \[-1, 5\]"),
        (torch.zeros(2, 100), torch.tensor([True, False]), {}, "lengths must be an integer tensor"),
        (torch.zeros(2, 100), None, {"sample_rate": 0}, "sample_rate must be a positive int"),
        (torch.zeros(2, 100), None, {"sample_rate": 8000.0}, "sample_rate must be a positive int"),
    ],
)
def test_input_errors(waveform, lengths, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        make_encoder()(waveform, lengths, **kwargs)
    assert str(info.value).startswith("audio: ")


def test_check_finite():
    encoder = make_encoder(check_finite=True)
    wave = waveforms(2, 800)
    wave[1, 3] = float("inf")
    with pytest.raises(ValueError, match="audio: waveform holds 1 non-finite"):
        encoder(wave)
    wave[1, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        encoder(wave)
    with pytest.raises(ValueError, match="AudioEncoderConfig"):
        AudioEncoder(ConformerConfig())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"embed_dim": 0}, "embed_dim must be a positive int"),
        ({"sample_rate": -1}, "sample_rate must be a positive int"),
        ({"n_fft": 0}, "n_fft must be a positive int"),
        ({"hop_length": 1.5}, "hop_length must be a positive int"),
        ({"n_mels": 0}, "n_mels must be a positive int"),
        ({"conv_channels": 0}, "conv_channels must be a positive int"),
        ({"conv_chunk_tokens": 0}, "conv_chunk_tokens must be a positive int"),
        ({"subsampling": 3}, r"subsampling must be one of \(1, 2, 4, 8\)"),
        ({"f_min": 9000.0}, r"f_min must be in \[0, sample_rate / 2 = 8000.0\)"),
        ({"f_max": 9000.0}, r"f_max must be in \(f_min=0.0, sample_rate / 2 = 8000.0\]"),
        ({"log_floor": 0.0}, "log_floor must be positive"),
        ({"dropout": -0.1}, "dropout must be a float"),
        ({"trunk": "transformer"}, "trunk must be 'none' or 'conformer'"),
        ({"trunk": "conformer", "embed_dim": 10, "conformer": {"num_heads": 4}}, "must divide embed_dim=10"),
        ({"conformer": {"depthwise_conv_kernel_size": 4}}, "depthwise_conv_kernel_size must be odd"),
        ({"conformer": {"num_layers": 0}}, "conformer.num_layers must be a positive int"),
        ({"conformer": {"dropout": 1.0}}, "conformer.dropout must be a float"),
        ({"conformer": {"layers": 2}}, r"conformer has unknown keys \['layers'\]"),
        ({"conformer": 3}, "conformer must be a ConformerConfig"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AudioEncoderConfig(**kwargs)


def test_config_accepts_a_nested_dict():
    cfg = AudioEncoderConfig(trunk="conformer", embed_dim=16, conformer={"num_layers": 1, "num_heads": 2})
    assert cfg.conformer == ConformerConfig(num_layers=1, num_heads=2)


def test_mel_spectrogram_equals_torchaudios():
    torch.manual_seed(0)
    encoder = AudioEncoder(AudioEncoderConfig(embed_dim=32, n_fft=256, hop_length=160, n_mels=16)).double()
    wave = torch.randn(3, 4001, dtype=torch.float64)
    expected = encoder.melspec(wave)  # (B, M, F)
    torch.testing.assert_close(encoder.mel_spectrogram(wave), expected, rtol=1e-12, atol=1e-12)


def test_conformer_trunk_forward_is_thread_safe():
    """Concurrent forwards with different lengths each see their own padding mask."""
    import threading

    torch.manual_seed(0)
    config = AudioEncoderConfig(
        embed_dim=16, n_fft=128, hop_length=64, n_mels=8, conv_channels=4, trunk="conformer",
        conformer={"num_heads": 2, "ffn_dim": 16, "num_layers": 1, "depthwise_conv_kernel_size": 3},
    )  # fmt: skip
    encoder = AudioEncoder(config).eval()
    wave = torch.randn(2, 2000)
    cases = [torch.tensor([2000, 700]), torch.tensor([900, 2000])]
    with torch.no_grad():
        expected = [encoder(wave, lengths)[0] for lengths in cases]
    failures = []

    def run(index: int) -> None:
        for _ in range(20):
            with torch.no_grad():
                out = encoder(wave, cases[index])[0]
            if not torch.allclose(out, expected[index], atol=1e-6):
                failures.append(index)

    threads = [threading.Thread(target=run, args=(i % 2,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and encoder._trunk_padding == {}
