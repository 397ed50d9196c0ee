"""The house's layout rules that a reader cannot see from one file (issue 26): no import circles
in pipeline/ or tsd/, counting imports inside functions too (a deferred import is still a
dependency: it hides a circle from Python, not from the reader).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    found = {}
    for f in sorted([*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("tsd/**/*.py")]):
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = f
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file. `from pkg import mod` is an
    edge to pkg.mod (not to the package, whose __init__ only re-exports)."""
    graph = {m: set() for m in modules}
    for m, f in modules.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
                graph[m].update(subs or ([node.module] if node.module in modules else []))
            elif isinstance(node, ast.Import):
                graph[m].update(a.name for a in node.names if a.name in modules)
        graph[m].discard(m)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_detector_finds_a_circle_through_a_deferred_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_in_pipeline_or_tsd():
    assert circles(import_graph(_modules())) == []


MODULE_LINES, FUNCTION_LINES = 450, 70  # issue 26: a module a newcomer reads whole, a function on one screen


def _code_lines(fn: ast.AST) -> int:
    """A function's lines without its docstring (a long why is welcome; long code is not)."""
    lines = fn.end_lineno - fn.lineno + 1
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        lines -= body[0].end_lineno - body[0].lineno + 1
    return lines


def test_modules_and_functions_stay_readable():
    too_long = []
    for name, f in _modules().items():
        text = f.read_text()
        if len(text.splitlines()) > MODULE_LINES:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node) > FUNCTION_LINES:
                too_long.append(f"{name}.{node.name}: {_code_lines(node)} lines")
    assert too_long == []
