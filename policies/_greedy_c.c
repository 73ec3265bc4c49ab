/* LAER-MoE's greedy placement and node_first token counts (moesim.policies.greedy and
 * laer_fsep, arXiv 2602.11686 §4) in C: the same decisions as the Python versions, copy for
 * copy. Built by setup.py where a compiler is present; without it moesim runs the Python.
 *
 * place(K, E, reps_KE, load_E, free_G, load_G, init_GE, gpus_per_node, allow_duplicates,
 *       skip_unplaceable, gpu_out, expert_out, sizes_K) -> int
 *   Each of the K candidates (new copies per expert, int64 [K, E]) is placed independently
 *   from the same start: free slots int64 [G], GPU loads float64 [G], initial copies int64
 *   [G, E] or None. Experts go in decreasing per-copy load load_e / (all copies of e), lowest
 *   id on ties. Each copy goes to a GPU with a free slot on a node holding the fewest copies of
 *   the expert; among those, the least-loaded GPU (load, then id), GPUs already holding the
 *   expert last (never without allow_duplicates). A round at a time, as the Python: every node
 *   offers its best GPU, offers sort by (copy level, holder, load, GPU), and the lowest level's
 *   offers are taken in that order, one copy per node per round. gpu_out / expert_out get the
 *   copies in placement order, sizes_K how many each candidate placed. Returns the number of
 *   copies, or -(e + 1) when expert e does not fit and skip_unplaceable is false.
 *
 * node_first(K, gpus_per_node, cand_J, gpu_J, expert_J, counts_GE, intra_K, inter_K,
 *            compute_KG) -> None
 *   Tokens under fractional node_first routing for K placements given as copies, the closed
 *   form of laer_fsep.node_first_tokens (see there).
 *
 * precise(load_E, num_slots, num_nodes, max_per_expert, out_E) -> None
 *   LAER's precise split by its max-heap (greedy.precise_replicas).
 *
 * slot_row(gpu_J, expert_J, E, G, S, out_P) -> None
 *   Slot row [G·S] from copies: each GPU's experts in id order, -1 pad (greedy.copies_to_phy2log).
 *
 * All buffers are C-contiguous int64 / float64 arrays.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int64_t level;
    int64_t dup;
    double load;
    int64_t gpu;
} Offer;

static inline int offer_less(const Offer *a, const Offer *b) {
    if (a->level != b->level) return a->level < b->level;
    if (a->dup != b->dup) return a->dup < b->dup;
    if (a->load != b->load) return a->load < b->load;
    return a->gpu < b->gpu;
}

static void sort_offers(Offer *o, int64_t n) {
    while (n > 16) {                                /* quicksort, the smaller side first */
        Offer *a = &o[0], *b = &o[n / 2], *c = &o[n - 1], pivot;
        if (offer_less(b, a)) { Offer *t = a; a = b; b = t; }
        if (offer_less(c, b)) b = offer_less(c, a) ? a : c;
        pivot = *b;
        int64_t i = 0, j = n - 1;
        while (i <= j) {
            while (offer_less(&o[i], &pivot)) i++;
            while (offer_less(&pivot, &o[j])) j--;
            if (i <= j) { Offer t = o[i]; o[i] = o[j]; o[j] = t; i++; j--; }
        }
        if (j + 1 < n - i) { sort_offers(o, j + 1); o += i; n -= i; }
        else { sort_offers(o + i, n - i); n = j + 1; }
    }
    for (int64_t i = 1; i < n; i++) {               /* insertion sort: few offers */
        Offer x = o[i];
        int64_t j = i - 1;
        while (j >= 0 && offer_less(&x, &o[j])) { o[j + 1] = o[j]; j--; }
        o[j + 1] = x;
    }
}

typedef struct {
    int64_t E, N, gpn, allow_dup;
    int64_t *free_, *held_GE, *level_NE, *best_N;   /* best_N: node's best free GPU, -2 stale */
    double *load;
    Offer *offers;
} State;

/* Node n's least-loaded GPU with a free slot (-1: none), cached until the node changes. */
static int64_t node_best(State *s, int64_t n) {
    if (s->best_N[n] != -2) return s->best_N[n];
    int64_t best = -1;
    for (int64_t g = n * s->gpn; g < (n + 1) * s->gpn; g++)
        if (s->free_[g] > 0 && (best < 0 || s->load[g] < s->load[best])) best = g;
    return s->best_N[n] = best;
}

/* Place up to `count` copies of expert e (per-copy load p) into out; returns how many. */
static int64_t place_expert(State *s, int64_t e, int64_t count, double p, int64_t held,
                            int64_t *out) {
    const int64_t E = s->E, gpn = s->gpn;
    int64_t placed = 0;
    while (placed < count) {
        int64_t nof = 0;
        for (int64_t n = 0; n < s->N; n++) {
            if (!held && !placed) {                 /* nobody holds e: every node at level 0 */
                int64_t g = node_best(s, n);
                if (g < 0) continue;
                Offer *o = &s->offers[nof++];
                o->level = 0;
                o->dup = 0;
                o->gpu = g;
                o->load = s->load[g];
                continue;
            }
            int64_t best = -1, dup = -1;
            for (int64_t g = n * gpn; g < (n + 1) * gpn; g++) {
                if (s->free_[g] <= 0) continue;
                int64_t *slot = s->held_GE[g * E + e] ? &dup : &best;
                if (*slot < 0 || s->load[g] < s->load[*slot]) *slot = g;  /* ids ascend */
            }
            if (best < 0 && !(s->allow_dup && dup >= 0)) continue;
            Offer *o = &s->offers[nof++];
            o->level = s->level_NE[n * E + e];
            o->dup = best < 0;
            o->gpu = best < 0 ? dup : best;
            o->load = s->load[o->gpu];
        }
        if (nof == 0) break;
        sort_offers(s->offers, nof);
        for (int64_t i = 0; i < nof && placed < count; i++) {
            if (s->offers[i].level != s->offers[0].level) break;
            int64_t g = s->offers[i].gpu;
            s->free_[g] -= 1;
            s->load[g] += p;
            s->held_GE[g * E + e] += 1;
            s->level_NE[(g / gpn) * E + e] += 1;
            s->best_N[g / gpn] = -2;
            out[placed++] = g;
        }
    }
    return placed;
}

static const double *sort_key;                     /* per-copy loads while ordering */

static int by_load_desc(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    if (sort_key[x] != sort_key[y]) return sort_key[x] > sort_key[y] ? -1 : 1;
    return (x > y) - (x < y);
}

#define NEED(cond, msg) \
    if (!(cond)) { PyErr_SetString(PyExc_ValueError, "_greedy_c: " msg); goto done; }

static PyObject *place(PyObject *self, PyObject *args) {
    Py_buffer reps, lo, fr, gl, gout, eout, sizes, init = {0};
    PyObject *init_obj, *result = NULL;
    Py_ssize_t K, E, gpn;
    int allow_dup, skip;
    if (!PyArg_ParseTuple(args, "nny*y*y*y*Onppw*w*w*", &K, &E, &reps, &lo, &fr, &gl,
                          &init_obj, &gpn, &allow_dup, &skip, &gout, &eout, &sizes))
        return NULL;
    int have_init = init_obj != Py_None;
    int64_t G = fr.len / 8, N = gpn > 0 ? G / gpn : 0;
    State s = {E, N, gpn, allow_dup, NULL, NULL, NULL, NULL, NULL, NULL};
    int64_t *held0 = NULL, *level0 = NULL, *order = NULL, *init_col = NULL;
    double *per_copy = NULL;
    if (have_init && PyObject_GetBuffer(init_obj, &init, PyBUF_C_CONTIGUOUS) < 0) goto done;
    NEED(reps.len == 8 * K * E && lo.len == 8 * E && gl.len == 8 * G && sizes.len == 8 * K
         && gpn > 0 && N * gpn == G && eout.len == gout.len
         && (!have_init || init.len == 8 * G * E), "inconsistent buffer sizes");
    size_t ge = (size_t)(G * E + 1), ne = (size_t)(N * E + 1);
    s.free_ = malloc(8 * (size_t)(G + 1));
    s.load = malloc(8 * (size_t)(G + 1));
    s.held_GE = malloc(8 * ge);
    s.level_NE = malloc(8 * ne);
    s.offers = malloc(sizeof(Offer) * (size_t)(N + 1));
    s.best_N = malloc(8 * (size_t)(N + 1));
    held0 = calloc(ge, 8);
    level0 = calloc(ne, 8);
    init_col = calloc((size_t)E + 1, 8);
    order = malloc(8 * (size_t)(E + 1));
    per_copy = malloc(8 * (size_t)(E + 1));
    if (!s.free_ || !s.best_N || !s.load || !s.held_GE || !s.level_NE || !s.offers || !held0 || !level0
        || !init_col || !order || !per_copy) {
        PyErr_NoMemory();
        goto done;
    }
    if (have_init) {
        const int64_t *c = init.buf;
        for (int64_t g = 0; g < G; g++)
            for (int64_t e = 0; e < E; e++) {
                held0[g * E + e] = c[g * E + e] != 0;
                level0[(g / gpn) * E + e] += c[g * E + e];
                init_col[e] += c[g * E + e];
            }
    }
    const int64_t *reps_KE = reps.buf;
    const double *load_E = lo.buf;
    int64_t *gpu_out = gout.buf, *exp_out = eout.buf, *sizes_K = sizes.buf;
    int64_t total = 0, room = gout.len / 8;
    for (int64_t k = 0; k < K; k++) {
        const int64_t *r = reps_KE + k * E;
        for (int64_t e = 0; e < E; e++) {
            int64_t copies = r[e] + init_col[e];
            per_copy[e] = load_E[e] / (double)(copies > 1 ? copies : 1);
            order[e] = e;
        }
        sort_key = per_copy;
        qsort(order, (size_t)E, 8, by_load_desc);
        memcpy(s.free_, fr.buf, 8 * (size_t)G);
        memcpy(s.load, gl.buf, 8 * (size_t)G);
        memcpy(s.held_GE, held0, 8 * (size_t)(G * E));
        memcpy(s.level_NE, level0, 8 * (size_t)(N * E));
        for (int64_t n = 0; n < N; n++) s.best_N[n] = -2;
        int64_t start = total;
        for (int64_t i = 0; i < E; i++) {
            int64_t e = order[i], count = r[e];
            if (count <= 0) continue;
            NEED(total + count <= room, "no room for the copies");
            int64_t got = place_expert(&s, e, count, per_copy[e], init_col[e], gpu_out + total);
            for (int64_t j = 0; j < got; j++) exp_out[total + j] = e;
            total += got;
            if (got < count && !skip) {
                result = PyLong_FromLongLong(-(e + 1));
                goto done;
            }
        }
        sizes_K[k] = total - start;
    }
    result = PyLong_FromLongLong(total);
done:
    free(s.free_); free(s.best_N); free(s.load); free(s.held_GE); free(s.level_NE); free(s.offers);
    free(held0); free(level0); free(init_col); free(order); free(per_copy);
    PyBuffer_Release(&reps); PyBuffer_Release(&lo); PyBuffer_Release(&fr);
    PyBuffer_Release(&gl); PyBuffer_Release(&gout); PyBuffer_Release(&eout);
    PyBuffer_Release(&sizes);
    if (have_init) PyBuffer_Release(&init);
    return result;
}

static PyObject *node_first(PyObject *self, PyObject *args) {
    Py_buffer kb, gb, eb, cb, intra_b, inter_b, comp_b;
    Py_ssize_t K, gpn;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "nny*y*y*y*w*w*w*", &K, &gpn, &kb, &gb, &eb, &cb, &intra_b,
                          &inter_b, &comp_b))
        return NULL;
    int64_t J = kb.len / 8, G = comp_b.len / 8 / (K > 0 ? K : 1);
    int64_t N = gpn > 0 ? G / gpn : 0, E = G > 0 ? cb.len / 8 / G : 0;
    double *node_n = NULL, *node_c = NULL, *col_c = NULL, *kept = NULL, *sum_n_E = NULL;
    NEED(gb.len == kb.len && eb.len == kb.len && intra_b.len == 8 * K && inter_b.len == 8 * K
         && gpn > 0 && N * gpn == G && cb.len == 8 * G * E, "inconsistent buffer sizes");
    const int64_t *k_J = kb.buf, *g_J = gb.buf, *e_J = eb.buf;
    const double *n_GE = cb.buf;
    double *intra = intra_b.buf, *inter = inter_b.buf, *comp = comp_b.buf;
    node_n = calloc((size_t)(N * E + 1), 8);
    node_c = calloc((size_t)(K * N * E + 1), 8);
    col_c = calloc((size_t)(K * E + 1), 8);
    kept = calloc((size_t)(K * E + 1), 8);
    sum_n_E = calloc((size_t)(E + 1), 8);
    if (!node_n || !node_c || !col_c || !kept || !sum_n_E) { PyErr_NoMemory(); goto done; }
    double all = 0.0;
    for (int64_t g = 0; g < G; g++)
        for (int64_t e = 0; e < E; e++) {
            node_n[(g / gpn) * E + e] += n_GE[g * E + e];
            all += n_GE[g * E + e];
        }
    for (int64_t j = 0; j < J; j++) {
        NEED(k_J[j] >= 0 && k_J[j] < K && g_J[j] >= 0 && g_J[j] < G && e_J[j] >= 0
             && e_J[j] < E, "copy out of range");
        node_c[(k_J[j] * N + g_J[j] / gpn) * E + e_J[j]] += 1.0;
        col_c[k_J[j] * E + e_J[j]] += 1.0;
    }
    for (int64_t e = 0; e < E; e++) {
        for (int64_t n = 0; n < N; n++) sum_n_E[e] += node_n[n * E + e];
    }
    for (int64_t k = 0; k < K; k++) {
        double kept_k = 0.0, own_k = 0.0;
        for (int64_t e = 0; e < E; e++) {
            double s = 0.0;
            for (int64_t n = 0; n < N; n++)
                if (node_c[(k * N + n) * E + e] > 0.0) s += node_n[n * E + e];
            kept[k * E + e] = s;
            kept_k += s;
        }
        for (int64_t g = 0; g < G; g++) comp[k * G + g] = 0.0;
        for (int64_t j = 0; j < J; j++) {
            if (k_J[j] != k) continue;
            int64_t g = g_J[j], e = e_J[j], n = g / gpn;
            double c = node_c[(k * N + n) * E + e];
            double remote = sum_n_E[e] - kept[k * E + e];
            own_k += n_GE[g * E + e] / c;
            comp[k * G + g] += node_n[n * E + e] / c + remote / col_c[k * E + e];
        }
        intra[k] = 2.0 * (kept_k - own_k);
        inter[k] = 2.0 * (all - kept_k);
    }
    Py_INCREF(Py_None);
    result = Py_None;
done:
    free(node_n); free(node_c); free(col_c); free(kept); free(sum_n_E);
    PyBuffer_Release(&kb); PyBuffer_Release(&gb); PyBuffer_Release(&eb); PyBuffer_Release(&cb);
    PyBuffer_Release(&intra_b); PyBuffer_Release(&inter_b); PyBuffer_Release(&comp_b);
    return result;
}

static PyObject *precise(PyObject *self, PyObject *args) {
    Py_buffer lo, ob;
    Py_ssize_t slots, nodes, cap;
    if (!PyArg_ParseTuple(args, "y*nnnw*", &lo, &slots, &nodes, &cap, &ob)) return NULL;
    int64_t E = lo.len / 8, step = nodes * E <= slots ? nodes : 1, budget = slots - step * E;
    int64_t n = 0, *r = ob.buf, *heap_e = malloc(8 * (size_t)(E + 1));
    const double *load = lo.buf;
    double *heap_q = malloc(8 * (size_t)(E + 1));
    PyObject *result = NULL;
    if (ob.len != lo.len) { PyErr_SetString(PyExc_ValueError, "_greedy_c: sizes"); goto done; }
    if (!heap_e || !heap_q) { PyErr_NoMemory(); goto done; }
    /* a min-heap on (-load/r, e): the largest quotient, lowest id on ties, on top */
#define LESS(i, j) (heap_q[i] < heap_q[j] || (heap_q[i] == heap_q[j] && heap_e[i] < heap_e[j]))
#define SWAP(i, j) { double q = heap_q[i]; heap_q[i] = heap_q[j]; heap_q[j] = q; \
                     int64_t t = heap_e[i]; heap_e[i] = heap_e[j]; heap_e[j] = t; }
    for (int64_t e = 0; e < E; e++) {
        r[e] = step;
        if (2 * step > cap) continue;
        heap_q[n] = -load[e] / (double)step;
        heap_e[n] = e;
        for (int64_t i = n++; i > 0 && LESS(i, (i - 1) / 2); i = (i - 1) / 2) SWAP(i, (i - 1) / 2);
    }
    while (budget >= step && n > 0) {
        int64_t e = heap_e[0];
        r[e] += step;
        budget -= step;
        if (r[e] + step <= cap) heap_q[0] = -load[e] / (double)r[e];   /* pop and push */
        else { n--; heap_q[0] = heap_q[n]; heap_e[0] = heap_e[n]; }
        for (int64_t i = 0;;) {
            int64_t l = 2 * i + 1, m = i;
            if (l < n && LESS(l, m)) m = l;
            if (l + 1 < n && LESS(l + 1, m)) m = l + 1;
            if (m == i) break;
            SWAP(i, m);
            i = m;
        }
    }
#undef LESS
#undef SWAP
    Py_INCREF(Py_None);
    result = Py_None;
done:
    free(heap_e); free(heap_q);
    PyBuffer_Release(&lo); PyBuffer_Release(&ob);
    return result;
}

static PyObject *slot_row(PyObject *self, PyObject *args) {
    Py_buffer gb, eb, ob;
    Py_ssize_t E, G, S;
    if (!PyArg_ParseTuple(args, "y*y*nnnw*", &gb, &eb, &E, &G, &S, &ob)) return NULL;
    int64_t J = gb.len / 8, *count = calloc((size_t)(G * E + 1), 8), *out = ob.buf;
    const int64_t *g_J = gb.buf, *e_J = eb.buf;
    PyObject *result = NULL;
    if (!count) { PyErr_NoMemory(); goto done; }
    NEED(eb.len == gb.len && ob.len == 8 * G * S, "inconsistent buffer sizes");
    for (int64_t j = 0; j < J; j++) {
        NEED(g_J[j] >= 0 && g_J[j] < G && e_J[j] >= 0 && e_J[j] < E, "copy out of range");
        count[g_J[j] * E + e_J[j]] += 1;
    }
    for (int64_t g = 0; g < G; g++) {
        int64_t pos = 0;
        for (int64_t e = 0; e < E; e++)
            for (int64_t c = count[g * E + e]; c > 0; c--) {
                NEED(pos < S, "more copies than slots on a rank");
                out[g * S + pos++] = e;
            }
        while (pos < S) out[g * S + pos++] = -1;
    }
    Py_INCREF(Py_None);
    result = Py_None;
done:
    free(count);
    PyBuffer_Release(&gb); PyBuffer_Release(&eb); PyBuffer_Release(&ob);
    return result;
}

static PyMethodDef methods[] = {
    {"precise", precise, METH_VARARGS, "LAER's precise split, the max-heap (see greedy.py)."},
    {"slot_row", slot_row, METH_VARARGS, "Slot row from copies (see greedy.py)."},
    {"place", place, METH_VARARGS, "Greedy placement of K candidates (see the file head)."},
    {"node_first", node_first, METH_VARARGS, "node_first token counts (see the file head)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_greedy_c",
                                    "moesim's greedy placement and node_first tokens in C", -1,
                                    methods};

PyMODINIT_FUNC PyInit__greedy_c(void) { return PyModule_Create(&module); }
