"""Import every layer handler module so that its types register.

One import line per handler module; importing ``opextract`` runs this file.
"""

from opextract import (  # noqa: F401
    _activations,
    _conv,
    _convtranspose,
    _dense,
    _interpolate,
    _pool,
    _reshape,
    _upsample,
)
