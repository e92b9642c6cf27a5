"""Numba kernels that write CSR arrays and multiply sparse and dense factors.

The kernels trust their input: the Python wrappers in ``_conv.py`` and
``_compose.py`` validate shapes and dtypes and allocate the output exactly
(sizes are known, or counted in a first pass, before anything large is
allocated). ``prange`` runs only over output rows, which are independent.
Nothing here configures numba; thread counts are numba's defaults.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, inline="always")
def _tap_sum(weight, co, ci, pd, a, ph, b, pw, c, gsd, tapd, gsh, taph, gsw, tapw):
    """Sum of the kernel weights of every tap that lands on one input position.

    ``(pd, a)``, ``(ph, b)``, ``(pw, c)`` pick, per axis, a pattern (or output
    position) and one of its distinct input positions; the taps landing there
    are ``tap*[p, gs*[p, j]:gs*[p, j + 1]]``.
    """
    s = 0.0
    for i in range(gsd[pd, a], gsd[pd, a + 1]):
        kd = tapd[pd, i]
        for j in range(gsh[ph, b], gsh[ph, b + 1]):
            kh = taph[ph, j]
            for k in range(gsw[pw, c], gsw[pw, c + 1]):
                s += weight[co, ci, kd, kh, tapw[pw, k]]
    return s


@njit(cache=True)
def conv_indptr(indptr, cout, od_n, oh_n, ow_n, cin_g, ngd, ngh, ngw):
    """Fill ``indptr`` of a convolution matrix from per-axis column counts."""
    indptr[0] = 0
    pos = 0
    row = 0
    for _co in range(cout):
        for od in range(od_n):
            for oh in range(oh_n):
                base = cin_g * ngd[od] * ngh[oh]
                for ow in range(ow_n):
                    pos += base * ngw[ow]
                    row += 1
                    indptr[row] = pos


@njit(cache=True, parallel=True)
def conv_fill_general(
    weight,
    cin_g,
    cout_g,
    in_dhw,
    out_dhw,
    ngd,
    cold,
    gsd,
    tapd,
    ngh,
    colh,
    gsh,
    taph,
    ngw,
    colw,
    gsw,
    tapw,
    indptr,
    indices,
    data,
):
    """Write a convolution whose taps may land on the same input position.

    Circular, reflect and replicate padding can send several taps of one
    output position to one input position; their weights are summed into one
    entry. Per axis, ``col*[o, j]`` lists the distinct input positions of
    output position ``o`` in increasing order and ``tap*[o, gs*[o, j]:gs*[o,
    j + 1]]`` the kernel offsets that land there.
    """
    cout = weight.shape[0]
    d_in, h_in, w_in = in_dhw[0], in_dhw[1], in_dhw[2]
    od_n, oh_n, ow_n = out_dhw[0], out_dhw[1], out_dhw[2]
    hw = h_in * w_in
    dhw = d_in * hw
    for t in prange(cout * od_n * oh_n):
        co = t // (od_n * oh_n)
        rem = t - co * od_n * oh_n
        od = rem // oh_n
        oh = rem - od * oh_n
        g = co // cout_g
        for ow in range(ow_n):
            pos = indptr[t * ow_n + ow]
            for ci in range(cin_g):
                cbase = (g * cin_g + ci) * dhw
                for a in range(ngd[od]):
                    base_d = cbase + cold[od, a] * hw
                    for b in range(ngh[oh]):
                        base_h = base_d + colh[oh, b] * w_in
                        for c in range(ngw[ow]):
                            indices[pos] = base_h + colw[ow, c]
                            data[pos] = _tap_sum(
                                weight, co, ci, od, a, oh, b, ow, c,
                                gsd, tapd, gsh, taph, gsw, tapw,
                            )  # fmt: skip
                            pos += 1


@njit(cache=True)
def conv_templates(
    weight,
    cin_g,
    in_dhw,
    ngd,
    reld,
    gsd,
    tapd,
    ngh,
    relh,
    gsh,
    taph,
    ngw,
    relw,
    gsw,
    tapw,
    tcols,
    tvals,
):
    """Build one row template per output channel and per tap pattern.

    Output positions whose taps have the same kernel offsets and the same
    input positions relative to the first one (a *pattern*) have rows that
    differ only by a column shift. ``tcols[combo]`` holds the relative
    columns of pattern combination ``combo = (pd * n_h + ph) * n_w + pw`` and
    ``tvals[co, combo]`` its values, weights of colliding taps summed.
    Serial: templates hold at most a fraction of the matrix's entries, and a
    parallel launch costs more than the work on small layers.
    """
    cout = weight.shape[0]
    h_in, w_in = in_dhw[1], in_dhw[2]
    hw = h_in * w_in
    dhw = in_dhw[0] * hw
    n_d, n_h, n_w = ngd.shape[0], ngh.shape[0], ngw.shape[0]
    for co in range(cout):
        for pd in range(n_d):
            for ph in range(n_h):
                for pw in range(n_w):
                    combo = (pd * n_h + ph) * n_w + pw
                    pos = 0
                    for ci in range(cin_g):
                        for a in range(ngd[pd]):
                            off_d = ci * dhw + reld[pd, a] * hw
                            for b in range(ngh[ph]):
                                off_h = off_d + relh[ph, b] * w_in
                                for c in range(ngw[pw]):
                                    s = _tap_sum(
                                        weight, co, ci, pd, a, ph, b, pw, c,
                                        gsd, tapd, gsh, taph, gsw, tapw,
                                    )  # fmt: skip
                                    if co == 0:
                                        tcols[combo, pos] = off_h + relw[pw, c]
                                    tvals[co, combo, pos] = s
                                    pos += 1


@njit(cache=True, parallel=True)
def conv_fill_templates(
    cin_g,
    cout_g,
    in_dhw,
    out_dhw,
    pid_d,
    base_d,
    pid_h,
    base_h,
    pid_w,
    base_w,
    n_h,
    n_w,
    tcols,
    tvals,
    indptr,
    indices,
    data,
):
    """Write every row of a convolution matrix as a shifted template copy."""
    cout = tvals.shape[0]
    h_in, w_in = in_dhw[1], in_dhw[2]
    hw = h_in * w_in
    dhw = in_dhw[0] * hw
    od_n, oh_n, ow_n = out_dhw[0], out_dhw[1], out_dhw[2]
    for t in prange(cout * od_n * oh_n):
        co = t // (od_n * oh_n)
        rem = t - co * od_n * oh_n
        od = rem // oh_n
        oh = rem - od * oh_n
        g = co // cout_g
        row_base = g * cin_g * dhw + base_d[od] * hw + base_h[oh] * w_in
        combo_dh = (pid_d[od] * n_h + pid_h[oh]) * n_w
        for ow in range(ow_n):
            row = t * ow_n + ow
            start = indptr[row]
            n = indptr[row + 1] - start
            combo = combo_dh + pid_w[ow]
            base = row_base + base_w[ow]
            cols = tcols[combo]
            vals = tvals[co, combo]
            for j in range(n):
                indices[start + j] = cols[j] + base
                data[start + j] = vals[j]


# ---------------------------------------------------------------------------
# Products. Rows are split into contiguous chunks, one scratch accumulator per
# chunk, so that threads never share memory they write.


@njit(cache=True, parallel=True)
def spgemm_count(a_indptr, a_indices, b_indptr, b_indices, n_cols, n_chunks, counts):
    """Count the nonzeros of each row of ``A @ B`` (symbolic pass)."""
    m = a_indptr.shape[0] - 1
    step = (m + n_chunks - 1) // n_chunks
    for chunk in prange(n_chunks):
        mark = np.full(n_cols, -1, dtype=np.int64)
        start = chunk * step
        stop = min(m, start + step)
        for i in range(start, stop):
            nnz = 0
            for p in range(a_indptr[i], a_indptr[i + 1]):
                k = a_indices[p]
                for q in range(b_indptr[k], b_indptr[k + 1]):
                    j = b_indices[q]
                    if mark[j] != i:
                        mark[j] = i
                        nnz += 1
            counts[i] = nnz


@njit(cache=True, parallel=True)
def spgemm_fill(
    a_indptr,
    a_indices,
    a_data,
    b_indptr,
    b_indices,
    b_data,
    n_cols,
    n_chunks,
    c_indptr,
    c_indices,
    c_data,
):
    """Numeric pass of ``A @ B`` into exactly allocated CSR arrays, sorted."""
    m = a_indptr.shape[0] - 1
    step = (m + n_chunks - 1) // n_chunks
    for chunk in prange(n_chunks):
        mark = np.full(n_cols, -1, dtype=np.int64)
        acc = np.zeros(n_cols, dtype=c_data.dtype)
        touched = np.empty(n_cols, dtype=np.int64)
        start = chunk * step
        stop = min(m, start + step)
        for i in range(start, stop):
            nnz = 0
            for p in range(a_indptr[i], a_indptr[i + 1]):
                k = a_indices[p]
                v = a_data[p]
                for q in range(b_indptr[k], b_indptr[k + 1]):
                    j = b_indices[q]
                    if mark[j] != i:
                        mark[j] = i
                        touched[nnz] = j
                        nnz += 1
                        acc[j] = v * b_data[q]
                    else:
                        acc[j] += v * b_data[q]
            pos = c_indptr[i]
            if nnz * 16 > n_cols:
                # Dense row: a scan over the marks is cheaper than a sort.
                for j in range(n_cols):
                    if mark[j] == i:
                        c_indices[pos] = j
                        c_data[pos] = acc[j]
                        pos += 1
            else:
                cols = np.sort(touched[:nnz])
                for r in range(nnz):
                    j = cols[r]
                    c_indices[pos] = j
                    c_data[pos] = acc[j]
                    pos += 1


@njit(cache=True, parallel=True)
def spgemm_dense(a_indptr, a_indices, a_data, b_indptr, b_indices, b_data, out):
    """``out = A @ B`` for CSR ``A`` and ``B`` written into a dense array."""
    m = a_indptr.shape[0] - 1
    for i in prange(m):
        row = out[i]
        for p in range(a_indptr[i], a_indptr[i + 1]):
            k = a_indices[p]
            v = a_data[p]
            for q in range(b_indptr[k], b_indptr[k + 1]):
                row[b_indices[q]] += v * b_data[q]


@njit(cache=True, parallel=True)
def dense_spmm(x, b_indptr, b_indices, b_data, out):
    """``out = X @ B`` for dense ``X`` and CSR ``B``; zeros of ``X`` skipped."""
    m, n_inner = x.shape
    for i in prange(m):
        row = out[i]
        for k in range(n_inner):
            v = x[i, k]
            if v != 0:
                for q in range(b_indptr[k], b_indptr[k + 1]):
                    row[b_indices[q]] += v * b_data[q]


@njit(cache=True, parallel=True)
def spmm_dense(a_indptr, a_indices, a_data, y, out):
    """``out = A @ Y`` for CSR ``A`` and dense ``Y``."""
    m = a_indptr.shape[0] - 1
    n = y.shape[1]
    for i in prange(m):
        row = out[i]
        for p in range(a_indptr[i], a_indptr[i + 1]):
            k = a_indices[p]
            v = a_data[p]
            for j in range(n):
                row[j] += v * y[k, j]


@njit(cache=True, parallel=True)
def dense_to_csr_count(x, counts):
    """Count the nonzeros of each row of a dense array."""
    for i in prange(x.shape[0]):
        nnz = 0
        for j in range(x.shape[1]):
            if x[i, j] != 0:
                nnz += 1
        counts[i] = nnz


@njit(cache=True, parallel=True)
def dense_to_csr_fill(x, indptr, indices, data):
    """Write the nonzeros of a dense array into exactly allocated CSR arrays."""
    for i in prange(x.shape[0]):
        pos = indptr[i]
        for j in range(x.shape[1]):
            v = x[i, j]
            if v != 0:
                indices[pos] = j
                data[pos] = v
                pos += 1


@njit(cache=True, parallel=True)
def stamp_rows(
    rep_indptr, rep_indices, rep_data, row_rep, row_shift, indptr, indices, data
):
    """Row ``i`` of the output is row ``row_rep[i]`` of the templates, its
    columns shifted by ``row_shift[i]``; ``indptr`` is already filled."""
    for i in prange(row_rep.shape[0]):
        r = row_rep[i]
        shift = row_shift[i]
        start = rep_indptr[r]
        pos = indptr[i]
        for q in range(rep_indptr[r + 1] - start):
            indices[pos + q] = rep_indices[start + q] + shift
            data[pos + q] = rep_data[start + q]


@njit(cache=True, parallel=True)
def virtual_spmm_dense(
    a_indptr, a_indices, a_data, t_indptr, t_indices, t_data, row_rep, row_shift, out
):
    """``out = A @ B`` where row ``k`` of ``B`` is template ``row_rep[k]``
    shifted by ``row_shift[k]`` (a convolution that was never allocated)."""
    m = a_indptr.shape[0] - 1
    for i in prange(m):
        row = out[i]
        for p in range(a_indptr[i], a_indptr[i + 1]):
            k = a_indices[p]
            v = a_data[p]
            r = row_rep[k]
            shift = row_shift[k]
            for q in range(t_indptr[r], t_indptr[r + 1]):
                row[t_indices[q] + shift] += v * t_data[q]


@njit(cache=True, parallel=True)
def dense_virtual_spmm(x, t_indptr, t_indices, t_data, row_rep, row_shift, out):
    """``out = X @ B`` for dense ``X`` and ``B`` given by templates."""
    m, n_inner = x.shape
    for i in prange(m):
        row = out[i]
        for k in range(n_inner):
            v = x[i, k]
            if v != 0:
                r = row_rep[k]
                shift = row_shift[k]
                for q in range(t_indptr[r], t_indptr[r + 1]):
                    row[t_indices[q] + shift] += v * t_data[q]


@njit(cache=True, inline="always")
def _patch_columns(r, start, offsets, sizes, strides, cols):
    """Spatial column of each window entry of row ``r``, -1 outside the input."""
    nd, n_window = offsets.shape
    for q in range(n_window):
        col = 0
        for a in range(nd):
            u = start[a, r] + offsets[a, q]
            if u < 0 or u >= sizes[a]:
                col = -1
                break
            col += u * strides[a]
        cols[q] = col


@njit(cache=True, parallel=True)
def patch_count(g, start, offsets, sizes, strides, counts):
    """Per row, the nonzero entries of its patch that lie inside the input.

    ``g`` is ``(window, rows, C)`` (the window flattened), ``offsets`` the
    ``(nd, window)`` offset of each window entry per axis, ``start`` the
    ``(nd, rows)`` window starts, ``sizes`` and ``strides`` the input's
    spatial sizes and strides.
    """
    n_window = offsets.shape[1]
    for r in prange(g.shape[1]):
        cols = np.empty(n_window, dtype=np.int64)
        _patch_columns(r, start, offsets, sizes, strides, cols)
        n = 0
        for q in range(n_window):
            if cols[q] >= 0:
                for c in range(g.shape[2]):
                    if g[q, r, c] != 0:
                        n += 1
        counts[r] = n


@njit(cache=True, parallel=True)
def patch_fill(g, start, offsets, sizes, strides, n_spatial, indptr, indices, data):
    """Write the rows counted by ``patch_count``, columns increasing."""
    n_window = offsets.shape[1]
    for r in prange(g.shape[1]):
        cols = np.empty(n_window, dtype=np.int64)
        _patch_columns(r, start, offsets, sizes, strides, cols)
        pos = indptr[r]
        for c in range(g.shape[2]):
            for q in range(n_window):
                v = g[q, r, c]
                if v != 0 and cols[q] >= 0:
                    indices[pos] = c * n_spatial + cols[q]
                    data[pos] = v
                    pos += 1


@njit(cache=True, parallel=True)
def patch_place(out, g, target, base, weight):
    """``out[target[q] + base[r], r, :] += weight * g[q, r, :]`` for all q, r."""
    for r in prange(g.shape[1]):
        for q in range(g.shape[0]):
            o = target[q] + base[r]
            for c in range(g.shape[2]):
                out[o, r, c] += weight * g[q, r, c]
