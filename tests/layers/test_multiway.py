"""MultiwayNetwork against a per-token twin: values, gradients, routing cost, copies, errors."""

from collections import Counter

import pytest
import torch
from devices import DEVICES
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mmlongnet.layers.multiway import MultiwayNetwork, MultiwayRouting, route, route_chain, route_parallel
from mmlongnet.training import COMPILE_OPTIONS

DIM, HIDDEN, OUT = 6, 10, 4  # token features in, FFN hidden width, Linear features out (!= DIM)


def make_expert(kind):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(DIM, OUT, dtype=torch.float64)
    if kind == "ffn":
        return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, DIM)).double()
    if kind == "layernorm":
        norm = nn.LayerNorm(DIM, dtype=torch.float64)
        with torch.no_grad():  # LayerNorm resets to weight 1, bias 0: give the template other values
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
        return norm
    raise ValueError(kind)


def perturb_norms(net):
    """LayerNorm copies reset to (1, 0) and would all be equal: make each expert distinct."""
    with torch.no_grad():
        for e in range(net.num_ways):
            for p in net.expert_parameters(e).values():
                p.add_(0.1 * e * torch.randn_like(p))


class CountOps(TorchDispatchMode):
    """Counts the ops dispatched inside it, by name."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def per_token_twin(net, x, ids):
    """Slow twin: every token x[b, l] through expert ids[b, l], one call per token."""
    call = net.expert_function()
    rows = [
        torch.stack([call(int(ids[b, pos]), x[b, pos]) for pos in range(x.shape[1])])
        for b in range(x.shape[0])
    ]
    return torch.stack(rows)  # (B, L, *F_out)


def random_ids(num_ways, batch=3, seq_len=9, seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, num_ways, (batch, seq_len), generator=generator)
    if num_ways > 1:
        ids[0] = torch.arange(seq_len) % num_ways  # row 0 interleaves every modality
        ids[1, : seq_len // 2] = num_ways - 1  # row 1: a run of the last modality, then random
    return ids


@pytest.mark.parametrize("kind", ["linear", "ffn", "layernorm"])
@pytest.mark.parametrize("num_ways", [1, 2, 3, 5])
def test_matches_per_token_twin(kind, num_ways):
    net = MultiwayNetwork(make_expert(kind), num_ways)
    if kind == "layernorm":
        perturb_norms(net)
    ids = random_ids(num_ways)
    x = torch.randn(*ids.shape, DIM, dtype=torch.float64)
    out = net(x, ids)
    expected_features = OUT if kind == "linear" else DIM
    assert out.shape == (*ids.shape, expected_features)
    torch.testing.assert_close(out, per_token_twin(net, x, ids), rtol=1e-12, atol=1e-12)


def test_int32_ids_and_extra_feature_dims():
    net = MultiwayNetwork(make_expert("linear"), 3)
    ids = random_ids(3).to(torch.int32)
    x = torch.randn(*ids.shape, 2, DIM, dtype=torch.float64)  # (B, L, 2, E): two vectors per token
    out = net(x, ids)
    assert out.shape == (*ids.shape, 2, OUT)
    torch.testing.assert_close(out, per_token_twin(net, x, ids), rtol=1e-12, atol=1e-12)


def test_gradients_reach_only_the_owning_experts():
    net = MultiwayNetwork(make_expert("ffn"), 3)
    ids = random_ids(2) * 2  # experts 0 and 2 only, interleaved
    assert set(ids.unique().tolist()) == {0, 2}
    x = torch.randn(*ids.shape, DIM, dtype=torch.float64, requires_grad=True)
    cotangent = torch.randn(*ids.shape, DIM, dtype=torch.float64)

    (net(x, ids) * cotangent).sum().backward()
    for p in net.parameters():  # the stacks (3, *S): expert 1 never ran, its slice is zero
        assert not p.grad[1].any() and p.grad[0].any() and p.grad[2].any()
    grads = {name: p.grad.clone() for name, p in net.named_parameters()}
    grad_x = x.grad.clone()

    net.zero_grad(set_to_none=True)
    x.grad = None
    (per_token_twin(net, x, ids) * cotangent).sum().backward()
    twin = {name: p.grad for name, p in net.named_parameters()}
    assert sorted(grads) == sorted(twin)  # the Sequential's two Linear layers, 0 and 2
    assert sorted(grads) == ["experts.0.bias", "experts.0.weight", "experts.2.bias", "experts.2.weight"]
    for name in grads:
        torch.testing.assert_close(grads[name], twin[name], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_x, x.grad, rtol=1e-12, atol=1e-12)


def record_inputs(net):
    """A forward pre-hook that keeps each expert's inputs: seen[e] is a list of tensors. The expert
    is known by the slice of the stacks it runs with (the template's first parameter)."""
    seen = [[] for _ in range(net.num_ways)]
    first = next(iter(net.expert_parameters(0)))
    slots = [net.expert_parameters(e)[first].data_ptr() for e in range(net.num_ways)]

    owner, _, attribute = first.rpartition(".")

    def keep(module, args):  # inside the call, the parameter is expert e's slice
        expert = slots.index(getattr(module.get_submodule(owner), attribute).data_ptr())
        seen[expert].append(args[0].detach().clone())

    net.experts.register_forward_pre_hook(keep)
    return seen


def test_each_expert_runs_once_on_exactly_its_tokens():
    net = MultiwayNetwork(make_expert("linear"), 4)
    seen = record_inputs(net)
    ids = torch.tensor([[0, 3, 3, 0, 3], [3, 0, 0, 0, 3]])  # experts 1 and 2 get no token
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    net(x, ids)
    assert [len(calls) for calls in seen] == [1, 0, 0, 1]
    assert seen[0][0].shape == (5, DIM) and seen[3][0].shape == (5, DIM)
    torch.testing.assert_close(seen[0][0], x[ids == 0], rtol=0, atol=0)  # its rows, in token order
    torch.testing.assert_close(seen[3][0], x[ids == 3], rtol=0, atol=0)


def test_one_modality_calls_its_expert_on_the_whole_input():
    net = MultiwayNetwork(make_expert("linear"), 3)
    seen = record_inputs(net)
    ids = torch.full((2, 5), 2)
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    out = net(x, ids)
    assert [len(calls) for calls in seen] == [0, 0, 1]
    torch.testing.assert_close(seen[2][0], x, rtol=0, atol=0)  # (B, L, E), no gather
    torch.testing.assert_close(out, net.expert_function()(2, x), rtol=0, atol=0)


def test_single_way_is_the_module_itself():
    module = make_expert("ffn")
    net = MultiwayNetwork(module, 1)
    seen = record_inputs(net)
    x = torch.randn(2, 7, DIM, dtype=torch.float64)
    out = net(x, torch.zeros(2, 7, dtype=torch.long))
    assert len(seen[0]) == 1 and seen[0][0].shape == x.shape
    torch.testing.assert_close(out, module(x), rtol=0, atol=0)


def test_empty_sequence_gives_empty_output_with_expert_features():
    net = MultiwayNetwork(make_expert("linear"), 3)
    out = net(torch.randn(2, 0, DIM, dtype=torch.float64), torch.zeros(2, 0, dtype=torch.long))
    assert out.shape == (2, 0, OUT) and out.dtype == torch.float64


def test_autocast_output_takes_the_experts_dtype():
    net = MultiwayNetwork(nn.Linear(DIM, OUT), 3)
    ids = random_ids(3)
    x = torch.randn(*ids.shape, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, ids)
        twin = per_token_twin(net, x, ids)
    assert out.dtype == twin.dtype == torch.bfloat16
    # Same products, fp32 accumulation in a different blocking: at most a rounding step of bf16 apart.
    torch.testing.assert_close(out.float(), twin.float(), rtol=2**-7, atol=1e-3)


def test_copies_are_independent_and_reinitialised():
    module = make_expert("ffn")
    net = MultiwayNetwork(module, 3)
    params = [net.expert_parameters(e) for e in range(3)]
    for name, p in module.named_parameters():
        torch.testing.assert_close(params[0][name], p, rtol=0, atol=0)  # way 0 keeps the template
        assert params[0][name] is not p
        for a in range(3):
            for b in range(a + 1, 3):
                assert not torch.equal(params[a][name], params[b][name]), (name, a, b)

    before = [{name: p.clone() for name, p in expert.items()} for expert in params]
    with torch.no_grad():
        params[1]["0.weight"].add_(1.0)
        module[0].weight.add_(1.0)  # the template is not shared either
    for e in (0, 2):
        for name, p in net.expert_parameters(e).items():
            torch.testing.assert_close(p, before[e][name], rtol=0, atol=0)
    torch.testing.assert_close(params[1]["0.weight"], before[1]["0.weight"] + 1.0, rtol=0, atol=0)


def test_parameters_are_one_stack_per_template_parameter_and_old_state_dicts_load():
    module = make_expert("ffn")
    net = MultiwayNetwork(module, 3)
    shapes = {name: tuple(p.shape) for name, p in net.named_parameters()}
    assert shapes == {f"experts.{name}": (3, *p.shape) for name, p in module.named_parameters()}
    for e in range(3):
        for name, p in net.expert_parameters(e).items():
            assert p.data_ptr() == net.experts.get_parameter(name)[e].data_ptr()  # a view, not a copy

    # the layout with one module per expert: keys experts.<e>.<name>
    old = {f"experts.{e}.{name}": p.clone() + e for e in range(3) for name, p in module.state_dict().items()}
    fresh = MultiwayNetwork(make_expert("ffn"), 3)
    fresh.load_state_dict(old)
    for e in range(3):
        for name, p in fresh.expert_parameters(e).items():
            torch.testing.assert_close(p, module.get_parameter(name) + e, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="experts.0.weight"):
        fresh.load_state_dict({k: v for k, v in old.items() if k != "experts.1.0.weight"})


def test_errors():
    net = MultiwayNetwork(make_expert("linear"), 3)
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(TypeError, match="integer dtype"):
        net(x, ids.float())
    with pytest.raises(TypeError, match="integer dtype"):
        net(x, ids.bool())
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 5, 6\)"):
        net(x, ids[:, :4])
    bad = ids.clone()
    bad[1, 3] = 3
    with pytest.raises(ValueError, match="found id 3 at batch row 1, position 3") as info:
        net(x, bad)
    assert "num_ways=3" in str(info.value)
    bad[1, 3] = 0
    bad[0, 4] = -1
    with pytest.raises(ValueError, match="found id -1 at batch row 0, position 4"):
        net(x, bad)
    with pytest.raises(ValueError, match="num_ways=0"):
        MultiwayNetwork(nn.Linear(2, 2), 0)
    with pytest.raises(TypeError, match="nn.Module"):
        MultiwayNetwork(lambda t: t, 2)
    assert "num_ways=3" in repr(net)


def test_reinitialisation_keeps_a_module_s_own_initialisation():
    from mmlongnet.layers import FeedForward

    torch.manual_seed(0)
    gamma = 3.0
    net = MultiwayNetwork(FeedForward(256, 1024, gamma_init=gamma), num_ways=3)
    xavier = (2 / (256 + 1024)) ** 0.5
    weights = [net.expert_parameters(e)["fc1.weight"] for e in range(3)]
    for weight in weights:
        assert abs(weight.std().item() / (gamma * xavier) - 1) < 0.03
    assert not torch.equal(weights[1], weights[2])


# --- routing built on the host -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "ffn", "layernorm"])
def test_host_routing_equals_the_per_token_twin_with_spare_capacity(kind):
    net = MultiwayNetwork(make_expert(kind), 3)
    perturb_norms(net)
    torch.manual_seed(1)
    x = torch.randn(2, 7, DIM, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 2, 2, 1, 0, 0, 2], [1, 1, 0, 2, 2, 0, 1]])
    routed = torch.ones_like(ids, dtype=torch.bool)
    routed[1, 5:] = False  # two padding tokens: no expert reads them, they come out as zeros
    capacities = [6, 9, 5]  # above the counts (4, 4, 4): spare rows read token 0, are discarded
    routing = MultiwayRouting.from_ids(ids, 3, routed=routed, capacities=capacities, fill=0)
    assert list(routing.capacities) == capacities and len(routing.gather) == sum(capacities)
    out = net(x, routing)
    expected = per_token_twin(net, x, ids)
    torch.testing.assert_close(out[routed], expected[routed], rtol=0, atol=1e-12)
    assert torch.equal(out[~routed], torch.zeros_like(out[~routed]))
    assert routing.modality_ids[1, 5:].tolist() == [0, 0]
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    x_grad, expert_grads = x.grad.clone(), [p.grad.clone() for p in net.parameters()]
    x.grad = None
    net.zero_grad()
    (expected * grad * routed[..., None]).sum().backward()
    torch.testing.assert_close(x.grad, x_grad, rtol=0, atol=1e-12)
    for got, want in zip(expert_grads, [p.grad for p in net.parameters()], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_host_routing_equals_device_routing_and_skips_experts_without_capacity():
    net = MultiwayNetwork(make_expert("linear"), 3)
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    ids = torch.tensor([[0, 0, 2, 2, 0], [2, 0, 0, 2, 2]])  # no token of expert 1
    seen = record_inputs(net)
    routing = MultiwayRouting.from_ids(ids, 3, capacities=[5, 0, 6])
    torch.testing.assert_close(net(x, routing), net(x, ids), rtol=0, atol=1e-12)
    assert [len(calls) for calls in seen] == [2, 0, 2]


def test_host_routing_errors_name_the_problem():
    ids = torch.tensor([[0, 3]])
    with pytest.raises(ValueError, match=r"\[0, num_ways=2\).*got 3"):
        MultiwayRouting.from_ids(ids, 2)
    with pytest.raises(ValueError, match="capacity 0 of expert 0 is below its 1 tokens"):
        MultiwayRouting.from_ids(torch.tensor([[0, 1]]), 2, capacities=[0, 1])
    net = MultiwayNetwork(make_expert("linear"), 2)
    routing = MultiwayRouting.from_ids(torch.tensor([[0, 1]]), 2)
    with pytest.raises(ValueError, match="routing is for 2 experts over"):
        net(torch.randn(1, 3, DIM, dtype=torch.float64), routing)


def test_host_routing_launches_one_gather_one_concatenation_and_one_scatter_for_any_number_of_experts():
    for num_ways in (2, 5):
        net = MultiwayNetwork(make_expert("linear"), num_ways)
        ids = torch.arange(3 * 10).reshape(3, 10) % num_ways
        routing = MultiwayRouting.from_ids(ids, num_ways)
        with CountOps() as counted:
            net(torch.randn(3, 10, DIM, dtype=torch.float64), routing)
        assert counted.ops["index_select"] == 1 and counted.ops["index_copy_"] == 1
        assert counted.ops["cat"] == 1 and counted.ops["addmm"] == num_ways


def test_chained_and_parallel_routing_equal_routing_each_module_and_gather_once():
    torch.manual_seed(3)
    norm = MultiwayNetwork(make_expert("layernorm"), 3)
    perturb_norms(norm)
    ffn, proj = MultiwayNetwork(make_expert("ffn"), 3), MultiwayNetwork(make_expert("linear"), 3)
    ids = torch.tensor([[0, 2, 2, 1, 0, 0, 2], [1, 1, 0, 2, 2, 0, 1]])
    routed = torch.ones_like(ids, dtype=torch.bool)
    routed[1, 6] = False
    routing = MultiwayRouting.from_ids(ids, 3, routed=routed, capacities=[6, 3, 7])
    x = torch.randn(2, 7, DIM, dtype=torch.float64, requires_grad=True)
    chained = route_chain((norm, ffn), x, routing)
    parallel = route_parallel((norm, proj), x, routing)
    expected_chain = route(ffn, route(norm, x, routing), routing)
    expected_parallel = [route(norm, x, routing), route(proj, x, routing)]
    torch.testing.assert_close(chained, expected_chain, rtol=0, atol=1e-12)
    for got, want in zip(parallel, expected_parallel, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    params = [x, *norm.parameters(), *ffn.parameters(), *proj.parameters()]
    got = torch.autograd.grad(chained.square().sum() + sum(y.sin().sum() for y in parallel), params)
    want = torch.autograd.grad(
        expected_chain.square().sum() + sum(y.sin().sum() for y in expected_parallel),
        params,
        allow_unused=True,
    )
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    with CountOps() as counted:
        route_chain((norm, ffn), x, routing)
        route_parallel((norm, proj), x, routing)
    assert counted.ops["index_select"] == 2 and counted.ops["index_copy_"] == 2
    # device ids (no host routing): each module on its own, the same values
    torch.testing.assert_close(route_chain((norm, ffn), x, ids)[routed], chained[routed], rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_routing_gives_the_eager_values_and_gradients(device):
    """Norm then FFN experts, host-routed, compiled (fullgraph, `COMPILE_OPTIONS`) against eager:
    float32 values and gradients, and finite gradients under bf16 autocast. On a GPU with as many
    tokens as a training batch (19,200: the compiled backward then reduces the experts' norm
    gradients over their rows in split, fused reductions)."""
    from mmlongnet.layers import FeedForward

    torch.manual_seed(0)
    batch, seq_len, width = (64, 300, 64) if device == "cuda" else (8, 50, 16)
    norm = MultiwayNetwork(nn.LayerNorm(width), 3).to(device)
    ffn = MultiwayNetwork(FeedForward(width, 4 * width), 3).to(device)
    perturb_norms(norm)
    params = [*norm.parameters(), *ffn.parameters()]
    ids = torch.randint(0, 3, (batch, seq_len))
    counts = torch.bincount(ids.flatten(), minlength=3).tolist()
    routing = MultiwayRouting.from_ids(ids, 3, capacities=[n + 7 for n in counts]).to(device)  # spare rows
    x = torch.randn(batch, seq_len, width, device=device)

    def chain(x):
        return route_chain((norm, ffn), x, routing)

    compiled = torch.compile(chain, fullgraph=True, options=COMPILE_OPTIONS)  # as MultimodalClassifier does
    for autocast in (False, True):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            eager, graph = chain(x), compiled(x)
        eager_grads = torch.autograd.grad(eager.float().square().mean(), params)
        graph_grads = torch.autograd.grad(graph.float().square().mean(), params)
        assert all(torch.isfinite(g).all() for g in graph_grads)
        if not autocast:
            torch.testing.assert_close(graph, eager, rtol=1e-4, atol=1e-5)
            for got, want in zip(graph_grads, eager_grads, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
