"""Saving and loading the trained weights of a patched model: safetensors for tensors, JSON for the config.

A directory holds `fastpeft_config.json` (the `UnifiedConfig`, the architecture, and the name and shape of every
tensor) and `fastpeft_model.safetensors` (the parameters the method trains, named as in the patched model).
Nothing is pickled.
"""

from __future__ import annotations

import json
import os
from typing import Union

import torch
from torch import nn

from fastpeft._version import __version__
from fastpeft.architectures import find_arch
from fastpeft.config import config_from_dict, config_to_dict
from fastpeft.patching import STATE_ATTR, build_plan, execute, get_state, undo

CONFIG_NAME = "fastpeft_config.json"
WEIGHTS_NAME = "fastpeft_model.safetensors"
FORMAT = "fastpeft-adapter"
FORMAT_VERSION = 1


def save_adapter(model: nn.Module, directory: Union[str, os.PathLike]) -> None:
    """Write the trained weights of `model` and its config to `directory` (created if missing)."""
    from safetensors.torch import save_file

    state = get_state(model, "save_adapter")
    if state.merged:
        raise ValueError(
            "fastpeft.save_adapter: LoRA is merged into the base weights; save the adapter before fastpeft.merge_lora"
        )
    params = dict(model.named_parameters())
    tensors = {}
    for name in state.trained:
        p = params[name]
        if p.device.type == "meta":
            raise ValueError(f"fastpeft.save_adapter: parameter {name!r} is on the meta device (no values to save)")
        tensors[name] = p.detach().to("cpu").contiguous()
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fastpeft_version": __version__,
        "architecture": state.arch,
        "model_type": state.model_type,
        "model_class": type(model).__name__,
        "config": config_to_dict(state.config),
        "prefix_sites": state.site_names,
        "tensors": {name: list(t.shape) for name, t in tensors.items()},
    }
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(record, f, indent=2)


def _read_record(directory) -> dict:
    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"fastpeft.load_adapter: {path!r} not found (expected a fastpeft.save_adapter directory)")
    try:
        with open(config_path) as f:
            record = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"fastpeft.load_adapter: {config_path!r} is not valid JSON: {error}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"fastpeft.load_adapter: {config_path!r} is not a fastpeft adapter config (format {FORMAT!r})")
    if record.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"fastpeft.load_adapter: {config_path!r} has format_version {record.get('format_version')!r}; "
            f"this fastpeft reads version {FORMAT_VERSION}"
        )
    for key in ("architecture", "model_type", "config", "tensors"):
        if key not in record:
            raise ValueError(f"fastpeft.load_adapter: {config_path!r} lacks the field {key!r}")
    return record


def _describe_mismatch(expected: dict, found: dict) -> str:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [
        f"{n}: model {list(expected[n])}, file {list(found[n])}"
        for n in sorted(set(expected) & set(found))
        if list(expected[n]) != list(found[n])
    ]
    lines = []
    for title, items in (("missing from the file", missing), ("not in the model", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (and {len(items) - 5} more)" if len(items) > 5 else ""
            lines.append(f"{title}: {', '.join(items[:5])}{more}")
    return "; ".join(lines)


def load_adapter(model: nn.Module, directory: Union[str, os.PathLike]) -> nn.Module:
    """Load a `save_adapter` directory into `model` and return it.

    `model` is a freshly loaded base model (it gets patched with the saved config) or a model already patched with
    the same config. Names, shapes and the config are checked before any weight is written; on any error the
    model is left as it was.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    record = _read_record(directory)
    config = config_from_dict(record["config"], where=f"{os.path.join(directory, CONFIG_NAME)}: config")
    arch = find_arch(model)
    model_type = model.config.model_type
    if record["architecture"] != arch.name or record["model_type"] != model_type:
        raise ValueError(
            f"fastpeft.load_adapter: the adapter was saved from a {record['model_type']!r} model, "
            f"this model is {model_type!r}"
        )
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    with safe_open(weights_path, framework="pt") as f:
        found = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    if found != {n: list(s) for n, s in record["tensors"].items()}:
        raise ValueError(
            f"fastpeft.load_adapter: {weights_path!r} does not hold the tensors its config lists: "
            + _describe_mismatch(record["tensors"], found)
        )

    state = getattr(model, STATE_ATTR, None)
    applied_here = state is None
    if applied_here:
        state = execute(model, build_plan(model, config))
    elif state.config != config:
        raise ValueError(
            f"fastpeft.load_adapter: the model is patched with {state.config}, the adapter was saved with {config}"
        )
    try:
        params = dict(model.named_parameters())
        expected = {name: list(params[name].shape) for name in state.trained}
        if expected != found:
            raise ValueError(
                f"fastpeft.load_adapter: the adapter in {str(directory)!r} does not fit this model: "
                + _describe_mismatch(expected, found)
            )
        tensors = load_file(weights_path)
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor.to(device=params[name].device, dtype=params[name].dtype))
    except BaseException:
        if applied_here:
            undo(model, state)
        raise
    return model
