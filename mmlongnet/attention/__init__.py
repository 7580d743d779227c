"""Dilated attention: the exact fused op, its dense reference, the modules and the decoding cache."""

from mmlongnet.attention.cache import DilatedKVCache
from mmlongnet.attention.config import LongNetLayerConfig
from mmlongnet.attention.dilated import available_backends, backend_status, check_schedule, dilated_attention
from mmlongnet.attention.global_queries import GlobalQueries
from mmlongnet.attention.modules import DilatedAttention
from mmlongnet.attention.multihead import MultiheadDilatedAttention, attend_globally, dense_attention
from mmlongnet.attention.reference import branch_multiplicity, dilated_attention_reference

__all__ = [
    "DilatedAttention",
    "DilatedKVCache",
    "GlobalQueries",
    "LongNetLayerConfig",
    "MultiheadDilatedAttention",
    "attend_globally",
    "available_backends",
    "backend_status",
    "branch_multiplicity",
    "check_schedule",
    "dense_attention",
    "dilated_attention",
    "dilated_attention_reference",
]
