"""Dilated attention: the exact fused op, its dense reference, and the module."""

from mmlongnet.attention.dilated import available_backends, check_schedule, dilated_attention
from mmlongnet.attention.modules import DilatedAttention
from mmlongnet.attention.reference import branch_multiplicity, dilated_attention_reference

__all__ = [
    "DilatedAttention",
    "available_backends",
    "branch_multiplicity",
    "check_schedule",
    "dilated_attention",
    "dilated_attention_reference",
]
