"""experiments/colab.ipynb end to end, offline, in a fresh `python3` kernel.

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
