"""MMLongNet: mixed batches, batch invariance, skipped encoders, multiway gradients, export, errors."""

import dataclasses

import pytest
import torch

from mmlongnet.attention import MultiheadDilatedAttention
from mmlongnet.modalities import AudioEncoder, TextEncoder, VisionEncoder
from mmlongnet.models import MMLongNet, MMLongNetConfig, StackConfig
from mmlongnet.models.multimodal import boundary_marks


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MMLongNet(MMLongNetConfig.tiny()).eval()


def sample(inputs, lengths, b):
    return {k: v[b : b + 1] for k, v in inputs.items()}, {k: v[b : b + 1] for k, v in lengths.items()}


def assert_batch_invariant(model, inputs, lengths):
    """Every sample's valid fused tokens and pooled outputs equal those of the sample alone."""
    batch = model(inputs, lengths)
    for b in range(next(iter(inputs.values())).shape[0]):
        alone = model(*sample(inputs, lengths, b))
        n = int((~alone.padding_mask).sum())
        assert int((~batch.padding_mask[b]).sum()) == n
        torch.testing.assert_close(batch.tokens[b, :n], alone.tokens[0, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch.pooled[b], alone.pooled[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(batch.modality_ids[b, :n], alone.modality_ids[0, :n])
    return batch


@pytest.mark.parametrize(
    "modalities", [("text", "audio"), ("video",), ("text", "audio", "video"), ("audio", "video")]
)
def test_mixed_batches_are_batch_invariant(model, modalities):
    inputs, lengths = model.example_inputs(3, seed=1)
    inputs = {k: v for k, v in inputs.items() if k in modalities}
    lengths = {k: v for k, v in lengths.items() if k in modalities}
    out = assert_batch_invariant(model, inputs, lengths)
    ids = [model.config.modalities.index(m) for m in modalities]
    assert set(out.modality_ids[~out.padding_mask].tolist()) == set(ids)
    assert set(out.modality_pooled) == set(modalities)


def test_samples_missing_some_modalities(model):
    inputs, lengths = model.example_inputs(4, seed=2)
    lengths["text"][1] = 0  # sample 1: no text
    lengths["audio"][2] = 0  # sample 2: no audio
    lengths["video"][3] = 0  # sample 3: no video
    lengths["audio"][3] = 0  # ... and no audio: text only
    for name in inputs:  # a collate leaves zeros beyond each length
        mask = torch.arange(inputs[name].shape[1])[None, :] >= lengths[name][:, None]
        inputs[name] = inputs[name].masked_fill(mask.view(*mask.shape, *[1] * (inputs[name].dim() - 2)), 0)
    out = assert_batch_invariant(model, inputs, lengths)
    text, audio, video = (model.config.modalities.index(m) for m in ("text", "audio", "video"))
    valid = ~out.padding_mask
    assert text not in out.modality_ids[1][valid[1]].tolist()
    assert set(out.modality_ids[3][valid[3]].tolist()) == {text}
    assert out.modality_present["audio"].tolist() == [True, True, False, False]
    assert out.modality_pooled["audio"][2].abs().max() == 0


def test_boundary_marks_single_out_each_samples_first_and_last_valid_token():
    padding = torch.arange(5)[None, :] >= torch.tensor([3, 0, 5, 1])[:, None]  # lengths 3, 0, 5, 1
    first, last = boundary_marks(padding)
    assert first.tolist() == [[True] + [False] * 4, [False] * 5, [True] + [False] * 4, [True] + [False] * 4]
    assert last.nonzero().tolist() == [[0, 2], [2, 4], [3, 0]]


def fused_inputs(model, inputs, lengths):
    """What the fusion stack takes, (B, L, E), once with the boundary embeddings and once with them
    zeroed, and the embeddings (2M, E)."""
    fused = []
    hook = model.fusion.register_forward_pre_hook(lambda _, args: fused.append(args[0]))
    weights = model.boundary_embedding.weight.detach().clone()
    model(inputs, lengths)
    with torch.no_grad():
        model.boundary_embedding.weight.zero_()
    model(inputs, lengths)
    with torch.no_grad():
        model.boundary_embedding.weight.copy_(weights)
    hook.remove()
    return fused[0], fused[1], weights


@pytest.mark.parametrize("boundaries", [True, "shared"])
def test_boundary_embeddings_land_on_each_modalitys_first_and_last_token(boundaries):
    torch.manual_seed(0)
    model = MMLongNet(dataclasses.replace(MMLongNetConfig.tiny(), boundary_embeddings=boundaries)).eval()
    pairs = 1 if boundaries == "shared" else len(model.config.modalities)
    assert model.boundary_embedding.weight.shape == (2 * pairs, model.config.d_model)
    inputs, lengths = model.example_inputs(3, seed=5)
    lengths["audio"][1] = 0  # sample 1 lacks the audio
    lengths["video"][2] = 1  # sample 2 has one frame: its first token is its last
    marked, plain, weights = fused_inputs(model, inputs, lengths)
    for b in range(3):
        offset, want = 0, torch.zeros_like(marked[b])  # (L, E)
        for m, name in enumerate(model.config.modalities):
            n = int(model.encoders[name].output_lengths(lengths[name][b : b + 1])[0])
            pair = 0 if boundaries == "shared" else m
            if n:
                want[offset] += weights[2 * pair]
                want[offset + n - 1] += weights[2 * pair + 1]
            offset += n
        torch.testing.assert_close(marked[b] - plain[b], want, rtol=1e-5, atol=1e-5)
    assert_batch_invariant(model, inputs, lengths)


def test_boundary_embeddings_reach_the_feature_fusion():
    torch.manual_seed(0)
    config = MMLongNetConfig.tiny(audio=None, video=None, fusion="feature", boundary_embeddings=True)
    model = MMLongNet(config).eval()
    inputs, lengths = {"text": torch.randint(3, 259, (2, 10))}, {"text": torch.tensor([10, 6])}
    marked, plain, weights = fused_inputs(model, inputs, lengths)
    added = torch.zeros(2, 10, config.d_model)  # (B, N, E): what the text stream gained
    for b, n in enumerate((10, 6)):
        added[b, 0] += weights[0]
        added[b, n - 1] += weights[1]
    projected = added @ model.feature_proj.weight.T  # the projection is linear: the gain maps through it
    torch.testing.assert_close(marked - plain, projected, rtol=1e-4, atol=1e-5)


def test_global_modalities_give_the_fusion_their_rows():
    torch.manual_seed(0)
    model = MMLongNet(MMLongNetConfig.tiny(global_modalities=["text", "video"])).eval()
    inputs, lengths = model.example_inputs(3, seed=6)
    lengths["video"][1] = 0  # sample 1: no video
    seen = []
    model.fusion.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs), with_kwargs=True)
    out = assert_batch_invariant(model, inputs, lengths)
    queries = seen[0]["global_queries"]
    text, video = (model.config.modalities.index(m) for m in ("text", "video"))
    expected = ((out.modality_ids == text) | (out.modality_ids == video)) & ~out.padding_mask
    assert torch.equal(queries.mask, expected) and expected[1].sum() == lengths["text"][1]
    widths = {name: model.encoders[name].output_lengths(inputs[name].shape[1]) for name in ("text", "video")}
    assert queries.count == widths["text"] + widths["video"]
    model({"audio": inputs["audio"]}, {"audio": lengths["audio"]})  # no global modality in the batch
    assert seen[-1]["global_queries"] is None


def test_global_rows_change_nothing_where_the_fusion_is_dense_already():
    dense_fusion = StackConfig(2, [64], [1])  # one segment over every fused token
    models = []
    for names in ([], ["text"]):
        torch.manual_seed(0)
        models.append(
            MMLongNet(MMLongNetConfig.tiny(fusion_stack=dense_fusion, global_modalities=names)).double()
        )
    inputs, lengths = models[0].example_inputs(2, seed=7)
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    plain, global_ = (model(inputs, lengths).tokens for model in models)
    torch.testing.assert_close(global_, plain)
    sparse = MMLongNet(MMLongNetConfig.tiny(global_modalities=["text"])).double()
    sparse.load_state_dict(models[0].state_dict())  # the same weights, the tiny dilated schedule
    assert (sparse(inputs, lengths).tokens - plain).abs().max() > 1e-3


def test_global_read_gates_the_fusion_layers_only_and_starts_as_the_model_without_it():
    torch.manual_seed(0)
    without = MMLongNet(MMLongNetConfig.tiny(global_modalities=["text"])).double()
    reading = MMLongNet(MMLongNetConfig.tiny(global_modalities=["text"], global_read=True)).double()
    missing = reading.load_state_dict(without.state_dict(), strict=False).missing_keys
    assert missing and all(
        name.startswith("fusion.") and name.endswith("global_read_gate") for name in missing
    )
    assert len(missing) == len(
        reading.fusion.layers
    )  # one gate per fusion layer, none in the modality stacks
    inputs, lengths = without.example_inputs(3, seed=8)
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    torch.testing.assert_close(reading(inputs, lengths).tokens, without(inputs, lengths).tokens)
    with torch.no_grad():
        for layer in reading.fusion.layers:
            layer.self_attn.global_read_gate.fill_(0.5)
    assert (reading(inputs, lengths).tokens - without(inputs, lengths).tokens).abs().max() > 1e-3
    assert_batch_invariant(reading.eval(), inputs, lengths)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"global_modalities": ["depth"]}, "configured modalities"),
        ({"global_modalities": ["text", "text"]}, "once each"),
        ({"global_modalities": ["text"], "fusion": "feature"}, "fusion='sequence'"),
        ({"global_read": True}, "global_read reads the tokens of global_modalities"),
        ({"boundary_embeddings": "per-modality"}, "boundary_embeddings must be False, True"),
        ({"boundary_embeddings": 1}, "boundary_embeddings must be False, True"),
    ],
)
def test_bad_fusion_options_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        MMLongNetConfig.tiny(**overrides)


def test_the_encoder_of_an_absent_modality_never_runs(model):
    calls = {name: 0 for name in model.encoders}
    hooks = [
        encoder.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        for name, encoder in model.encoders.items()
    ]
    inputs, lengths = model.example_inputs(2)
    model({"text": inputs["text"], "audio": None}, {"text": lengths["text"]})
    for hook in hooks:
        hook.remove()
    assert calls == {"text": 1, "audio": 0, "video": 0}


def test_gradients_reach_exactly_the_experts_that_owned_tokens():
    torch.manual_seed(0)
    model = MMLongNet(MMLongNetConfig.tiny())
    inputs, lengths = model.example_inputs(2)
    out = model(
        {"text": inputs["text"], "video": inputs["video"]}, {k: lengths[k] for k in ("text", "video")}
    )
    out.pooled.square().sum().backward()
    audio = model.config.modalities.index("audio")
    for name, parameter in model.fusion.named_parameters():
        if ".experts." in name:  # the stacks (K, *S): the audio expert's slice has a zero gradient
            present = [e for e in range(parameter.shape[0]) if e != audio]
            assert not parameter.grad[audio].any(), name
            assert all(parameter.grad[e].abs().sum() > 0 for e in present), name
    assert all(p.grad is None for p in model.encoders["audio"].parameters())


def test_checkpointing_recomputes_encoders_and_layers_with_the_same_gradients():
    config = dataclasses.replace(MMLongNetConfig.tiny(), dropout=0.1)
    models = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        models.append(MMLongNet(dataclasses.replace(config, checkpoint_activations=checkpointing)).double())
    inputs, lengths = models[0].example_inputs(3, seed=4)
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    calls = {name: 0 for name in models[1].encoders}
    for name, encoder in models[1].encoders.items():
        encoder.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    for model in models:
        torch.manual_seed(1)  # the same dropout masks, recomputed ones included
        model(inputs, lengths).pooled.square().sum().backward()
    assert calls == {name: 2 for name in calls}  # forward, then again in the backward
    grads = [dict((n, p.grad) for n, p in model.named_parameters()) for model in models]
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        if grad is None:
            assert grads[1][name] is None, name
        else:
            torch.testing.assert_close(grads[1][name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_save_and_load_reproduce_outputs_exactly(model, tmp_path):
    inputs, lengths = model.example_inputs(2)
    model.save_pretrained(tmp_path / "mm")
    loaded = MMLongNet.from_pretrained(tmp_path / "mm").eval()
    assert loaded.config == model.config
    assert torch.equal(loaded(inputs, lengths).tokens, model(inputs, lengths).tokens)
    assert not list((tmp_path / "mm").glob("*.pt*")) and (tmp_path / "mm" / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["text", "audio", "video"])
def test_a_single_encoder_exports_alone(model, name, tmp_path):
    encoder = model.encoders[name]
    inputs, lengths = model.example_inputs(2)
    encoder.save_pretrained(tmp_path / name)
    loaded = type(encoder).from_pretrained(tmp_path / name).eval()
    expected, got = encoder(inputs[name], lengths[name]), loaded(inputs[name], lengths[name])
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    assert isinstance(loaded, TextEncoder | AudioEncoder | VisionEncoder)
    with pytest.raises(ValueError, match="MMLongNet.from_pretrained"):
        type(encoder).from_pretrained(model.save_pretrained(tmp_path / "whole"))


def test_encode_single_modalities_runs_encoder_and_stack(model):
    inputs, lengths = model.example_inputs(2)
    tokens, padding = model.encode_audio(inputs["audio"], lengths["audio"])
    raw, raw_padding = model.encoders["audio"](inputs["audio"], lengths["audio"])
    torch.testing.assert_close(tokens, model.stacks["audio"](raw, raw_padding))
    assert torch.equal(padding, raw_padding)
    assert model.encode_text(inputs["text"], lengths["text"])[0].shape == (2, 24, 32)
    assert model.encode_video(inputs["video"], lengths["video"])[0].shape[0] == 2


def test_feature_fusion_of_time_aligned_streams():
    torch.manual_seed(0)
    config = MMLongNetConfig.tiny(audio=None, video=None, fusion="feature")
    model = MMLongNet(config).eval()
    tokens = torch.randint(3, 259, (2, 10))
    out = model({"text": tokens}, {"text": torch.tensor([10, 6])})
    assert out.tokens.shape == (2, 10, 32) and out.padding_mask[1, 6:].all()
    both = MMLongNet(MMLongNetConfig.tiny(video=None, fusion="feature")).eval()
    inputs, lengths = both.example_inputs(2)
    with pytest.raises(ValueError, match="equal token lengths"):
        both(inputs, lengths)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda i, lens: ({**i, "depth": i["text"]}, lens), ValueError, "unknown modality 'depth'"),
        (lambda i, lens: ({**i, "audio": i["audio"][:1]}, lens), ValueError, "same batch size"),
        (lambda i, lens: ({**i, "audio": i["audio"][..., None]}, lens), ValueError, "audio"),
        (lambda i, lens: ({**i, "text": i["text"].float()}, lens), (TypeError, ValueError), "text"),
        (lambda i, lens: (i, {**lens, "video": torch.tensor([3, 99])}), ValueError, "video"),
        (lambda i, lens: (i, {**lens, "text": lens["text"][:1]}), ValueError, r"\(B,\)"),
        (lambda i, lens: ({"text": i["text"]}, lens), ValueError, "missing from inputs"),
        (lambda i, lens: ({k: None for k in i}, {}), ValueError, "no modality"),
    ],
)
def test_bad_input_names_the_modality(model, call, error, match):
    inputs, lengths = model.example_inputs(2)
    with pytest.raises(error, match=match):
        model(*call(inputs, lengths))


def test_a_sample_without_any_modality_is_named(model):
    inputs, lengths = model.example_inputs(3)
    for name in lengths:
        lengths[name][1] = 0
    with pytest.raises(ValueError, match="sample 1 has no modality"):
        model(inputs, lengths)


def test_audio_at_another_rate_is_resampled_or_refused():
    torch.manual_seed(0)
    model = MMLongNet(MMLongNetConfig.tiny()).eval()
    waveform = torch.randn(1, 4000)
    out = model({"audio": waveform}, audio_sample_rate=8000)
    assert out.tokens.shape[0] == 1
    audio = dataclasses.replace(model.config.audio, resample=False)
    strict = MMLongNet(MMLongNetConfig.tiny(audio=audio)).eval()
    with pytest.raises(ValueError, match="8000"):
        strict({"audio": waveform}, audio_sample_rate=8000)


def test_nan_inputs_are_caught_when_checking_is_enabled():
    config = MMLongNetConfig.tiny()
    audio = dataclasses.replace(config.audio, check_finite=True)
    model = MMLongNet(MMLongNetConfig.tiny(audio=audio)).eval()
    waveform = torch.randn(1, 4000)
    waveform[0, 10] = float("nan")
    with pytest.raises(ValueError, match="audio"):
        model({"audio": waveform})


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(nhead=5), "nhead"),
        (dict(d_model=48), "embed_dim must equal d_model"),
        (dict(text=None, audio=None, video=None), "at least one"),
        (dict(fusion="cross"), "fusion"),
        (
            dict(fusion_stack={"num_layers": 1, "segment_lengths": [8, 16], "dilation_rates": [1]}),
            "equal length",
        ),
        (dict(text_stack={"num_layers": -1}), "num_layers"),
        (dict(dropout=2.0), "dropout"),
        (dict(rotary_fraction=0.0), "rotary_fraction must be in"),
        (dict(positions="xpos", rotary_fraction=0.5), "positions='rope' only"),
        (
            dict(
                positions="xpos",
                audio_stack={"num_layers": 1, "segment_lengths": [4, 6], "dilation_rates": [1, 2]},
            ),
            "audio_stack: positions='xpos' needs every segment length to divide the largest",
        ),
    ],
)
def test_config_validation_names_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        MMLongNetConfig.tiny(**overrides)


def test_rotary_fraction_rotates_that_share_of_every_self_attention():
    torch.manual_seed(0)
    half = MMLongNet(MMLongNetConfig.tiny(rotary_fraction=0.5)).eval()
    rotaries = [m.positions for m in half.modules() if isinstance(m, MultiheadDilatedAttention)]
    head_dim = half.config.d_model // half.config.nhead
    assert rotaries and all(r.rotary_dim == head_dim // 2 for r in rotaries)
    inputs, lengths = half.example_inputs(3, seed=1)
    assert_batch_invariant(half, inputs, lengths)
    torch.manual_seed(0)
    full = MMLongNet(MMLongNetConfig.tiny()).eval()
    full.load_state_dict(half.state_dict())  # the same weights: only the rotated share differs
    assert not torch.allclose(full(inputs, lengths).pooled, half(inputs, lengths).pooled, atol=1e-4)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
def test_cuda_batch_invariance_and_bf16_training_step():
    torch.manual_seed(0)
    video = {"embed_dim": 128, "image_size": 16, "patch_size": 8, "tubelet_size": 2}
    config = MMLongNetConfig.tiny(d_model=128, nhead=2, dim_feedforward=256, text={"embed_dim": 128},
                                  audio={"embed_dim": 128, "n_mels": 16}, video=video)  # fmt: skip
    model = MMLongNet(config).cuda().eval()
    inputs, lengths = model.example_inputs(3, seed=4, scale=8)
    # float32 on the fused CUDA kernels (cuDNN convolutions in TF32 would differ by ~1e-4)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        assert_batch_invariant(model, inputs, lengths)
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(inputs, lengths)
    out.pooled.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
