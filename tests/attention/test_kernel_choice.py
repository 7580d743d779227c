"""Which dense kernel runs each call (no plan for a new shape, bounded memory, refusals that expire),
and the op's promise not to read device values on the host."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mmlongnet.attention import dilated as dilated_module
from mmlongnet.attention import dilated_attention, kernels
from mmlongnet.attention.kernels import Kernel, KernelSelector


class FakeKernel:
    """A kernel's forward and backward as plain callables: records each call, raises the errors
    queued in `failures` first (one per call), then returns its name."""

    def __init__(
        self, name: str, plans_per_shape: bool = False, takes_bias: bool = True, compiles: bool = False
    ):
        self.calls: list[tuple] = []
        self.failures: list[Exception] = []
        self.kernel = Kernel(name, self._call, self._call, takes_bias, plans_per_shape, compiles)

    def _call(self, *args):
        self.calls.append(args)
        if self.failures:
            raise self.failures.pop(0)
        return self.kernel.name


def fakes():
    """A planning kernel first (as cuDNN in the CUDA chain), then two plan-free ones."""
    planner, flash, efficient = FakeKernel("planner", True), FakeKernel("flash"), FakeKernel("efficient")
    return planner, flash, efficient, [planner.kernel, flash.kernel, efficient.kernel]


def test_a_new_shape_never_plans_and_a_recurring_one_is_promoted():
    planner, flash, _, chain = fakes()
    selector = KernelSelector(promote_after=3)
    used = [selector.run(chain, "forward", ("shape", 1)) for _ in range(4)]
    assert used == ["flash", "flash", "planner", "planner"]
    assert selector.run(chain, "forward", ("shape", 2)) == "flash"  # counted per shape
    assert selector.run(chain, "backward", ("shape", 1)) == "flash"  # and per method
    assert len(planner.calls) == 2 and len(flash.calls) == 4


@pytest.fixture
def capturing(monkeypatch) -> list[bool]:
    """[whether a CUDA graph is being captured], as the selector sees it; set it to switch."""
    state = [False]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state[0])
    return state


def test_no_shape_is_promoted_while_a_cuda_graph_is_captured(capturing):
    _, _, _, chain = fakes()
    selector = KernelSelector(promote_after=2)
    assert selector.run(chain, "forward", ("a",)) == "flash"  # eager, first call
    capturing[0] = True
    assert selector.run(chain, "forward", ("a",)) == "flash"  # would be promoted now: not in a capture
    assert selector.run(chain, "forward", ("b",)) == "flash"
    capturing[0] = False
    assert selector.run(chain, "forward", ("a",)) == "planner"  # eager again: plans
    capturing[0] = True
    assert selector.run(chain, "forward", ("a",)) == "planner"  # planned before the capture


def test_a_compiling_kernel_records_only_the_shapes_it_ran_before_the_capture(capturing):
    compiler = FakeKernel("compiler", compiles=True)
    _, flash, _, chain = fakes()
    chain = [compiler.kernel, *chain]
    selector = KernelSelector(promote_after=1)
    assert selector.run(chain, "forward", ("ran",)) == "compiler"  # eager: compiles, and is noted
    capturing[0] = True
    assert selector.run(chain, "forward", ("ran",)) == "compiler"  # compiled before: recorded
    assert selector.run(chain, "backward", ("ran",)) == "flash"  # its backward never ran: skipped
    assert selector.run(chain, "forward", ("new",)) == "flash"  # new and not promoted in a capture
    assert ("compiler", "forward", ("new",)) not in selector.ran  # nothing noted inside a capture
    capturing[0] = False
    selector.clear()
    assert not selector.ran


def test_recorded_calls_take_flash_attn_at_any_size(monkeypatch, capturing):
    flash = FakeKernel("flash_attn_4", takes_bias=False, compiles=True).kernel
    monkeypatch.setattr(dilated_module, "flash_kernel", lambda device, dtype: flash)
    monkeypatch.setattr(dilated_module, "SELECTOR", KernelSelector())
    small = torch.empty(2, 16, 2, 8)  # (b, c, h, D): far below FLASH_MIN_WORK
    assert flash not in dilated_module._kernels(small, False, "flash_attn")  # eager: host work counts
    with dilated_module.SELECTOR.promoting():  # the eager step before a recording
        assert dilated_module._kernels(small, False, "flash_attn")[0] is flash
        assert flash not in dilated_module._kernels(small, True, "flash_attn")  # a key bias: never
    capturing[0] = True
    assert dilated_module._kernels(small, False, "flash_attn")[0] is flash
    assert flash not in dilated_module._kernels(small, False, "sdpa")


def test_shapes_promoted_at_once_before_a_capture_keep_their_plans_in_it(capturing):
    planner, _, _, chain = fakes()
    selector = KernelSelector(promote_after=5)
    assert selector.run(chain, "forward", ("seen",)) == "flash"
    with selector.promoting():
        assert selector.run(chain, "forward", ("new",)) == "planner"  # plans at its first call
        assert selector.run(chain, "backward", ("seen",)) == "planner"
    assert not selector.promote_now
    capturing[0] = True
    assert selector.run(chain, "forward", ("new",)) == "planner"  # the capture keeps the plan
    assert selector.run(chain, "backward", ("seen",)) == "planner"
    assert selector.run(chain, "forward", ("seen",)) == "flash"  # not promoted: 2 calls of 5
    capturing[0] = False
    assert selector.run(chain, "forward", ("other",)) == "flash"  # outside it, counted as usual
    assert len(planner.calls) == 4


def test_promoting_nests_and_ends_where_it_began():
    planner, _, _, chain = fakes()
    selector = KernelSelector(promote_after=5)
    with selector.promoting():
        with selector.promoting():  # e.g. a compiled model's first call inside a promoted warm-up
            assert selector.run(chain, "forward", ("a",)) == "planner"
        assert selector.promote_now  # the outer context still promotes
        assert selector.run(chain, "forward", ("b",)) == "planner"
    assert not selector.promote_now
    assert selector.run(chain, "forward", ("c",)) == "flash"
    with pytest.raises(KeyError), selector.promoting():
        raise KeyError("an error inside ends the promotion too")
    assert not selector.promote_now and len(planner.calls) == 2


def test_the_cuda_chain_runs_a_new_shape_on_flash_or_memory_efficient_then_cudnn():
    selector = KernelSelector(promote_after=2)
    cuda = torch.device("cuda")  # kernel_chain only reads the device type: no GPU needed
    bf16 = kernels.kernel_chain(cuda, torch.bfloat16, has_bias=False)
    bf16_bias = kernels.kernel_chain(cuda, torch.bfloat16, has_bias=True)
    fp32 = kernels.kernel_chain(cuda, torch.float32, has_bias=False)
    names = lambda chain, key: [k.name for k in selector.order(chain, "forward", key)]  # noqa: E731
    assert names(bf16, ("a",)) == ["cuda_flash", "efficient", "cudnn"]
    assert names(bf16_bias, ("b",)) == ["efficient", "cudnn"]
    assert names(fp32, ("c",)) == ["efficient"]
    assert names(bf16, ("a",)) == ["cudnn", "cuda_flash", "efficient"]  # its second call
    assert [k.name for k in kernels.KERNELS.values() if k.plans_per_shape] == ["cudnn"]
    assert kernels.kernel_chain(torch.device("cpu"), torch.bfloat16, True) == [kernels.CPU]
    one_row = kernels.kernel_chain(cuda, torch.bfloat16, has_bias=True, rows=1)  # cuDNN refuses it
    assert [k.name for k in one_row] == ["efficient"]


def test_a_planning_kernel_runs_a_new_shape_that_every_plan_free_kernel_refuses():
    planner, flash, efficient, chain = fakes()
    flash.failures.append(RuntimeError("head dim too large"))
    efficient.failures.append(RuntimeError("head dim too large"))
    with pytest.warns(UserWarning, match="refused"):
        assert KernelSelector().run(chain, "forward", ("shape",)) == "planner"
    assert len(planner.calls) == 1


def test_a_shape_the_planning_kernel_refuses_falls_to_the_next_kernel():
    planner, flash, _, chain = fakes()
    selector = KernelSelector(promote_after=1, retry_after=5)
    planner.failures.append(RuntimeError("cuDNN: no plan for this shape"))
    with pytest.warns(UserWarning, match="planner kernel refused a forward call"):
        assert selector.run(chain, "forward", ("shape",)) == "flash"
    assert selector.refusals[("planner", "forward", ("shape",))] == 5
    assert selector.run(chain, "forward", ("other",)) == "planner"  # only that shape is refused


def test_a_refusal_expires_after_retry_after_calls_and_warns_once(recwarn):
    planner, flash, _, chain = fakes()
    selector = KernelSelector(promote_after=1, retry_after=3)
    key = ("shape",)
    planner.failures += [RuntimeError("transient"), RuntimeError("transient again")]
    used = [selector.run(chain, "forward", key) for _ in range(10)]
    # refused on call 1, skipped on 2-4, refused again on its retry at 5, skipped 6-8, used from 9
    assert used == ["flash"] * 8 + ["planner"] * 2
    assert len(planner.calls) == 4 and len(flash.calls) == 8
    assert [str(w.message).split(";")[0] for w in recwarn] == [
        "dilated_attention: the planner kernel refused a forward call of shape ('shape',)"
    ]
    assert not selector.refusals  # accepted on its retry: forgotten


def test_out_of_memory_propagates_and_is_no_refusal():
    planner, flash, _, chain = fakes()
    selector = KernelSelector(promote_after=1)
    planner.failures.append(torch.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(torch.OutOfMemoryError):
        selector.run(chain, "forward", ("shape",))
    assert not flash.calls and not selector.refusals
    assert selector.run(chain, "forward", ("shape",)) == "planner"


def test_a_single_kernel_chain_raises_its_own_error():
    cpu = FakeKernel("cpu")
    cpu.failures.append(RuntimeError("bad input"))
    selector = KernelSelector()
    with pytest.raises(RuntimeError, match="^bad input$"):
        selector.run([cpu.kernel], "backward", ("shape",))
    assert not selector.refusals
    assert selector.run([cpu.kernel], "backward", ("shape",)) == "cpu"


def test_a_call_no_kernel_accepts_names_every_refusal():
    planner, flash, efficient, chain = fakes()
    for fake in (planner, flash, efficient):
        fake.failures.append(RuntimeError(f"{fake.kernel.name} says no"))
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="planner says no") as error:
        KernelSelector().run(chain, "forward", ("shape",))
    assert "flash: flash says no" in str(error.value) and "efficient says no" in str(error.value)


def test_call_counts_and_refusals_are_lru_bounded():
    planner, flash, _, chain = fakes()
    selector = KernelSelector(promote_after=1, max_entries=4)
    planner.failures += [RuntimeError("no")] * 10
    with pytest.warns(UserWarning):
        for shape in range(10):
            assert selector.run(chain, "forward", (shape,)) == "flash"
    assert list(selector.calls) == [("forward", (s,)) for s in (6, 7, 8, 9)]
    assert list(selector.refusals) == [("planner", "forward", (s,)) for s in (6, 7, 8, 9)]
    selector.run(chain, "forward", (6,))  # a use makes an entry the most recent
    selector.run(chain, "forward", (10,))
    assert list(selector.calls) == [("forward", (s,)) for s in (8, 9, 6, 10)]
    selector.clear()
    assert not selector.calls and not selector.refusals


@pytest.mark.parametrize("field", ["promote_after", "retry_after", "max_entries"])
def test_selector_settings_must_be_positive(field):
    with pytest.raises(ValueError, match=field):
        KernelSelector(**{field: 0})


def test_the_op_counts_its_calls_in_the_selector(monkeypatch, branch_calls_only):
    selector = KernelSelector()
    monkeypatch.setattr(dilated_module, "SELECTOR", selector)
    q, k, v = (torch.randn(1, 16, 2, 4, requires_grad=True) for _ in range(3))
    dilated_attention(q, k, v, [8], [1], backend="sdpa").sum().backward()
    strides = (64, 8, 4, 1)  # rows of q, k and v: (B*S, C, H, D) over (1, 16, 2, 4) storage
    key = (torch.float32, (2, 8, 2, 4), strides, strides, strides, False, False)  # two segments of 8 rows
    assert selector.calls == {("forward", key): 1, ("backward", key): 1}


def test_the_same_shape_with_other_strides_is_another_shape_to_plan_for(monkeypatch, branch_calls_only):
    """cuDNN keys its plans on the strides too. The tail call of a sequence one row longer than
    a whole number of segments has rows (B, 1, H, D) for any length, over storage whose batch
    stride is the sequence's: the selector counts such calls apart, so one never promotes another."""
    selector = KernelSelector()
    monkeypatch.setattr(dilated_module, "SELECTOR", selector)
    for seq_len in (9, 17):  # segment 8: one or two whole segments, then a tail of one row
        q, k, v = (torch.randn(2, seq_len, 2, 4) for _ in range(3))
        dilated_attention(q, k, v, [8], [1], backend="sdpa")
    tails = [key for method, key in selector.calls if key[1] == (2, 1, 2, 4)]
    assert [key[2] for key in tails] == [(72, 8, 4, 1), (136, 8, 4, 1)]  # batch stride 9 or 17 rows


# --- kernel contract: a row whose keys are all padding gets a finite output -------------------


def check_rows_without_keys_are_finite(kernel: Kernel, device: str, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 16, 2, 64, generator=generator).to(device, dtype) for _ in range(3))
    bias = torch.zeros(2, 16, dtype=dtype, device=device)
    bias[0] = float("-inf")  # no key at all for any row of sample 0
    bias[1, :5] = float("-inf")  # causal rows 0..4 of sample 1 see only padding
    for is_causal in (False, True):
        out, _ = kernel.forward(q, k, v, bias, is_causal, 0.125)
        assert torch.isfinite(out).all(), (kernel.name, is_causal)


def test_cpu_kernel_gives_rows_without_keys_a_finite_output():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        check_rows_without_keys_are_finite(kernels.CPU, "cpu", dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    ("name", "dtype"),
    [("cudnn", torch.bfloat16), ("efficient", torch.bfloat16), ("efficient", torch.float32)],
)
def test_cuda_kernels_give_rows_without_keys_a_finite_output(name, dtype):
    check_rows_without_keys_are_finite(kernels.KERNELS[name], "cuda", dtype)


# --- no device value is read on the host -------------------------------------------------------

# `bool(tensor)` and `.item()` reach the mode as is_nonzero / item inside the op's bodies, as
# _local_scalar_dense outside them
HOST_READS = ("aten._local_scalar_dense", "aten.nonzero", "aten.item", "aten.is_nonzero")


class CountHostReads(TorchDispatchMode):
    """Counts every aten op, including those inside the op's raw forward and backward (the mode
    runs their Python bodies under itself; it would otherwise see each custom op as one call)."""

    bodies = {
        torch.ops.mmlongnet.dilated_attention_forward.default: dilated_module.dilated_attention_forward_op,
        torch.ops.mmlongnet.dilated_attention_backward.default: dilated_module.dilated_attention_backward_op,
    }

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.name().split(".")[0].replace("::", ".")] += 1
        if func in self.bodies:
            with self:
                return self.bodies[func]._init_fn(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "per-offset"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("segs", "rates"), [([8, 16, 32], [1, 2, 4]), ([12, 24], [3, 6])])
def test_forward_and_backward_read_no_device_value_on_the_host(
    segs, rates, is_causal, masked, pack, monkeypatch
):
    if not pack:
        monkeypatch.setattr(dilated_module, "PACK_MAX_ELEMENTS", 0)
    q, k, v = (torch.randn(2, 45, 6, 8, requires_grad=True) for _ in range(3))
    mask = torch.zeros(2, 45, dtype=torch.bool)
    mask[0, 30:] = True
    mask[1, :10] = True
    kwargs = dict(is_causal=is_causal, key_padding_mask=mask if masked else None, backend="sdpa")
    with CountHostReads() as mode:
        out = dilated_attention(q, k, v, segs, rates, **kwargs)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    kernel_ops = [op for op in mode.ops if "scaled_dot_product" in op]
    assert mode.ops["aten._scaled_dot_product_flash_attention_for_cpu"] > 0, kernel_ops  # the bodies ran
    assert mode.ops["aten._scaled_dot_product_flash_attention_for_cpu_backward"] > 0, kernel_ops
    assert {op: mode.ops[op] for op in HOST_READS} == dict.fromkeys(HOST_READS, 0)
    # and under the mode the op computed what it computes without it
    expected = dilated_attention(q, k, v, segs, rates, **kwargs)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per-head"])
def test_key_bias_expands_per_head_and_aligns_for_the_efficient_kernel(per_head):
    batch, keys, heads = 2, 13, 3
    bias = torch.zeros(batch, keys, heads) if per_head else torch.zeros(batch, keys)
    bias.view(-1)[::5] = float("-inf")
    expanded = kernels._expanded_bias(bias, heads, keys)  # (b, h, c_q, c_k)
    expected = bias.transpose(1, 2) if per_head else bias[:, None, :].expand(batch, heads, keys)
    assert expanded.shape == (batch, heads, keys, keys)
    assert torch.equal(expanded, expected[:, :, None, :].expand(batch, heads, keys, keys))
    aligned = kernels._aligned_bias(bias, heads)
    assert torch.equal(aligned, expanded)
    assert aligned.stride(-1) == 1 and aligned.stride(0) % 8 == 0 and aligned.stride(2) == 0
    assert aligned.stride(1) % 8 == 0 if per_head else aligned.stride(1) == 0
    assert expanded.stride(-1) == 1  # the keys contiguous (cuDNN), also per head
