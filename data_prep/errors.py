"""The errors of data_prep that say the corpus or the data config is at fault: SourceError (the corpus cannot be
read as configured) and DataPrepError (the data set cannot be prepared as configured). Both are PipelineErrors:
the CLI prints their message alone, and a build that meets one discards its partial data set (data_prep.build).
"""

from __future__ import annotations

from pipeline.config import PipelineError


class SourceError(PipelineError, ValueError):
    """The corpus cannot be read as configured."""


class DataPrepError(PipelineError, ValueError):
    """The data set cannot be prepared as configured."""
