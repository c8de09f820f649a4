"""User-facing errors: the CLI prints these as one line, without a traceback."""


class TritlmError(Exception):
    """A problem the user can fix (bad path, bad config key, corrupt file, wrong tokenizer...)."""


class ConfigError(TritlmError):
    """An unknown key, a wrong type or an impossible value in a config."""


class FormatError(TritlmError):
    """A file that is missing, truncated, corrupt, or of the wrong kind."""


class WriteError(TritlmError):
    """A file or folder could not be written (permissions, a read-only disk, an I/O error...)."""


class DiskFullError(WriteError):
    """No space (or no quota) left on the disk a file or folder was being written to."""


class RunLockedError(TritlmError):
    """Another live run holds the lock of an output folder."""
