/*
 * Exact dense linear assignment for steerflow's ExactOT: min_sigma sum_i C[i, sigma(i)] over permutations.
 *
 * On column duals v (the reduced cost of (i, j) is C[i][j] - v[j]; a row's dual is its smallest reduced cost):
 *   0. row minima: each row in turn takes a free column of least cost; when all succeed the matching attains the
 *      sum of row minima, a lower bound, and is optimal (x0 = x1 up to order, all-equal points: O(n^2), done).
 *   1. epsilon-scaling forward auction (Bertsekas 1988), epsilon from eps_start down to eps_end. It only
 *      produces good duals: its assignment is epsilon-optimal, not exact, and is discarded. Skipped on small
 *      problems and on costs with few distinct values (see AUCTION_MIN_N), where its prices crawl by epsilon.
 *   2. augmenting row reduction with epsilon = 0 (Jonker & Volgenant 1987): each free row takes its best
 *      column and lowers that column's dual to its second-best reduced cost, so every assigned row sits on
 *      a column of least reduced cost (complementary slackness). Its work is capped; rows left free go on.
 *   3. shortest augmenting paths (Dijkstra on reduced costs, dense), one per free row: exact.
 * Phases 1-2 use a per-row list of the `cand` cheapest columns: duals only decrease, so reduced costs only
 * rise, and the list's last value at the time it was built bounds every column outside it from below; a
 * row is rescanned in full only when its second best exceeds that bound. The result is exactly optimal
 * for the given float64 costs (phase 3 preserves dual feasibility and ends with a perfect matching).
 *
 * Python calls the module's two functions (bottom of the file) on buffers, with the GIL released: `assign` on a
 * cost matrix, `assign_points` on two point sets whose squared (or plain) Euclidean costs it forms itself from
 * explicit differences, which do not cancel far from the origin.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_CAND 64

typedef struct {
    const double *C;
    int64_t n;
    double *v;      /* column duals */
    int64_t *x;     /* row -> column, -1 when free */
    int64_t *y;     /* column -> row, -1 when free */
    int64_t K;      /* candidate list length, 0 = always scan the whole row */
    int32_t *cand;  /* n * K column indices */
    double *bound;  /* n lower bounds on the reduced costs of the columns outside each list */
    int64_t bids, rescans;
} lap_t;

/* rebuild row i's candidate list: its K smallest reduced costs under the current duals */
static void rescan(lap_t *s, int64_t i)
{
    const double *row = s->C + i * s->n;
    const double *v = s->v;
    int32_t *cj = s->cand + i * s->K;
    double hv[MAX_CAND];
    int64_t K = s->K, m = 0;
    for (int64_t j = 0; j < s->n; j++) {
        double h = row[j] - v[j];
        if (m == K && h >= hv[K - 1]) continue;
        int64_t p = m < K ? m++ : K - 1;
        while (p > 0 && hv[p - 1] > h) {
            hv[p] = hv[p - 1];
            cj[p] = cj[p - 1];
            p--;
        }
        hv[p] = h;
        cj[p] = (int32_t)j;
    }
    s->bound[i] = hv[K - 1];
    s->rescans++;
}

/* best (u1 at j1) and second-best (u2 at j2) reduced cost of row i, exact */
static void top2(lap_t *s, int64_t i, double *u1o, int64_t *j1o, double *u2o, int64_t *j2o)
{
    const double *row = s->C + i * s->n;
    const double *v = s->v;
    for (int attempt = 0;; attempt++) {
        double u1 = INFINITY, u2 = INFINITY;
        int64_t j1 = -1, j2 = -1;
        int64_t len = s->K ? s->K : s->n;
        const int32_t *cj = s->K ? s->cand + i * s->K : NULL;
        for (int64_t k = 0; k < len; k++) {
            int64_t j = cj ? cj[k] : k;
            double h = row[j] - v[j];
            if (h < u2) {
                if (h < u1) {
                    u2 = u1;
                    j2 = j1;
                    u1 = h;
                    j1 = j;
                } else {
                    u2 = h;
                    j2 = j;
                }
            }
        }
        if (!s->K || attempt == 1 || u2 <= s->bound[i]) {
            *u1o = u1;
            *j1o = j1;
            *u2o = u2;
            *j2o = j2;
            return;
        }
        rescan(s, i); /* after a rescan the list holds the true best two */
    }
}

static void clear_assignment(lap_t *s)
{
    for (int64_t k = 0; k < s->n; k++) s->x[k] = s->y[k] = -1;
}

/* one epsilon phase of the forward auction from an empty assignment (Gauss-Seidel, stack of free rows) */
static void auction_phase(lap_t *s, int64_t *stack, double eps)
{
    int64_t top = 0;
    clear_assignment(s);
    for (int64_t i = s->n - 1; i >= 0; i--) stack[top++] = i;
    while (top > 0) {
        int64_t i = stack[--top], j1, j2;
        double u1, u2;
        top2(s, i, &u1, &j1, &u2, &j2);
        s->v[j1] -= (u2 - u1) + eps;
        int64_t k = s->y[j1];
        if (k >= 0) {
            s->x[k] = -1;
            stack[top++] = k;
        }
        s->x[i] = j1;
        s->y[j1] = i;
        s->bids++;
    }
}

/* augmenting row reduction (epsilon = 0) over the free rows in `fr`; returns how many stay free */
static int64_t row_reduction(lap_t *s, int64_t *fr, int64_t nfree, int passes)
{
    int64_t budget = 4 * s->n; /* immediate re-bids allowed in all; zero increments could otherwise cycle */
    for (int pass = 0; pass < passes && nfree > 0; pass++) {
        int64_t k = 0, prev = nfree;
        nfree = 0;
        while (k < prev) {
            int64_t i = fr[k++], j1, j2;
            double u1, u2;
            top2(s, i, &u1, &j1, &u2, &j2);
            int64_t i0 = s->y[j1];
            if (u1 < u2) {
                s->v[j1] -= u2 - u1;
            } else if (i0 >= 0) { /* tie: take the second column, no dual change */
                j1 = j2;
                i0 = s->y[j2];
            }
            if (i0 >= 0) {
                s->x[i0] = -1;
                if (u1 < u2 && budget-- > 0)
                    fr[--k] = i0;
                else
                    fr[nfree++] = i0;
            }
            s->x[i] = j1;
            s->y[j1] = i;
            s->bids++;
        }
    }
    return nfree;
}

/* shortest augmenting path from free row f (Dijkstra on reduced costs; columns ordered in `cols` as
 * [0, lo) finished, [lo, up) at the current distance `mn`, [up, n) not yet reached at `mn`) */
static void augment(lap_t *s, int64_t f, double *d, int64_t *pred, int64_t *cols)
{
    const int64_t n = s->n;
    const double *C = s->C;
    double *v = s->v;
    int64_t *x = s->x, *y = s->y;
    for (int64_t j = 0; j < n; j++) {
        d[j] = C[f * n + j] - v[j];
        pred[j] = f;
        cols[j] = j;
    }
    int64_t lo = 0, up = 0, last = 0, endj = -1;
    double mn = 0.0;
    while (endj < 0) {
        if (lo == up) { /* move every column at the new least distance to [lo, up) */
            last = lo;
            mn = INFINITY;
            for (int64_t k = lo; k < n; k++) {
                int64_t j = cols[k];
                double h = d[j];
                if (h <= mn) {
                    if (h < mn) {
                        up = lo;
                        mn = h;
                    }
                    cols[k] = cols[up];
                    cols[up++] = j;
                }
            }
            for (int64_t k = lo; k < up; k++)
                if (y[cols[k]] < 0) {
                    endj = cols[k];
                    break;
                }
            if (endj >= 0) break;
        }
        int64_t j1 = cols[lo++], i = y[j1];
        const double *ri = C + i * n;
        double h0 = ri[j1] - v[j1] - mn;
        for (int64_t k = up; k < n; k++) {
            int64_t j = cols[k];
            double h = ri[j] - v[j] - h0;
            if (h < d[j]) {
                d[j] = h;
                pred[j] = i;
                if (h == mn) {
                    if (y[j] < 0) {
                        endj = j;
                        break;
                    }
                    cols[k] = cols[up];
                    cols[up++] = j;
                }
            }
        }
    }
    for (int64_t k = 0; k < last; k++) { /* finished columns: keep reduced costs >= 0, tight on the path */
        int64_t j = cols[k];
        v[j] += d[j] - mn;
    }
    for (int64_t j = endj;;) {
        int64_t i = pred[j];
        y[j] = i;
        int64_t t = x[i];
        x[i] = j;
        if (i == f) break;
        j = t;
    }
}

/* each row in turn takes a free column of least cost in that row (its own index first when that is one): when
 * every row finds one, the matching is optimal, since it attains the sum of row minima, a lower bound on every
 * assignment (column duals v = 0 certify it). x0 = x1 up to order, duplicates included, and all-equal batches pass
 * in O(n^2); a generic batch fails after about sqrt(n) rows, when two rows first want the same column. */
static int row_minima_match(const double *C, int64_t n, int64_t *x, int64_t *y)
{
    for (int64_t k = 0; k < n; k++) x[k] = y[k] = -1;
    for (int64_t i = 0; i < n; i++) {
        const double *row = C + i * n;
        double m = row[0];
        for (int64_t j = 1; j < n; j++)
            if (row[j] < m) m = row[j];
        int64_t j = i;
        if (!(row[i] == m && y[i] < 0))
            for (j = 0; j < n && !(row[j] == m && y[j] < 0); j++) {}
        if (j == n) return 0;
        x[i] = j;
        y[j] = i;
    }
    return 1;
}

static int cmp_double(const void *p, const void *q)
{
    double a = *(const double *)p, b = *(const double *)q;
    return (a > b) - (a < b);
}

#define SAMPLE_ROWS 4

/* the epsilon schedule's unit: the median spread max_j C_ij - min_j C_ij of about 64 evenly spaced rows (robust to
 * a few outlying entries, which would make every epsilon too coarse); 0 when every sampled row is constant */
static double spread(const double *C, int64_t n)
{
    double s[128];
    int64_t step = n / 64 > 1 ? n / 64 : 1, m = 0;
    for (int64_t i = 0; i < n && m < 128; i += step, m++) {
        const double *row = C + i * n;
        double lo = row[0], hi = row[0];
        for (int64_t j = 1; j < n; j++) {
            if (row[j] < lo) lo = row[j];
            if (row[j] > hi) hi = row[j];
        }
        s[m] = hi - lo;
    }
    qsort(s, (size_t)m, sizeof *s, cmp_double);
    return m % 2 ? s[m / 2] : 0.5 * (s[m / 2 - 1] + s[m / 2]);
}

/* the fraction of distinct values in SAMPLE_ROWS evenly spaced rows (buf: n doubles of scratch). Integer
 * coordinates and duplicated points give few: equal values make the auction's bids raise prices by epsilon alone
 * (price wars between identical persons), while Jonker-Volgenant's augmenting paths stop at the first free column
 * among many tied ones. */
static double distinct_fraction(const double *C, int64_t n, double *buf)
{
    int64_t distinct = 0;
    for (int r = 0; r < SAMPLE_ROWS; r++) {
        const double *row = C + ((2 * r + 1) * n / (2 * SAMPLE_ROWS)) * n;
        for (int64_t k = 0; k < n; k++) buf[k] = row[k];
        qsort(buf, (size_t)n, sizeof *buf, cmp_double);
        distinct += 1;
        for (int64_t k = 1; k < n; k++) distinct += buf[k] != buf[k - 1];
    }
    return (double)distinct / (double)(SAMPLE_ROWS * n);
}

/* the automatic choice: no auction below AUCTION_MIN_N points (Jonker-Volgenant's paths are short there and the
 * auction's phases cost more than they save), nor when the sampled rows hold fewer than min(0.9 n, TIE_COUNT)
 * distinct values; either choice is exact. */
#define AUCTION_MIN_N 64
#define TIE_COUNT 600.0

/*
 * C: n x n row-major float64, finite. row_to_col, col_to_row (n, out). v (n, out): column duals.
 * cand: candidate list length (0 = full scans, at most 64). eps_start, eps_end: the auction's epsilon schedule
 * as fractions of the costs' spread (median row range); eps_start = 0 skips the auction, eps_start < 0 chooses
 * (see AUCTION_MIN_N; 0.1 when it takes the auction). stats (4, out): auction + reduction bids, full-row rescans,
 * augmenting paths, and the path taken (0: row minima already match, 1: Jonker-Volgenant alone, 2: auction warm
 * start + JV).
 * Returns 0, or -1 when memory runs out.
 */
static int steerflow_assign(const double *C, int64_t n, int64_t *row_to_col, int64_t *col_to_row, double *v,
                            int64_t cand, double eps_start, double eps_end, double theta, int64_t *stats)
{
    stats[0] = stats[1] = stats[2] = stats[3] = 0;
    for (int64_t j = 0; j < n; j++) v[j] = 0.0;
    if (n <= 0 || row_minima_match(C, n, row_to_col, col_to_row)) return 0;
    int64_t *work = malloc((size_t)n * sizeof *work), *pred = malloc((size_t)n * sizeof *pred),
            *cols = malloc((size_t)n * sizeof *cols);
    double *d = malloc((size_t)n * sizeof *d);
    int32_t *cj = NULL;
    double *bound = NULL;
    int rc = 0;
    if (!work || !pred || !cols || !d) {
        rc = -1;
        goto done;
    }
    if (eps_start < 0.0)
        eps_start = n < AUCTION_MIN_N || distinct_fraction(C, n, d) < fmin(0.9, TIE_COUNT / (double)n) ? 0.0 : 1e-1;
    if (eps_start > 0.0) {
        double span = spread(C, n);
        eps_start *= span;
        eps_end *= span;
    }
    if (cand > n) cand = n;
    if (cand < 2 || eps_start <= 0.0) cand = 0; /* a list needs a best and a second best; it pays off in the auction */
    if (cand > MAX_CAND) cand = MAX_CAND;
    if (theta <= 1.0) theta = 10.0;
    if (cand) {
        cj = malloc((size_t)(n * cand) * sizeof *cj);
        bound = malloc((size_t)n * sizeof *bound);
        if (!cj || !bound) {
            rc = -1;
            goto done;
        }
    }
    lap_t s = {C, n, v, row_to_col, col_to_row, cand, cj, bound, 0, 0};
    if (cand)
        for (int64_t i = 0; i < n; i++) rescan(&s, i);
    stats[3] = 1;
    if (eps_start > 0.0) {
        stats[3] = 2;
        if (eps_end <= 0.0 || eps_end > eps_start) eps_end = eps_start;
        for (double eps = eps_start;; eps /= theta) {
            if (eps < eps_end) eps = eps_end;
            auction_phase(&s, work, eps);
            if (eps <= eps_end) break;
        }
    }
    clear_assignment(&s);
    for (int64_t i = 0; i < n; i++) work[i] = i;
    int64_t nfree = row_reduction(&s, work, n, 2); /* the rows still free are work[0, nfree) */
    for (int64_t k = 0; k < nfree; k++) augment(&s, work[k], d, pred, cols);
    stats[0] = s.bids;
    stats[1] = s.rescans;
    stats[2] = nfree;
done:
    free(work);
    free(pred);
    free(cols);
    free(d);
    free(cj);
    free(bound);
    return rc;
}

/* C[i][j] = |a_i - b_j|^2 (or |a_i - b_j| when euclidean) for a, b (n, D) row-major, from explicit differences:
 * no cancellation, whatever the points' offset from the origin. Returns 0, or -3 when an entry overflows. */
static int pairwise_costs(const double *a, const double *b, int64_t n, int64_t D, int euclidean, double *C)
{
    for (int64_t i = 0; i < n; i++) {
        const double *ai = a + i * D;
        double *row = C + i * n;
        for (int64_t j = 0; j < n; j++) {
            const double *bj = b + j * D;
            double s = 0.0;
            for (int64_t k = 0; k < D; k++) {
                double h = ai[k] - bj[k];
                s += h * h;
            }
            row[j] = euclidean ? sqrt(s) : s;
        }
        for (int64_t j = 0; j < n; j++)
            if (!isfinite(row[j])) return -3;
    }
    return 0;
}

static int buffers_fit(Py_buffer *x, Py_buffer *y, Py_buffer *v, Py_buffer *st, int64_t n)
{
    return y->len == x->len && v->len == n * (Py_ssize_t)sizeof(double) && st->len == 4 * (Py_ssize_t)sizeof(int64_t);
}

static PyObject *finish(int rc)
{
    if (rc == -2) {
        PyErr_SetString(PyExc_ValueError, "assign: buffer sizes do not match an n x n problem");
        return NULL;
    }
    if (rc == -3) {
        PyErr_SetString(PyExc_ValueError, "the cost matrix holds NaN or inf");
        return NULL;
    }
    if (rc != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* Python entry points, on buffers: float64 C (n * n), or float64 points a, b (n * D); int64 row_to_col and
 * col_to_row (n); float64 v (n); int64 stats (4). The GIL is released while they compute. */
static PyObject *py_assign(PyObject *self, PyObject *args)
{
    Py_buffer C, x, y, v, st;
    long long cand;
    double eps_start, eps_end, theta;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*w*w*w*w*Lddd", &C, &x, &y, &v, &st, &cand, &eps_start, &eps_end, &theta))
        return NULL;
    int64_t n = x.len / (Py_ssize_t)sizeof(int64_t);
    int rc = -2;
    if (C.len == n * n * (Py_ssize_t)sizeof(double) && buffers_fit(&x, &y, &v, &st, n)) {
        Py_BEGIN_ALLOW_THREADS
        rc = steerflow_assign((const double *)C.buf, n, (int64_t *)x.buf, (int64_t *)y.buf, (double *)v.buf,
                              (int64_t)cand, eps_start, eps_end, theta, (int64_t *)st.buf);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&C);
    PyBuffer_Release(&x);
    PyBuffer_Release(&y);
    PyBuffer_Release(&v);
    PyBuffer_Release(&st);
    return finish(rc);
}

static PyObject *py_assign_points(PyObject *self, PyObject *args)
{
    Py_buffer a, b, x, y, v, st;
    long long D, cand;
    int euclidean;
    double eps_start, eps_end, theta;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*Lpw*w*w*w*Lddd", &a, &b, &D, &euclidean, &x, &y, &v, &st, &cand, &eps_start,
                          &eps_end, &theta))
        return NULL;
    int64_t n = x.len / (Py_ssize_t)sizeof(int64_t);
    int rc = -2;
    if (D >= 1 && a.len == n * D * (Py_ssize_t)sizeof(double) && b.len == a.len && buffers_fit(&x, &y, &v, &st, n)) {
        Py_BEGIN_ALLOW_THREADS
        double *C = n > 0 ? malloc((size_t)(n * n) * sizeof *C) : NULL;
        rc = n == 0 ? 0 : C ? pairwise_costs((const double *)a.buf, (const double *)b.buf, n, D, euclidean, C) : -1;
        if (rc == 0)
            rc = steerflow_assign(C, n, (int64_t *)x.buf, (int64_t *)y.buf, (double *)v.buf, (int64_t)cand,
                                  eps_start, eps_end, theta, (int64_t *)st.buf);
        free(C);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    PyBuffer_Release(&x);
    PyBuffer_Release(&y);
    PyBuffer_Release(&v);
    PyBuffer_Release(&st);
    return finish(rc);
}

static PyMethodDef lap_methods[] = {
    {"assign", py_assign, METH_VARARGS, "assign(C, row_to_col, col_to_row, v, stats, cand, eps_start, eps_end, theta)"},
    {"assign_points", py_assign_points, METH_VARARGS,
     "assign_points(a, b, D, euclidean, row_to_col, col_to_row, v, stats, cand, eps_start, eps_end, theta)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef lap_module = {PyModuleDef_HEAD_INIT, "_lap", "steerflow's compiled assignment solver.", -1,
                                        lap_methods};

PyMODINIT_FUNC PyInit__lap(void) { return PyModule_Create(&lap_module); }
