"""Sequence parallelism applied from outside: `parallelize_sequence(model, group)`.

Legend: B batch, N tokens of the full sequence, n = N / P tokens of one rank, P ranks of the group,
p this rank, E embed dim, H heads, D head dim.

The package's models are single-device code. This module changes a built model, once, so that it
runs over a sequence split across the P ranks of a process group (rank p holds tokens
[p*n, (p+1)*n)), as torchtitan's `parallelize` does:
- every `DilatedAttention` of the part that runs sharded becomes a `ShardedDilatedAttention`, which
  holds the group and calls the collective `sharded_dilated_attention`;
- the module that runs sharded takes the forward of a sequence-parallel twin of its class (the way
  `torch.distributed.fsdp.fully_shard` changes a module's class, so that parameter names, state
  dict and `isinstance` stay those of the original): it starts the positions at p*n and, for
  `MMLongNet`'s fusion stack, cuts the sequence into slices first and gathers them after.

What runs sharded:
- `MMLongNet`: the fusion stack (without one, nothing). The model takes whole (replicated) inputs
  and returns whole outputs; the encoders and modality stacks run unsharded on every rank. The
  stack names its slice in `sequence_shard` = (p, P), from which `MMLongNet.plan_batch` routes the
  slice's tokens.
- `LongNetLM`: its decoder. The model takes this rank's slice of the tokens (B, n) and returns the
  logits of the slice (B, n, V).
- any other module holding dilated attention (a LongNet stack or layer, `MultiheadDilatedAttention`):
  the module itself, on this rank's slice, (B, n, E) -> (B, n, E). A bare `DilatedAttention` is
  returned as its `ShardedDilatedAttention`.

Refused when wrapping, with a ValueError naming the module (none of them can run on one slice):
dense attention, the relative position bias, attention dropout, the scalable softmax, global
queries (`MMLongNetConfig.global_modalities`); refused at the call: cached decoding, global queries.
Backward may run at any later time: the attention modules keep their group, and activation
checkpointing recomputes through the same modules.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmlongnet.attention.modules import DilatedAttention
from mmlongnet.attention.multihead import MultiheadDilatedAttention
from mmlongnet.distributed.collectives import Group, group_rank, group_size
from mmlongnet.distributed.groups import gather_sequence
from mmlongnet.distributed.sharded import sharded_dilated_attention
from mmlongnet.layers.relative_bias import RelativePositionBias
from mmlongnet.models.longnet import LongNetLM
from mmlongnet.models.multimodal import MMLongNet

__all__ = ["ShardedDilatedAttention", "parallelize_sequence"]


def _unsupported(what: str, where: str) -> ValueError:
    """The error for a feature that cannot run on one rank's slice of a sequence."""
    return ValueError(
        f"{where}: {what} is not supported when the sequence is sharded over ranks (parallelize_sequence); "
        "build the model without it, or run it unsharded"
    )


class ShardedDilatedAttention(nn.Module):
    """The sharded twin of `DilatedAttention`: dilated attention over this rank's slice of a sequence
    split evenly over the ranks of `group` (see `sharded_dilated_attention`).

    forward(q, k, v, is_causal=False, key_padding_mask=None, position_bias=None) -> (B, n, H, D),
    with q, k, v (B, n, H, D) this rank's slice and key_padding_mask (B, n) bool its slice of the
    padding mask (True = padding); position_bias must be None. Every rank of the group calls it with
    the same shapes and options. It holds no parameter.
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        group: Group = None,
        softmax_scale: float | None = None,
        validate: bool = True,
    ) -> None:
        super().__init__()
        self.segment_lengths, self.dilation_rates = list(segment_lengths), list(dilation_rates)
        self.group, self.softmax_scale, self.validate = group, softmax_scale, validate

    @classmethod
    def from_dilated(
        cls, module: DilatedAttention, group: Group = None, *, validate: bool = True, where: str = ""
    ) -> ShardedDilatedAttention:
        """The twin of `module` over `group`; a ValueError when it has attention dropout."""
        if module.attention_dropout > 0.0:
            raise _unsupported(f"attention dropout ({module.attention_dropout})", where or "DilatedAttention")
        return cls(
            module.segment_lengths, module.dilation_rates, group=group, softmax_scale=module.softmax_scale,
            validate=validate,
        )  # fmt: skip

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        is_causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if position_bias is not None:
            raise _unsupported("an additive position bias", "ShardedDilatedAttention")
        return sharded_dilated_attention(
            q, k, v, self.segment_lengths, self.dilation_rates, group=self.group, is_causal=is_causal,
            key_padding_mask=key_padding_mask, softmax_scale=self.softmax_scale, validate=self.validate,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"segment_lengths={self.segment_lengths}, dilation_rates={self.dilation_rates}, "
            f"ranks={group_size(self.group)}, validate={self.validate}"
        )


_WHOLE_SEQUENCE_OPTIONS = {
    "kv_cache": "cached decoding",
    "kv_caches": "cached decoding",
    "global_queries": "global queries (dense rows over the whole sequence)",
}


class SequenceParallel:
    """The part of a sequence-parallel twin class that knows its place in the group.

    Attributes (set by `parallelize_sequence`):
        sequence_group: the process group the sequence is split over.
        sequence_shard: (p, P), this rank's index and the number of ranks.
    """

    sequence_group: Group
    sequence_shard: tuple[int, int]

    def _refuse_whole_sequence_options(self, kwargs: dict) -> None:
        """ValueError for a call option that needs the whole sequence on every rank."""
        for name, what in _WHOLE_SEQUENCE_OPTIONS.items():
            if kwargs.get(name) is not None:
                raise _unsupported(f"{what} ({name})", type(self).__name__)


class SlicedSequence(SequenceParallel):
    """forward(x (B, N, E), key_padding_mask (B, N) bool or None, *args, position_offset=0, **kwargs)
    -> (B, N, E): pads the sequence with padding tokens to a multiple of P, runs the module on this
    rank's slice (B, n, E) at its global positions, and gathers the slices back, differentiably (the
    gradient reaching a slice is the sum over ranks of the gradients of its rows); global queries are
    refused."""

    def forward(self, x, key_padding_mask=None, *args, position_offset=0, **kwargs):
        self._refuse_whole_sequence_options(kwargs)
        index, num_shards = self.sequence_shard
        batch, length, _ = x.shape
        extra = -length % num_shards  # padding tokens up to a multiple of P, the same on every rank
        if extra:
            x = F.pad(x, (0, 0, 0, extra))  # (B, P*n, E)
            if key_padding_mask is None:
                key_padding_mask = torch.zeros(batch, length, dtype=torch.bool, device=x.device)
            key_padding_mask = F.pad(key_padding_mask, (0, extra), value=True)  # (B, P*n)
        n = x.shape[1] // num_shards
        local = x.narrow(1, index * n, n)  # (B, n, E), a view
        mask = None if key_padding_mask is None else key_padding_mask.narrow(1, index * n, n)  # (B, n)
        out = super().forward(local, mask, *args, position_offset=position_offset + index * n, **kwargs)
        return gather_sequence(out, self.sequence_group, 1)[:, :length]  # (B, N, E)


class LocalSlice(SequenceParallel):
    """forward(x (B, n, ...), *args, position_offset=0, **kwargs): the module on this rank's slice,
    its positions starting at p*n + position_offset; cached decoding and global queries are refused."""

    def forward(self, x, *args, position_offset=0, **kwargs):
        self._refuse_whole_sequence_options(kwargs)
        index, _ = self.sequence_shard
        return super().forward(x, *args, position_offset=position_offset + index * x.shape[1], **kwargs)


_TWINS: dict[tuple[type, type], type] = {}


def _twin_class(mixin: type, cls: type) -> type:
    """The class `mixin` + `cls`, made once per pair (its name: "SequenceParallel" + cls's)."""
    twin = _TWINS.get((mixin, cls))
    if twin is None:
        twin = type(f"SequenceParallel{cls.__name__}", (mixin, cls), {"__module__": __name__})
        _TWINS[(mixin, cls)] = twin
    return twin


def _check_shardable(module: nn.Module, where: str) -> None:
    """ValueError for the first thing in `module` that cannot run on one slice of a sequence."""
    if isinstance(module, SequenceParallel):
        raise ValueError(f"{where} runs sequence-parallel already: parallelize a model once")
    found = False
    for name, sub in module.named_modules():
        place = f"{where}.{name}" if name else where
        if isinstance(sub, MultiheadDilatedAttention):
            if sub.attention == "dense":
                raise _unsupported("attention='dense' (it would see the local slice only)", place)
            if isinstance(sub.positions, RelativePositionBias):
                raise _unsupported("positions='relative' (its bias is an (H, N, N) tensor)", place)
            if sub.length_scale is not None:
                raise _unsupported("scalable_softmax (its n counts the keys of the whole sequence)", place)
        if isinstance(sub, DilatedAttention):
            found = True
            if sub.attention_dropout > 0.0:
                raise _unsupported(f"attention dropout ({sub.attention_dropout})", place)
    if not found:
        raise ValueError(f"{where} holds no DilatedAttention: there is nothing to run sequence-parallel")


def _shard_attention(module: nn.Module, group: Group, validate: bool) -> None:
    """Swap every `DilatedAttention` below `module` for its `ShardedDilatedAttention` over `group`."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DilatedAttention):
                setattr(parent, name, ShardedDilatedAttention.from_dilated(child, group, validate=validate))


def parallelize_sequence(model: nn.Module, group: Group = None, *, validate: bool = True) -> nn.Module:
    """Make `model` run over a sequence split evenly over the ranks of `group` (None: the default
    group); see the module docstring for what runs sharded and what each model then takes.

    Changes `model` in place (a bare `DilatedAttention` excepted, which is returned as its
    `ShardedDilatedAttention`) and returns it. Call it once, on every rank of the group, after
    `torch.distributed.init_process_group` and before wrapping the model in DDP. Parameters and
    their names do not change, so state dicts and exports stay those of the unsharded model.

    validate: each attention call checks with one small all_gather that the ranks agree on shapes
        and options (False saves that round trip once a setup is known to be right).

    Raises ValueError (before changing anything) when the part that would run sharded holds dense
    attention, the relative position bias or attention dropout, holds no dilated attention, or runs
    sequence-parallel already.
    """
    if isinstance(model, DilatedAttention):
        return ShardedDilatedAttention.from_dilated(model, group, validate=validate)
    if isinstance(model, MMLongNet):
        if model.fusion is None:  # fusion_stack.num_layers=0: every rank runs the whole model
            return model
        if model.config.global_modalities:  # dense rows over the whole fused sequence
            raise _unsupported(f"global_modalities={model.config.global_modalities}", "MMLongNet")
        target, mixin, where = model.fusion, SlicedSequence, "MMLongNet.fusion"
    elif isinstance(model, LongNetLM):
        if model.token_shift is not None:  # its first tokens would need the previous rank's last ones
            raise _unsupported(f"token_shift={model.config.token_shift}", "LongNetLM")
        target, mixin, where = model.decoder, LocalSlice, "LongNetLM.decoder"
    else:
        target, mixin, where = model, LocalSlice, type(model).__name__
    _check_shardable(target, where)
    _shard_attention(target, group, validate)
    target.__class__ = _twin_class(mixin, type(target))
    target.sequence_group, target.sequence_shard = group, (group_rank(group), group_size(group))
    return model
