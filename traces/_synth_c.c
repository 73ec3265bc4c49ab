/* The streaming synthetic sampler's inner loop (moesim.traces.synth_kernel) in C: the same
 * counts as its numpy version, bit for bit. Built by setup.py where a compiler is present
 * (with -ffp-contract=off, so no multiply-add is fused and every float operation rounds as
 * numpy's do); without it moesim runs the numpy version.
 *
 * draw(tab_EQ, w_RE, key, row0, total, cap, E, out_RE, flags_R) -> int
 *   One (pass, layer): R rows of E counts. tab_EQ float32 [E, 256] (per-expert factor table),
 *   w_RE float32 [R, E] (per-rank weights), out_RE [R, E] of uint16, int32 or int64 (told
 *   apart by its byte size), flags_R uint8 [R]. Row r is global row g = row0 + r; its words
 *   are SplitMix64 outputs at counters g·W + j + 1 (W = ceil(E/4) + 1, key added), cell e takes
 *   bytes 2e and 2e+1 of the words (little-endian) as table indices q1, q2, and
 *       x_e = (tab[e, q1] · tab[e, q2]) · w[r, e]            (float32)
 *       cum_e = x_0 + … + x_e                                  (float64, in order)
 *       u = (word_{W-1} >> 11) · 2^-53,  s = total / cum_{E-1}
 *       k_e = floor(cum_e · s + u) (k_{E-1} = total),  count_e = k_e - k_{e-1}.
 *   flags[r] = 1 when max_e x_e · s > cap (the row needs water-filling), 2 when a count came
 *   out above cap (float rounding); those rows are redone in Python. Returns how many.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>

#define GAMMA 0x9E3779B97F4A7C15ULL
#define QBITS 8
#define Q (1 << QBITS)

static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

#define STORE_ROW(TYPE)                                                                 \
    do {                                                                                \
        TYPE *o = (TYPE *)out + r * E;                                                  \
        for (int64_t e = 0; e < E - 1; e++) {                                           \
            int64_t k = (int64_t)(cum[e] * s + u), c = k - prev;   /* >= 0: floor */ \
            prev = k;                                                                   \
            if (c > cap) flag = 2;                                                      \
            o[e] = (TYPE)c;                                                             \
        }                                                                               \
        if (total - prev > cap) flag = 2;                                               \
        o[E - 1] = (TYPE)(total - prev);                                                \
    } while (0)

static int64_t draw_rows(const float *tab, const float *w, uint64_t key, int64_t row0,
                         int64_t total, int64_t cap, int64_t E, int64_t R, int size,
                         void *out, uint8_t *flags, double *cum, float *x) {
    const uint64_t W = (uint64_t)((E + 3) / 4 + 1);
    int64_t flagged = 0;
    for (int64_t r = 0; r < R; r++) {
        const uint64_t c0 = (uint64_t)(row0 + r) * W + 1;
        const float *wr = w + r * E;
        float maxx = 0.0f;
        for (int64_t e = 0; e < E; e += 4) {           /* the weights: independent cells */
            const uint64_t word = mix64(key + (c0 + (uint64_t)(e >> 2)) * GAMMA);
            const int64_t n = E - e < 4 ? E - e : 4;
            for (int64_t i = 0; i < n; i++) {
                const float *te = tab + (e + i) * Q;
                const unsigned sh = 16u * (unsigned)i;
                float v = te[(word >> sh) & (Q - 1)] * te[(word >> (sh + 8)) & (Q - 1)];
                v = v * wr[e + i];
                x[e + i] = v;
                maxx = v > maxx ? v : maxx;
            }
        }
        double acc = 0.0;                               /* the running sum, in order */
        for (int64_t e = 0; e < E; e++) {
            acc += (double)x[e];
            cum[e] = acc;
        }
        const double u = (double)(mix64(key + (c0 + W - 1) * GAMMA) >> 11) * 0x1.0p-53;
        const double s = (double)total / acc;
        int flag = (double)maxx * s > (double)cap;
        int64_t prev = 0;
        if (size == 2) STORE_ROW(uint16_t);
        else if (size == 4) STORE_ROW(int32_t);
        else STORE_ROW(int64_t);
        flags[r] = (uint8_t)flag;
        flagged += flag != 0;
    }
    return flagged;
}

static PyObject *draw(PyObject *self, PyObject *args) {
    Py_buffer tb, wb, ob, fb;
    unsigned long long key;
    long long row0, total, cap;
    Py_ssize_t E;
    if (!PyArg_ParseTuple(args, "y*y*KLLLnw*w*", &tb, &wb, &key, &row0, &total, &cap, &E, &ob,
                          &fb))
        return NULL;
    PyObject *result = NULL;
    const int64_t R = E > 0 ? (int64_t)fb.len : 0;
    const int size = R > 0 ? (int)(ob.len / (R * E)) : 0;
    double *cum = NULL;
    float *x = NULL;
    if (E < 1 || tb.len != (Py_ssize_t)sizeof(float) * Q * E
        || wb.len != (Py_ssize_t)sizeof(float) * R * E || ob.len != (Py_ssize_t)size * R * E
        || (size != 2 && size != 4 && size != 8) || total < 0) {
        PyErr_SetString(PyExc_ValueError, "_synth_c.draw: inconsistent buffer sizes");
        goto done;
    }
    cum = malloc(sizeof(double) * (size_t)E);
    x = malloc(sizeof(float) * (size_t)E);
    if (cum == NULL || x == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int64_t flagged;
    Py_BEGIN_ALLOW_THREADS
    flagged = draw_rows(tb.buf, wb.buf, (uint64_t)key, row0, total, cap, E, R, size, ob.buf,
                        fb.buf, cum, x);
    Py_END_ALLOW_THREADS
    result = PyLong_FromLongLong(flagged);
done:
    free(cum);
    free(x);
    PyBuffer_Release(&tb);
    PyBuffer_Release(&wb);
    PyBuffer_Release(&ob);
    PyBuffer_Release(&fb);
    return result;
}

static PyMethodDef methods[] = {
    {"draw", draw, METH_VARARGS, "Counts of one (pass, layer) of the streaming sampler."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_synth_c",
                                    "moesim's streaming synthetic sampler's inner loop in C",
                                    -1, methods};

PyMODINIT_FUNC PyInit__synth_c(void) { return PyModule_Create(&module); }
