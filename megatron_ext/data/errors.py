"""The data pipeline's error type (bad data configuration or input): `DataConfigError`,
defined with the other user-facing errors in `megatron_ext.errors`.

Raised before any training step; entry points print `error: <message>` and exit 2.
Messages name the file, flag or curriculum stage at fault in one line.
"""

from megatron_ext.errors import DataConfigError

__all__ = ["DataConfigError"]
