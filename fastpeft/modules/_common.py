"""Small helpers shared by the inserted modules."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def like(t: Optional[Tensor], ref: Tensor) -> Optional[Tensor]:
    """`t` in the dtype of the activation `ref`, so that trained weights may stay in float32 under a bfloat16 base
    model. Under autocast the ops cast their inputs themselves, as `nn.Linear` does."""
    if t is None or t.dtype == ref.dtype or autocast_enabled(ref.device):
        return t
    return t.to(ref.dtype)


def autocast_enabled(device: torch.device) -> bool:
    # torch raises for device types autocast does not know (meta).
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:
        return False


def remove_hooks(module: torch.nn.Module, hook_type: type) -> None:
    """Remove every forward (pre-)hook of `module` that is an instance of `hook_type`.

    fastpeft finds its hooks by type rather than by keeping `RemovableHandle`s, so that `copy.deepcopy` of a
    patched model (whose hooks are copied with it) can still be `remove`d.
    """
    extras = (
        module._forward_pre_hooks_with_kwargs,
        module._forward_hooks_with_kwargs,
        module._forward_hooks_always_called,
    )
    for store in (module._forward_pre_hooks, module._forward_hooks):
        for key, hook in list(store.items()):
            if isinstance(hook, hook_type):
                del store[key]
                for extra in extras:
                    extra.pop(key, None)

