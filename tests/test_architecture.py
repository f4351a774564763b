"""The package's shape: imports (those inside functions too) form no cycle, every folder imports only the folders
below it, with no exceptions, launch/ sits above all of qwenjax/, and qwenjax's top level holds only the public API,
the errors, the file helpers and the configs."""

import ast
import pathlib

from conftest import REPO

PACKAGE = REPO / "qwenjax"
LAUNCH = REPO / "launch"
ROOTS = ("qwenjax", "launch")

# Folders, bottom to top (qwenjax's top-level modules count as folders of their own, and `qwenjax` is the public
# API, its __init__.py). A module imports modules of its own folder or of folders in the layers below; never a
# folder of its own layer or above. launch/ (launch/bench/ with it) may import anything in qwenjax; qwenjax never
# imports launch.
LAYERS = (
    ("qwenjax._errors",),
    ("qwenjax._files",),
    ("qwenjax.config",),
    ("qwenjax.parallel",),  # logical axes, meshes and their rules, multi-host
    ("qwenjax.kernels",),  # attention and int8 matmul kernels, and the buckets padded sizes come from
    ("qwenjax.model", "qwenjax.text"),
    ("qwenjax.multimodal",),  # images and videos for the model: preprocessing, positions, features
    ("qwenjax.checkpoints",),
    ("qwenjax.engine",),
    ("qwenjax.training", "qwenjax.server"),  # fine-tuning; the OpenAI-compatible HTTP server over an engine
    ("qwenjax",),
    ("launch",),
)


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for root in (PACKAGE, LAUNCH) for p in sorted(root.rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
  """module -> the qwenjax and launch modules it imports anywhere in its body. `from a import b` counts as importing a.b
  when that is a module, else a; a package's parents, which Python imports on the way, are not counted."""
  modules = _modules()
  graph: dict[str, set[str]] = {}
  for name, path in modules.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        edges.update(a.name for a in node.names if a.name.split(".")[0] in ROOTS)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(anchor + ([base] if base else []))
        if base.split(".")[0] not in ROOTS:
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


def folder(module: str) -> str:
  """The folder a module belongs to: qwenjax.<folder> (or a top-level module of qwenjax), the public API
  `qwenjax`, or `launch`."""
  parts = module.split(".")
  if parts[0] == "launch":
    return "launch"
  return ".".join(parts[:2])


def _layer(name: str) -> int:
  found = [i for i, layer in enumerate(LAYERS) if name in layer]
  assert found, f"{name} is in no layer of tests/test_architecture.py"
  return found[0]


def folder_graph() -> dict[str, dict[str, list[str]]]:
  """folder -> {folder it imports: the module edges that do}, edges within a folder left out."""
  out: dict[str, dict[str, list[str]]] = {}
  for a, edges in import_graph().items():
    for b in sorted(edges):
      if folder(a) != folder(b):
        out.setdefault(folder(a), {}).setdefault(folder(b), []).append(f"{a} -> {b}")
  return out


def test_the_graph_sees_imports_inside_functions():
  graph = import_graph()
  assert "qwenjax.engine.engine" in graph["qwenjax"]  # the public API
  assert "launch._cli" in graph["launch.generate"]  # launch/ is in the graph too
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


def test_every_folder_has_one_layer():
  named = [name for layer in LAYERS for name in layer]
  assert len(named) == len(set(named)), named
  present = {folder(m) for m in _modules()}
  assert present == set(named), f"in no layer: {sorted(present - set(named))}; gone: {sorted(set(named) - present)}"


def test_folders_import_only_the_folders_below_them():
  upward = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)}): {', '.join(edges)}"
            for a, imports in sorted(folder_graph().items()) for b, edges in sorted(imports.items())
            if _layer(b) >= _layer(a)]
  assert not upward, "\n".join(upward)


def test_the_top_level_is_the_api_errors_files_and_configs():
  flat = sorted(p.name for p in PACKAGE.glob("*.py"))
  assert flat == ["__init__.py", "_errors.py", "_files.py", "config.py"], flat
  folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")
  assert folders == ["checkpoints", "engine", "kernels", "model", "multimodal", "parallel", "server", "text",
                     "training"]
  assert all((PACKAGE / f / "__init__.py").is_file() for f in folders)
