"""The table of experiments/RESULTS.md, "The TPU program, compiled without a TPU", from the
raw lines of experiments/tpu_table.sh (experiments/results/tpu_compile/).

    python experiments/tpu_table.py [RESULTS_DIR]

Prints one markdown row per compiled program (LABEL.jsonl) or refused one
(LABEL.error.txt: XLA:TPU's figure of what the step needs, against what the chip has),
then for each generation the largest batch per chip of the train step (float32 compute,
precision 'high') as the compiles bracket it: the largest that compiled and the smallest
that XLA:TPU refused. A TPU program's memory is assigned when it is compiled, and XLA:TPU
refuses one that does not fit the chip, so a compile decides what fits; XLA's memory
analysis does not (it read 115% of a v5e chip for a batch that compiled: RESULTS.md).
"""
import json
import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent
# Left out of the largest-batch lines: not a TPU VM's program.
NOT_A_VM = {'v4_8cores_high_b32': 'libtpu\'s compile-only v4 default, one device per TensorCore '
                                  '(8 on 4 chips); a TPU VM drives each v4 chip as one device'}
_ERROR = re.compile(r'at (\d+) images per chip \(train\.batch_size = (\d+) over (\d+) chips\) '
                    r'needs ([\d.]+)G of memory per chip, and a (.+?) chip has ([\d.]+)G')


def read(folder: pathlib.Path) -> tuple[list, list]:
  """(compiled DenseFlow-74-10 program lines, refused programs) of the variants in `folder`."""
  # Each variant's file is named by its --label; the file's name is the row's label.
  lines = [{**json.loads(line), 'label': path.stem} for path in sorted(folder.glob('*.jsonl'))
           for line in path.read_text().splitlines() if line.strip()]
  lines = [l for l in lines if l.get('config', '').endswith('configs/cifar10.py')]   # DF-74-10
  refused = []
  for path in sorted(folder.glob('*.error.txt')):
    match = _ERROR.search(path.read_text())
    if not match:
      print(f'warning: {path.name} holds no refusal this script can read (left out)',
            file=sys.stderr)
    else:
      per_chip, batch, chips, need, kind, has = match.groups()
      refused.append({'label': path.name.removesuffix('.error.txt'), 'device_kind': kind,
                      'batch_per_device': int(per_chip), 'devices': int(chips),
                      'need_gib': float(need),   # XLA's G: GiB (15.75G of a 16 GiB chip)
                      'has_gib': float(has)})
  return lines, refused


def rows(lines: list, refused: list) -> list[str]:
  out = ['| label | chip | slice (chips) | program | images / chip | compute | precision '
         '| compile s | host GiB | HBM per chip | all-reduces (MB) | ops per step |',
         '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for l in lines:
    reduces = l['collectives'].get('all-reduce', {'count': 0, 'bytes': 0})
    out.append(f"| {l['label']} | {l['device_kind']} | {l.get('topology', '')} ({l['devices']}) "
               f"| {l['program']} | {l['batch_per_device']} | {l['compute_dtype']} "
               f"| {l['precision']} | {l['compile_s']:,.0f} | {l['host_peak_gib']} "
               f"| {l['memory'].get('hbm', l['memory']['peak_gib'])} "
               f"| {reduces['count']} ({reduces['bytes'] / 1e6:,.0f}) | {l['kernels']:,} |")
  for r in refused:
    out.append(f"| {r['label']} | {r['device_kind']} | ({r['devices']}) | train "
               f"| {r['batch_per_device']} | | | refused | | needs {r['need_gib']}G, has "
               f"{r['has_gib']}G | | |")
  return out


def largest_batches(lines: list, refused: list) -> list[str]:
  """One line per generation: the largest float32 train step per chip that compiled and
  the smallest that was refused."""
  compiled, too_big = {}, {}
  for l in lines:
    if (l['program'] == 'train' and l['compute_dtype'] == 'float32'
        and l['precision'] == 'high' and l['label'] not in NOT_A_VM):
      compiled.setdefault(l['device_kind'], []).append(l['batch_per_device'])
  for r in refused:   # an error line names no settings: tpu_table.sh's labels do
    if '_high_' in r['label']:
      too_big.setdefault(r['device_kind'], []).append(r['batch_per_device'])
  out = []
  for kind in sorted(set(compiled) | set(too_big)):
    fits, refused_at = max(compiled.get(kind, [0])), min(too_big.get(kind, [0]), default=0)
    if not fits:
      span = f'largest < {refused_at} (nothing compiled)'
    elif not refused_at:
      span = f'largest >= {fits} (nothing larger compiled or refused)'
    elif refused_at <= fits:
      span = f'contradiction: {fits} compiled, {refused_at} refused (different code?)'
    else:
      span = f'{fits} <= largest < {refused_at}'
    out.append(f'- {kind}: {span} images per chip')
  return out


def main(argv):
  folder = pathlib.Path(argv[1]) if len(argv) > 1 else HERE / 'results' / 'tpu_compile'
  lines, refused = read(folder)
  print('\n'.join(rows(lines, refused) + [''] + largest_batches(lines, refused)))


if __name__ == '__main__':
  main(sys.argv)
