"""Tokenized attention on Zipf token streams: deduplicated vs naive routing, unique vs full target attention.

Launch one process per device:

    torchrun --nproc_per_node 2 benchmarks/tokenized.py --device cpu --tag cpu  # gloo
    torchrun --nproc_per_node 8 benchmarks/tokenized.py --tag h200x8            # NCCL, one GPU per rank

Every rank draws its own mini-batch of B sequences of length L (lengths uniform in [L/2, L]) from a
Zipf distribution over V ids (P(rank k) ~ 1 / k^s). The ids of the Zipf ranks are shuffled by a
fixed permutation, so the frequent ids spread over the shards (with the identity, rank 0 would own
all of them). For each (V, s):

- routing: a `ShardedEmbedding` with `dedup=True` and one with `dedup=False` look the batch up
  and back-propagate (float32 rows, E = `--dim`). Bytes: what all ranks send to other ranks per
  step (split sizes and ids as int64, embedding rows forward, gradient rows backward), from the
  modules' `last_stats`; time: median of `--steps` steps (forward + backward) after 2 warm-up steps,
  host time between barriers (and device synchronisations).
- target attention (rank 0 alone, no communication): `TargetAttention` over distinct ids vs over
  all positions, one query per sample attending to its history, keys and values projected from a
  frozen (V, E) table; forward + backward, median time, and the key/value rows each computes.

Writes `<out>/tokenized_<tag>.json` (rank 0) and prints a table.
"""

# B batch of one rank, L sequence length, V vocabulary, E embedding dim, P ranks, s Zipf exponent

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py
from _common import (  # noqa: E402
    RESULTS_DIR,
    device_name,
    init_distributed,
    median_step_ms,
    use_repository,
    write_json,
)

use_repository()
from mmlongnet.distributed import ShardedEmbedding, TargetAttention  # noqa: E402

WARMUP = 2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[100_000, 1_000_000], help="V values")
    parser.add_argument("--exponent", type=float, nargs="+", default=[1.0, 1.2], help="Zipf exponents s")
    parser.add_argument("--batch", type=int, default=8, help="B per rank (default 8)")
    parser.add_argument("--length", type=int, default=2048, help="L (default 2048)")
    parser.add_argument("--dim", type=int, default=64, help="E (default 64)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    parser.add_argument("--device", default="cuda", help="cuda (NCCL) or cpu (gloo)")
    parser.add_argument("--tag", default="local")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    return parser.parse_args()


def zipf_batch(V: int, s: float, B: int, L: int, rank: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, L) long and lengths (B,) long in [L/2, L]; padding positions hold -1."""
    weights = torch.arange(1, V + 1, dtype=torch.float64).pow(-s)  # (V,)
    cdf = weights.cumsum(0) / weights.sum()  # (V,)
    shuffle = torch.randperm(V, generator=torch.Generator().manual_seed(0))  # the same on every rank
    g = torch.Generator().manual_seed(1 + rank)
    zipf_rank = torch.searchsorted(cdf, torch.rand(B, L, generator=g, dtype=torch.float64)).clamp_max(V - 1)
    tokens = shuffle[zipf_rank]  # (B, L)
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)  # (B,)
    tokens[torch.arange(L) >= lengths[:, None]] = -1
    return tokens.to(device), lengths.to(device)


def time_steps(step, steps: int, device, collective: bool = True) -> float:
    """Median milliseconds of `step()` over `steps` runs after the warm-up."""
    return median_step_ms(step, steps, device, warmup=WARMUP, barrier=collective)


def routing_bytes(module: ShardedEmbedding) -> tuple[int, int, int]:
    """(distinct-or-all ids sent, forward bytes, backward bytes) this rank sent to other ranks last step."""
    stats = module.last_stats
    row_bytes = module.embedding_dim * module.weight.element_size()
    forward = 8 * (len(stats.send_counts) - 1 + stats.ids_sent) + stats.rows_returned * row_bytes
    return stats.ids_sent, forward, stats.ids_sent * row_bytes


def run_case(args, V: int, s: float, rank: int, world: int, device) -> dict:
    """One (V, s) row: routing bytes and times on all ranks, target attention on rank 0."""
    B, L, E = args.batch, args.length, args.dim
    tokens, lengths = zipf_batch(V, s, B, L, rank, device)
    valid = tokens >= 0
    grad = torch.ones(B, L, E, device=device)
    row = {"V": V, "s": s, "P": world, "B": B, "L": L, "E": E}
    local = torch.tensor(
        [int(valid.sum()), int(torch.unique(tokens[valid]).numel())],
        dtype=torch.float64,
        device=device,
    )
    dist.all_reduce(local)
    row["valid_tokens_per_rank"], row["distinct_ids_per_rank"] = (local / world).tolist()
    for dedup in (True, False):
        torch.manual_seed(rank)
        emb = ShardedEmbedding(V, E, dedup=dedup, device=device)

        def step(emb=emb):
            emb.weight.grad = None
            emb(tokens, lengths, validate=False).backward(grad)

        ms = time_steps(step, args.steps, device)
        sent = torch.tensor(routing_bytes(emb), dtype=torch.float64, device=device)
        dist.all_reduce(sent)  # summed over ranks
        name = "dedup" if dedup else "naive"
        row[f"{name}_ms"] = ms
        row[f"{name}_ids_sent"] = int(sent[0])
        row[f"{name}_forward_bytes"] = int(sent[1])
        row[f"{name}_backward_bytes"] = int(sent[2])
        row[f"{name}_bytes"] = int(sent[1] + sent[2])
        del emb
    row["bytes_ratio_naive_over_dedup"] = row["naive_bytes"] / max(row["dedup_bytes"], 1)
    row["time_ratio_naive_over_dedup"] = row["naive_ms"] / row["dedup_ms"]

    if rank == 0:  # target attention: one rank, no communication
        table = nn.Embedding(V, E, device=device).requires_grad_(False)
        query = torch.randn(B, E, device=device, requires_grad=True)
        out_grad = torch.ones(B, E, device=device)
        for unique in (True, False):
            attention = TargetAttention(E, unique=unique, device=device)

            def attend(attention=attention):
                attention(query, tokens, lengths, table).backward(out_grad)

            name = "unique" if unique else "full"
            row[f"target_{name}_ms"] = time_steps(attend, args.steps, device, collective=False)
        sample = torch.arange(B, device=device)[:, None].expand(B, L)[valid]  # (T,)
        row["target_unique_rows"] = int(torch.unique(sample * V + tokens[valid]).numel())
        row["target_full_rows"] = B * L
        del table
    dist.barrier()
    return row


def main() -> int:
    args = parse_args()
    device, rank, world = init_distributed(args.device)
    rows = [run_case(args, V, s, rank, world, device) for V in args.vocab for s in args.exponent]
    if rank == 0:
        meta = {
            "device": device_name(device),
            "backend": dist.get_backend(), "world_size": world, "torch": torch.__version__,
            "dtype": "float32", "command": " ".join(sys.argv), "steps": args.steps,
            "threads": torch.get_num_threads(),
        }  # fmt: skip
        path = args.out / f"tokenized_{args.tag}.json"
        write_json(path, {"meta": meta, "rows": rows})
        header = (
            f"{'V':>8} {'s':>4} {'tokens':>7} {'distinct':>8} {'dedup MB':>9} {'naive MB':>9} {'x':>5} "
            f"{'dedup ms':>9} {'naive ms':>9} {'TA uniq rows':>12} {'TA full rows':>12} {'TA uniq ms':>10} "
            f"{'TA full ms':>10}"
        )
        print(header)
        for r in rows:
            print(
                f"{r['V']:>8} {r['s']:>4} {r['valid_tokens_per_rank']:>7.0f} "
                f"{r['distinct_ids_per_rank']:>8.0f} "
                f"{r['dedup_bytes'] / 1e6:>9.2f} {r['naive_bytes'] / 1e6:>9.2f} "
                f"{r['bytes_ratio_naive_over_dedup']:>5.1f} {r['dedup_ms']:>9.1f} {r['naive_ms']:>9.1f} "
                f"{r['target_unique_rows']:>12} {r['target_full_rows']:>12} {r['target_unique_ms']:>10.1f} "
                f"{r['target_full_ms']:>10.1f}"
            )
        print(f"results: {path}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
