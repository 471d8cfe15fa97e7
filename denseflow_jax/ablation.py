"""The rows of the paper's Table 4 (DenseFlow-45-6 on CIFAR-10) as model switches.

Our reading of Table 4 (the official repository ships only row 6):
  row  coupling network   cross-unit augmentation   published bpd
  1    Glow               none                      3.42
  2    Glow               white noise               3.40
  3    Glow               preconditioned noise      3.37
  4    dense + attention  none                      3.14
  5    dense + attention  white noise               3.08
  6    dense + attention  preconditioned (full)     3.07
"""
ROWS = {
    1: ('glow', False, 'preconditioned', 3.42),
    2: ('glow', True, 'white', 3.40),
    3: ('glow', True, 'preconditioned', 3.37),
    4: ('dense_attention', False, 'preconditioned', 3.14),
    5: ('dense_attention', True, 'white', 3.08),
    6: ('dense_attention', True, 'preconditioned', 3.07),
}


def apply_row(config):
  """Set config.model's switches from `config.ablation_row` (after command-line overrides)."""
  row = config.ablation_row
  if row not in ROWS:
    raise ValueError(f'ablation_row must be one of {sorted(ROWS)}, got {row!r}')
  config.model.coupling_net, config.model.cross_unit, config.model.noise, _ = ROWS[row]
  return config
