"""The root of the pipeline's errors: a problem the user can fix, printed without a traceback."""

from __future__ import annotations


class PipelineError(Exception):
    """A problem the user can fix (bad config, bad input, damaged files): the CLI prints its message alone,
    without a traceback. Each error class of the pipeline derives from it."""
