"""Which layers of a model hold neurons, and how their weights map onto those neurons."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["DEFAULT_LAYER_TYPES", "find_layers", "find_output_layers", "num_neurons", "channel_dim", "input_groups"]

#: Layer types tracked by default: each output unit (Linear) or output channel (Conv) is a neuron.
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def num_neurons(layer: nn.Module) -> int:
    """Number of neurons of a Linear or Conv layer: its output features or channels."""
    if isinstance(layer, nn.Linear) or (isinstance(layer, nn.modules.conv._ConvNd) and not layer.transposed):
        return int(layer.weight.shape[0])  # the weight's rows: right even when the weight was replaced
    raise TypeError(
        f"lightning_ssr tracks Linear and Conv1d/2d/3d layers, got {type(layer).__name__}; "
        "choose other `layer_types`"
    )


def channel_dim(layer: nn.Module) -> int:
    """The dimension of the layer's output that indexes its neurons."""
    return -1 if isinstance(layer, nn.Linear) else 1


def input_groups(consumer: nn.Module, neurons: int) -> int | None:
    """How many input columns of ``consumer`` belong to each of ``neurons`` producer neurons.

    A Linear after a Linear of ``n`` units has ``in_features == n`` (1 column each); a Linear
    after a flattened Conv of ``n`` channels has ``in_features == n * positions`` (channel-major,
    as ``torch.flatten`` lays it out). ``None`` when the shapes do not line up.
    """
    if isinstance(consumer, nn.Linear):
        fan = consumer.in_features
    elif isinstance(consumer, nn.modules.conv._ConvNd) and not consumer.transposed and consumer.groups == 1:
        fan = consumer.in_channels
        return 1 if fan == neurons else None
    else:
        return None
    if fan % neurons:
        return None
    return fan // neurons


def _output_layers(candidates: dict[str, nn.Module], model: nn.Module) -> set[str]:
    """The model's output layer: the last candidate registered, with its siblings in a ModuleDict
    or ModuleList, or the layers at the same path under another key of an enclosing ModuleDict
    (the heads of a multi-head model, e.g. Avalanche's ``classifiers.<task>.classifier``)."""
    if not candidates:
        return set()
    last = list(candidates)[-1]
    parts = last.split(".")
    for depth in range(len(parts) - 2, 0, -1):  # heads keyed by task in a ModuleDict, at any depth
        container = ".".join(parts[:depth])
        if isinstance(model.get_submodule(container), nn.ModuleDict):
            rest = ".".join(parts[depth + 1:])
            return {n for n in candidates if n.startswith(container + ".") and n.split(".")[depth + 1:] == rest.split(".")}
    parent_name = last.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, (nn.ModuleDict, nn.ModuleList)):
        prefix = parent_name + "." if parent_name else ""
        return {n for n in candidates if n.startswith(prefix) and "." not in n[len(prefix):]}
    return {last}


def _untrackable(model: nn.Module) -> set[int]:
    """Warn, naming them, about the modules SSR cannot track or whose effect it cannot control, in one
    pass over the model; return the ids of the Linear layers that must stay untracked (attention's
    ``out_proj``, applied through ``torch.nn.functional``)."""
    functional: dict[int, str] = {}
    recurrent, norms = [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            functional[id(m.out_proj)] = f"{name}.out_proj" if name else "out_proj"
        elif isinstance(m, nn.RNNBase):
            recurrent.append(name)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            norms.append(name)
    if recurrent:
        warnings.warn(
            f"SSR does not track the recurrent layers {recurrent} (an LSTM/GRU unit's state mixes its gates, "
            "so there is no per-neuron weight row to scale); the Linear/Conv layers around them are tracked",
            stacklevel=4)
    if norms:
        warnings.warn(
            f"{len(norms)} BatchNorm layer(s) ({norms[:3]}{' ...' if len(norms) > 3 else ''}) normalize with batch "
            "statistics that drift between tasks (and re-normalize what SSR's homeostatic scaling sets, where "
            "scaling_rate > 0): convert them with lightning_ssr.convert_batchnorm(model) (SSRNorm, a homeostatic "
            "drop-in)", stacklevel=4)
    if functional:
        warnings.warn(
            f"SSR leaves {list(functional.values())} untracked: nn.MultiheadAttention applies its out_proj through "
            "torch.nn.functional, never through the module's forward, so no hook can sense it (the layers "
            "that feed and read the attention are tracked as usual)", stacklevel=4)
    return set(functional)


def find_layers(
    model: nn.Module,
    layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    track_output: bool = False,
) -> dict[str, nn.Module]:
    """Select the layers whose neurons SSR tracks, by type and by name pattern.

    Args:
        model: the model to search.
        layer_types: module types to consider. Default: Linear and Conv1d/2d/3d.
        include: ``fnmatch`` patterns on qualified module names (``"encoder.*"``); when given,
            only matching layers are tracked, and a pattern that matches no candidate raises.
            Default: ``None`` (every candidate).
        exclude: patterns of layers never tracked. Default: ``()``.
        track_output: track the output layer too. The output layer is the last candidate in
            registration order (with its siblings when it sits in a ModuleDict/ModuleList, as
            the heads of a multi-head model do); its units are logits, not firing rates, so by
            default it is left alone. Patterns in ``include`` override this. Default: ``False``.

    Returns:
        Qualified name to module, in registration order.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> list(find_layers(net))
        ['0']
        >>> list(find_layers(net, track_output=True))
        ['0', '2']
    """
    types = tuple(layer_types)
    functional = _untrackable(model)
    candidates = {
        name: m for name, m in model.named_modules()
        if name and isinstance(m, types) and id(m) not in functional
        and not (isinstance(m, nn.modules.conv._ConvNd) and m.transposed)
    }
    if not candidates:
        raise ValueError(
            f"No layer to track in {type(model).__name__}: `layer_types` "
            f"{[t.__name__ for t in types]} matched no module"
        )
    for pattern in [*(include or ()), *exclude]:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in candidates):
            arg = "include" if include and pattern in include else "exclude"
            shown = list(candidates)[:10]
            raise ValueError(
                f"`{arg}` pattern {pattern!r} matches no layer; candidate layers are {shown}"
                + (" ..." if len(candidates) > 10 else "")
            )
    outputs = set() if track_output else _output_layers(candidates, model)
    chosen: dict[str, nn.Module] = {}
    for name, m in candidates.items():
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        if include:
            if any(fnmatch.fnmatchcase(name, p) for p in include):
                chosen[name] = m
        elif name not in outputs:
            chosen[name] = m
    if not chosen:
        raise ValueError(
            f"No layer left to track in {type(model).__name__} after `include`/`exclude` and "
            f"leaving out the output layer {sorted(outputs)}; pass `track_output=True` or `include`"
        )
    return _without_shared_weights(chosen)


def _without_shared_weights(chosen: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Tied weights: a weight tensor is one set of neurons' incoming synapses, so only the first layer
    holding it is tracked (scaling it once per layer would apply two factors to one synapse)."""
    owner: dict[int, str] = {}
    out: dict[str, nn.Module] = {}
    for name, m in chosen.items():
        first = owner.setdefault(id(m.weight), name)
        if first == name:
            out[name] = m
        else:
            warnings.warn(f"SSR leaves {name!r} untracked: it shares its weight with {first!r}, which it tracks "
                          "(tied weights get one set of factors and gates)", stacklevel=4)
    return out


def find_output_layers(model: nn.Module, layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES) -> dict[str, nn.Module]:
    """The output layer(s) as :func:`find_layers` defines them (the heads of a multi-head model).

    Example:
        >>> list(find_output_layers(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))))
        ['2']
    """
    types = tuple(layer_types)
    candidates = {
        name: m for name, m in model.named_modules()
        if name and isinstance(m, types) and not (isinstance(m, nn.modules.conv._ConvNd) and m.transposed)
    }
    outputs = _output_layers(candidates, model)
    return {n: m for n, m in candidates.items() if n in outputs}


def weight_rows(weight: Tensor, layer: nn.Module) -> Tensor:
    """A ``[neurons, fan_in]`` view of a Linear or Conv weight (rows are incoming weights)."""
    return weight.reshape(num_neurons(layer), -1)
