"""User-facing errors: the CLI prints these as one line, without a traceback."""


class TritlmError(Exception):
    """A problem the user can fix (bad path, bad config key, corrupt file, wrong tokenizer...)."""


class ConfigError(TritlmError):
    """An unknown key, a wrong type or an impossible value in a config."""


class FormatError(TritlmError):
    """A file that is missing, truncated, corrupt, or of the wrong kind."""
