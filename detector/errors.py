"""User-facing errors: the CLI prints their message on one line, without a traceback."""


class DetectorError(Exception):
    """A mistake the user can fix (bad setting, broken dataset, missing file); the message says how."""


class ConfigError(DetectorError, ValueError):
    """A setting with an unknown key, a wrong type or a value out of range."""


class DataError(DetectorError):
    """A data card, annotation file or image that cannot be used as it is."""
