"""Import every layer handler module so that its types register.

One import line per handler module; importing ``opextract`` runs this file.
"""

from opextract import _conv, _upsample  # noqa: F401
