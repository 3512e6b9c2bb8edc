"""The layering of the code base, checked: which package may import which, no import cycles, and what a running tier
has loaded. Each rule is also shown failing on a deliberately wrong import, so a broken checker cannot pass."""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "device", "edge", "cloud", "training", "scripts", "proto")

# Layers from the bottom up: a module may import its own layer and the ones below, never one above.
LAYERS = ("common.wire", "common.model", "common.serving", "common.emulation")
# Modules whose logic must not depend on a transport or on generated protobuf code (directly).
PURE = ("common.model", "common.serving.runtime", "common.serving.batching", "common.wire.batch", "common.wire.link",
        "common.emulation.cost_model", "common.emulation.report", "common.emulation.feed", "common.emulation.chain",
        "common.emulation.baselines")
TRANSPORT = ("grpc", "grpc_health", "grpc_reflection", "proto")
# Modules that run a deployment rather than emulate one may call the gRPC client (health waits).
LAUNCHERS = ("common.emulation.deployment",)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts}


def _module_level(statements: list[ast.stmt]):
    """The statements that run when a module is imported: its body, including ``if``/``try`` blocks."""
    for node in statements:
        yield node
        if isinstance(node, (ast.If, ast.Try)):
            for block in (node.body, node.orelse, getattr(node, "finalbody", []),
                          *[h.body for h in getattr(node, "handlers", [])]):
                yield from _module_level(block)


def imports_of(source: str, module: str, top_level_only: bool = False) -> set[str]:
    """Absolute names ``module`` imports (``from a import b`` counts as ``a.b`` too, since b may be a module)."""
    tree = ast.parse(source)
    nodes = _module_level(tree.body) if top_level_only else ast.walk(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(module.split(".")[:-node.level] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def import_graph(top_level_only: bool = False) -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        graph[name] = {i for i in imports_of(path.read_text(), name, top_level_only) if i != name
                       and (i in modules or i.split(".")[0] in TRANSPORT or i.split(".")[0] not in PACKAGES)}
    return graph


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that breaks a layering rule, as ``importer -> imported (rule)``."""
    bad = []
    for module, imported in graph.items():
        for target in imported:
            if _within(module, "common") and (_within(target, "training") or _within(target, "scripts")):
                bad.append(f"{module} -> {target} (shared code imports no training or scripts)")
            for i, layer in enumerate(LAYERS):
                if _within(module, layer) and any(_within(target, above) for above in LAYERS[i + 1:]):
                    bad.append(f"{module} -> {target} ({layer} sits below it)")
            if any(_within(module, p) for p in PURE) and target.split(".")[0] in TRANSPORT:
                bad.append(f"{module} -> {target} (pure logic imports no gRPC or protobuf code)")
            if (_within(module, "common.emulation") and module not in LAUNCHERS
                    and target in ("common.serving.server", "common.serving.client")):
                bad.append(f"{module} -> {target} (emulation never calls the gRPC server or client)")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles among project modules (depth-first search; each cycle reported once from where it closes)."""
    state, stack, found = {}, [], []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_layering_holds():
    assert layering_violations(import_graph()) == []


@pytest.mark.parametrize("importer, imported, rule", [
    ("common.wire.tensors", "common.serving.runtime", "sits below"),
    ("common.model.gates", "common.emulation.chain", "sits below"),
    ("common.serving.server", "training.calibrate", "no training"),
    ("common.serving.runtime", "grpc", "pure logic"),
    ("common.model.bundle", "proto.splitexit_pb2", "pure logic"),
    ("common.emulation.chain", "common.serving.client", "never calls the gRPC"),
])
def test_a_wrong_import_is_caught(importer, imported, rule):
    graph = import_graph()
    graph[importer] = graph[importer] | {imported}
    assert any(v.startswith(f"{importer} -> {imported}") and rule in v for v in layering_violations(graph))


def test_no_import_cycles_at_module_level():
    assert cycles(import_graph(top_level_only=True)) == []


def test_a_cycle_is_caught():
    graph = import_graph(top_level_only=True)
    graph["common.wire.tensors"] = graph["common.wire.tensors"] | {"common.wire.codecs"}
    assert any("common.wire.tensors" in c and "common.wire.codecs" in c for c in cycles(graph))


def test_only_a_few_shared_modules_sit_directly_under_common():
    loose = sorted(p.name for p in (ROOT / "common").glob("*.py") if p.name != "__init__.py")
    assert len(loose) <= 8, loose


def _loaded_by(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


# What a serving install (the package without its train/dev extras) does not have; a tier must start without them.
NOT_IN_A_SERVING_INSTALL = ("matplotlib", "grpc_tools", "tqdm")


@pytest.mark.e2e
def test_a_started_tier_needs_no_training_plotting_or_code_generation(tiny_bundle):
    """Start the edge tier (server up, weights loaded, next tier configured) in an interpreter where the packages
    of the train and dev extras cannot be imported, as in a serving install, and list what it has loaded."""
    loaded = _loaded_by(f"""
        import sys
        for name in {NOT_IN_A_SERVING_INSTALL!r}:
            sys.modules[name] = None  # importing it now raises ImportError, as if it were not installed
        from common.serving.tier import Tier, get_args_parser, plan_tier
        args = get_args_parser("edge").parse_args(
            ["--bundle", {str(tiny_bundle)!r}, "--listen", "127.0.0.1:0", "--next", "127.0.0.1:9"])
        tier = Tier.open(plan_tier("edge", args))
        try:
            tier.load()
        finally:
            tier.close()
        print(*(name for name, m in sys.modules.items() if m is not None))
    """)
    assert "common.serving.tier" in loaded and "torch" in loaded  # it did start a tier
    assert sorted(m for m in loaded if m.split(".")[0] in ("training", "scripts", *NOT_IN_A_SERVING_INSTALL)) == []


def test_the_serving_install_leaves_out_training_plotting_and_code_generation():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {d.split("==")[0].split("[")[0] for d in project["dependencies"]}
    assert not core & {"matplotlib", "grpcio-tools", "tqdm"}
    assert "matplotlib" in str(project["optional-dependencies"]["train"])


def test_emulation_and_the_planner_load_no_grpc():
    loaded = _loaded_by("""
        import sys
        import common.emulation.chain, common.emulation.baselines, common.emulation.cost_model
        import training.analysis.planner, training.analysis.frontier
        print(*sys.modules)
    """)
    assert "training.analysis.planner" in loaded
    assert sorted(m for m in loaded if m.split(".")[0] in ("grpc", "grpc_health", "grpc_reflection")) == []
