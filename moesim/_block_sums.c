/* One pass over a stack of block-diagonal all-to-all matrices (moesim.blockmatrix): the sums
 * the cost model, the routing and the traffic metrics read from them, in integers (exact, so
 * equal to numpy's reductions in any order). Built by setup.py where a compiler is present;
 * without it moesim computes the same sums with numpy, one reduction at a time.
 *
 * sums(tok_XRK, R, K, g, group, row_XR, col_XR, diag_XR, node_row_XR, node_col_XR, acc_YRK)
 *   tok_XRK: C-contiguous int32 or int64 (told apart by itemsize) [X, R, K], the in-block
 *   matrices: row r belongs to block b = r / K and its column j is destination rank b·K + j.
 *   Outputs int64, all zeroed by the caller: row sums, column sums (per destination rank),
 *   the diagonal (self traffic: column r mod K of row r), and the sums over the destinations
 *   on the source's own node (node_row) and over the sources on the destination's node
 *   (node_col), nodes being g consecutive ranks, when K is a multiple of g (g·n = K; else
 *   those two stay zero). acc_YRK (or None): acc[x / group] += tok[x], the sum of each run of
 *   `group` consecutive matrices (one iteration's passes and layers: its traffic).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define SUMS_LOOP(TYPE)                                                                    \
    do {                                                                                   \
        const TYPE *t = (const TYPE *)tok;                                                 \
        for (int64_t x = 0; x < X; x++) {                                                  \
            int64_t *acc = acc_all ? acc_all + (x / group) * R * K : NULL;                 \
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
    PyObject *tok_o, *row_o, *col_o, *diag_o, *noder_o, *nodec_o, *acc_o;
    long long R, K, g, group;
    if (!PyArg_ParseTuple(args, "OLLLLOOOOOO", &tok_o, &R, &K, &g, &group, &row_o, &col_o,
                          &diag_o, &noder_o, &nodec_o, &acc_o))
        return NULL;
    Py_buffer tokv, v[6];
    int got = 0;
    if (PyObject_GetBuffer(tok_o, &tokv, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return NULL;
    const int size = (int)tokv.itemsize;
    if ((size != 4 && size != 8) || K <= 0 || g <= 0 || group <= 0 || tokv.len % (size * K)) {
        PyBuffer_Release(&tokv);
        PyErr_SetString(PyExc_ValueError, "sums: tok must be int32 or int64 [X, R, K]");
        return NULL;
    }
    const int64_t XR = tokv.len / size / K;
    PyObject *outs[5] = {row_o, col_o, diag_o, noder_o, nodec_o};
    const char *names[5] = {"row", "col", "diag", "node_row", "node_col"};
    for (; got < 5; got++)
        if (!out_ok(outs[got], &v[got], XR, names[got])) goto fail;
    if (R <= 0 || R % K || XR % R) {
        PyErr_SetString(PyExc_ValueError, "sums: R must be a multiple of K");
        goto fail;
    }
    const int64_t X = XR / R;
    int64_t *acc_all = NULL;
    if (acc_o != Py_None) {
        const int64_t Y = (X + group - 1) / group;
        if (!out_ok(acc_o, &v[5], Y * R * K, "acc")) goto fail;
        got = 6;
        acc_all = (int64_t *)v[5].buf;
    }
    const int nodes = (K % g) == 0;
    int64_t *row_all = v[0].buf, *col_all = v[1].buf, *diag_all = v[2].buf;
    int64_t *noder_all = v[3].buf, *nodec_all = v[4].buf;
    const void *tok = tokv.buf;
    Py_BEGIN_ALLOW_THREADS
    if (size == 4) SUMS_LOOP(int32_t);
    else SUMS_LOOP(int64_t);
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
