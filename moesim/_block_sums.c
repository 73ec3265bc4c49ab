/* One pass over a stack of block-diagonal all-to-all matrices (moesim.blockmatrix): the sums
 * the cost model, the routing and the traffic metrics read from them, in integers (exact, so
 * equal to numpy's reductions in any order). Built by setup.py where a compiler is present;
 * without it moesim computes the same sums with numpy, one reduction at a time.
 *
 * sums(tok_XRQ, R, K, S, g, acc_rows_X, row_XR, col_XR, diag_XR, node_row_XR, node_col_XR,
 *      slot_XP, acc_YRK)
 *   tok_XRQ: C-contiguous int32 or int64 (told apart by itemsize) [X, R, K·S], the in-block
 *   matrices per destination slot (S slots per rank): row r belongs to block b = r / K, its
 *   columns j·S … j·S + S − 1 are destination rank b·K + j's slots; a rank's entry is the sum
 *   of its slots'.
 *   Outputs int64, all zeroed by the caller: row sums, column sums (per destination rank),
 *   the diagonal (self traffic: column r mod K of row r), and the sums over the destinations
 *   on the source's own node (node_row) and over the sources on the destination's node
 *   (node_col), nodes being g consecutive ranks, when K is a multiple of g (g·n = K; else
 *   those two stay zero). slot_XP (or None; with S > 1): the column sums per destination slot
 *   [X, R·S]. acc_YRK (or None): acc[acc_rows[x]] += the rank-level matrix x (rows < 0 skip),
 *   e.g. one iteration's passes and layers summed: its traffic.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* one slot per rank: the plain loop (vectorised) */
#define RANK_LOOP(TYPE)                                                                    \
    do {                                                                                   \
        const TYPE *t = (const TYPE *)tok;                                                 \
        for (int64_t x = 0; x < X; x++) {                                                  \
            int64_t *acc = acc_all && acc_rows[x] >= 0 ? acc_all + acc_rows[x] * R * K : NULL; \
            int64_t *col = col_all + x * R, *nodec = nodec_all + x * R;                    \
            for (int64_t r = 0; r < R; r++) {                                              \
                const TYPE *restrict row = t + (x * R + r) * K;                            \
                const int64_t b0 = (r / K) * K, rr = r % K;                                \
                int64_t *restrict cb = col + b0;                                           \
                int64_t s = 0;                                                             \
                if (acc) {                                                                 \
                    int64_t *restrict a = acc + r * K;                                     \
                    for (int64_t j = 0; j < K; j++) {                                      \
                        const int64_t v = (int64_t)row[j];                                 \
                        s += v; cb[j] += v; a[j] += v;                                     \
                    }                                                                      \
                } else {                                                                   \
                    for (int64_t j = 0; j < K; j++) {                                      \
                        const int64_t v = (int64_t)row[j];                                 \
                        s += v; cb[j] += v;                                                \
                    }                                                                      \
                }                                                                          \
                row_all[x * R + r] = s;                                                    \
                diag_all[x * R + r] = (int64_t)row[rr];                                    \
                if (nodes) {                                                               \
                    const int64_t j0 = (rr / g) * g;                                       \
                    int64_t sn = 0;                                                        \
                    for (int64_t j = j0; j < j0 + g; j++) {                                \
                        const int64_t v = (int64_t)row[j];                                 \
                        sn += v; nodec[b0 + j] += v;                                       \
                    }                                                                      \
                    noder_all[x * R + r] = sn;                                             \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
    } while (0)

/* S slots per rank: slot column sums, and every rank-level sum over each rank's S slots */
#define SLOT_LOOP(TYPE)                                                                    \
    do {                                                                                   \
        const TYPE *t = (const TYPE *)tok;                                                 \
        const int64_t Q = K * S;                                                           \
        for (int64_t x = 0; x < X; x++) {                                                  \
            int64_t *acc = acc_all && acc_rows[x] >= 0 ? acc_all + acc_rows[x] * R * K : NULL; \
            int64_t *col = col_all + x * R, *nodec = nodec_all + x * R;                    \
            int64_t *cslot = slot_all + x * R * S;                                         \
            for (int64_t r = 0; r < R; r++) {                                              \
                const TYPE *restrict row = t + (x * R + r) * Q;                            \
                const int64_t b0 = (r / K) * K, rr = r % K, j0 = (rr / g) * g;             \
                int64_t *restrict cs = cslot + b0 * S;                                     \
                for (int64_t q = 0; q < Q; q++) cs[q] += (int64_t)row[q];                  \
                int64_t s = 0, sn = 0;                                                     \
                for (int64_t j = 0; j < K; j++) {                                          \
                    int64_t v = 0;                                                         \
                    for (int64_t k = 0; k < S; k++) v += (int64_t)row[j * S + k];          \
                    s += v; col[b0 + j] += v;                                              \
                    if (acc) acc[r * K + j] += v;                                          \
                    if (nodes && j >= j0 && j < j0 + g) { sn += v; nodec[b0 + j] += v; }   \
                    if (j == rr) diag_all[x * R + r] = v;                                  \
                }                                                                          \
                row_all[x * R + r] = s;                                                    \
                if (nodes) noder_all[x * R + r] = sn;                                      \
            }                                                                              \
        }                                                                                  \
    } while (0)

static int out_ok(PyObject *obj, Py_buffer *view, int64_t n, const char *name) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE | PyBUF_FORMAT) < 0)
        return 0;
    if (view->itemsize != 8 || view->len != n * 8) {
        PyErr_Format(PyExc_ValueError, "%s: expected %lld int64", name, (long long)n);
        PyBuffer_Release(view);
        return 0;
    }
    return 1;
}

static PyObject *sums(PyObject *self, PyObject *args) {
    PyObject *tok_o, *rows_o, *row_o, *col_o, *diag_o, *noder_o, *nodec_o, *slot_o, *acc_o;
    long long R, K, S, g;
    if (!PyArg_ParseTuple(args, "OLLLLOOOOOOOO", &tok_o, &R, &K, &S, &g, &rows_o, &row_o,
                          &col_o, &diag_o, &noder_o, &nodec_o, &slot_o, &acc_o))
        return NULL;
    Py_buffer tokv, v[8];
    int got = 0;
    if (PyObject_GetBuffer(tok_o, &tokv, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return NULL;
    const int size = (int)tokv.itemsize;
    if ((size != 4 && size != 8) || K <= 0 || S <= 0 || g <= 0 || R <= 0 || R % K
        || tokv.len % (size * R * K * S)) {
        PyBuffer_Release(&tokv);
        PyErr_SetString(PyExc_ValueError, "sums: tok must be int32 or int64 [X, R, K*S]");
        return NULL;
    }
    const int64_t X = tokv.len / size / (R * K * S);
    PyObject *outs[5] = {row_o, col_o, diag_o, noder_o, nodec_o};
    const char *names[5] = {"row", "col", "diag", "node_row", "node_col"};
    for (; got < 5; got++)
        if (!out_ok(outs[got], &v[got], X * R, names[got])) goto fail;
    int64_t *slot_all = NULL, *acc_all = NULL;
    const int64_t *acc_rows = NULL;
    if (S > 1 && slot_o == Py_None) {
        PyErr_SetString(PyExc_ValueError, "sums: S > 1 needs the slot sums' output");
        goto fail;
    }
    if (slot_o != Py_None) {
        if (!out_ok(slot_o, &v[got], X * R * S, "slot")) goto fail;
        slot_all = (int64_t *)v[got++].buf;
    }
    if (acc_o != Py_None) {
        if (!out_ok(rows_o, &v[got], X, "acc_rows")) goto fail;
        acc_rows = (const int64_t *)v[got++].buf;
        if (PyObject_GetBuffer(acc_o, &v[got], PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0)
            goto fail;
        const int64_t Y = v[got].len / 8 / (R * K);
        acc_all = (int64_t *)v[got++].buf;
        for (int64_t x = 0; x < X; x++)
            if (acc_rows[x] >= Y) {
                PyErr_SetString(PyExc_ValueError, "sums: acc row out of range");
                goto fail;
            }
    }
    const int nodes = (K % g) == 0;
    int64_t *row_all = v[0].buf, *col_all = v[1].buf, *diag_all = v[2].buf;
    int64_t *noder_all = v[3].buf, *nodec_all = v[4].buf;
    const void *tok = tokv.buf;
    Py_BEGIN_ALLOW_THREADS
    if (S == 1 && size == 4) RANK_LOOP(int32_t);
    else if (S == 1) RANK_LOOP(int64_t);
    else if (size == 4) SLOT_LOOP(int32_t);
    else SLOT_LOOP(int64_t);
    Py_END_ALLOW_THREADS
    for (int i = 0; i < got; i++) PyBuffer_Release(&v[i]);
    PyBuffer_Release(&tokv);
    Py_RETURN_NONE;
fail:
    for (int i = 0; i < got; i++) PyBuffer_Release(&v[i]);
    PyBuffer_Release(&tokv);
    return NULL;
}

static PyMethodDef methods[] = {
    {"sums", sums, METH_VARARGS, "row, column, diagonal and node sums of block matrices"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_block_sums", NULL, -1, methods};

PyMODINIT_FUNC PyInit__block_sums(void) { return PyModule_Create(&module); }
