"""The ops of a compiled XLA program (GPU or TPU), read from its optimised HLO text.

    kernels = count_kernels(compiled.as_text())

XLA:GPU launches one kernel (or one library call) for each instruction of a
*control* computation (the entry, while-loop bodies and conditions, conditional
branches) that is not pure bookkeeping: a `fusion` (elementwise "loop", reduction
"input", Triton GEMM, cuDNN fusion, ...), a `custom-call` (cuDNN convolution, cuBLAS
GEMM, cuSOLVER LU, ...), a `copy`, a collective, and any other op left unfused.
XLA:TPU runs the same kinds of instruction one after another on a core: fusions
("output" fusions hold the convolutions and dots, "loop" the elementwise work), copies,
async slices, collectives, custom calls (LU blocks, ...); we count them the same way.
A while loop's body counts once per iteration (`known_trip_count`; XLA:TPU does not write
it, so there the bound of the condition's `i < N` compare), its condition once more; a
conditional counts its largest branch. An async op (`-start` / `-done`) counts once.

For each kernel we record
  * its kind (`kind_of`),
  * the part of the model it comes from (`part_of`: the Flax module path in the
    HLO metadata's op_name, forward or backward by `transpose(` in it; 'step' is
    the optimizer and counters, 'unnamed' what XLA added without an op_name, e.g.
    copies into the donated output buffers, 'scan_slices' the copies of each module's
    slice of a unit's stacked parameters (and, in a rolled scan, of its stacked
    activations)),
  * the bytes it reads and writes: operand and result sizes, where an operand that a
    fusion only slices (a stacked scan operand) counts as the slices it takes.
Everything here is text processing: it needs neither a GPU nor JAX.
"""
import collections
import dataclasses
import json
import math
import re
import sys
from typing import Dict, List

_COMPUTATION = re.compile(r'^(ENTRY )?%([\w.\-]+) .*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][a-z0-9\-]*)\((.*)$')
_ARRAY = re.compile(r'\b(pred|s4|u4|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64|c64|c128|'
                    r'f8e4m3fn|f8e5m2|token)\[([0-9,]*)\]')
_OPERAND = re.compile(r'%([\w.\-]+)')
_CALLS = re.compile(r'\b(calls|body|condition|to_apply)=%([\w.\-]+)')
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONSTANT = re.compile(r'constant\((\d+)\)')
_KIND = re.compile(r'\bkind=(k\w+)')
_BACKEND_KIND = re.compile(r'"fusion_backend_config":\{"kind":"([^"]+)"')
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# A unit's scanned modules (nn.scan) take their slice of each stacked parameter [N, ...]; a
# rolled scan also stacks the activations its backward loop reads (dynamic_update_slice).
_SCAN_SLICE = re.compile(r'/unit_\d+/(?:while/body/)?(?:jit\(dynamic_(?:update_)?index_in_dim\)/)?'
                         r'(?:slice|squeeze|dynamic_slice|dynamic_update_slice)$')
_CUSTOM_FUSION = re.compile(r'"custom_fusion_config":\{"name":"([^"]+)"')

_BYTES = {'pred': 1, 's4': 1, 'u4': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2,
          'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8,
          'c128': 16, 'f8e4m3fn': 1, 'f8e5m2': 1, 'token': 0}
# Instructions of a control computation that launch nothing.
_FREE = {'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'while',
         'conditional', 'call', 'after-all', 'add-dependency', 'opt-barrier',
         'partition-id', 'replica-id', 'copy-done', 'all-reduce-done', 'all-gather-done',
         'collective-permute-done', 'async-done', 'async-update', 'send-done', 'recv-done',
         'get-dimension-size', 'domain'}
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
               'collective-permute', 'collective-broadcast')
# Model parts, most specific first: the first that occurs in the op_name's module path.
PARTS = (
    ('dequantization', '/dequantization/'),
    ('attention', '/attention/'),
    ('batchnorm', '/mix_norm/'),
    ('dense_block', '/dense/'),
    ('coupling_net_proj', ('/in_proj/', '/mix_conv/', '/out_proj/')),
    ('affine_coupling', '/coupling/'),
    ('conv1x1', ('/conv1x1/', 'slogdet', 'jit(inv)')),
    ('actnorm', '/actnorm/'),
    ('cross_unit', '/cross_unit_'),
    ('prior', 'prior.'),
    ('noise', ('_normal', '_threefry', 'random_')),
    ('flow_other', 'DenseFlow'),
)


def array_bytes(type_text: str) -> int:
  """Bytes of an HLO type: 'f32[64,16,16,48]{3,2,1,0}' or a tuple of such."""
  total = 0
  for dtype, dims in _ARRAY.findall(type_text):
    total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)
  return total


@dataclasses.dataclass
class Instruction:
  name: str
  type_text: str
  opcode: str
  operands: List[str]
  arguments: str          # the text between the opcode's parentheses
  attributes: str

  @property
  def bytes(self) -> int:
    return array_bytes(self.type_text)


def _split_arguments(rest: str):
  """(the text inside the opcode's parentheses, the attributes after them)."""
  depth = 1
  for i, ch in enumerate(rest):
    depth += (ch == '(') - (ch == ')')
    if depth == 0:
      return rest[:i], rest[i + 1:]
  return rest, ''


def parse_module(text: str) -> Dict[str, List[Instruction]]:
  """{computation name: its instructions}, plus '__entry__' naming the entry."""
  computations, current = {}, None
  for line in text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = computations.setdefault(header.group(2), [])
      if header.group(1):
        computations['__entry__'] = header.group(2)
      continue
    match = _INSTRUCTION.match(line)
    if match and current is not None:
      arguments, attributes = _split_arguments(match.group(4))
      current.append(Instruction(match.group(1), match.group(2), match.group(3),
                                 _OPERAND.findall(arguments), arguments, attributes))
  return computations


def kind_of(inst: Instruction) -> str:
  """A kernel's kind: 'fusion:loop', 'fusion:input' (reductions), 'fusion:triton_gemm',
  'custom_call:__cudnn$convForward', 'copy', 'all-reduce', ..."""
  if inst.opcode == 'fusion':
    backend = _BACKEND_KIND.search(inst.attributes)
    custom = _CUSTOM_FUSION.search(inst.attributes)
    if custom and custom.group(1) == 'dynamic_slice_fusion':
      return 'fusion:dynamic_slice'
    if backend:
      return 'fusion:' + backend.group(1).lstrip('_')
    kind = _KIND.search(inst.attributes)
    name = 'dynamic_slice' if inst.name.startswith(('dynamic_slice', 'dynamic-slice')) else None
    return 'fusion:' + (name or (kind.group(1)[1:].lower() if kind else 'unknown'))
  if inst.opcode == 'custom-call':
    target = _TARGET.search(inst.attributes)
    return 'custom_call:' + (target.group(1) if target else '?')
  return inst.opcode.replace('-start', '')


def part_of(inst: Instruction) -> str:
  """'<part>:fwd' or '<part>:bwd' from the op_name, or 'step' (optimizer, counters)."""
  match = _OP_NAME.search(inst.attributes)
  op_name = match.group(1) if match else ''
  direction = 'bwd' if 'transpose(' in op_name else 'fwd'
  if _SCAN_SLICE.search(op_name):
    return f'scan_slices:{direction}'
  for part, needles in PARTS:
    needles = (needles,) if isinstance(needles, str) else needles
    if any(n in op_name for n in needles):
      return f'{part}:{direction}'
  return 'step' if op_name else 'unnamed'


def _sliced_parameter_bytes(fused: List[Instruction]) -> Dict[int, int]:
  """{parameter number: bytes actually read} for the parameters of a fused computation
  that are only sliced (dynamic-slice / slice / gather): the sizes of the slices."""
  users = collections.defaultdict(list)
  for inst in fused:
    for operand in inst.operands:
      users[operand].append(inst)
  sliced = {}
  for inst in fused:
    if inst.opcode != 'parameter':
      continue
    uses = users.get(inst.name, [])
    if uses and all(u.opcode in ('dynamic-slice', 'slice', 'gather') and u.operands[0] == inst.name
                    for u in uses):
      sliced[int(inst.arguments)] = sum(u.bytes for u in uses)
  return sliced


def _updated_in_place(fused: List[Instruction]):
  """(parameter number, bytes written) when the fused computation's root is a
  dynamic-update-slice of one of its parameters (an in-place write into a stacked
  buffer: only the update moves), else None."""
  if not fused or fused[-1].opcode != 'dynamic-update-slice':
    return None
  root = fused[-1]
  by_name = {i.name: i for i in fused}
  target, update = by_name.get(root.operands[0]), by_name.get(root.operands[1])
  if target is None or target.opcode != 'parameter' or update is None:
    return None
  return int(target.arguments), update.bytes


@dataclasses.dataclass
class KernelStats:
  """Kernels (and the bytes they move) of one computation, loops expanded."""
  by_kind: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  by_part: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  bytes_by_kind: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  bytes_by_part: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  by_part_kind: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  # Per collective kind, the bytes it delivers per device (its result; an async start's
  # operand), not the kernel bytes above.
  collective_bytes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  unknown_trip_counts: int = 0

  def add(self, other: 'KernelStats', times: int = 1):
    for field in ('by_kind', 'by_part', 'bytes_by_kind', 'bytes_by_part', 'by_part_kind',
                  'collective_bytes'):
      mine = getattr(self, field)
      for key, value in getattr(other, field).items():
        mine[key] += value * times
    self.unknown_trip_counts += other.unknown_trip_counts * times

  @property
  def kernels(self) -> int:
    return sum(self.by_kind.values())


class _Program:
  def __init__(self, text: str):
    self.computations = parse_module(text)
    self.entry = self.computations.pop('__entry__')
    self.types = {i.name: i.type_text for insts in self.computations.values() for i in insts}
    self._memo = {}

  def kernel_bytes(self, inst: Instruction) -> int:
    operand_bytes = [array_bytes(self.types.get(o, '')) for o in inst.operands]
    result = inst.bytes
    if inst.opcode == 'fusion':
      fused = self.computations.get(_CALLS.search(inst.attributes).group(2), [])
      for number, read in _sliced_parameter_bytes(fused).items():
        if number < len(operand_bytes):
          operand_bytes[number] = read
      in_place = _updated_in_place(fused)
      if in_place is not None and in_place[0] < len(operand_bytes):
        operand_bytes[in_place[0]] = 0
        result = in_place[1]
    return sum(operand_bytes) + result

  def trip_count(self, while_inst: Instruction):
    """Iterations of a while loop: XLA:GPU's known_trip_count, or a condition whose root
    is `i < N` with a constant N (a scan from 0, as XLA:TPU leaves it); else None."""
    trip = _TRIP.search(while_inst.attributes)
    if trip:
      return int(trip.group(1))
    condition = self.computations.get(dict(_CALLS.findall(while_inst.attributes))['condition'], [])
    if not condition or condition[-1].opcode != 'compare' or 'direction=LT' not in condition[-1].attributes:
      return None
    by_name = {i.name: i for i in condition}
    bound = by_name.get(condition[-1].operands[-1])
    number = _CONSTANT.search(f'{bound.opcode}({bound.arguments})') if bound else None
    return int(number.group(1)) if number and bound.opcode == 'constant' else None

  def stats(self, name: str) -> KernelStats:
    if name in self._memo:
      return self._memo[name]
    stats = KernelStats()
    for inst in self.computations[name]:
      if inst.opcode == 'while':
        called = dict(_CALLS.findall(inst.attributes))
        trip = self.trip_count(inst)
        n = 1 if trip is None else trip
        stats.unknown_trip_counts += trip is None
        stats.add(self.stats(called['body']), n)
        stats.add(self.stats(called['condition']), n + 1)
      elif inst.opcode == 'conditional':
        branches = [b.strip().lstrip('%') for b in
                    _BRANCHES.search(inst.attributes).group(1).split(',')]
        stats.add(max((self.stats(b) for b in branches), key=lambda s: s.kernels))
      elif inst.opcode == 'call':
        stats.add(self.stats(_CALLS.search(inst.attributes).group(2)))
      elif inst.opcode not in _FREE and not inst.opcode.endswith('-done'):
        kind, part, moved = kind_of(inst), part_of(inst), self.kernel_bytes(inst)
        stats.by_kind[kind] += 1
        stats.by_part[part] += 1
        stats.by_part_kind[f'{part} {kind}'] += 1
        stats.bytes_by_kind[kind] += moved
        stats.bytes_by_part[part] += moved
        if kind in COLLECTIVES:
          async_start = inst.opcode.endswith('-start') and inst.operands
          stats.collective_bytes[kind] += (array_bytes(self.types[inst.operands[0]])
                                           if async_start else inst.bytes)
    self._memo[name] = stats
    return stats


def count_kernels(text: str) -> dict:
  """Kernel (op) counts of an optimised XLA HLO module (see the module docstring):
  {'kernels', 'by_kind', 'by_part', 'by_part_kind', 'kernel_bytes', 'bytes_by_kind',
   'bytes_by_part', 'collectives', 'unknown_trip_counts'}."""
  program = _Program(text)
  stats = program.stats(program.entry)
  ordered = lambda counter: dict(counter.most_common())
  return {
      'kernels': stats.kernels,
      'by_kind': ordered(stats.by_kind),
      'by_part': ordered(stats.by_part),
      'by_part_kind': ordered(stats.by_part_kind),
      'kernel_bytes': sum(stats.bytes_by_kind.values()),
      'bytes_by_kind': ordered(stats.bytes_by_kind),
      'bytes_by_part': ordered(stats.bytes_by_part),
      'collectives': {kind: {'count': stats.by_kind[kind],
                             'bytes': stats.collective_bytes[kind]}
                      for kind in COLLECTIVES if stats.by_kind[kind]},
      'unknown_trip_counts': stats.unknown_trip_counts,
  }


if __name__ == '__main__':
  print(json.dumps(count_kernels(open(sys.argv[1]).read()), indent=1))
