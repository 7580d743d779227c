"""Multiway network: one expert per modality, every token routed by its modality id.

Legend: B batch, L tokens per sample, T = B*L tokens, K experts (num_ways), n_e tokens of expert e,
F_in / F_out the feature shape of one token going in / coming out (usually (E,) and (E,) or (F,)).

BEiT-3 (Wang et al. 2022, arXiv 2208.10442, Sec. 2.1) and VLMo give each modality its own
feed-forward network (and BEiT-3 its own layer norms) while the attention is shared. BEiT-3 splits
a batch at one position (image tokens first, then text). Here every token carries its own id, so
any number of experts and any interleaving of modalities, within and across samples, is allowed.

The experts' parameters are stacked: one (K, *shape) tensor per parameter of the template, not K
tensors, so the optimizer, gradient clipping and the autograd engine handle a third as many
tensors in a three-modality model (each has a cost per tensor on the host). Expert e runs as the
template with slice e of every stack (`torch.func.functional_call`).

Two ways to route:
- from the ids on the device: one host sync (the per-expert token counts, read once), one stable
  sort of the ids, and per expert that has tokens one gather of its n_e rows, one expert call on
  (n_e, *F_in) and one scatter of its (n_e, *F_out) output into place;
- from a `MultiwayRouting` built on the host (from lengths the CPU already holds): the same
  gathers, expert calls and scatters, with no host sync and no sort. Its per-expert sizes are
  capacities C_e >= n_e fixed by the padded shapes, so the shapes repeat from batch to batch
  (CUDA graphs, `torch.compile`); the C_e - n_e spare rows read token 0 and are written to a
  discarded row.
An expert without tokens is not called.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call


@dataclass(frozen=True)
class MultiwayRouting:
    """Which token goes to which expert, derived on the host once per batch.

    The experts' rows lie one after the other: expert e owns rows [o_e, o_e + C_e) of the routed
    order, o_e the sum of the capacities before it.

    Attributes:
        shape: (B, L), the token grid the routing is for.
        capacities: K ints C_e, the rows of each expert (its n_e tokens, then spare rows).
        gather: (sum C_e,) long, the flat position in [0, B*L) each routed row reads; spare rows
            read position 0.
        scatter: (sum C_e,) long, where each routed row is written in a (B*L + 1)-row output;
            spare rows go to the discarded row B*L.
        modality_ids: (B, L) long, the id of every token; positions no expert reads (padding)
            hold `fill`.

    Positions that no expert reads come out as zeros.
    """

    shape: tuple[int, int]
    capacities: tuple[int, ...]
    gather: torch.Tensor
    scatter: torch.Tensor
    modality_ids: torch.Tensor

    @classmethod
    def from_ids(
        cls,
        modality_ids: torch.Tensor,
        num_ways: int,
        *,
        routed: torch.Tensor | None = None,
        capacities: Sequence[int] | None = None,
        fill: int = 0,
    ) -> MultiwayRouting:
        """Build the routing on the CPU (in NumPy: it reads no tensor through the dispatcher).

        Args:
            modality_ids: (B, L) integer CPU tensor, values in [0, num_ways) where `routed`.
            num_ways: K.
            routed: (B, L) bool CPU tensor, the tokens to route (None: all); the others (padding)
                are read by no expert.
            capacities: K ints C_e >= the expert's token count (None: exactly the counts); an
                expert of capacity 0 is not called.
            fill: the id `modality_ids` of the result holds at unrouted positions.

        Returns the routing with CPU tensors; `to(device)` moves it.
        """
        if modality_ids.device.type != "cpu" or modality_ids.dim() != 2:
            raise ValueError(f"modality_ids must be a (B, L) CPU tensor, got {tuple(modality_ids.shape)}")
        ids = modality_ids.long().numpy()  # (B, L)
        routed = np.ones(ids.shape, dtype=bool) if routed is None else routed.numpy()
        flat_ids, flat_routed = ids.reshape(-1), routed.reshape(-1)  # (T,)
        outside = flat_routed & ((flat_ids < 0) | (flat_ids >= num_ways))
        if outside.any():
            raise ValueError(
                f"modality_ids must lie in [0, num_ways={num_ways}) at routed positions, got "
                f"{flat_ids[outside][0]} at flat position {np.flatnonzero(outside)[0]}"
            )
        num_tokens = flat_ids.size
        gather, scatter, sizes = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], []
        for expert in range(num_ways):
            positions = np.flatnonzero((flat_ids == expert) & flat_routed)  # (n_e,)
            capacity = positions.size if capacities is None else capacities[expert]
            if capacity < positions.size:
                raise ValueError(
                    f"capacity {capacity} of expert {expert} is below its {positions.size} tokens"
                )
            spare = capacity - positions.size
            gather += [positions, np.zeros(spare, np.int64)]
            scatter += [positions, np.full(spare, num_tokens, np.int64)]
            sizes.append(int(capacity))
        shown = torch.from_numpy(np.where(routed, ids, fill))  # (B, L)
        gather_rows = torch.from_numpy(np.concatenate(gather))  # (sum C_e,)
        scatter_rows = torch.from_numpy(np.concatenate(scatter))  # (sum C_e,)
        return cls(tuple(ids.shape), tuple(sizes), gather_rows, scatter_rows, shown)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the routing, in a fixed order (for one batched copy to a device)."""
        return [self.gather, self.scatter, self.modality_ids]

    def with_tensors(self, tensors: Sequence[torch.Tensor]) -> MultiwayRouting:
        """The same routing over `tensors` (as `tensors()` lists them, e.g. moved to a device)."""
        return MultiwayRouting(self.shape, self.capacities, *tensors)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MultiwayRouting:
        return self.with_tensors([t.to(device, non_blocking=non_blocking) for t in self.tensors()])


class MultiwayNetwork(nn.Module):
    """`num_ways` independent copies of a token-wise module; each token goes to the copy of its id.

    Args:
        module: the template expert. It must act on every token independently (Linear, an FFN,
            LayerNorm, RMSNorm, ...): it is called on (n_e, *F_in) rows, or on the whole
            (B, L, *F_in) input by the fast path, and must return (n_e, *F_out) / (B, L, *F_out).
        num_ways: number of experts K >= 1.

    Experts: expert 0 has the values of `module` (so pretrained single-modality weights carry over
    to way 0). Experts 1 to K-1 start from copies in which every submodule with a
    `reset_parameters()` method is re-initialised, so they start from different values; a
    module's own `reset_parameters()` is trusted with its children (custom initialisations
    survive). Parameters that no `reset_parameters()` covers (a bare `nn.Parameter` on a custom
    module without that method) keep the template's values in every expert. `module` itself is
    not registered; later changes to it do not reach the experts.

    Parameters: `experts` is a copy of `module` in which every parameter and buffer of shape S is
    the stack (K, *S) of the K experts' values: expert e's weight of an `nn.Linear` template is
    `experts.weight[e]`, and the state-dict keys are `experts.<name>` (a state dict of the layout
    with one module per expert, `experts.<e>.<name>`, loads too). `experts` is storage only:
    call the network, or `expert_function()`, not `experts`. `expert_parameters(e)` gives expert
    e's slices by name (views: writing them in place, e.g. a custom initialisation, changes
    expert e). Every call reads all stacks, so an expert without tokens in a batch gets a zero
    gradient (not None): optimizers with momentum or weight decay still move it.

    forward(x, modality_ids):
        x: (B, L, *F_in), e.g. (B, L, E).
        modality_ids: (B, L), any integer dtype, values in [0, K).
        returns (B, L, *F_out), dtype of the experts' output (e.g. bf16 under autocast).

    Fast path, no gather or scatter: K == 1, or all ids equal (the expert of that id is called on
    x as it is). With K == 1 the ids are checked for dtype and shape only, not for their values,
    so that path needs no host sync. With K > 1, reading the token counts syncs with the device
    once per call (the sizes of the gathers depend on the data); under `torch.compile` this is a
    graph break.
    """

    def __init__(self, module: nn.Module, num_ways: int) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if isinstance(num_ways, bool) or not isinstance(num_ways, int):
            raise TypeError(f"num_ways must be an int, got {type(num_ways).__name__}")
        if num_ways < 1:
            raise ValueError(f"num_ways must be >= 1, got num_ways={num_ways}")
        self.num_ways = num_ways
        copies = [copy.deepcopy(module) for _ in range(num_ways)]
        for expert in copies[1:]:
            _reset_all(expert)
        self.experts = copy.deepcopy(module)
        for owner_name, owner in self.experts.named_modules():
            for name, value in (*owner.named_parameters(recurse=False), *owner.named_buffers(recurse=False)):
                full_name = f"{owner_name}.{name}" if owner_name else name
                stack = torch.stack([_state_of(expert, full_name) for expert in copies]).detach()  # (K, *S)
                if name in owner._parameters:
                    owner._parameters[name] = nn.Parameter(stack, requires_grad=value.requires_grad)
                else:
                    owner._buffers[name] = stack
        self._state_names = [name for name, _ in _stacked_state(self.experts)]
        self._register_load_state_dict_pre_hook(self._stack_per_expert_state)

    def expert_parameters(self, expert: int) -> dict[str, torch.Tensor]:
        """Expert `expert`'s parameters and buffers by name (as in `module`): views of its slices."""
        return {name: stack[expert] for name, stack in _stacked_state(self.experts)}

    def expert_function(self) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """`fn(e, rows)`: expert e on rows (n, *F_in) -> (n, *F_out).

        The stacks are split once, here (one `unbind` each, whose backward is one stack), so take
        one function per forward and call it for every expert."""
        slices = [stack.unbind(0) for _, stack in _stacked_state(self.experts)]  # K views each

        def call(expert: int, rows: torch.Tensor) -> torch.Tensor:
            state = {name: views[expert] for name, views in zip(self._state_names, slices, strict=True)}
            return functional_call(self.experts, state, (rows,))

        return call

    def _stack_per_expert_state(self, state_dict: dict, prefix: str, *args) -> None:
        """Load hook: stack the keys of the layout with one module per expert (`experts.<e>.<name>`)."""
        for name in self._state_names:
            keys = [f"{prefix}experts.{e}.{name}" for e in range(self.num_ways)]
            if f"{prefix}experts.{name}" not in state_dict and all(key in state_dict for key in keys):
                state_dict[f"{prefix}experts.{name}"] = torch.stack([state_dict.pop(key) for key in keys])

    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor | MultiwayRouting) -> torch.Tensor:
        """x: (B, L, *F_in), modality_ids: (B, L) integer or a `MultiwayRouting` -> (B, L, *F_out)."""
        if isinstance(modality_ids, MultiwayRouting):
            return self._forward_routed(x, modality_ids)
        if modality_ids.dtype == torch.bool or modality_ids.is_floating_point() or modality_ids.is_complex():
            raise TypeError(f"modality_ids must have an integer dtype, got {modality_ids.dtype}")
        if x.dim() < 2 or modality_ids.shape != x.shape[:2]:
            raise ValueError(
                f"modality_ids must have shape x.shape[:2]; got modality_ids {tuple(modality_ids.shape)} "
                f"and x {tuple(x.shape)}"
            )
        batch, seq_len = x.shape[:2]
        num_tokens = batch * seq_len
        if self.num_ways == 1 or num_tokens == 0:
            # No token to route (T == 0): expert 0 on the empty input only to learn F_out and dtype.
            return self.expert_function()(0, x)  # (B, L, *F_out)

        ids = modality_ids.reshape(num_tokens).to(device=x.device, dtype=torch.long)  # (T,)
        # Bin 0 counts ids < 0, bin K+1 ids >= K, bin e+1 the tokens of expert e: one host sync.
        counts = torch.bincount(ids.clamp(-1, self.num_ways) + 1, minlength=self.num_ways + 2).tolist()
        if counts[0] or counts[-1]:
            self._raise_out_of_range(modality_ids)
        counts = counts[1:-1]  # K entries, summing to T
        if max(counts) == num_tokens:
            return self.expert_function()(counts.index(num_tokens), x)  # (B, L, *F_out), one modality

        flat_x = x.reshape(num_tokens, *x.shape[2:])  # (T, *F_in)
        order = torch.argsort(ids, stable=True)  # (T,): expert 0's tokens, then expert 1's, ...
        call = self.expert_function()
        out = None
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            index = order[start : start + count]  # (n_e,), positions in [0, T), in token order
            start += count
            y = call(expert, flat_x.index_select(0, index))  # (n_e, *F_out)
            if out is None:
                out = y.new_empty((num_tokens, *y.shape[1:]))  # (T, *F_out), every row written below
            out.index_copy_(0, index, y.to(out.dtype))
        return out.view(batch, seq_len, *out.shape[1:])  # (B, L, *F_out)

    def _forward_routed(self, x: torch.Tensor, routing: MultiwayRouting) -> torch.Tensor:
        """x: (B, L, *F_in) routed by a host-built `MultiwayRouting`: no host sync."""
        _check_routing(routing, self.num_ways, x)
        return routed_apply(x, routing, self.expert_function())

    def _raise_out_of_range(self, modality_ids: torch.Tensor) -> None:
        """Error path only: name the first offending id, its batch row and position."""
        bad = (modality_ids < 0) | (modality_ids >= self.num_ways)  # (B, L)
        row, pos = bad.nonzero()[0].tolist()
        value = modality_ids[row, pos].item()
        raise ValueError(
            f"modality_ids must lie in [0, num_ways) with num_ways={self.num_ways}; "
            f"found id {value} at batch row {row}, position {pos}"
        )

    def extra_repr(self) -> str:
        return f"num_ways={self.num_ways}"


def _state_of(module: nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer `name` (dotted) of `module`."""
    owner_name, _, attribute = name.rpartition(".")
    return getattr(module.get_submodule(owner_name), attribute)


def _stacked_state(experts: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, (K, *S) stack) of every parameter and buffer of a network's `experts`, in a fixed order."""
    return [*experts.named_parameters(), *experts.named_buffers()]


def _reset_all(module: nn.Module) -> None:
    """Re-initialise `module`: a module with `reset_parameters()` resets itself (and owns the
    initialisation of its children, e.g. MAGNETO's gains); otherwise its children are reset."""
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()
        return
    for child in module.children():
        _reset_all(child)


def maybe_multiway(module: nn.Module, num_ways: int) -> nn.Module:
    """`module` itself for one way, else a `MultiwayNetwork` of `num_ways` copies of it."""
    return module if num_ways == 1 else MultiwayNetwork(module, num_ways)


def _check_routing(routing: MultiwayRouting, num_ways: int, x: torch.Tensor) -> None:
    if len(routing.capacities) != num_ways or tuple(x.shape[:2]) != routing.shape:
        raise ValueError(
            f"the routing is for {len(routing.capacities)} experts over {routing.shape} tokens; "
            f"this layer has {num_ways} experts and x has shape {tuple(x.shape)}"
        )


def routed_apply(
    x: torch.Tensor, routing: MultiwayRouting, expert_fn: Callable[[int, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """`expert_fn(e, rows)` on the rows of each expert e, put back in token order.

    x: (B, L, *F_in); `expert_fn` maps (C_e, *F_in) rows to (C_e, *F_out). One gather, one call
    per expert with rows (on a split view, whose backward is one concatenation), one
    concatenation and one scatter, whatever the number of experts. Returns (B, L, *F_out), zeros
    where no expert reads.
    """
    batch, seq_len = routing.shape
    num_tokens = batch * seq_len
    rows = x.reshape(num_tokens, *x.shape[2:]).index_select(0, routing.gather)  # (sum C_e, *F_in)
    pieces = [
        expert_fn(e, expert_rows)  # (C_e, *F_out)
        for e, expert_rows in enumerate(rows.split(list(routing.capacities)))
        if expert_rows.shape[0]
    ]
    if not pieces:  # no expert has a token: expert 0 on the empty input only for F_out and dtype
        pieces.append(expert_fn(0, rows[:0]))  # (0, *F_out)
    dtype = pieces[0].dtype
    routed = torch.cat([y.to(dtype) for y in pieces]) if len(pieces) > 1 else pieces[0]  # (sum C_e, ...)
    out = routed.new_zeros((num_tokens + 1, *routed.shape[1:]))  # (T + 1, *F_out); row T is dropped
    out.index_copy_(0, routing.scatter, routed)
    return out[:num_tokens].view(batch, seq_len, *out.shape[1:])  # (B, L, *F_out)


def route_chain(
    modules: Sequence[nn.Module], x: torch.Tensor, modality_ids: torch.Tensor | MultiwayRouting | None
) -> torch.Tensor:
    """`route` through `modules` one after the other: (B, L, F_in) -> (B, L, F_out).

    With a `MultiwayRouting` and every module a `MultiwayNetwork` of its width, the tokens are
    gathered and scattered once for the whole chain (expert e of each module in turn on expert
    e's rows); otherwise each module is routed on its own.
    """
    if isinstance(modality_ids, MultiwayRouting) and _all_multiway(modules, len(modality_ids.capacities)):
        _check_routing(modality_ids, len(modality_ids.capacities), x)

        calls = [module.expert_function() for module in modules]

        def chain(e: int, rows: torch.Tensor) -> torch.Tensor:
            for call in calls:
                rows = call(e, rows)
            return rows

        return routed_apply(x, modality_ids, chain)
    for module in modules:
        x = route(module, x, modality_ids)
    return x


def route_parallel(
    modules: Sequence[nn.Module], x: torch.Tensor, modality_ids: torch.Tensor | MultiwayRouting | None
) -> list[torch.Tensor]:
    """`route` of each of `modules` on the same x: (B, L, F_in) -> one (B, L, F_i) per module.

    With a `MultiwayRouting` and every module a `MultiwayNetwork` of its width, the tokens are
    gathered and scattered once for all (each expert's outputs joined along the features, then
    split); otherwise each module is routed on its own.
    """
    if isinstance(modality_ids, MultiwayRouting) and _all_multiway(modules, len(modality_ids.capacities)):
        _check_routing(modality_ids, len(modality_ids.capacities), x)
        sizes = []
        calls = [module.expert_function() for module in modules]

        def joined(e: int, rows: torch.Tensor) -> torch.Tensor:
            outs = [call(e, rows) for call in calls]  # (C_e, F_i) each
            sizes[:] = [y.shape[-1] for y in outs]
            return torch.cat(outs, dim=-1)  # (C_e, sum F_i)

        return list(routed_apply(x, modality_ids, joined).split(sizes, dim=-1))
    return [route(module, x, modality_ids) for module in modules]


def _all_multiway(modules: Sequence[nn.Module], num_ways: int) -> bool:
    return all(isinstance(m, MultiwayNetwork) and m.num_ways == num_ways for m in modules)


def route(
    module: nn.Module, x: torch.Tensor, modality_ids: torch.Tensor | MultiwayRouting | None
) -> torch.Tensor:
    """Apply a plain module, or a `MultiwayNetwork` with the tokens' modality ids (B, L) or their
    host-built `MultiwayRouting`."""
    if isinstance(module, MultiwayNetwork):
        if modality_ids is None:
            raise ValueError(f"this layer has {module.num_ways} multiway experts: pass modality_ids (B, L)")
        return module(x, modality_ids)
    return module(x)


def expert_parameters(module: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Per expert, its parameters by name: views of the stacks of a `MultiwayNetwork` (writing
    them in place changes that expert), or [the parameters of `module`] for a plain module."""
    if isinstance(module, MultiwayNetwork):
        return [module.expert_parameters(e) for e in range(module.num_ways)]
    return [dict(module.named_parameters())]
