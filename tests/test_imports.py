"""The package's imports run one way: foundation -> data -> models / diffusion -> train -> commands.

Read from the source with `ast` (nothing is imported), at module level and inside functions alike.
"""
import ast
import pathlib
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "diffusion_jax"

# Lowest first. A module may import its own layer and the layers below it; within a layer the
# imports must not form a cycle, and models and diffusion never import each other.
LAYERS = (
    ("foundation", ("config", "config_defaults", "malloc", "paths", "patches", "sharding", "distributed", "metrics", "media", "checkpoint")),
    ("data", ("data",)),
    ("models and diffusion", ("models", "diffusion")),
    ("train", ("train",)),
    ("commands", ("export", "inference", "encode", "recaption", "sample", "eval_metrics", "evaluate", "quickstart", "__main__")),
)
SIBLINGS_APART = ("models", "diffusion")
# Function-local imports allowed, each to keep an optional heavy dependency off the import path.
LOCAL_IMPORTS_ALLOWED = {"jax.experimental.pallas.ops.tpu"}  # the TPU splash-attention kernels


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: pathlib.Path, modules) -> list[tuple[str, bool, int]]:
  """(imported name, inside a function, line) for every import statement of the file."""
  found = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, ast.Import):
        found.extend((alias.name, in_function, child.lineno) for alias in child.names)
      elif isinstance(child, ast.ImportFrom):
        assert child.level == 0, f"{path}:{child.lineno}: relative import"
        for alias in child.names:  # `from a import b` names module a.b when it is one, else a
          name = f"{child.module}.{alias.name}"
          found.append((name if name in modules else child.module, in_function, child.lineno))
      visit(child, local)

  visit(ast.parse(path.read_text()), False)
  return found


def _layer_of(module: str) -> tuple[int, str]:
  """(layer index, group) of a package module: the group is its first name below diffusion_jax."""
  group = module.split(".")[1] if "." in module else ""
  for index, (_, groups) in enumerate(LAYERS):
    if group in groups:
      return index, group
  raise AssertionError(f"{module} is in no layer: add it to tests/test_imports.py LAYERS")


def _graph():
  modules = _modules()
  edges, local = {}, []
  for module, path in modules.items():
    edges[module] = set()
    for name, in_function, line in _imports(path, modules):
      if in_function:
        local.append((f"{path.relative_to(PACKAGE.parent)}:{line}", name))
      if name.startswith("diffusion_jax.") and name != module:
        edges[module].add(name)
  return modules, edges, local


def test_every_module_has_a_layer():
  for module in _modules():
    if module != "diffusion_jax" and module.count(".") >= 1:
      _layer_of(module)


def test_imports_run_down_the_layers():
  _, edges, _ = _graph()
  upward = []
  for module, targets in edges.items():
    if module == "diffusion_jax":
      continue
    layer, group = _layer_of(module)
    for target in targets:
      if target.count(".") == 1 and target.split(".")[1] in ("data", "models", "diffusion", "train"):
        continue  # the (empty) subpackage itself
      target_layer, target_group = _layer_of(target)
      if target_layer > layer:
        upward.append(f"{module} ({LAYERS[layer][0]}) imports {target} ({LAYERS[target_layer][0]})")
      elif {group, target_group} == set(SIBLINGS_APART):
        upward.append(f"{module} imports its sibling {target}")
  assert not upward, "\n".join(upward)


def test_no_import_cycles():
  _, edges, _ = _graph()
  state, stack, cycles = {}, [], []

  def visit(module):
    state[module] = "open"
    stack.append(module)
    for target in sorted(edges.get(module, ())):
      if state.get(target) == "open":
        cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
      elif target not in state:
        visit(target)
    stack.pop()
    state[module] = "done"

  for module in sorted(edges):
    if module not in state:
      visit(module)
  assert not cycles, "\n".join(cycles)


def test_function_local_imports_only_for_optional_heavy_dependencies():
  _, _, local = _graph()
  unexpected = [f"{where}: {name}" for where, name in local
                if not any(name == allowed or name.startswith(allowed + ".") for allowed in LOCAL_IMPORTS_ALLOWED)]
  assert not unexpected, "function-local imports:\n" + "\n".join(unexpected)


@pytest.mark.parametrize("source, message", [
    ("from diffusion_jax.train import loop\n", "imports diffusion_jax.train.loop"),
    ("def f():\n  from diffusion_jax import export\n", "imports diffusion_jax.export"),
])
def test_an_upward_import_is_caught(tmp_path, monkeypatch, source, message):
  """The walk sees module-level and function-level imports alike (a planted one in data/)."""
  copy = tmp_path / "diffusion_jax"
  for path in PACKAGE.rglob("*.py"):
    target = copy / path.relative_to(PACKAGE)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(path.read_text())
  (copy / "data" / "planted.py").write_text(source)
  monkeypatch.setattr(sys.modules[__name__], "PACKAGE", copy)
  with pytest.raises(AssertionError, match=message):
    test_imports_run_down_the_layers()
