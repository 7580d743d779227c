"""Whether the running code is traced (torch.compile) or recorded (a CUDA graph)."""

from __future__ import annotations

import torch


def traced() -> bool:
    """Whether the running code is traced by `torch.compile` or recorded into a CUDA graph: then
    nothing may read a device value on the host or copy from the host, per-batch values come as
    device tensors (a plan's `device_lengths`), and nothing may keep a tensor made inside."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()
