"""SpeciaRL in JAX."""

import os

# transformers serves only tokenizers and image processors here; its advice that PyTorch is missing is noise.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
