"""The table of experiments/RESULTS.md, "The TPU program, compiled without a TPU", from the
raw lines of experiments/tpu_table.sh (experiments/results/tpu_compile/).

    python experiments/tpu_table.py [RESULTS_DIR]

Prints one markdown row per compiled program (LABEL.jsonl) or refused one
(LABEL.error.txt: XLA:TPU's figure of what the step needs, against what the chip has),
then the largest batch per chip of each generation's train step at float32 compute and
the configured precision. That estimate is a straight line through the (images per chip,
HBM per chip) points of the generation: peak(b) = a + s * b, largest b with
peak(b) <= the chip's usable HBM. The usable HBM is XLA:TPU's own figure where one of its
errors gave it (v5e: 15.75 of 16 GiB), else the nominal HBM less the same 1.6%. XLA
plans memory against the HBM it has (on a large chip it keeps more alive at once), so a
line through points far below the limit overstates the slope: the estimate is a lower
bound, and the way to be sure of a batch is to compile it.
"""
import json
import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent
NOMINAL_GIB = {'TPU v4': 32, 'TPU v5 lite': 16, 'TPU v5': 95, 'TPU v6 lite': 32}
TARGET_KIND = {'v4': 'TPU v4', 'v5e': 'TPU v5 lite', 'v5p': 'TPU v5', 'v6e': 'TPU v6 lite'}
V5E_USABLE = 15.75 / 16   # XLA:TPU's "available HBM" of a v5e chip over its nominal HBM
# Lines left out of the largest-batch lines: not a TPU VM's program.
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
    if match:
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
  """One line per generation with two or more float32 train-step points."""
  points, usable = {}, {}
  for l in lines:
    if (l['program'] == 'train' and l['compute_dtype'] == 'float32'
        and l['precision'] == 'high' and l['label'] not in NOT_A_VM):
      points.setdefault(l['device_kind'], {})[l['batch_per_device']] = l['memory']['peak_gib']
  for r in refused:
    points.setdefault(r['device_kind'], {}).setdefault(r['batch_per_device'], r['need_gib'])
    usable[r['device_kind']] = r['has_gib']
  out = []
  for kind, by_batch in sorted(points.items()):
    if len(by_batch) < 2:
      out.append(f'- {kind}: one point only ({by_batch}), no line')
      continue
    (b0, m0), (b1, m1) = sorted(by_batch.items())[0], sorted(by_batch.items())[-1]
    slope = (m1 - m0) / (b1 - b0)
    limit = usable.get(kind, NOMINAL_GIB[kind] * V5E_USABLE)
    largest = int((limit - (m0 - slope * b0)) / slope)
    out.append(f'- {kind}: {", ".join(f"{b}: {m:.2f}" for b, m in sorted(by_batch.items()))} '
               f'GiB (images per chip: HBM) -> {m0 - slope * b0:.2f} GiB + {slope:.3f} GiB '
               f'per image; {limit:.2f} GiB usable -> about {largest} images per chip')
  return out


def main(argv):
  folder = pathlib.Path(argv[1]) if len(argv) > 1 else HERE / 'results' / 'tpu_compile'
  lines, refused = read(folder)
  print('\n'.join(rows(lines, refused) + [''] + largest_batches(lines, refused)))


if __name__ == '__main__':
  main(sys.argv)
