"""Vision: patch and tubelet tokens, timm backbones, local checkpoints, masks, batch invariance."""

import pytest
import timm
import torch
import torch.nn.functional as F

from mmlongnet.modalities import VisionEncoder, VisionEncoderConfig

SMALL = dict(embed_dim=16, image_size=32, patch_size=8)  # P = 4 x 4 = 16 patches per frame
VIT = dict(backbone="vit_tiny_patch16_224", backbone_kwargs={"img_size": 32, "patch_size": 8})


def make_encoder(seed=0, **kwargs):
    torch.manual_seed(seed)
    return VisionEncoder(VisionEncoderConfig(**{**SMALL, **kwargs})).eval()


def frames(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_image_tokens_are_patch_embeddings_plus_positions():
    encoder = make_encoder()
    images = frames(2, 3, 32, 32)
    tokens, pad = encoder(images)
    assert tokens.shape == (2, 16, 16) and pad.shape == (2, 16) and not pad.any()
    conv = encoder.patch_embed.proj
    expected = F.conv2d(images, conv.weight, conv.bias, stride=8).flatten(2).transpose(1, 2)  # (B, P, E)
    torch.testing.assert_close(tokens, expected + encoder.pos_embed, rtol=0, atol=1e-6)
    assert encoder.num_patches == 16 and encoder.grid_size == (4, 4) and encoder.embed_dim == 16


@pytest.mark.parametrize("tubelet_size", [1, 2, 3])
def test_image_equals_a_one_frame_video(tubelet_size):
    encoder = make_encoder(tubelet_size=tubelet_size)
    images = frames(3, 3, 32, 32)
    image_tokens, image_pad = encoder(images, torch.tensor([1, 0, 1]))
    video_tokens, video_pad = encoder(images[:, None], torch.tensor([1, 0, 1]))
    torch.testing.assert_close(image_tokens, video_tokens, rtol=0, atol=0)
    assert torch.equal(image_pad, video_pad)
    assert image_pad.tolist() == [[False] * 16, [True] * 16, [False] * 16]
    assert image_tokens[1].abs().sum() == 0


def slow_tubelet_tokens(encoder, video, lengths):
    """One Conv2d per frame slot of each tubelet, tubelets completed with the last valid frame."""
    t = encoder.config.tubelet_size
    weight, bias = encoder.patch_embed.weight, encoder.patch_embed.bias  # (E, C, t, p, p)
    batch, num_frames = video.shape[:2]
    tubelets = -(-num_frames // t)
    out = torch.zeros(batch, tubelets * 16, 16)
    for b in range(batch):
        for k in range(-(-int(lengths[b]) // t)):
            acc = bias[:, None, None].clone()
            for tau in range(t):
                frame = video[b, min(k * t + tau, int(lengths[b]) - 1)]
                acc = acc + F.conv2d(frame[None], weight[:, :, tau], stride=8)[0]  # (E, 4, 4)
            out[b, k * 16 : (k + 1) * 16] = acc.flatten(1).T + encoder.pos_embed
    return out


@pytest.mark.parametrize("tubelet_size", [2, 3])
def test_tubelets_match_a_slow_twin(tubelet_size):
    encoder = make_encoder(seed=1, tubelet_size=tubelet_size)
    video = frames(4, 7, 3, 32, 32, seed=1)
    lengths = torch.tensor([7, 4, 1, 0])
    tokens, pad = encoder(video, lengths)
    tubelets = -(-7 // tubelet_size)
    assert tokens.shape == (4, tubelets * 16, 16)
    valid_tubelets = [-(-n // tubelet_size) for n in lengths.tolist()]
    assert (~pad).sum(1).tolist() == [16 * n for n in valid_tubelets]
    assert encoder.output_lengths(lengths).tolist() == [16 * n for n in valid_tubelets]
    assert encoder.output_lengths(5) == 16 * -(-5 // tubelet_size)
    torch.testing.assert_close(tokens, slow_tubelet_tokens(encoder, video, lengths), rtol=0, atol=1e-5)


def test_frame_tokens_are_time_major():
    encoder = make_encoder(seed=2)
    video = frames(1, 3, 3, 32, 32, seed=2)
    tokens, _ = encoder(video)
    for t in range(3):
        torch.testing.assert_close(
            tokens[0, t * 16 : (t + 1) * 16], encoder(video[:, t])[0][0], rtol=0, atol=0
        )


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(tubelet_size=3), dict(tubelet_size=2, pos_embed="sincos"), VIT, dict(VIT, tubelet_size=2)],
    ids=["patch", "tubelet3", "tubelet2-sincos", "vit", "vit-tubelet2"],
)
def test_batch_invariance_alone_vs_padded_batch(kwargs):
    encoder = make_encoder(seed=3, **kwargs)
    lengths = [6, 5, 1, 0]
    video = frames(4, 6, 3, 32, 32, seed=3)
    for row, length in enumerate(lengths):
        video[row, length:] = 9.0  # padding frames must not reach the valid tokens
    batched, pad = encoder(video, torch.tensor(lengths))
    for row, length in enumerate(lengths):
        if length == 0:
            assert pad[row].all() and batched[row].abs().sum() == 0
            continue
        alone, alone_pad = encoder(video[row : row + 1, :length])
        assert not alone_pad.any() and alone.shape[1] == (~pad[row]).sum()
        torch.testing.assert_close(batched[row, : alone.shape[1]], alone[0], rtol=0, atol=1e-5)
        assert batched[row, alone.shape[1] :].abs().sum() == 0


def test_vit_backbone_tokens():
    encoder = make_encoder(seed=4, **VIT)
    assert isinstance(encoder.backbone, timm.models.VisionTransformer)
    assert encoder.num_patches == 16 and encoder.grid_size == (4, 4) and encoder.pos_embed is None
    images = frames(2, 3, 32, 32, seed=4)
    tokens, pad = encoder(images)
    with torch.no_grad():
        features = encoder.backbone.forward_features(images)  # (B, 1 + P, 192)
    assert features.shape == (2, 17, 192)
    torch.testing.assert_close(tokens, encoder.backbone_proj(features[:, 1:]), rtol=0, atol=1e-5)
    assert not pad.any()


def test_backbone_tubelets_average_valid_frames():
    encoder = make_encoder(seed=5, tubelet_size=2, **VIT)
    video = frames(1, 3, 3, 32, 32, seed=5)
    tokens, pad = encoder(video)  # tubelets {0, 1} and {2}
    per_frame = [encoder(video[:, t])[0][0] for t in range(3)]
    torch.testing.assert_close(tokens[0, :16], (per_frame[0] + per_frame[1]) / 2, rtol=0, atol=1e-5)
    torch.testing.assert_close(tokens[0, 16:], per_frame[2], rtol=0, atol=1e-5)
    assert not pad.any()


def test_cnn_backbone_feature_map_is_flattened():
    encoder = make_encoder(seed=6, backbone="resnet10t", pos_embed="sincos")
    images = frames(2, 3, 32, 32, seed=6)
    tokens, _ = encoder(images)
    with torch.no_grad():
        features = encoder.backbone.forward_features(images)  # (B, 512, 1, 1)
    assert encoder.grid_size == tuple(features.shape[2:]) and encoder.num_patches == features.shape[2] ** 2
    expected = encoder.backbone_proj(features.flatten(2).transpose(1, 2)) + encoder.sincos_pos_embed
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-5)


def test_local_checkpoint_round_trip(tmp_path):
    source = make_encoder(seed=7, embed_dim=192, **VIT)  # width 192: no projection, outputs comparable
    assert isinstance(source.backbone_proj, torch.nn.Identity)
    path = tmp_path / "vit_tiny.pth"
    torch.save(source.backbone.state_dict(), path)
    loaded = make_encoder(seed=8, embed_dim=192, checkpoint_path=str(path), **VIT)
    fresh = make_encoder(seed=8, embed_dim=192, **VIT)
    images = frames(2, 3, 32, 32, seed=7)
    expected = source(images)[0]
    torch.testing.assert_close(loaded(images)[0], expected, rtol=0, atol=0)
    assert (fresh(images)[0] - expected).abs().max() > 1e-2  # the checkpoint did the work
    with pytest.raises(FileNotFoundError, match="vision: checkpoint_path .* does not exist"):
        make_encoder(checkpoint_path=str(tmp_path / "missing.pth"), **VIT)


def test_tubelet_times_and_frame_rate():
    encoder = make_encoder(tubelet_size=2, frame_rate=4.0)
    assert encoder.tubelet_times(5).tolist() == [0.0, 0.5, 1.0]
    video = frames(1, 2, 3, 32, 32)
    assert encoder(video, frame_rate=4.0)[0].shape == (1, 16, 16)
    with pytest.raises(ValueError, match="video at frame_rate=8.0 fps, but the encoder expects 4.0 fps"):
        encoder(video, frame_rate=8.0)
    with pytest.raises(ValueError, match="frame_rate applies to videos"):
        encoder(video[:, 0], frame_rate=4.0)
    with pytest.raises(ValueError, match="tubelet_times needs VisionEncoderConfig.frame_rate"):
        make_encoder().tubelet_times(3)


def test_empty_video_factory_kwargs_and_check_finite():
    encoder = make_encoder(tubelet_size=2)
    tokens, pad = encoder(frames(2, 0, 3, 32, 32))
    assert tokens.shape == (2, 0, 16) and pad.shape == (2, 0)
    double = VisionEncoder(VisionEncoderConfig(**SMALL, tubelet_size=2), dtype=torch.float64)
    assert double(frames(1, 2, 3, 32, 32))[0].dtype == torch.float64
    strict = make_encoder(check_finite=True)
    images = frames(1, 3, 32, 32)
    images[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="vision: pixels holds 1 non-finite"):
        strict(images)


@pytest.mark.parametrize(
    ("pixels", "lengths", "match"),
    [
        (
            frames(3, 32, 32),
            None,
            r"expected images \(B, C, H, W\) or videos \(B, T, C, H, W\) float, got \(3, 32",
        ),
        (frames(1, 1, 1, 3, 32, 32), None, r"or videos \(B, T, C, H, W\) float, got \(1, 1, 1, 3, 32, 32\)"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), None, "got dtype torch.uint8; convert and normalise"),
        (frames(1, 1, 32, 32), None, r"expected 3 channels \(in_chans\), got 1"),
        (frames(1, 3, 32, 24), None, r"expected frames of image_size=\(32, 32\), got \(32, 24\)"),
        (frames(2, 4, 3, 32, 32), torch.tensor([4, 5]), r"lengths must be in \[0, 4\] \(valid frames"),
        (frames(2, 3, 32, 32), torch.tensor([1, 2]), r"lengths must be in \[0, 1\]"),
        (frames(2, 3, 32, 32), torch.tensor([1]), r"lengths must have shape \(B,\) = \(2,\)"),
        (frames(2, 3, 32, 32), torch.tensor([0.0, 1.0]), "lengths must be an integer tensor"),
    ],
)
def test_input_errors(pixels, lengths, match):
    with pytest.raises(ValueError, match=match) as info:
        make_encoder()(pixels, lengths)
    assert str(info.value).startswith("vision: ")


def test_direct_method_errors():
    encoder = make_encoder()
    with pytest.raises(ValueError, match=r"vision: expected images \(B, C, H, W\) float"):
        encoder.encode_image(frames(1, 1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"vision: expected video \(B, T, C, H, W\) float"):
        encoder.encode_video(frames(1, 3, 32, 32))
    with pytest.raises(ValueError, match="VisionEncoderConfig"):
        VisionEncoder(SMALL)


def test_backbone_rejecting_the_image_size_says_how_to_fix_it():
    with pytest.raises(
        ValueError,
        match=r"vision: backbone 'vit_tiny_patch16_224' rejected .*doesn't match model.*'img_size'",
    ):
        VisionEncoder(VisionEncoderConfig(embed_dim=16, image_size=32, backbone="vit_tiny_patch16_224"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"embed_dim": 0}, "embed_dim must be a positive int"),
        ({"image_size": (32, 32, 3)}, r"image_size must be an int or \(H, W\)"),
        ({"image_size": (32, 0)}, "image_size must be a positive int"),
        ({"patch_size": 5}, r"patch_size=5 must divide image_size=\(32, 32\)"),
        ({"in_chans": 0}, "in_chans must be a positive int"),
        ({"tubelet_size": 0}, "tubelet_size must be a positive int"),
        ({"frame_rate": 0}, "frame_rate must be a positive number"),
        ({"pos_embed": "rope"}, "pos_embed must be 'learned', 'sincos', 'none' or None"),
        ({"pos_embed": "sincos", "embed_dim": 18}, "needs embed_dim divisible by 4"),
        ({"dropout": 1.5}, "dropout must be a float"),
        ({"backbone_kwargs": {"img_size": 32}}, "backbone_kwargs is only used with a backbone"),
        ({"checkpoint_path": "w.pth"}, "checkpoint_path loads backbone weights; set backbone"),
        ({"backbone": "no_such_model"}, "backbone must be a timm model name"),
        ({"backbone": "resnet10t", "backbone_kwargs": {"num_classes": 3}}, r"must not set \['num_classes'\]"),
        ({"backbone": "resnet10t", "backbone_kwargs": [1]}, "backbone_kwargs must be a dict"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VisionEncoderConfig(**{**SMALL, **kwargs})


def test_config_normalises_image_size_and_resolves_pos_embed():
    assert VisionEncoderConfig(**SMALL).image_size == (32, 32)
    assert VisionEncoderConfig(embed_dim=8, image_size=[32, 16], patch_size=8).image_size == (32, 16)
    assert VisionEncoderConfig(**SMALL).pos_embed_kind == "learned"
    assert VisionEncoderConfig(**SMALL, **VIT).pos_embed_kind == "none"
    assert VisionEncoderConfig(**SMALL, **VIT, pos_embed="learned").pos_embed_kind == "learned"
