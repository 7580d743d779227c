"""LongNet models: causality, cached decoding, encoder-decoder, checkpointing, configuration errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmlongnet.data import AssociativeRecall, RecallConfig
from mmlongnet.data.recall import IGNORE_INDEX
from mmlongnet.models import LongNet, LongNetEncoder, LongNetEncoderLayer, LongNetLM

TINY = dict(d_model=32, nhead=4, num_layers=2, dim_feedforward=64, segment_lengths=[4, 8, 16],
            dilation_rates=[1, 2, 4])  # fmt: skip


def tiny_lm(**kwargs) -> LongNetLM:
    torch.manual_seed(0)
    return LongNetLM(61, **(TINY | kwargs)).double().eval()


def test_logits_shape_and_defaults_are_the_paper_base_config():
    lm = LongNetLM(100, num_layers=1)
    attn = lm.decoder.layers[0].self_attn
    assert (lm.d_model, attn.num_heads, lm.decoder.layers[0].ffn.fc1.out_features) == (768, 12, 3072)
    assert attn.segment_lengths == [2048, 4096, 8192, 16384, 32768]
    assert attn.dilation_rates == [1, 2, 4, 6, 12]
    assert lm(torch.randint(0, 100, (2, 5))).shape == (2, 5, 100)


@pytest.mark.parametrize("positions", ["rope", "xpos", "relative", None])
def test_lm_is_causal_by_perturbation(positions):
    lm = tiny_lm(positions=positions)
    tokens = torch.randint(0, 61, (2, 37))
    changed = tokens.clone()
    changed[:, 20] = (changed[:, 20] + 1) % 61
    logits, logits_changed = lm(tokens), lm(changed)
    torch.testing.assert_close(logits[:, :20], logits_changed[:, :20], rtol=1e-12, atol=1e-12)
    # the change reaches the rest of its largest segment [16, 32) ...
    assert (logits[:, 20:32] - logits_changed[:, 20:32]).abs().amax(-1).min() > 1e-6
    # ... and, dilated attention being segment-local, nothing beyond it
    torch.testing.assert_close(logits[:, 32:], logits_changed[:, 32:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("positions", "scalable_softmax"),
    [("rope", None), ("xpos", None), ("relative", None), (None, None), ("rope", 8)],
)
def test_cached_greedy_generation_equals_repeated_full_forward_passes(positions, scalable_softmax):
    lm = tiny_lm(positions=positions, scalable_softmax=scalable_softmax)
    prompt = torch.randint(0, 61, (2, 3))
    # 3 + 45 tokens cross every segment boundary of every branch (4, 8, 16) several times
    cached = lm.generate(prompt, 45, temperature=0)
    uncached = lm.generate(prompt, 45, temperature=0, use_cache=False)
    assert cached.shape == (2, 48)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :3], prompt)
    # and the cached logits are those of the full forward pass
    caches = lm.decoder.new_caches()
    step_logits = [lm(cached[:, :10], kv_caches=caches)[:, -1]]
    step_logits += [lm(cached[:, t : t + 1], kv_caches=caches)[:, -1] for t in range(10, 47)]
    full = lm(cached[:, :47])[:, 9:]
    torch.testing.assert_close(torch.stack(step_logits, dim=1), full, rtol=1e-10, atol=1e-10)


def shifted_lm(width: int = 3, window: float = 0.0) -> LongNetLM:
    """tiny_lm with a token shift of random weights (a new one is the identity), `window` the share
    of its fixed window channels."""
    lm = tiny_lm(token_shift=width, token_shift_window=window)
    with torch.no_grad():
        lm.token_shift.weight.normal_(generator=torch.Generator().manual_seed(1))
    return lm


@pytest.mark.parametrize("window", [0.0, 0.5])
def test_token_shift_decodes_with_caches_as_full_passes_and_stays_causal(window):
    lm = shifted_lm(window=window)
    prompt = torch.randint(0, 61, (2, 3))
    cached = lm.generate(prompt, 30, temperature=0)
    assert torch.equal(cached, lm.generate(prompt, 30, temperature=0, use_cache=False))
    caches = lm.new_caches()
    step_logits = [lm(cached[:, :1], kv_caches=caches)[:, -1]]  # a first call shorter than W - 1
    step_logits += [lm(cached[:, t : t + 1], kv_caches=caches)[:, -1] for t in range(1, 32)]
    torch.testing.assert_close(torch.stack(step_logits, dim=1), lm(cached[:, :32]), rtol=1e-10, atol=1e-10)
    tokens = torch.randint(0, 61, (2, 30))
    changed = tokens.clone()
    changed[:, 20] = (changed[:, 20] + 1) % 61
    logits, logits_changed = lm(tokens), lm(changed)
    torch.testing.assert_close(logits[:, :20], logits_changed[:, :20], rtol=1e-12, atol=1e-12)
    assert (logits[:, 20:23] - logits_changed[:, 20:23]).abs().amax(-1).min() > 1e-6
    with pytest.raises(TypeError, match="new_caches"):
        lm(tokens, kv_caches=lm.decoder.new_caches())


@pytest.mark.parametrize(("width", "window"), [(0, 0.0), (5, 0.0), (5, 0.5)])
def test_token_shift_puts_every_residue_in_one_dilated_hop(width, window):
    """One layer, segments 4 and 16 at rates 1 and 4: the query at 15 reaches rows 12-15 (its
    segment) and, through the rate-4 branch, only rows 3, 7, 11 of its own residue. Token 2 is out
    of reach without a shift; with one of width 5, row 3 carries it (learned weights, or the fixed
    window channels alone, the learned ones left at zero)."""
    torch.manual_seed(0)
    lm = LongNetLM(61, d_model=32, nhead=4, num_layers=1, dim_feedforward=64, segment_lengths=[4, 16],
                   dilation_rates=[1, 4], token_shift=width, token_shift_window=window)  # fmt: skip
    lm = lm.double().eval()
    if width and not window:
        with torch.no_grad():
            lm.token_shift.weight.normal_(generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(0, 61, (1, 16))

    def moved(position: int) -> float:  # how much the query's logits move with that token
        changed = tokens.clone()
        changed[0, position] = (changed[0, position] + 1) % 61
        return (lm(tokens)[0, 15] - lm(changed)[0, 15]).abs().max().item()

    assert moved(3) > 1e-6  # its own residue: in reach either way
    if width:
        assert moved(2) > 1e-6
    else:
        assert moved(2) == 0.0


@pytest.mark.parametrize("window", [0.0, 0.5])
def test_token_shift_adds_nothing_from_padding(window):
    lm = shifted_lm(window=window)
    tokens = torch.randint(0, 61, (2, 20))
    padding = torch.zeros(2, 20, dtype=torch.bool)
    padding[0, :5] = True  # left padding: the shift would carry it into the first real tokens
    other = tokens.masked_scatter(padding, torch.randint(0, 61, (5,)))
    logits, logits_other = lm(tokens, key_padding_mask=padding), lm(other, key_padding_mask=padding)
    torch.testing.assert_close(logits[~padding], logits_other[~padding], rtol=1e-12, atol=1e-12)


def test_token_shift_starts_as_the_model_without_and_is_validated():
    torch.manual_seed(0)
    plain = LongNetLM(61, **TINY).double().eval()
    torch.manual_seed(0)
    with_shift = LongNetLM(61, token_shift=4, **TINY).double().eval()
    with torch.no_grad():
        with_shift.load_state_dict(plain.state_dict(), strict=False)
    tokens = torch.randint(0, 61, (2, 25))
    assert torch.equal(with_shift(tokens), plain(tokens))
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="token_shift"):
            LongNetLM(61, token_shift=bad, **TINY)
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match=r"token_shift_window must be a share in \[0, 1\]"):
            LongNetLM(61, token_shift=4, token_shift_window=bad, **TINY)
    with pytest.raises(TypeError, match="token_shift_window must be a number"):
        LongNetLM(61, token_shift=4, token_shift_window="half", **TINY)
    with pytest.raises(ValueError, match="needs a token shift of width >= 2"):
        LongNetLM(61, token_shift=0, token_shift_window=0.5, **TINY)
    windowed = LongNetLM(61, token_shift=4, token_shift_window=0.5, **TINY)
    assert windowed.token_shift.window_share == 0.5
    assert set(windowed.state_dict()) == set(with_shift.state_dict())  # the window is not saved: fixed


def test_sampling_is_reproducible_and_top_k_one_is_greedy():
    lm = tiny_lm()
    prompt = torch.randint(0, 61, (3, 4))
    runs = [lm.generate(prompt, 12, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]  # fmt: skip
    assert torch.equal(*runs)
    greedy = lm.generate(prompt, 12, temperature=0)
    assert torch.equal(lm.generate(prompt, 12, temperature=1.5, top_k=1), greedy)


def test_generate_rejects_bad_arguments():
    lm = tiny_lm()
    prompt = torch.zeros(1, 2, dtype=torch.long)
    bad = [(dict(max_new_tokens=-1), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
           (dict(top_k=0), "top_k")]  # fmt: skip
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            lm.generate(prompt, **({"max_new_tokens": 3} | kwargs))
    with pytest.raises(ValueError, match="dense"):
        tiny_lm(attention="dense").generate(prompt, 3)


def test_dense_attention_lm_equals_dilated_with_one_full_branch():
    dense = tiny_lm(attention="dense")
    one_branch = tiny_lm(segment_lengths=[64], dilation_rates=[1])
    one_branch.load_state_dict(dense.state_dict())
    tokens = torch.randint(0, 61, (2, 30))
    torch.testing.assert_close(dense(tokens), one_branch(tokens), rtol=1e-10, atol=1e-10)


def test_tied_embeddings_share_one_matrix():
    lm = LongNetLM(61, tie_embeddings=True, **TINY)
    assert lm.lm_head.weight is lm.embedding.weight
    untied = LongNetLM(61, **TINY)
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in lm.parameters()) == 61 * 32


def test_magneto_gain_of_a_decoder_only_stack():
    torch.manual_seed(0)
    lm = LongNetLM(61, d_model=256, nhead=4, num_layers=6, dim_feedforward=512, segment_lengths=[8],
                   dilation_rates=[1])  # fmt: skip
    gamma = math.sqrt(math.log(12))
    layer = lm.decoder.layers[0]
    xavier = math.sqrt(2 / (256 + 256))
    assert abs(layer.self_attn.v_proj.weight.std().item() / (gamma * xavier) - 1) < 0.03
    assert abs(layer.self_attn.q_proj.weight.std().item() / xavier - 1) < 0.03
    assert abs(layer.ffn.fc1.weight.std().item() / (gamma * math.sqrt(2 / (256 + 512))) - 1) < 0.03


def test_encoder_decoder_forward_backward_and_memory_padding():
    torch.manual_seed(0)
    model = LongNet(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
                    segment_lengths=[4, 8], dilation_rates=[1, 2], dropout=0.0).double()  # fmt: skip
    src = torch.randn(2, 13, 32, dtype=torch.float64)
    tgt = torch.randn(2, 9, 32, dtype=torch.float64, requires_grad=True)
    padding = torch.zeros(2, 13, dtype=torch.bool)
    padding[1, 10:] = True
    out = model(src, tgt, src_key_padding_mask=padding)
    assert out.shape == (2, 9, 32)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # padded memory tokens change nothing
    src_changed = src.clone()
    src_changed[1, 10:] = 100.0
    torch.testing.assert_close(model(src_changed, tgt, src_key_padding_mask=padding), out)
    # the decoder is causal: changing target token 5 leaves outputs 0..4 unchanged
    tgt_changed = tgt.detach().clone()
    tgt_changed[:, 5] += 1.0
    torch.testing.assert_close(model(src, tgt_changed, src_key_padding_mask=padding)[:, :5], out[:, :5])


def test_encoder_outputs_at_valid_positions_ignore_padding_content():
    torch.manual_seed(0)
    encoder = LongNetEncoder(2, 32, 4, dim_feedforward=64, segment_lengths=[4, 8], dilation_rates=[1, 2],
                             positions="rope", dropout=0.0).double()  # fmt: skip
    x = torch.randn(2, 15, 32, dtype=torch.float64)
    padding = torch.zeros(2, 15, dtype=torch.bool)
    padding[0, 11:] = True
    changed = x.clone()
    changed[0, 11:] = -7.0
    torch.testing.assert_close(encoder(changed, padding)[0, :11], encoder(x, padding)[0, :11])


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = LongNetEncoderLayer(32, 4, 64, [4, 8], [1, 2], dropout=0.0, dtype=torch.float64)
    checkpointed = LongNetEncoderLayer(32, 4, 64, [4, 8], [1, 2], dropout=0.0, checkpoint_activations=True,
                                       dtype=torch.float64)  # fmt: skip
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    grads = []
    for layer in (plain, checkpointed):
        layer.train()
        layer(x).square().sum().backward()
        grads.append([p.grad for p in layer.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_tokens=0), "num_tokens"),
        (dict(nhead=5), "nhead must be a positive divisor of d_model=32"),
        (dict(d_model=-4), "d_model"),
        (dict(num_layers=0), "num_layers"),
        (dict(dim_feedforward=0), "dim_feedforward"),
        (dict(dropout=1.2), "dropout"),
        (dict(segment_lengths=[4, 8], dilation_rates=[1]), "segment_lengths and dilation_rates"),
        (dict(dilation_rates=[1, 2, 32]), "dilation rate may not exceed"),
        (dict(activation="tanh"), "activation must be one of"),
        (dict(positions="xpos", segment_lengths=[4, 6, 16]), "divide the largest"),
    ],
)
def test_bad_configuration_raises_value_error_naming_the_field(kwargs, match):
    args = dict(num_tokens=61) | TINY | kwargs
    with pytest.raises(ValueError, match=match):
        LongNetLM(**args)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("positions", ["rope", "xpos"])
def test_cuda_bf16_forward_and_cached_decoding_within_twice_the_reference_error(positions):
    """bf16 logits on the fused kernels, full and cached, vs float64: error <= 2x the bf16 reference's."""
    torch.manual_seed(0)
    kwargs = dict(d_model=256, nhead=4, num_layers=2, dim_feedforward=512, segment_lengths=[64, 128, 256],
                  dilation_rates=[1, 2, 4], positions=positions)  # fmt: skip
    exact = LongNetLM(97, **kwargs).double().cuda().eval()
    low_fused = LongNetLM(97, **kwargs).cuda().eval()
    low_fused.load_state_dict(exact.state_dict())
    low_fused.bfloat16()
    low_reference = LongNetLM(97, backend="reference", **kwargs).cuda().eval()
    low_reference.load_state_dict(low_fused.state_dict())
    tokens = torch.randint(0, 97, (2, 600), device="cuda")
    with torch.no_grad():
        truth = exact(tokens)
        errors = {}
        for name, logits in (("fused", low_fused(tokens)), ("reference", low_reference(tokens))):
            errors[name] = ((logits.double() - truth).norm() / truth.norm()).item()
        caches = low_fused.decoder.new_caches()
        steps = [low_fused(tokens[:, :500], kv_caches=caches)[:, -1]]
        steps += [low_fused(tokens[:, t : t + 1], kv_caches=caches)[:, -1] for t in range(500, 600)]
        cached = torch.stack(steps, dim=1).double()
        errors["cached"] = ((cached - truth[:, 499:]).norm() / truth[:, 499:].norm()).item()
    assert errors["fused"] <= 2 * errors["reference"] + 1e-4, errors
    assert errors["cached"] <= 2 * errors["reference"] + 1e-4, errors


@pytest.mark.cuda
@cuda
def test_cuda_bf16_training_step_of_dilated_and_dense_models_is_finite():
    torch.manual_seed(0)
    for attention in ("dilated", "dense"):
        lm = LongNetLM(97, d_model=256, nhead=4, num_layers=2, dim_feedforward=512, attention=attention,
                       segment_lengths=[256, 512], dilation_rates=[1, 2],
                       checkpoint_activations=True).cuda()  # fmt: skip
        tokens = torch.randint(0, 97, (1, 2000), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = lm(tokens)
        loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), tokens[0, 1:])
        loss.backward()
        assert torch.isfinite(loss) and abs(loss.item() - math.log(97)) < 1.0
        assert all(torch.isfinite(p.grad).all() for p in lm.parameters() if p.grad is not None)


def _expert_state(layer, expert: int) -> dict:
    """A multiway layer's state dict as a single-way layer's: expert `expert` of every multiway part."""
    state = {}
    for name, value in layer.state_dict().items():
        if ".experts." in name:  # a stack (K, *S) of the experts' values
            prefix, rest = name.split(".experts.", 1)
            state[f"{prefix}.{rest}"] = value[expert]
        else:
            state[name] = value
    return state


def test_multiway_layer_routes_each_token_to_its_modality_experts():
    torch.manual_seed(0)
    kwargs = dict(dim_feedforward=64, segment_lengths=[4, 8], dilation_rates=[1, 2], dropout=0.0,
                  positions="rope", dtype=torch.float64)  # fmt: skip
    multiway = LongNetEncoderLayer(32, 4, num_ways=3, **kwargs)
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    for expert in range(3):
        single = LongNetEncoderLayer(32, 4, **kwargs)
        single.load_state_dict(_expert_state(multiway, expert))
        ids = torch.full((2, 13), expert)
        torch.testing.assert_close(multiway(x, modality_ids=ids), single(x), rtol=1e-12, atol=1e-12)
    # mixed ids: gradients reach the experts that own tokens (0 and 2), never expert 1
    ids = torch.randint(0, 2, (2, 13)) * 2
    multiway(x, modality_ids=ids).square().sum().backward()
    for name, parameter in multiway.named_parameters():
        if ".experts." in name:  # the stacks (3, *S): expert 1's slice has a zero gradient
            grad = parameter.grad
            assert not grad[1].any() and grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0, name
    with pytest.raises(ValueError, match="modality_ids"):
        multiway(x)


def test_larger_embeddings_learn_associative_recall_within_a_thousand_steps(one_thread):
    """The `embedding_std` option's claim: on recall at CPU scale (64 tokens, 16 pairs, 8 queries,
    32 values; chance 1/32) the dense LM with embeddings at std 4 (untied) matches keys within 1,000
    steps; with the default std d_model^-0.5 it stays near chance for 6,000 steps."""
    torch.manual_seed(0)
    config = RecallConfig(
        length=64, num_pairs=16, num_queries=8, num_keys=32, num_values=32, num_fillers=4, seed=1
    )
    data = AssociativeRecall(config, 10**6)
    model = LongNetLM(
        config.vocab_size, d_model=64, nhead=4, num_layers=2, dim_feedforward=128, segment_lengths=[16, 64],
        dilation_rates=[1, 4], attention="dense", embedding_std=4.0,
    )  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

    def batch(index: int) -> dict:
        return torch.utils.data.default_collate([data[index * 64 + i] for i in range(64)])

    for step in range(1000):
        drawn = batch(step)
        tokens, targets = drawn["tokens"], drawn["targets"]
        loss = F.cross_entropy(model(tokens).transpose(1, 2), targets, ignore_index=IGNORE_INDEX)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    held_out = batch(10**4)
    with torch.no_grad():
        predictions = model(held_out["tokens"]).argmax(-1)
    asked = held_out["targets"] != IGNORE_INDEX
    assert (predictions[asked] == held_out["targets"][asked]).float().mean() > 0.9


@pytest.mark.parametrize("field", ["embedding_std", "gamma_init"])
@pytest.mark.parametrize("value", [0.0, -1.0, True])
def test_initial_scales_must_be_positive_numbers(field, value):
    with pytest.raises(ValueError, match=field):
        LongNetLM(16, d_model=16, nhead=2, num_layers=1, dim_feedforward=32, **{field: value})


def test_initial_scales_reach_the_embedding_and_the_layers():
    kwargs = dict(
        d_model=32, nhead=2, num_layers=2, dim_feedforward=64, segment_lengths=[8], dilation_rates=[1]
    )
    torch.manual_seed(0)
    default = LongNetLM(512, **kwargs)
    torch.manual_seed(0)
    scaled = LongNetLM(512, embedding_std=4.0, gamma_init=0.25, **kwargs)
    assert scaled.embedding.weight.std().item() == pytest.approx(4.0, rel=0.05)
    assert default.embedding.weight.std().item() == pytest.approx(32**-0.5, rel=0.05)
    gain = default.decoder.layers[0].ffn.fc1.weight.std() / scaled.decoder.layers[0].ffn.fc1.weight.std()
    assert gain.item() == pytest.approx(math.sqrt(math.log(4)) / 0.25, rel=0.05)  # MAGNETO's sqrt(log 2L)
