"""The merge-cost benchmark's parts that run without a GPU: the merges it skips (and restores), its
table, and its refusal without CUDA."""

import pytest
import torch
from benchmark_loader import load_benchmark

from mmlongnet.attention import dilated, dilated_attention
from mmlongnet.attention.reference import dilated_attention_reference

bench = load_benchmark("merge_cost")

SCHEDULE = ([16, 32], [1, 2])


def _inputs():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 128, 4, 8, generator=generator, requires_grad=True) for _ in range(3))
    assert not dilated.runs_dense(q, *SCHEDULE)  # the branch calls, whose merges the variants skip
    return q, k, v


def _out_and_grads(q, k, v, attend):
    out = attend(q, k, v, *SCHEDULE, is_causal=True)
    return (out, *torch.autograd.grad(out.square().sum(), (q, k, v)))


def test_each_variant_skips_its_merges_and_the_op_is_exact_again_afterwards():
    q, k, v = _inputs()
    expected = _out_and_grads(q, k, v, dilated_attention_reference)

    def matches(variant):
        with bench.skipped_merges(variant):
            got = _out_and_grads(q, k, v, lambda *a, **kw: dilated_attention(*a, **kw, backend="sdpa"))
        return [torch.allclose(g, e, atol=1e-5) for g, e in zip(got, expected, strict=True)]

    assert matches("op") == [True] * 4
    assert matches("no_bwd_merges") == [True, False, False, False]  # the forward still merges
    assert not any(matches("no_merges"))
    assert matches("op") == [True] * 4  # restored on exit
    assert dilated.add_parts.__module__ == dilated.merge_weighted.__module__ == "mmlongnet.attention.merge"


def test_table_gives_the_ratios_to_the_dense_baselines():
    row = {"schedule": "lm", "causal": True, "head_dim": 128, "n": 131072, "dense_cudnn_ms": 18.0,
           "dense_flash_attn_4_ms": 17.0, "op_ms": [20.0, 20.0], "no_bwd_merges_ms": [19.0, 18.0],
           "no_merges_ms": [17.5, 18.5]}  # fmt: skip
    line = bench.table([row]).splitlines()[-1]
    assert line == (
        "| lm, causal, 128 | 128K | 20.00 | 18.50 | 18.00 | 18.00 | 17.00 | 1.111 "
        "| 0.900, 1.000 | 0.850, 0.944 |"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_refuses_without_cuda(capsys):
    assert bench.main(["--sizes", "65536"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err
