/*
 * Exact dense linear assignment for steerflow's ExactOT: min_sigma sum_i C[i, sigma(i)] over permutations.
 *
 * Three phases on column duals v (the reduced cost of (i, j) is C[i][j] - v[j]; a row's dual is its
 * smallest reduced cost):
 *   1. epsilon-scaling forward auction (Bertsekas 1988), epsilon from eps_start down to eps_end. It only
 *      produces good duals: its assignment is epsilon-optimal, not exact, and is discarded.
 *   2. augmenting row reduction with epsilon = 0 (Jonker & Volgenant 1987): each free row takes its best
 *      column and lowers that column's dual to its second-best reduced cost, so every assigned row sits on
 *      a column of least reduced cost (complementary slackness). Its work is capped; rows left free go on.
 *   3. shortest augmenting paths (Dijkstra on reduced costs, dense), one per free row: exact.
 * Phases 1-2 use a per-row list of the `cand` cheapest columns: duals only decrease, so reduced costs only
 * rise, and the list's last value at the time it was built bounds every column outside it from below; a
 * row is rescanned in full only when its second best exceeds that bound. The result is exactly optimal
 * for the given float64 costs (phase 3 preserves dual feasibility and ends with a perfect matching).
 *
 * Called through ctypes (which releases the GIL); the module init below only lets Python import the
 * shared object to find its path.
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

/*
 * C: n x n row-major float64, finite. row_to_col (n, out). v (n, in/out): initial column duals (zeros
 * are fine). cand: candidate list length (0 = full scans, at most 64). eps_start <= 0 skips the auction.
 * stats (3, out): auction + reduction bids, full-row rescans, augmenting paths.
 * Returns 0, or -1 when memory runs out.
 */
int steerflow_assign(const double *C, int64_t n, int64_t *row_to_col, double *v, int64_t cand, double eps_start,
                     double eps_end, double theta, int64_t *stats)
{
    stats[0] = stats[1] = stats[2] = 0;
    if (n <= 0) return 0;
    if (n == 1) {
        row_to_col[0] = 0;
        return 0;
    }
    if (cand > n) cand = n;
    if (cand < 2) cand = 0; /* a list needs a best and a second best */
    if (cand > MAX_CAND) cand = MAX_CAND;
    if (theta <= 1.0) theta = 10.0;
    lap_t s = {C, n, v, row_to_col, NULL, cand, NULL, NULL, 0, 0};
    int64_t *y = malloc((size_t)n * sizeof *y), *work = malloc((size_t)n * sizeof *work),
            *pred = malloc((size_t)n * sizeof *pred), *cols = malloc((size_t)n * sizeof *cols);
    double *d = malloc((size_t)n * sizeof *d);
    int32_t *cj = cand ? malloc((size_t)(n * cand) * sizeof *cj) : NULL;
    double *bound = cand ? malloc((size_t)n * sizeof *bound) : NULL;
    int rc = 0;
    if (!y || !work || !pred || !cols || !d || (cand && (!cj || !bound))) {
        rc = -1;
        goto done;
    }
    s.y = y;
    s.cand = cj;
    s.bound = bound;
    if (cand)
        for (int64_t i = 0; i < n; i++) rescan(&s, i);
    if (eps_start > 0.0) {
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
    free(y);
    free(work);
    free(pred);
    free(cols);
    free(d);
    free(cj);
    free(bound);
    return rc;
}

static struct PyModuleDef lap_module = {PyModuleDef_HEAD_INIT, "_lap",
                                        "steerflow's compiled assignment solver (called through ctypes).", -1,
                                        NULL};

PyMODINIT_FUNC PyInit__lap(void) { return PyModule_Create(&lap_module); }
