"""The package's layering (docs/design.md), read from the import statements of its modules."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jaxembed"
PROGRAMS = {
    "jaxembed.train",
    "jaxembed.mine",
    "jaxembed.evaluate",
    "jaxembed.convert",
    "jaxembed.merge",
    "jaxembed.score",
}
# Optional heavy dependencies imported where they are used, never to dodge a cycle; and the
# package's two public names, imported on first use (so the data readers' worker processes
# do not import JAX).
ALLOWED_LOCAL = {("jaxembed.evaluate", "jaxembed.mteb_adapter"), ("jaxembed", "jaxembed.encoder")}


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports() -> tuple[dict[str, set[str]], set[tuple[str, str]]]:
    """``(module -> jaxembed modules it imports, the function-local ones)``."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    local = set()
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxembed"):
                names = [f"{node.module}.{a.name}" for a in node.names]
                targets = [n if n in mods else node.module for n in names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("jaxembed")]
            else:
                continue
            for t in targets:
                if t in mods and t != m:
                    graph[m].add(t)
                    if node.col_offset > 0:
                        local.add((m, t))
    return graph, local


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for n in graph[todo.pop()]:
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def test_no_import_cycles_and_no_local_imports_to_dodge_one():
    graph, local = _imports()
    cycles = sorted(m for m in graph if m in _reachable(graph, m))
    assert cycles == []
    assert local <= ALLOWED_LOCAL


def test_programs_never_import_each_other():
    graph, _ = _imports()
    for program in PROGRAMS:
        assert not (_reachable(graph, program) & PROGRAMS), program


def test_lower_layers_know_nothing_of_the_layers_above():
    graph, _ = _imports()
    above_models = {
        "jaxembed.data",
        "jaxembed.encoder",
        "jaxembed.workdir",
        "jaxembed.trained_model",
        "jaxembed.retrieval",
    }
    for m in graph:
        deps = _reachable(graph, m)
        if m.startswith(("jaxembed.models", "jaxembed.losses", "jaxembed.gradcache")):
            # Models and losses: no data, programs, runs or encoders; losses no models.
            assert not any(d.startswith(tuple(above_models | PROGRAMS)) for d in deps), m
        if m in ("jaxembed.losses", "jaxembed.gradcache"):
            assert not any(d.startswith("jaxembed.models") for d in deps), m
        if m.startswith("jaxembed.data"):
            # The pipeline is handed a tokenizer and a packing plan: no model, no mesh.
            banned = ("jaxembed.models", "jaxembed.hf", "jaxembed.encoder", "jaxembed.sharding")
            assert not any(d.startswith(banned) for d in deps), (m, deps)
