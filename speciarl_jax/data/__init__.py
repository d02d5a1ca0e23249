"""Data: sources (TFDS, FGVC-Aircraft, manifests, a synthetic world), selections, prompts, the grain pipeline, and
an up-front check that names every bad example of a source."""

from .checking import BadExamplesError, check_source, find_bad_examples
from .config import BENCHMARKS, benchmark_source, pipeline_from_config, source_from_config
from .pipeline import Batch, BatchIterator, EpochReport, Pipeline, PipelineOptions, collate
from .prompts import PROMPTS, Prompt, get_prompt, load_prompt, load_prompt_file
from .selection import Concat, Subset, mixed_set, random_subset, sample_ids
from .sources import (
    AircraftSource,
    BadExampleError,
    Example,
    FileListSource,
    ManifestSource,
    Source,
    SplitNotFoundError,
    TfdsSource,
    class_name_to_label,
    coop_split_source,
)
from .synthetic import SyntheticSource, SyntheticWorld
