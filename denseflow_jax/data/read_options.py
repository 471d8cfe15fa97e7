"""grain's read options, shared by the training and the evaluation stream."""
import grain


def read_options(prefetch: int) -> grain.ReadOptions:
  """``data.prefetch`` reading threads and batches buffered ahead."""
  return grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)
