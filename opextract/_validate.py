"""Argument checks and size estimates shared by the builders and the API.

Every message follows one wording: the parameter, the rule, then the value
received (``input_shape must be (C, H, W) with positive sizes; got (3, 0)``).
"""

from __future__ import annotations

import contextlib
import contextvars
import operator
from collections.abc import Iterator

import numpy as np

from opextract._errors import OperatorTooLargeError

#: Default memory budget of one operator or factor, in bytes (4 GiB). An
#: estimate above it is refused before anything large is allocated.
DEFAULT_MAX_BYTES = 4 * 2**30

LAYOUTS = ("compact", "padded")

_budget: contextvars.ContextVar[int] = contextvars.ContextVar(
    "opextract_max_bytes", default=DEFAULT_MAX_BYTES
)


@contextlib.contextmanager
def budget(max_bytes: int | None) -> Iterator[int]:
    """Make ``max_bytes`` the budget of the builders called inside the block."""
    value = current_budget() if max_bytes is None else check_max_bytes(max_bytes)
    token = _budget.set(value)
    try:
        yield value
    finally:
        _budget.reset(token)


def current_budget() -> int:
    """The memory budget in force (bytes)."""
    return _budget.get()


def check_max_bytes(max_bytes) -> int:
    try:
        value = operator.index(max_bytes)
    except TypeError:
        value = None
    if value is None or value <= 0:
        raise ValueError(f"max_bytes must be a positive integer; got {max_bytes!r}")
    return value


def check_dtype(dtype) -> np.dtype:
    """Return ``dtype`` as a numpy dtype; only float32 and float64 are allowed."""
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved not in (np.dtype(np.float32), np.dtype(np.float64)):
        shown = getattr(dtype, "__name__", None) or repr(dtype)
        raise ValueError(f"dtype must be float32 or float64; got {shown}")
    return resolved


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'compact' or 'padded'; got {layout!r}")
    return layout


def check_shape(shape, *, name: str = "input_shape", ndim: int | None = None):
    """Return ``shape`` as a tuple of positive Python ints."""
    try:
        values = tuple(operator.index(s) for s in shape)
    except TypeError:
        values = None
    if values is None or not values or any(s <= 0 for s in values):
        raise ValueError(f"{name} must be a tuple of positive integers; got {shape!r}")
    if ndim is not None and len(values) != ndim:
        raise ValueError(f"{name} must have {ndim} entries; got {shape!r}")
    return values


def int_tuple(value, nd: int, name: str) -> tuple[int, ...]:
    """``value`` as a tuple of ``nd`` ints (an int is repeated ``nd`` times)."""
    try:
        if isinstance(value, (tuple, list)):
            values = tuple(operator.index(v) for v in value)
        else:
            values = (operator.index(value),) * nd
    except TypeError:
        values = None
    if values is None or len(values) != nd:
        raise ValueError(
            f"{name} must be an int or a tuple of {nd} ints; got {value!r}"
        )
    return values


def index_dtype(largest: int) -> np.dtype:
    """int32 when every index (and nnz) fits, else int64."""
    return np.dtype(np.int32 if largest <= np.iinfo(np.int32).max else np.int64)


def csr_bytes(nnz: int, n_rows: int, n_cols: int, dtype) -> tuple[int, np.dtype]:
    """Bytes of a CSR array with ``nnz`` entries, and its index dtype."""
    idx = index_dtype(max(nnz, n_cols, n_rows))
    size = nnz * (np.dtype(dtype).itemsize + idx.itemsize) + (n_rows + 1) * idx.itemsize
    return size, idx


def check_bytes(estimate: int, what: str, max_bytes: int | None = None) -> None:
    """Refuse ``estimate`` bytes when it exceeds the budget."""
    limit = current_budget() if max_bytes is None else max_bytes
    if estimate > limit:
        raise OperatorTooLargeError(
            f"{what} needs an estimated {estimate} bytes "
            f"({estimate / 2**30:.2f} GiB), more than max_bytes={limit}; "
            "raise max_bytes or use as_linear_operator(..., backend='torch')"
        )
