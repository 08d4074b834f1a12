"""The house's layers, read from the code with ast: every import (inside functions too) between the
project's modules, which must form no cycle, and the machinery in harness/ never importing a
top-level script."""
import ast
import os

from harness.tests.fixtures import ROOT

SCRIPTS = {"train_grpo", "eval"}
PROGRAMS = {"harness.sft", "harness.sweep", "harness.bench", "harness.serve", "harness.gpu_check",
            "harness.rl_vs_sft"}


def project_modules():
    """{module name: path} of the project's code (tests and docs left out)."""
    out = {}
    for folder in ("", "harness"):
        for f in sorted(os.listdir(os.path.join(ROOT, folder))):
            if f.endswith(".py") and not f.startswith("test_") and f != "__init__.py":
                name = (folder + "." if folder else "") + f[:-3]
                out[name] = os.path.join(ROOT, folder, f)
    return out


def imports_of(path, names):
    """The project modules a file imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found & set(names)


def graph():
    names = project_modules()
    return {m: imports_of(p, names) for m, p in names.items()}


def cycle(edges):
    """One cycle as a list of modules, or None (depth-first search)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_import_graph_has_no_cycle_even_counting_imports_inside_functions():
    assert cycle(graph()) is None


def test_the_cycle_finder_finds_a_planted_cycle():
    edges = graph()
    edges["tinylora"] = edges["tinylora"] | {"eval"}  # the method importing a script
    assert cycle(edges) is not None


def test_the_machinery_imports_no_top_level_script():
    machinery = {m for m in graph() if m.startswith("harness.") and m not in PROGRAMS}
    assert {"harness.config", "harness.run", "harness.export", "harness.engine"} <= machinery
    bad = {m: sorted(graph()[m] & SCRIPTS) for m in machinery if graph()[m] & SCRIPTS}
    assert bad == {}


def test_the_method_is_standalone():
    assert graph()["tinylora"] == set()
