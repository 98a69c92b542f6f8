"""The error every model-reading check raises (a ValueError: bad input, not a bug)."""


class ModelReadError(ValueError):
    """The model folder cannot be read safely; the message names the file/tensor and the fix."""
