/* The q* step for float32 CPU rows, called through ctypes by optimal_sampling/cpu_kernel.py:
 *
 *   kl_symmetry_rows  the KL-symmetric α solve, the algorithm of the Triton kernel in
 *                     optimal_sampling/kernels.py (theory/derivation.md §4.6), one row at a time;
 *   mixture_rows      log q* at the solved α and the four moments its diagnostics come from.
 *
 * The batched torch ops (alpha.LogRatioMoments, mixture.mixture_on_support and
 * diagnostics_on_support) write and re-read [B, V]-sized temporaries — [B, 6, V] in every
 * Newton pass — and keep the solve's per-row state in dozens of small ops per iteration; on
 * small batches that costs as much as a tiny model's forward. Here a pass reads the row's
 * two log-prob rows once and keeps its sums in registers: the solve's first pass gathers the
 * row statistics and the sums at both bracket ends, each Newton iteration is one more pass.
 *
 * Vectorised by hand with GCC / clang vector extensions (compilers do not vectorise these
 * loops on their own: the selects and the polynomial exp defeat them). Each lane keeps its
 * own float32 sums over a chunk of CHUNK tokens; the lanes are added in float64 after each
 * chunk, as the torch path's row_sum64 does. exp is the polynomial `exp_below` on exponents
 * shifted below an upper bound of their row max known before the pass: one exp per token.
 * Rows are independent; large batches are shared out over threads (`run_rows`).
 *
 * Built on first use by optimal_sampling/cpu_kernel.py with the system C compiler
 * (-O3 -march=native -pthread -fno-trapping-math; no fast-math: ±inf and NaN keep their
 * IEEE meaning).
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define CHUNK 1024

/* float32 lanes in GCC / clang vector extensions: eight in an AVX register where the
 * target has AVX (-march=native), else four (SSE, NEON). */
#if defined(__AVX__)
#define W 8
#else
#define W 4
#endif
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));

#if W == 8
static inline vf splat(float x) { return (vf){x, x, x, x, x, x, x, x}; }
#else
static inline vf splat(float x) { return (vf){x, x, x, x}; }
#endif
static inline vf select(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }
static inline vf vmax(vf a, vf b) { return select(a > b, a, b); }
static inline vf vmin(vf a, vf b) { return select(a < b, a, b); }
static inline float hmax(vf x) { float m = x[0]; for (int l = 1; l < W; l++) m = x[l] > m ? x[l] : m; return m; }
static inline float hmin(vf x) { float m = x[0]; for (int l = 1; l < W; l++) m = x[l] < m ? x[l] : m; return m; }
static inline double hsum(vf x) { double s = 0; for (int l = 0; l < W; l++) s += x[l]; return s; }

/* e^x per lane for x ≤ ~0 (the exponents here are shifted below their max); −inf and
 * anything below −87.7 give 0 (float32's normal range ends there). 2^t with t = x·log₂e split
 * as n + f, n = round(t), |f| ≤ 1/2: 2^f by its Taylor polynomial of degree 7 (truncation
 * error < 6e-9 relative), 2^n by building the float's exponent bits. */
static inline vf exp_below(vf x) {
    vf t = x * 1.44269504088896341f;
    t = vmax(t, splat(-127.0f)); /* also −inf; 2^-127 is built as exponent bits 0, i.e. 0 */
    t = vmin(t, splat(127.0f));
    vf n = (t + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 · 2^23 */
    vf g = (t - n) * 0.693147180559945309f; /* 2^f = e^g, |g| ≤ 0.347 */
    vf p = splat(1.0f / 5040.0f);
    p = p * g + 1.0f / 720.0f;
    p = p * g + 1.0f / 120.0f;
    p = p * g + 1.0f / 24.0f;
    p = p * g + 1.0f / 6.0f;
    p = p * g + 0.5f;
    p = p * g + 1.0f;
    p = p * g + 1.0f;
    vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)bits;
}

/* W tokens from `start` (those past `width` read as −inf, i.e. off the support). */
static inline void load(const float *lp, const float *lr, int64_t start, int64_t width, vf *p, vf *r) {
    if (start + W <= width) {
        memcpy(p, lp + start, sizeof(vf));
        memcpy(r, lr + start, sizeof(vf));
        return;
    }
    *p = *r = splat(-INFINITY);
    for (int64_t l = 0; start + l < width; l++) {
        (*p)[l] = lp[start + l];
        (*r)[l] = lr[start + l];
    }
}

/* Σ w Δ₊, Σ w Δ₋, Σ w Δ₊², Σ w Δ₋², Σ w Δ₊³, Σ w Δ₋³ (Δ₋ = max(−Δ, 0)) of one row. */
typedef struct {
    double s_pos, s_neg, q_pos, q_neg, c_pos, c_neg;
} Sums;

/* The same sums per lane, float32, over one chunk. */
typedef struct {
    vf s_pos, s_neg, q_pos, q_neg, c_pos, c_neg;
} LaneSums;

/* One block of tokens: both log-probs, Δ on the common support (0 off it), its two signed
 * parts, and whether a token counts in h (on the support, Δ ≠ 0). A NaN log-prob is off the
 * support here (mixture_row writes NaN back into log q for it). */
typedef struct {
    vf p, r, delta, d_pos, d_neg;
    vi common, counts;
} Block;

static inline Block block_at(const float *lp, const float *lr, int64_t start, int64_t width) {
    Block b;
    load(lp, lr, start, width, &b.p, &b.r);
    b.common = (b.p > -INFINITY) & (b.r > -INFINITY);
    b.delta = select(b.common, b.r - b.p, splat(0.0f));
    b.counts = b.common & (b.delta != 0.0f);
    b.d_pos = vmax(b.delta, splat(0.0f));
    b.d_neg = vmax(-b.delta, splat(0.0f));
    return b;
}

static inline void add_terms(LaneSums *a, vf w, const Block *b) {
    vf w_pos = w * b->d_pos, w_neg = w * b->d_neg;
    a->s_pos += w_pos;
    a->s_neg += w_neg;
    w_pos *= b->d_pos;
    w_neg *= b->d_neg;
    a->q_pos += w_pos;
    a->q_neg += w_neg;
    a->c_pos += w_pos * b->d_pos;
    a->c_neg += w_neg * b->d_neg;
}

static inline void add_lanes(Sums *s, const LaneSums *a) {
    s->s_pos += hsum(a->s_pos);
    s->s_neg += hsum(a->s_neg);
    s->q_pos += hsum(a->q_pos);
    s->q_neg += hsum(a->q_neg);
    s->c_pos += hsum(a->c_pos);
    s->c_neg += hsum(a->c_neg);
}

/* h = log S₊ − log S₋ (±inf with an empty side), h' = E₊[Δ] − E₋[Δ] and
 * h'' = Var₊[Δ] − Var₋[Δ] under the weights w Δ± / S± (an empty side counts 0). */
static void log_ratio(const Sums *s, double *h, double *slope, double *curvature) {
    double mean_pos = s->s_pos > 0 ? s->q_pos / s->s_pos : 0.0;
    double mean_neg = s->s_neg > 0 ? s->q_neg / s->s_neg : 0.0;
    double var_pos = (s->s_pos > 0 ? s->c_pos / s->s_pos : 0.0) - mean_pos * mean_pos;
    double var_neg = (s->s_neg > 0 ? s->c_neg / s->s_neg : 0.0) - mean_neg * mean_neg;
    *h = log(s->s_pos) - log(s->s_neg);
    *slope = mean_pos + mean_neg;
    *curvature = var_pos - var_neg;
}

/* One pass at `alpha`: the six sums of e^(t − shift) with t = (log p − top) + αΔ, and the
 * row max of t (returned). `shift` bounds that max from above, so one exp per token. */
static float row_pass(const float *lp, const float *lr, int64_t width, float top, float alpha, float shift, Sums *out) {
    Sums s = {0, 0, 0, 0, 0, 0};
    vf row_max = splat(-INFINITY);
    for (int64_t chunk = 0; chunk < width; chunk += CHUNK) {
        int64_t end = chunk + CHUNK < width ? chunk + CHUNK : width;
        LaneSums a = {{0}, {0}, {0}, {0}, {0}, {0}};
        for (int64_t start = chunk; start < end; start += W) {
            Block b = block_at(lp, lr, start, width);
            vf t = select(b.counts, (b.p - top) + alpha * b.delta, splat(-INFINITY));
            row_max = vmax(row_max, t);
            add_terms(&a, exp_below(t - shift), &b);
        }
        add_lanes(&s, &a);
    }
    *out = s;
    return hmax(row_max);
}

/* The first pass: the row's top log p on the common support, Δ's range there, and the
 * sums at α = 0 (exponent log p) and α = 1 (log p + Δ), both ≤ 0 so unshifted. */
typedef struct {
    float top, d_max, d_min, max_zero, max_one;
    Sums zero, one;
} RowStart;

static void first_pass(const float *lp, const float *lr, int64_t width, RowStart *out) {
    Sums zero = {0, 0, 0, 0, 0, 0}, one = {0, 0, 0, 0, 0, 0};
    vf top = splat(-INFINITY), d_max = splat(-INFINITY), d_min = splat(INFINITY);
    vf max_zero = splat(-INFINITY), max_one = splat(-INFINITY);
    for (int64_t chunk = 0; chunk < width; chunk += CHUNK) {
        int64_t end = chunk + CHUNK < width ? chunk + CHUNK : width;
        LaneSums a0 = {{0}, {0}, {0}, {0}, {0}, {0}}, a1 = {{0}, {0}, {0}, {0}, {0}, {0}};
        for (int64_t start = chunk; start < end; start += W) {
            Block b = block_at(lp, lr, start, width);
            top = vmax(top, select(b.common, b.p, splat(-INFINITY)));
            d_max = vmax(d_max, select(b.common, b.delta, splat(-INFINITY)));
            d_min = vmin(d_min, select(b.common, b.delta, splat(INFINITY)));
            vf t0 = select(b.counts, b.p, splat(-INFINITY));
            vf t1 = select(b.counts, b.p + b.delta, splat(-INFINITY));
            max_zero = vmax(max_zero, t0);
            max_one = vmax(max_one, t1);
            add_terms(&a0, exp_below(t0), &b);
            add_terms(&a1, exp_below(t1), &b);
        }
        add_lanes(&zero, &a0);
        add_lanes(&one, &a1);
    }
    RowStart st = {hmax(top), hmax(d_max), hmin(d_min), hmax(max_zero), hmax(max_one), zero, one};
    *out = st;
}

/* alpha._tangent_step for one row: the larger (slope falling) or smaller tangent root
 * inside (lo, hi), else the midpoint. NaN / ±inf roots are never inside. */
static double tangent_step(double lo, double hi, double h_lo, double h_hi, double slope_lo, double slope_hi) {
    double root_lo = lo - h_lo / slope_lo, root_hi = hi - h_hi / slope_hi;
    int in_lo = (root_lo > lo) & (root_lo < hi), in_hi = (root_hi > lo) & (root_hi < hi);
    if (in_lo && in_hi) {
        if (slope_lo >= slope_hi) return root_lo > root_hi ? root_lo : root_hi;
        return root_lo < root_hi ? root_lo : root_hi;
    }
    if (in_lo) return root_lo;
    if (in_hi) return root_hi;
    return 0.5 * (lo + hi);
}

/* alpha._newton_step_lands for one row (false for NaN / inf). */
static int newton_step_lands(double newton_step, double slope, double curvature, double tol, double quadratic_step) {
    double length = fabs(newton_step);
    int remainder = fabs(curvature) * newton_step * newton_step <= 0.25 * tol * slope;
    return (length <= tol) | ((length <= quadratic_step) & remainder);
}

/* The arguments of one call, shared by its threads. */
typedef struct {
    const float *lp, *lr;
    int64_t stride_lp, stride_lr, width;
    double tol, quadratic_step, degenerate_rtol, fallback, alpha_min, alpha_max;
    int32_t max_iter;
    float *alpha_out;
    int32_t *iterations_out;
    int8_t *degenerate_out, *empty_out, *converged_out;
} Call;

/* One row, start to finish: the first pass, the boundary tests, the Newton iteration, the
 * fallback and the clamp. */
static void solve_row(const Call *call, int64_t row) {
    const float *lp = call->lp + row * call->stride_lp, *lr = call->lr + row * call->stride_lr;
    int64_t width = call->width;
    double tol = call->tol;
    RowStart st;
    first_pass(lp, lr, width, &st);
    float top = st.top;
    /* t(α) = (1 − α)(log p − top) + α(log r − top) per token, so the chord through the
     * row maxima at α = 0 and 1 bounds the row max at any α in [0, 1]. */
    float max_zero = st.max_zero - top, max_one = st.max_one - top;
    double h_lo, slope_lo, h_hi, slope_hi, unused;
    Sums sums = st.zero;
    if (max_zero < -60.0f) /* nearly all mass on tokens with Δ = 0: the terms may have underflowed */
        row_pass(lp, lr, width, top, 0.0f, max_zero, &sums);
    log_ratio(&sums, &h_lo, &slope_lo, &unused);
    sums = st.one;
    if (max_one < -60.0f)
        row_pass(lp, lr, width, top, 1.0f, max_one, &sums);
    log_ratio(&sums, &h_hi, &slope_hi, &unused);

    int nonempty = top > -INFINITY;
    double d_max = st.d_max, d_min = st.d_min;
    double d_scale = fabs(d_max) > fabs(d_min) ? fabs(d_max) : fabs(d_min);
    int degenerate = nonempty && (d_max - d_min <= call->degenerate_rtol * d_scale);
    int live = nonempty && !degenerate;
    int at_lower = live && (h_lo >= 0);
    int at_upper = live && !at_lower && (h_hi <= 0);
    double lo = 0.0, hi = 1.0;
    double alpha = tangent_step(lo, hi, h_lo, h_hi, slope_lo, slope_hi);
    if (degenerate) alpha = 0.5;
    if (at_lower) alpha = 0.0;
    if (at_upper) alpha = 1.0;
    int active = live && !at_lower && !at_upper;

    int32_t iterations = 0;
    while (active && iterations < call->max_iter) {
        float a = (float)alpha;
        float shift = (1.0f - a) * max_zero + a * max_one;
        Sums evaluated;
        float row_max = row_pass(lp, lr, width, top, a, shift, &evaluated);
        if (row_max < shift - 60.0f) /* the bound was loose enough for terms to underflow: redo at the max */
            row_pass(lp, lr, width, top, a, row_max, &evaluated);
        double h, slope, curvature;
        log_ratio(&evaluated, &h, &slope, &curvature);
        iterations++;
        if (h < 0) { lo = alpha; h_lo = h; slope_lo = slope; }
        if (h > 0) { hi = alpha; h_hi = h; slope_hi = slope; }
        double newton_step = h / slope;
        int close = newton_step_lands(newton_step, slope, curvature, tol, call->quadratic_step);
        double polished = alpha - newton_step;
        polished = polished > lo ? polished : lo;
        polished = polished < hi ? polished : hi;
        double step = close ? polished : tangent_step(lo, hi, h_lo, h_hi, slope_lo, slope_hi);
        if (h != 0) alpha = step; /* NaN h too: the Triton kernel does the same */
        active = !((h == 0) || close || (hi - lo <= tol));
    }
    if (!nonempty) alpha = call->fallback;
    alpha = alpha > call->alpha_min ? alpha : call->alpha_min;
    alpha = alpha < call->alpha_max ? alpha : call->alpha_max;
    call->alpha_out[row] = (float)alpha;
    call->iterations_out[row] = iterations;
    call->degenerate_out[row] = (int8_t)degenerate;
    call->empty_out[row] = (int8_t)!nonempty;
    call->converged_out[row] = (int8_t)!active;
}

/* Rows first, first + step, first + 2·step, ... of a call: interleaved, so that threads
 * share out rows that need more work. */
typedef void (*RowFn)(const void *call, int64_t row);
typedef struct {
    RowFn fn;
    const void *call;
    int64_t batch, first, step;
} Share;

static void *run_share(void *arg) {
    const Share *share = (const Share *)arg;
    for (int64_t row = share->first; row < share->batch; row += share->step)
        share->fn(share->call, row);
    return NULL;
}

#define MAX_THREADS 256

/* Every row of a call on up to `threads` threads (the rows are independent; the caller
 * decides when threads pay off). A thread that cannot start has its rows run here. */
static void run_rows(RowFn fn, const void *call, int64_t batch, int32_t threads) {
    int64_t n = threads < 1 ? 1 : threads;
    n = n > batch ? batch : n;
    n = n > MAX_THREADS ? MAX_THREADS : n;
    Share shares[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    for (int64_t t = 0; t < n; t++) {
        shares[t] = (Share){fn, call, batch, t, n};
        started[t] = t > 0 && pthread_create(&ids[t], NULL, run_share, &shares[t]) == 0;
    }
    if (n >= 1)
        run_share(&shares[0]);
    for (int64_t t = 1; t < n; t++) {
        if (started[t])
            pthread_join(ids[t], NULL);
        else
            run_share(&shares[t]);
    }
}

static void solve_row_fn(const void *call, int64_t row) { solve_row((const Call *)call, row); }

/* Solve `batch` rows of `width` float32 log-probs (row strides in elements). Outputs per
 * row: α (fallback on rows without a common token, then clamped), iterations, and the
 * degenerate / empty-support / converged flags — the fields of alpha.AlphaSolution. */
void kl_symmetry_rows(const float *lp, const float *lr, int64_t stride_lp, int64_t stride_lr, int64_t batch,
                      int64_t width, double tol, double quadratic_step, int32_t max_iter, double degenerate_rtol,
                      double fallback, double alpha_min, double alpha_max, float *alpha_out, int32_t *iterations_out,
                      int8_t *degenerate_out, int8_t *empty_out, int8_t *converged_out, int32_t threads) {
    Call call = {lp, lr, stride_lp, stride_lr, width, tol, quadratic_step, degenerate_rtol, fallback,
                 alpha_min, alpha_max, max_iter, alpha_out, iterations_out, degenerate_out, empty_out, converged_out};
    run_rows(solve_row_fn, &call, batch, threads);
}

/* ---------------------------------------------------------------------------------------
 * The mixture at a given α: log q_α and the four per-row quantities its diagnostics come
 * from (mixture.diagnostics_from_moments): with t = log p + αΔ on the common support S,
 *
 *   A(α) = log Σ_S e^t,   E_q[Δ],   H(q) = A − E_q[t] + E_q[log m],   A(−α) − A(2 − α)  (ess_log_gap).
 *
 * m is a column's multiplicity: how many vocabulary tokens it stands for (the top-k path's
 * rest bucket, `lm` = log m; NULL: every column is one token). A bucket of m tokens of equal
 * probability has the column's log-probs minus log m each, which leaves A, E_q[Δ], the KLs and
 * the ESS gap as they are computed over columns and adds E_q[log m] to the entropy only.
 * Three passes per row: the row maxima of the three exponents, the sums (three exps per
 * token), then log q = t − A written out. A row without a common token gets the fallback
 * row as its log q (its entropy, E_q[Δ] = 0, A = −inf, a NaN ESS gap), as
 * mixture.mixture_on_support does. A NaN input gives NaN in log q. */
typedef struct {
    const float *lp, *lr, *alpha, *lm;
    int64_t stride_lp, stride_lr, stride_lm, stride_out, width;
    int32_t fallback_teacher;
    float *logq;
    double *moments; /* [B, 4]: A, E_q[Δ], H(q), A(−α) − A(2 − α) */
} MixCall;

static void mixture_row(const MixCall *call, int64_t row) {
    const float *lp = call->lp + row * call->stride_lp, *lr = call->lr + row * call->stride_lr;
    const float *lm = call->lm ? call->lm + row * call->stride_lm : NULL;
    float *out = call->logq + row * call->stride_out;
    double *moments = call->moments + 4 * row;
    int64_t width = call->width;
    float a = call->alpha[row], a_minus = -a, a_plus = 2.0f - a;

    vf max_a = splat(-INFINITY), max_minus = splat(-INFINITY), max_plus = splat(-INFINITY);
    for (int64_t start = 0; start < width; start += W) {
        Block b = block_at(lp, lr, start, width);
        vf off = splat(-INFINITY);
        max_a = vmax(max_a, select(b.common, b.p + a * b.delta, off));
        max_minus = vmax(max_minus, select(b.common, b.p + a_minus * b.delta, off));
        max_plus = vmax(max_plus, select(b.common, b.p + a_plus * b.delta, off));
    }
    float top = hmax(max_a), top_minus = hmax(max_minus), top_plus = hmax(max_plus);

    if (!(top > -INFINITY)) { /* no common token: the fallback row */
        const float *fallback = call->fallback_teacher ? lr : lp;
        double entropy = 0;
        for (int64_t i = 0; i < width; i++) {
            out[i] = fallback[i];
            if (fallback[i] > -INFINITY)
                entropy -= exp((double)fallback[i]) * (fallback[i] - (lm ? lm[i] : 0.0f));
        }
        moments[0] = -INFINITY;
        moments[1] = 0.0;
        moments[2] = entropy;
        moments[3] = NAN;
        return;
    }
    double z = 0, z_delta = 0, z_t = 0, z_m = 0, z_minus = 0, z_plus = 0;
    for (int64_t chunk = 0; chunk < width; chunk += CHUNK) {
        int64_t end = chunk + CHUNK < width ? chunk + CHUNK : width;
        vf s = {0}, s_delta = {0}, s_t = {0}, s_m = {0}, s_minus = {0}, s_plus = {0};
        for (int64_t start = chunk; start < end; start += W) {
            Block b = block_at(lp, lr, start, width);
            vf t = select(b.common, (b.p + a * b.delta) - top, splat(-INFINITY)); /* ≤ 0 */
            vf w = exp_below(t);
            s += w;
            s_delta += w * b.delta;
            s_t += select(b.common, w * t, splat(0.0f)); /* 0 · (−inf) off the support */
            if (lm) { /* an empty column's log m is −inf: it is off the support */
                vf m, unused;
                load(lm, lm, start, width, &m, &unused);
                s_m += select(b.common, w * m, splat(0.0f));
            }
            s_minus += exp_below(select(b.common, (b.p + a_minus * b.delta) - top_minus, splat(-INFINITY)));
            s_plus += exp_below(select(b.common, (b.p + a_plus * b.delta) - top_plus, splat(-INFINITY)));
        }
        z += hsum(s);
        z_delta += hsum(s_delta);
        z_t += hsum(s_t);
        z_m += hsum(s_m);
        z_minus += hsum(s_minus);
        z_plus += hsum(s_plus);
    }
    double log_z = log(z);
    float shift = (float)log_z;
    for (int64_t start = 0; start < width; start += W) {
        Block b = block_at(lp, lr, start, width);
        vi nan = (b.p != b.p) | (b.r != b.r);
        vf logq = select(b.common, ((b.p + a * b.delta) - top) - shift, splat(-INFINITY));
        logq = select(nan, splat(NAN), logq);
        if (start + W <= width) {
            memcpy(out + start, &logq, sizeof(vf));
        } else {
            for (int64_t l = 0; start + l < width; l++)
                out[start + l] = logq[l];
        }
    }
    moments[0] = top + log_z;
    moments[1] = z_delta / z;
    moments[2] = log_z - z_t / z + z_m / z;
    moments[3] = (top_minus + log(z_minus)) - (top_plus + log(z_plus));
}

static void mixture_row_fn(const void *call, int64_t row) { mixture_row((const MixCall *)call, row); }

/* log q_α `[B, V]` (rows `stride_out` apart) and the moments `[B, 4]` of `batch` rows at
 * the given α per row; `lm` (rows `stride_lm` apart) is each column's log multiplicity, or NULL. */
void mixture_rows(const float *lp, const float *lr, int64_t stride_lp, int64_t stride_lr, int64_t batch, int64_t width,
                  const float *alpha, const float *lm, int64_t stride_lm, int32_t fallback_teacher, float *logq,
                  int64_t stride_out, double *moments, int32_t threads) {
    MixCall call = {lp, lr, alpha, lm, stride_lp, stride_lr, stride_lm, stride_out, width, fallback_teacher, logq,
                    moments};
    run_rows(mixture_row_fn, &call, batch, threads);
}
