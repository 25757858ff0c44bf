"""One exception family. The CLI turns these into a red message and exit code 1.

A message names the bad value (file, column, row), what was expected, and what to do.
"""


class CxrembedError(Exception):
    """Base class of every error cxrembed raises on purpose."""


class DataError(CxrembedError):
    """A dataset folder, metadata file, split list or image is missing or malformed."""


class ConfigError(CxrembedError):
    """An option or configuration value is out of range or inconsistent."""


class PromptsError(ConfigError):
    """A prompts file or mapping (``--prompts``) is malformed or names an unknown label."""


class ModelError(CxrembedError):
    """A model name, weights tag or checkpoint cannot be used."""


class StoreError(CxrembedError):
    """An embedding store or index is missing, incomplete, or from another encoder."""


class DiskFullError(CxrembedError):
    """A write failed for want of space (disk full, quota, file size limit); what was
    written before is intact and the command can be run again once space is freed."""
