"""Turn an arbitrary PyTorch model into a ``StagedBackbone`` by cutting it after named modules.

The model is traced with ``torch.fx`` (the cut modules kept as leaves), and the graph is partitioned in execution
order: stage ``k`` holds every operation after cut ``k-1`` up to and including cut ``k``; what follows the last cut
(pooling, flatten, the final linear layer) becomes the classifier. A cut is only accepted when the one tensor the
cut module returns is the *only* value flowing from the operations before it to the operations after it - cutting
inside a residual block would leave the skip branch behind, and is refused with a message naming the value.

Every stage is a ``torch.fx.GraphModule`` holding references to the original modules (nothing is copied), so the
converted backbone computes exactly what the model computes, and its stages keep the model's own parameter names
(``layer1.0.conv1.weight``), which is how weights trained elsewhere are mapped onto it (``load_pretrained``).
"""
from __future__ import annotations

import operator
from pathlib import Path
from typing import Iterable

import torch
from torch import fx, nn

from common.errors import ConfigError
from common.model.staged import StagedBackbone

# Operators that write into their first argument. A stage must never do that to its input: tiers decode the tensor
# they receive zero-copy from the request's immutable bytes.
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
                      operator.irshift, operator.imatmul}


class _CutTracer(fx.Tracer):
    """The default tracer, except that the cut modules are leaves (one call node each)."""

    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)


def convert(model: nn.Module, cuts: Iterable[str], num_classes: int,
            stage_names: Iterable[str] | None = None) -> StagedBackbone:
    """A ``StagedBackbone`` running ``model`` as stages ending after each module named in ``cuts``.

    ``cuts`` are qualified module names (``model.named_modules()``) in execution order. ``stage_names`` defaults to
    the cut names. Raises ``ConfigError`` for an unknown module, a module that is not called exactly once, cuts out
    of order, a cut that some other value crosses (a skip connection), or nothing left after the last cut.
    The returned backbone shares ``model``'s modules; in-place activations in them are switched off (same values).
    """
    cuts = list(cuts)
    names = list(stage_names) if stage_names is not None else list(cuts)
    if not cuts:
        raise ConfigError("give at least one module to cut after")
    if len(names) != len(cuts) or len(set(names)) != len(names):
        raise ConfigError(f"need one distinct stage name per cut, got {names} for cuts {cuts}")
    if len(set(cuts)) != len(cuts):
        raise ConfigError(f"a module is named twice in the cuts {cuts}")
    modules = dict(model.named_modules())
    for cut in cuts:
        if cut not in modules or cut == "":
            raise ConfigError(f"cannot cut after {cut!r}: {type(model).__name__} has no module of that name "
                              f"(top-level modules: {', '.join(n for n, _ in model.named_children())})")
    for a in cuts:
        for b in cuts:
            if b.startswith(a + "."):
                raise ConfigError(f"cannot cut after both {a!r} and {b!r}: the second lies inside the first")
    _switch_off_inplace(model)
    graph = _trace(model, set(cuts))

    # Locate each cut's call node and check the cuts follow the order the model runs them in.
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    cut_nodes = []
    for cut in cuts:
        calls = [n for n in nodes if n.op == "call_module" and n.target == cut]
        if len(calls) != 1:
            raise ConfigError(f"cannot cut after {cut!r}: the model's forward calls it {len(calls)} times as a step "
                              "of its own (a cut must be a module called exactly once)")
        cut_nodes.append(calls[0])
    order = [position[n] for n in cut_nodes]
    if order != sorted(order):
        ran = [cuts[i] for i in sorted(range(len(cuts)), key=lambda i: order[i])]
        raise ConfigError(f"cuts must be listed in the order the model runs them: {ran}, got {cuts}")

    # Part index of every node: 0..len(cuts)-1 are stages, len(cuts) is the classifier.
    part: dict[fx.Node, int] = {}
    k = 0
    for node in nodes:
        if node.op == "get_attr":
            continue  # parameters and buffers are fetched afresh in every part that reads them
        part[node] = k
        if k < len(cut_nodes) and node is cut_nodes[k]:
            k += 1
    _check_crossings(nodes, part, cut_nodes, cuts)
    for node in nodes:
        if node.op == "placeholder" and part[node] != 0:
            raise ConfigError("the model's input is only available to the first stage")
    body = [n for n in nodes if n.op not in ("placeholder", "output", "get_attr")]
    last = [n for n in body if part[n] == len(cuts)]
    if not last:
        raise ConfigError(f"nothing runs after the last cut {cuts[-1]!r}: the classifier must come after it")

    parts = [_extract(model, graph, nodes, part, i, cut_nodes) for i in range(len(cuts) + 1)]
    _check_parameters_not_shared(parts, names + ["classifier"])
    backbone = StagedBackbone(list(zip(names, parts[:-1])), parts[-1], num_classes=num_classes)
    backbone.source_names = True  # stage state_dict keys are the model's own names (see load_pretrained)
    return backbone


def _switch_off_inplace(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False


def _trace(model: nn.Module, leaves: set[str]) -> fx.Graph:
    try:
        graph = _CutTracer(leaves).trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, ... for forwards it cannot follow symbolically
        raise ConfigError(f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: {e}); "
                          "build its stages by hand instead") from None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ConfigError(f"{type(model).__name__}.forward takes {len(placeholders)} inputs; a backbone takes one")
    for node in graph.nodes:  # functional in-place flags, e.g. F.relu(x, inplace=True)
        if node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
    return graph


def _check_crossings(nodes: list[fx.Node], part: dict[fx.Node, int], cut_nodes: list[fx.Node],
                     cuts: list[str]) -> None:
    """Refuse any value used after a cut other than that cut's own output, and in-place writes to a stage input."""
    for node in nodes:
        if node.op == "output" or node not in part:
            continue
        for user in node.users:
            where = part.get(user, len(cut_nodes)) if user.op != "output" else len(cut_nodes)
            if where == part[node]:
                continue
            allowed = where == part[node] + 1 and node is cut_nodes[part[node]]
            if not allowed:
                boundary = cuts[part[node]] if part[node] < len(cuts) else cuts[-1]
                raise ConfigError(
                    f"cannot cut after {boundary!r}: the value {_describe(node)} is also used after the cut "
                    f"(by {_describe(user)}), e.g. by a skip connection; cut at a block boundary instead")
        if node.op == "call_module" and node in cut_nodes:
            for user in node.users:
                if user.op != "output" and part.get(user) == part[node] + 1 and _writes_first_arg(user, node):
                    raise ConfigError(f"the stage after {node.target!r} modifies its input in place "
                                      f"({_describe(user)}); tiers receive read-only tensors")


def _writes_first_arg(user: fx.Node, value: fx.Node) -> bool:
    if not user.args or user.args[0] is not value:
        return False
    if user.op == "call_method":
        return user.target.endswith("_") and not user.target.startswith("_")
    if user.op == "call_function":
        name = getattr(user.target, "__name__", "")
        return user.target in _INPLACE_OPERATORS or (name.endswith("_") and not name.startswith("_"))
    return False


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"output of module {node.target!r}"
    if node.op == "placeholder":
        return "model input"
    target = getattr(node.target, "__name__", node.target)
    return f"{node.op} {target!r} ({node.name})"


def _extract(model: nn.Module, graph: fx.Graph, nodes: list[fx.Node], part: dict[fx.Node, int], index: int,
             cut_nodes: list[fx.Node]) -> fx.GraphModule:
    """Part ``index`` of the partition as its own graph module: one input, one output."""
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    if index == 0:
        (inp,) = [n for n in nodes if n.op == "placeholder"]
        env[inp] = sub.placeholder("x")
    else:
        env[cut_nodes[index - 1]] = sub.placeholder("x")

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env and n.op == "get_attr":
            env[n] = sub.node_copy(n)
        return env[n]

    for node in nodes:
        if part.get(node) == index and node.op not in ("placeholder", "output"):
            env[node] = sub.node_copy(node, lookup)
    if index < len(cut_nodes):
        sub.output(env[cut_nodes[index]])
    else:
        (out,) = [n for n in nodes if n.op == "output"]
        sub.output(fx.map_arg(out.args[0], lookup))
    return fx.GraphModule(model, sub, class_name=f"Part{index}")


def _check_parameters_not_shared(parts: list[nn.Module], names: list[str]) -> None:
    """A tensor owned by two stages would be exported (and trained) twice, once per tier; refuse it."""
    owner: dict[int, str] = {}
    for name, module in zip(names, parts):
        for t in [*module.parameters(), *module.buffers()]:
            if id(t) in owner and owner[id(t)] != name:
                raise ConfigError(f"stages {owner[id(t)]!r} and {name!r} share a parameter; cut elsewhere")
            owner[id(t)] = name


def source_state_dict(backbone: StagedBackbone) -> dict[str, torch.Tensor]:
    """The backbone's tensors under the original model's names (converted backbones) or its own names (others)."""
    if not getattr(backbone, "source_names", False):
        return dict(backbone.state_dict())
    out: dict[str, torch.Tensor] = {}
    for module in [*backbone.stages, backbone.classifier]:
        out.update(module.state_dict())
    return out


def load_pretrained(backbone: StagedBackbone, path: Path) -> list[str]:
    """Copy weights from a local file into ``backbone``; return the names left at their initial values.

    ``path`` is a ``.safetensors`` file or a PyTorch state dict read with ``weights_only=True`` (never unpickled
    objects, never downloaded). Names are the original model's (e.g. torchvision's ``layer1.0.conv1.weight``).
    Tensors whose shape differs - typically the final classifier when the class count changed - are skipped and
    reported; anything else missing or mismatched is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pretrained weights {path} do not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConfigError(f"cannot read {path} as a weights-only state dict: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path} does not hold a flat state dict of tensors")
    own = source_state_dict(backbone)
    missing = sorted(set(own) - set(state))
    if missing:
        raise ConfigError(f"{path} lacks {len(missing)} of the backbone's tensors, e.g. {missing[:3]}")
    skipped = [k for k, t in own.items() if tuple(state[k].shape) != tuple(t.shape)]
    head = set(backbone.classifier.state_dict())
    if not getattr(backbone, "source_names", False):
        head = {f"classifier.{k}" for k in head}
    foreign = [k for k in skipped if k not in head]
    if foreign:
        raise ConfigError(f"{path} has tensors of the wrong shape for this backbone: {foreign[:3]}")
    with torch.no_grad():
        for k, t in own.items():
            if k not in skipped:
                t.copy_(state[k])
    return skipped
