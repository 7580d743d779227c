"""A short CPU tour of dilated attention: ``python -m mmlongnet.tour`` (or ``make tour``).

Four steps, each printing what it checks:

1. dilated attention on a sequence whose length is not a multiple of any segment length;
2. the fast ``sdpa`` backend against the dense ``reference`` (outputs and q/k/v gradients, float64);
3. causal attention with a key padding mask: future tokens cannot change earlier outputs,
   padded tokens cannot change anything;
4. forward + backward throughput of the ``sdpa`` backend at N = 16384.

Runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import time

import torch

from mmlongnet.attention import dilated_attention

# B batch, N tokens, H heads, D head dim
SEGMENT_LENGTHS = [512, 1024, 2048]
DILATION_RATES = [1, 2, 4]


def _header(step: int, title: str) -> None:
    print()
    print(f"[{step}/4] {title}")
    print("-" * (len(title) + 6))


def _qkv(B: int, N: int, H: int, D: int, dtype: torch.dtype, requires_grad: bool = False):
    """Three random tensors of shape (B, N, H, D)."""
    return [torch.randn(B, N, H, D, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


def step_any_length() -> None:
    _header(1, "Dilated attention on a sequence of any length")
    B, N, H, D = 2, 5000, 8, 32
    q, k, v = _qkv(B, N, H, D, torch.float32)
    print(f"q, k, v: (B, N, H, D) = {tuple(q.shape)}, float32")
    print(f"segment_lengths = {SEGMENT_LENGTHS}, dilation_rates = {DILATION_RATES}")
    print(f"N = {N} is a multiple of no segment length: each branch's last segment is shorter.")
    out = dilated_attention(q, k, v, SEGMENT_LENGTHS, DILATION_RATES)  # backend="auto": sdpa on the CPU
    print(f"out: {tuple(out.shape)}, all finite: {bool(out.isfinite().all())}")


def step_sdpa_vs_reference() -> None:
    _header(2, 'Fast backend "sdpa" against the dense "reference" (float64)')
    B, N, H, D = 2, 1500, 8, 16
    q, k, v = _qkv(B, N, H, D, torch.float64, requires_grad=True)
    grad_out = torch.randn(B, N, H, D, dtype=torch.float64)
    print(f"q, k, v: {tuple(q.shape)}, float64 (the reference builds the dense N x N scores)")
    results = {}
    for backend in ("sdpa", "reference"):
        out = dilated_attention(q, k, v, SEGMENT_LENGTHS, DILATION_RATES, backend=backend)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        results[backend] = (out.detach(), *grads)
    for name, a, b in zip(("out", "dq", "dk", "dv"), results["sdpa"], results["reference"], strict=True):
        print(f"max |sdpa - reference| of {name:>3}: {(a - b).abs().max().item():.2e}")


def step_causal_padding() -> None:
    _header(3, "Causal attention with a key padding mask")
    B, N, H, D = 2, 5000, 8, 32
    q, k, v = _qkv(B, N, H, D, torch.float32)
    key_padding_mask = torch.zeros(B, N, dtype=torch.bool)  # (B, N), True = padding
    key_padding_mask[1, -300:] = True
    print(f"q, k, v: {tuple(q.shape)}; key_padding_mask: the last 300 tokens of sample 1 are padding")

    def run(q, k, v):
        return dilated_attention(
            q, k, v, SEGMENT_LENGTHS, DILATION_RATES, is_causal=True, key_padding_mask=key_padding_mask
        )

    out = run(q, k, v)

    t = 2500  # inside a segment of every branch
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, t:] = torch.randn_like(x[:, t:])  # replace every token at positions >= t
    out2 = run(q2, k2, v2)
    print(f"replaced q, k, v at positions >= t = {t}")
    print(f"max change of outputs before position t: {(out2[:, :t] - out[:, :t]).abs().max().item()}")
    print(f"max change of outputs from position t on: {(out2[:, t:] - out[:, t:]).abs().max().item():.2f}")

    k3, v3 = k.clone(), v.clone()
    k3[1, -300:] = torch.randn_like(k3[1, -300:])  # change only the padded keys / values
    v3[1, -300:] = torch.randn_like(v3[1, -300:])
    out3 = run(q, k3, v3)
    change = (out3 - out).abs().max().item()
    print(f"replaced the padded keys and values of sample 1; max change of any output: {change}")


def step_throughput() -> None:
    _header(4, 'Throughput of the "sdpa" backend, forward + backward')
    B, N, H, D = 1, 16384, 8, 32
    q, k, v = _qkv(B, N, H, D, torch.float32, requires_grad=True)
    print(f"q, k, v: {tuple(q.shape)}, float32, {torch.get_num_threads()} CPU threads")

    def fwd_bwd() -> None:
        out = dilated_attention(q, k, v, SEGMENT_LENGTHS, DILATION_RATES, backend="sdpa")
        out.sum().backward()

    fwd_bwd()  # warm-up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fwd_bwd()
        times.append(time.perf_counter() - t0)
    best = min(times)
    print(f"forward + backward: {best * 1e3:.0f} ms (best of 3), {B * N / best:,.0f} tokens/s")


def main() -> None:
    torch.manual_seed(0)
    print("mmlongnet tour: LongNet dilated attention on the CPU")
    step_any_length()
    step_sdpa_vs_reference()
    step_causal_padding()
    step_throughput()
    print()
    print("Done.")


if __name__ == "__main__":
    main()
