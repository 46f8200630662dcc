"""User-facing errors.

A KdpipeError carries one clear sentence for the user; the CLI prints it and exits with
status 2, never a traceback. Anything else is a bug and keeps its traceback.
"""


class KdpipeError(Exception):
    """Bad input or state the user can fix: the message is one sentence saying what and why."""


class CheckpointError(KdpipeError):
    """A checkpoint is missing, unreadable, or of another architecture."""


class DataError(KdpipeError):
    """A data set is missing, malformed, or not the one a store was made from."""


class StoreError(KdpipeError):
    """An artifact store is missing, incomplete, foreign, or lacks what is asked of it."""
