"""The one error type of the data pipeline: bad data configuration or input.

Raised before any training step; entry points print `error: <message>` and exit 2.
Messages name the file, flag or curriculum stage at fault in one line.
"""


class DataConfigError(ValueError):
    """Bad data flag, curriculum file, tokenizer or indexed dataset."""
