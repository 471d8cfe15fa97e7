"""Every mistake on the command line is one `error:` line (issue #21): flag parsing included,
exit status 1, nothing on stdout, no workdir made. One `python -m denseflow_jax.main` per
mistake, run from a directory that is not the repository's."""
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / 'configs' / 'digits.py')

# (arguments after --config DIGITS --workdir WORKDIR, words the error line must hold)
MISTAKES = {
    'int given a float': (['--config.train.batch_size=2.0'],
                          ['--config.train.batch_size must be an integer', "got '2.0'"]),
    'int given a bool': (['--config.train.batch_size=True'],
                         ['--config.train.batch_size must be an integer', "got 'True'"]),
    'float given a word': (['--config.train.lr=fast'],
                           ['--config.train.lr must be a number', "got 'fast'"]),
    'bool given a word': (['--config.eval.use_ema=maybe'],
                          ['--config.eval.use_ema must be true or false', "got 'maybe'"]),
    'tuple given a word': (['--config.model.image_shape=abc'],
                           ['--config.model.image_shape must be a tuple of integers',
                            'written like 8,8,1', "got 'abc'"]),
    'unknown mode': (['--mode', 'nonsense'],
                     ['--mode must be one of train, eval, sample', "got 'nonsense'"]),
    'unknown flag': (['--wrokdir=x'], ['unknown flag --wrokdir=x', 'did you mean --workdir?']),
    'flag below its bound': (['--num_processes=0'],
                             ['--num_processes must be an integer >= 1', "got '0'"]),
}


def run_main(args, cwd):
  return subprocess.run([sys.executable, '-m', 'denseflow_jax.main', *args], cwd=cwd,
                        capture_output=True, text=True, timeout=120)


def assert_one_error_line(proc, words, workdir):
  lines = proc.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
  for word in words:
    assert word in lines[0], (word, lines[0])
  assert proc.returncode == 1, proc.returncode
  assert proc.stdout == ''
  assert not workdir.exists()


@pytest.mark.parametrize('name', sorted(MISTAKES))
def test_a_bad_value_or_flag_is_one_error_line(name, tmp_path):
  args, words = MISTAKES[name]
  workdir = tmp_path / 'run'
  proc = run_main(['--config', DIGITS, '--workdir', str(workdir), *args], cwd=tmp_path)
  assert_one_error_line(proc, words, workdir)


def test_no_config_is_one_error_line(tmp_path):
  workdir = tmp_path / 'run'
  proc = run_main(['--workdir', str(workdir), '--config.train.lr=1'], cwd=tmp_path)
  assert_one_error_line(proc, ['--config is required', 'digits.py', 'cifar10.py'], workdir)


def test_a_config_file_that_does_not_load_is_one_error_line(tmp_path):
  config = tmp_path / 'broken.py'
  config.write_text('def get_config():\n  return undefined_name\n')
  workdir = tmp_path / 'run'
  proc = run_main(['--config', str(config), '--workdir', str(workdir)], cwd=tmp_path)
  assert_one_error_line(proc, [f'--config {config} could not be loaded', 'NameError',
                               'undefined_name', f'{config}, line 2'], workdir)


def test_no_workdir_for_train_is_one_error_line(tmp_path):
  proc = run_main(['--config', DIGITS], cwd=tmp_path)
  assert_one_error_line(proc, ['--workdir is required for --mode=train'], tmp_path / 'run')
  assert list(tmp_path.iterdir()) == []
