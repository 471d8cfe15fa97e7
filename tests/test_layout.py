"""The layout of the package and of the experiments' scripts: no import cycle between the
package's modules, imports only at the top of a file (except optional dependencies,
imported where they are needed), a docstring in every module, no module over 400 lines
(the Inception network excepted: one architecture) and no function over 80. Checked on
the source with `ast`; nothing is imported."""
import ast
import collections
import pathlib
from typing import Dict, List, Set, Tuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'denseflow_jax'
EXPERIMENTS = ROOT / 'experiments'     # scripts: the same rules, except the import cycle
# Optional dependencies: imported lazily, inside the function that needs them
# (torchvision: experiments/check_inception_layout.py only).
OPTIONAL = {'torch', 'torchvision', 'tensorflow', 'tensorflow_datasets', 'sklearn'}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
LONG_MODULES = {'denseflow_jax.inception'}   # InceptionV3's blocks, kept in one file


def modules(root: pathlib.Path) -> Dict[str, pathlib.Path]:
  """{'denseflow_jax.x.y': path} of every .py file under the folder `root` (a package, or
  experiments/: 'experiments.gpu_bench')."""
  out = {}
  for path in sorted(root.rglob('*.py')):
    parts = (root.name,) + path.relative_to(root).with_suffix('').parts
    if parts[-1] == '__init__':
      parts = parts[:-1]
    out['.'.join(parts)] = path
  return out


def import_graph(root: pathlib.Path) -> Dict[str, Set[str]]:
  """{module: modules of the package it imports}, from imports at any level of the file."""
  mods = modules(root)
  graph = collections.defaultdict(set)
  for name, path in mods.items():
    is_package = path.name == '__init__.py'
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        if node.level:
          base = name.split('.')[:len(name.split('.')) - node.level + is_package]
          module = '.'.join(base + ([node.module] if node.module else []))
        else:
          module = node.module
        targets = [module] + [f'{module}.{alias.name}' for alias in node.names]
      else:
        continue
      graph[name].update(t for t in targets if t in mods and t != name)
  return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
  """Every import cycle a depth-first walk meets, as [a, b, ..., a]."""
  cycles, done = [], set()

  def visit(node, stack):
    for nxt in sorted(graph.get(node, ())):
      if nxt in stack:
        cycles.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in done:
        visit(nxt, stack + [nxt])
    done.add(node)

  for node in sorted(graph):
    if node not in done:
      visit(node, [node])
  return cycles


def misplaced_imports(path: pathlib.Path) -> List[Tuple[int, str]]:
  """(line, module) of every import that is not a top-level statement of the file
  (inside a function, class, `if` or `try`), optional dependencies excepted."""
  tree = ast.parse(path.read_text())
  top = {id(node) for node in tree.body}
  found = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      else:
        names = ['.' * node.level + (node.module or '')]
      found += [(node.lineno, n) for n in names if n.split('.')[0] not in OPTIONAL]
  return found


def long_modules(mods: Dict[str, pathlib.Path]) -> Dict[str, int]:
  """{module: lines} of the modules over MAX_MODULE_LINES, LONG_MODULES excepted."""
  lengths = {name: len(path.read_text().splitlines()) for name, path in mods.items()
             if name not in LONG_MODULES}
  return {name: n for name, n in lengths.items() if n > MAX_MODULE_LINES}


def long_functions(mods: Dict[str, pathlib.Path]) -> Dict[str, int]:
  """{'module.function': lines} of the functions (nested ones too) over MAX_FUNCTION_LINES."""
  found = {}
  for name, path in mods.items():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > MAX_FUNCTION_LINES:
          found[f'{name}.{node.name}'] = length
  return found


def without_docstring(mods: Dict[str, pathlib.Path]) -> List[str]:
  """The modules that have no module docstring."""
  return [name for name, path in mods.items() if not ast.get_docstring(ast.parse(path.read_text()))]


# The modules that read the raw config (issue #20): the command line, the mode table, the
# settings and their checks, the ablation rows and the checkpoint's record of the config.
# Below them code takes the typed settings (settings.Settings) or plain arguments.
CONFIG_READERS = {'denseflow_jax.main', 'denseflow_jax.modes', 'denseflow_jax.settings',
                  'denseflow_jax.config_checks', 'denseflow_jax.ablation',
                  'denseflow_jax.checkpoint'}
MAX_CONFIG_FUNCTIONS = 4      # elsewhere: those that record or compare the config


def functions_taking(parameter: str, mods: Dict[str, pathlib.Path]) -> List[str]:
  """'module.function' of every function with a parameter named `parameter`."""
  found = []
  for name, path in mods.items():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        args = node.args
        if parameter in [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]:
          found.append(f'{name}.{node.name}')
  return found


def all_modules() -> Dict[str, pathlib.Path]:
  """The package's modules and the experiments' scripts."""
  return {**modules(PACKAGE), **modules(EXPERIMENTS)}


def test_the_package_has_no_import_cycle():
  assert find_cycles(import_graph(PACKAGE)) == []


@pytest.mark.parametrize('name', sorted(all_modules()))
def test_imports_are_at_the_top_except_optional_dependencies(name):
  assert misplaced_imports(all_modules()[name]) == []


@pytest.mark.parametrize('root', [PACKAGE, EXPERIMENTS], ids=lambda root: root.name)
def test_modules_and_functions_fit_on_a_few_screens(root):
  assert long_modules(modules(root)) == {}
  assert long_functions(modules(root)) == {}


def test_few_functions_below_the_modes_take_the_raw_config():
  mods = {n: p for n, p in modules(PACKAGE).items() if n not in CONFIG_READERS}
  found = functions_taking('config', mods)
  assert len(found) <= MAX_CONFIG_FUNCTIONS, found


@pytest.mark.parametrize('root', [PACKAGE, EXPERIMENTS], ids=lambda root: root.name)
def test_every_module_has_a_docstring(root):
  assert without_docstring(modules(root)) == []


def test_the_checks_find_a_cycle_and_a_late_import(tmp_path):
  """The checks above on a tiny package that has what they must find."""
  pkg = tmp_path / 'denseflow_jax'
  (pkg / 'sub').mkdir(parents=True)
  (pkg / '__init__.py').write_text('"""Package."""\n')
  (pkg / 'sub' / '__init__.py').write_text('"""Sub."""\n')
  (pkg / 'a.py').write_text('"""A."""\nfrom denseflow_jax import b\n')
  (pkg / 'b.py').write_text('"""B."""\n\ndef f():\n  from denseflow_jax.sub import c\n'
                            '  import torch  # optional: allowed\n')
  (pkg / 'sub' / 'c.py').write_text('"""C."""\nfrom .. import a\nimport os\n'
                                    'if os.name:\n  import json\n')
  graph = import_graph(pkg)
  assert graph['denseflow_jax.sub.c'] == {'denseflow_jax', 'denseflow_jax.a'}
  assert find_cycles(graph) == [['denseflow_jax.a', 'denseflow_jax.b', 'denseflow_jax.sub.c',
                                 'denseflow_jax.a']]
  assert misplaced_imports(pkg / 'b.py') == [(4, 'denseflow_jax.sub')]
  assert misplaced_imports(pkg / 'sub' / 'c.py') == [(5, 'json')]
  assert misplaced_imports(pkg / 'a.py') == []
  (pkg / 'd.py').write_text('"""D."""\n\ndef f(config, x):\n  return x\n\n'
                            'def g(settings, *, config=None):\n  return settings\n')
  assert functions_taking('config', {'denseflow_jax.d': pkg / 'd.py'}) == [
      'denseflow_jax.d.f', 'denseflow_jax.d.g']


def test_the_checks_find_what_a_script_must_not_have(tmp_path):
  """The same checks on a tiny experiments/ folder: a script too long, a function too
  long, a script without a docstring, imports inside a function; an import after a
  top-level sys.path.insert is still at the top."""
  folder = tmp_path / 'experiments'
  folder.mkdir()
  (folder / 'ok.py').write_text('"""Fine."""\nimport sys\nsys.path.insert(0, ".")\n'
                                'import json  # noqa: E402\n\n\ndef f():\n'
                                '  from torchvision import models  # optional: allowed\n')
  (folder / 'late.py').write_text('"""Late."""\n\n\ndef main():\n  import jax\n'
                                  '  from denseflow_jax import model\n')
  (folder / 'long.py').write_text('"""Long."""\n' + 'x = 1\n' * MAX_MODULE_LINES)
  body = ''.join(f'  y{i} = {i}\n' for i in range(MAX_FUNCTION_LINES))
  (folder / 'bare.py').write_text(f'def short():\n  pass\n\n\ndef big():\n{body}')
  mods = modules(folder)
  assert sorted(mods) == ['experiments.bare', 'experiments.late', 'experiments.long',
                          'experiments.ok']
  assert misplaced_imports(mods['experiments.ok']) == []
  assert misplaced_imports(mods['experiments.late']) == [(5, 'jax'), (6, 'denseflow_jax')]
  assert long_modules(mods) == {'experiments.long': MAX_MODULE_LINES + 1}
  assert long_functions(mods) == {'experiments.bare.big': MAX_FUNCTION_LINES + 1}
  assert without_docstring(mods) == ['experiments.bare']
