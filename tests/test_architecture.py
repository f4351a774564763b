"""The package's shape: imports (those inside functions too) form no cycle and run down the layers, and the top
level holds only the public API, the errors and the configs."""

import ast
import pathlib

from conftest import REPO

PACKAGE = REPO / "qwenjax"

# Bottom to top. A module may import modules of its own layer or below, never above (and never in a cycle).
LAYERS = (
    ("qwenjax._errors", "qwenjax.config"),
    # leaves that import nothing above the configs: logical axes and mesh rules, multi-host, kernels, buckets,
    # host-side page bookkeeping, and the KV cache pytree (sharding places it)
    ("qwenjax.parallel.axes", "qwenjax.parallel.sharding", "qwenjax.parallel.distributed", "qwenjax.kernels",
     "qwenjax.kernels.buckets", "qwenjax.engine.pages", "qwenjax.model.kv_cache"),
    ("qwenjax.model", "qwenjax.text", "qwenjax.multimodal"),
    ("qwenjax.checkpoints",),
    ("qwenjax.parallel.planner", "qwenjax.engine", "qwenjax.training"),
    ("qwenjax",),
)


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
  """module -> the qwenjax modules it imports anywhere in its body. `from a import b` counts as importing a.b
  when that is a module, else a; a package's parents, which Python imports on the way, are not counted."""
  modules = _modules()
  graph: dict[str, set[str]] = {}
  for name, path in modules.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        edges.update(a.name for a in node.names if a.name.split(".")[0] == "qwenjax")
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(anchor + ([base] if base else []))
        if base.split(".")[0] != "qwenjax":
          continue
        for alias in node.names:
          edges.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    graph[name] = edges - {name}
  return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan's algorithm)."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  found: list[list[str]] = []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def _layer(module: str) -> int:
  best, depth = None, -1
  for i, layer in enumerate(LAYERS):
    for prefix in layer:
      if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > depth:
        best, depth = i, len(prefix)
  assert best is not None, f"{module} is in no layer of tests/test_architecture.py"
  return best


def test_the_graph_sees_imports_inside_functions():
  graph = import_graph()
  assert "qwenjax.engine.engine" in graph["qwenjax"]  # the public API
  # launch-time imports inside functions are edges too (the checker would miss cycles through them otherwise)
  lazily = {m for m, path in _modules().items()
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef)
            for inner in ast.walk(node) if isinstance(inner, (ast.Import, ast.ImportFrom))
            and (getattr(inner, "module", "") or "").startswith("qwenjax")}
  assert lazily, "no module imports qwenjax inside a function: the test no longer exercises that case"
  assert all(graph[m] for m in lazily)


def test_no_import_cycles():
  cycles = _cycles(import_graph())
  assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_run_down_the_layers():
  upward = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
            for a, edges in import_graph().items() for b in sorted(edges) if _layer(b) > _layer(a)]
  assert not upward, "\n".join(upward)


def test_the_top_level_is_the_api_errors_and_configs():
  flat = sorted(p.name for p in PACKAGE.glob("*.py"))
  assert flat == ["__init__.py", "_errors.py", "config.py"], flat
  folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")
  assert folders == ["checkpoints", "engine", "kernels", "model", "multimodal", "parallel", "text", "training"]
  assert all((PACKAGE / f / "__init__.py").is_file() for f in folders)
