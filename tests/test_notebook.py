"""experiments/colab.ipynb end to end, offline, in a fresh `python3` kernel; its Colab-only
logic (runtime detection, install arguments, REPO_URL checks, clone, Drive workdir) in this
process, on fake environments.

The notebook's parameters cell (tag `parameters`) is followed by an injected cell, as
papermill does, that shrinks the run: 3 train steps of configs/digits.py with a
one-block model, 16 test images with k=2 and 4 samples. The kernel starts in experiments/ (where Jupyter opens
the notebook), is not Colab (so the install cell must do nothing), runs on the CPU
with XLA optimisations off (conftest's settings do not reach a new process).
"""
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import types

import pytest

nbclient = pytest.importorskip('nbclient')
nbformat = pytest.importorskip('nbformat')

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / 'experiments' / 'colab.ipynb'
# A one-block model (as tests/test_main.py's `tiny`): compilation dominates, and the
# notebook's plumbing, not the digits model, is under test here.
OVERRIDES = {'model.block_config': (2,), 'model.layers_config': (1,), 'model.mid_channels': (8,),
             'model.growth_rate': 2, 'model.glow_channels': 8,
             'eval.num_examples': 16, 'eval.batch_size': 16, 'eval.k': 2, 'eval.k_chunk': 2,
             'sample.num': 4, 'sample.batch_size': 4}


def _text(cell):
  """Everything a code cell printed or displayed as text."""
  parts = []
  for out in cell.get('outputs', []):
    if out.output_type == 'stream':
      parts.append(out.text)
    elif 'data' in out and 'text/plain' in out.data:
      parts.append(out.data['text/plain'])
  return ''.join(parts)


@pytest.fixture(scope='module')
def executed(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('notebook') / 'digits'
  nb = nbformat.read(NOTEBOOK, as_version=4)
  params = [i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])]
  assert len(params) == 1, 'the notebook needs exactly one cell tagged "parameters"'
  injected = nbformat.v4.new_code_cell(
      f'WORKDIR = {str(workdir)!r}\nNUM_STEPS = 3\nOVERRIDES = {OVERRIDES!r}')
  nb.cells.insert(params[0] + 1, injected)
  # One CPU device, as in a plain runtime (no simulated devices from XLA_FLAGS).
  # os.environ carries the test run's compilation cache and settings (conftest.py).
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  client = nbclient.NotebookClient(nb, kernel_name='python3', timeout=300,
                                   resources={'metadata': {'path': str(NOTEBOOK.parent)}})
  client.execute(env=env)   # raises CellExecutionError, with the traceback, if a cell fails
  return nb, workdir


def test_notebook_runs_and_writes_every_result(executed):
  nb, workdir = executed
  errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs
            if o.output_type == 'error']
  assert not errors, errors
  out = '\n'.join(_text(c) for c in nb.cells if c.cell_type == 'code')
  assert 'Not running in Colab: nothing installed' in out
  assert f'WORKDIR: {workdir}' in out

  assert any((workdir / 'checkpoints').iterdir()), 'no checkpoint written'
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if 'train_bpd' in r] == [3]
  assert [r['step'] for r in records if 'test_bpd' in r] == [3]
  result = json.loads((workdir / 'eval_test_k2_latest_raw.json').read_text())
  assert result['num_examples'] == 16 and result['k'] == 2
  pngs = list((workdir / 'samples').glob('samples_T1_n4_latest_raw.png'))
  assert pngs and pngs[0].read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

  # The printed bits/dim are finite, positive, and the ones in the eval JSON.
  match = re.search(r'test bits/dim: ELBO (\S+), IWBO \(k=2\) (\S+)', out)
  assert match, out[-2000:]
  elbo, iwbo = float(match[1]), float(match[2])
  assert math.isfinite(elbo) and math.isfinite(iwbo) and elbo > 0 and iwbo > 0
  assert elbo == pytest.approx(result['elbo_bpd'], abs=1e-4)
  assert iwbo == pytest.approx(result['iwbo_bpd'], abs=1e-4)

  def cell(snippet):
    return next(c for c in nb.cells if c.cell_type == 'code' and snippet in c.source)

  def shows_png(c):
    return any('image/png' in o.get('data', {}) for o in c.outputs)

  assert shows_png(cell("modes.run('sample', config, WORKDIR)")), 'sample grid not displayed'
  curve = cell('json.loads(line)')   # a plot with matplotlib, else a table row for step 3
  assert shows_png(curve) or re.search(r'^\s+3\s+\d+\.\d{4}\s+\d+\.\d{4}$', _text(curve), re.M)
  assert 'OFFICIAL_CHECKPOINT is not set: skipped' in _text(cell('OFFICIAL_CHECKPOINT ='))


# The Colab-only cells, run here on fake environments (Colab itself is not reachable offline).

def _notebook():
  return nbformat.read(NOTEBOOK, as_version=4)


def _code_cell(snippet):
  cells = [c for c in _notebook().cells if c.cell_type == 'code' and snippet in c.source]
  assert len(cells) == 1, f'{len(cells)} code cells hold {snippet!r}'
  return cells[0].source


@pytest.fixture
def nb_helpers():
  """The namespace of the notebook's helpers cell (standard library only)."""
  namespace = {}
  exec(_code_cell('def detect_runtime('), namespace)
  return namespace


def _no_accelerator(tmp_path):
  """detect_runtime's arguments for a machine with nothing: empty /dev, PCI bus and PATH."""
  (tmp_path / 'dev').mkdir()
  (tmp_path / 'pci').mkdir()
  (tmp_path / 'bin').mkdir()
  return {'environ': {'PATH': str(tmp_path / 'bin')}, 'dev': str(tmp_path / 'dev'),
          'pci': str(tmp_path / 'pci')}


def _pci_device(tmp_path, name, vendor, device):
  path = tmp_path / 'pci' / name
  path.mkdir(parents=True)
  (path / 'vendor').write_text(vendor + '\n')
  (path / 'device').write_text(device + '\n')


def _fake_nvidia_smi(tmp_path, returncode):
  smi = tmp_path / 'bin' / 'nvidia-smi'
  smi.write_text(f'#!/bin/sh\nexit {returncode}\n')
  smi.chmod(0o755)


def test_runtime_detection_on_this_machine(nb_helpers):
  if shutil.which('nvidia-smi') or pathlib.Path('/dev/accel0').exists():
    pytest.skip('this machine has (or may have) an accelerator')
  runtime, why = nb_helpers['detect_runtime']()
  assert runtime == 'cpu', why


def test_runtime_detection_branches(nb_helpers, tmp_path):
  detect = nb_helpers['detect_runtime']
  args = _no_accelerator(tmp_path)
  assert detect(**args)[0] == 'cpu'
  # Google's network card (gVNIC, vendor 0x1ae0 too) is no TPU.
  _pci_device(tmp_path, '0000:00:04.0', '0x1ae0', '0x0042')
  assert detect(**args)[0] == 'cpu'
  # nvidia-smi that fails (a driver without a GPU) is no GPU; one that runs is.
  _fake_nvidia_smi(tmp_path, 9)
  assert detect(**args) == ('cpu', f'{tmp_path}/bin/nvidia-smi is there but found no GPU')
  _fake_nvidia_smi(tmp_path, 0)
  assert detect(**args)[0] == 'gpu'
  # A TPU wins: a TPU VM's chip on the PCI bus (v5e), a /dev/accel device, the variables.
  _pci_device(tmp_path, '0000:00:05.0', '0x1ae0', '0x0063')
  assert detect(**args)[0] == 'tpu' and 'device 0x0063' in detect(**args)[1]
  shutil.rmtree(tmp_path / 'pci')
  (tmp_path / 'pci').mkdir()
  assert detect(**args)[0] == 'gpu'
  (tmp_path / 'dev' / 'accel0').touch()
  assert detect(**args) == ('tpu', f'found {tmp_path}/dev/accel0')
  (tmp_path / 'dev' / 'accel0').unlink()
  for name in ('COLAB_TPU_ADDR', 'TPU_NAME'):
    environ = dict(args['environ'], **{name: '10.0.0.2:8470'})
    assert detect(environ=environ, dev=args['dev'], pci=args['pci']) == ('tpu', f'{name} is set')


def test_install_arguments_per_runtime(nb_helpers):
  args = nb_helpers['pip_install_args']
  assert args('cpu') == ['-e', '.']
  assert args('gpu') == ['-e', '.[gpu]']
  assert args('tpu') == ['-e', '.', 'jax[tpu]']
  # The gpu extra is the CUDA build of JAX.
  pyproject = (ROOT / 'pyproject.toml').read_text()
  assert re.search(r'^gpu = \["jax\[cuda12\]', pyproject, re.M)


def test_repo_url_checks(nb_helpers):
  check = nb_helpers['check_repo_url']
  assert check('  https://github.com/me/denseflow-jax ') == 'https://github.com/me/denseflow-jax'
  for empty in ('', '   '):
    with pytest.raises(ValueError, match=r"^REPO_URL is empty.*parameters cell.*"
                       r"REPO_URL = 'https://github.com/<you>/denseflow-jax'"):
      check(empty)
  with pytest.raises(ValueError, match='still holds a placeholder'):
    check('https://github.com/<you>/denseflow-jax')


def _fake_colab(monkeypatch, mounted):
  """A `google.colab` module in sys.modules (what the cells test for), with drive.mount."""
  colab = types.ModuleType('google.colab')
  colab.drive = types.SimpleNamespace(mount=mounted.append)
  monkeypatch.setitem(sys.modules, 'google.colab', colab)


def test_colab_install_cell_stops_at_an_empty_repo_url(nb_helpers, monkeypatch, tmp_path):
  _fake_colab(monkeypatch, [])
  monkeypatch.chdir(tmp_path)

  def no_subprocess(*args, **kwargs):
    raise AssertionError(f'ran {args} before checking REPO_URL')
  monkeypatch.setattr(subprocess, 'run', no_subprocess)
  namespace = dict(nb_helpers, REPO_URL='', REPO_BRANCH='')
  with pytest.raises(ValueError, match='^REPO_URL is empty'):
    exec(_code_cell("IN_COLAB = 'google.colab' in sys.modules"), namespace)
  assert os.getcwd() == str(tmp_path)


@pytest.mark.skipif(shutil.which('git') is None, reason='needs git')
def test_clone(nb_helpers, tmp_path):
  clone = nb_helpers['clone']
  with pytest.raises(RuntimeError, match=r"^git could not clone REPO_URL = '.*missing'.*exists"):
    clone(str(tmp_path / 'missing'), '', str(tmp_path / 'a'))
  repo = tmp_path / 'repo'
  git = ['git', '-C', str(repo), '-c', 'user.name=t', '-c', 'user.email=t@t']
  subprocess.run(['git', 'init', '-q', str(repo)], check=True)
  (repo / 'README.md').write_text('main\n')
  subprocess.run(git + ['add', '.'], check=True)
  subprocess.run(git + ['commit', '-qm', 'main'], check=True)
  subprocess.run(git + ['checkout', '-qb', 'feature'], check=True)
  (repo / 'README.md').write_text('feature\n')
  subprocess.run(git + ['commit', '-qam', 'feature'], check=True)
  url = repo.as_uri()   # file://: --depth=1 holds, as for a GitHub URL
  clone(url, 'feature', str(tmp_path / 'b'))
  assert (tmp_path / 'b' / 'README.md').read_text() == 'feature\n'
  with pytest.raises(RuntimeError, match="REPO_BRANCH = 'nope'.*the branch exists"):
    clone(url, 'nope', str(tmp_path / 'c'))


def test_workdir_cell(nb_helpers, monkeypatch, tmp_path, capsys):
  cell = _code_cell('drive.mount(DRIVE_MOUNT)')
  assert nb_helpers['DRIVE_ROOT'] == '/content/drive/MyDrive/denseflow-jax'
  assert nb_helpers['drive_workdir']('runs/x') == '/content/drive/MyDrive/denseflow-jax/runs/x'
  assert nb_helpers['drive_workdir']('/elsewhere/x') == '/elsewhere/x'

  # Colab with USE_DRIVE: Drive mounted, a relative WORKDIR moved under DRIVE_ROOT.
  mounted = []
  _fake_colab(monkeypatch, mounted)
  nb_helpers['DRIVE_ROOT'] = str(tmp_path / 'MyDrive' / 'denseflow-jax')
  namespace = dict(nb_helpers, IN_COLAB=True, USE_DRIVE=True, WORKDIR='runs/digits-notebook')
  exec(cell, namespace)
  assert mounted == ['/content/drive']
  assert namespace['WORKDIR'] == str(tmp_path / 'MyDrive' / 'denseflow-jax' / 'runs' / 'digits-notebook')
  assert os.path.isdir(namespace['WORKDIR'])
  assert 'WORKDIR on Google Drive' in capsys.readouterr().out

  # Colab without it: WORKDIR kept, with a warning that a recycled runtime loses it.
  monkeypatch.chdir(tmp_path)
  namespace = dict(nb_helpers, IN_COLAB=True, USE_DRIVE=False, WORKDIR='runs/w')
  exec(cell, namespace)
  assert namespace['WORKDIR'] == 'runs/w' and len(mounted) == 1
  assert 'lost when Colab recycles the runtime; set USE_DRIVE = True' in capsys.readouterr().out
  # Not Colab: USE_DRIVE does nothing.
  namespace = dict(nb_helpers, IN_COLAB=False, USE_DRIVE=True, WORKDIR='runs/w')
  exec(cell, namespace)
  assert namespace['WORKDIR'] == 'runs/w' and len(mounted) == 1
  assert 'USE_DRIVE is for Colab' in capsys.readouterr().out


def test_text_agrees_with_the_readme():
  nb = _notebook()
  first = nb.cells[0].source
  assert first.startswith('[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]'
                          '(https://colab.research.google.com/github/<user>/<repo>/blob/main/'
                          'experiments/colab.ipynb)')
  text = '\n'.join(c.source for c in nb.cells)
  readme = (ROOT / 'README.md').read_text()
  quick_start = readme.split('## Quick start', 1)[1].split('\n## ', 1)[0]
  durations = re.findall(r'\d+ min(?:utes?)?(?: \d+ s)?', text)
  assert durations, 'the notebook states no run time'
  for d in durations:   # every run time the notebook states is the README's for the quick start
    assert d in quick_start, d
