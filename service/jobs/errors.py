"""The errors of every kind of job: one ``JobNotFound``, one ``TooManyJobs``, one output-location family.

- ``JobNotFound`` (NOT_FOUND, ``JOB_NOT_FOUND``): no job by that id, in the store or among the
  editor's jobs (never started, or forgotten after the time they are kept).
- ``JobNotFinished`` (FAILED_PRECONDITION): deleting a job that still runs.
- ``TooManyJobs`` (RESOURCE_EXHAUSTED): a kind of job already runs as many jobs as it may.
- ``OutputRefused``: a job's output location cannot take it; the ``reason`` fixes the code
  (``OUTPUT_REASONS``): not allowed, not empty, in use, not a folder, too small, conflicting.
"""

from __future__ import annotations

from rulewright.service.errors import Code, Error


class JobNotFound(Error):
    """No job by that id (→ NOT_FOUND)."""

    code, reason = Code.NOT_FOUND, "JOB_NOT_FOUND"


class JobNotFinished(Error):
    """Deleting a job that still runs (→ FAILED_PRECONDITION)."""

    code, reason = Code.FAILED_PRECONDITION, "JOB_NOT_FINISHED"


class TooManyJobs(Error):
    """This server already runs as many jobs of the kind as it allows (→ RESOURCE_EXHAUSTED)."""

    code, reason = Code.RESOURCE_EXHAUSTED, "TOO_MANY_JOBS"


# Why an output location refuses a job, and the code each reason answers with.
OUTPUT_REASONS = {
    "OUTPUT_NOT_ALLOWED": Code.PERMISSION_DENIED,       # outside every allowed prefix, or through a link
    "OUTPUT_NOT_EMPTY": Code.FAILED_PRECONDITION,       # a new job's location already holds documents
    "OUTPUT_IN_USE": Code.FAILED_PRECONDITION,          # claimed by another job (not this job existing already)
    "OUTPUT_NOT_A_FOLDER": Code.FAILED_PRECONDITION,    # a file stands where the location needs a folder
    "OUTPUT_SPACE": Code.RESOURCE_EXHAUSTED,            # less free room than the job's worst-case output
    "OUTPUT_CONFLICT": Code.ABORTED,                    # the location holds another job's manifest
}


class OutputRefused(Error):
    """A job's output location cannot take it; ``reason`` (a key of ``OUTPUT_REASONS``) fixes the code."""

    def __init__(self, reason: str, message: str, **kwargs):
        super().__init__(message, reason=reason, **kwargs)
        self.code = OUTPUT_REASONS[reason]
