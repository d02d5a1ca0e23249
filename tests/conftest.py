"""Shared test set-up."""
from absl import flags

# grain's worker processes read absl flags; under pytest nobody parses them.
flags.FLAGS.mark_as_parsed()
