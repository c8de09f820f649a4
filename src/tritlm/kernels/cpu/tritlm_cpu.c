/*
 * tritlm CPU ternary kernels: int8 activations x 2-bit ternary weights (layout "i2s_r4").
 *
 * Weight layout (see tritlm/kernels/pack.py): code q = w + 1 in 2 bits; 128 weights per 32-byte
 * block, byte j of a block holds q[j] (bits 1:0), q[j+32] (3:2), q[j+64] (5:4), q[j+96] (7:6);
 * K padded to a multiple of 128 with zero weights (q = 1); rows in groups of 4, the 32-byte blocks
 * of a group interleaved: row 4g+r, block b at byte ((g*KB + b)*4 + r)*32.
 *
 * Math: dot = sum_k q_k x_k - sum_k x_k  (= sum_k w_k x_k, exact in int32);
 *       out = (float)((double)dot * w_scale[n] * (1.0 / x_scale[t])) (+ bias[n]), in IEEE double:
 *       dot * w_scale is exact, so the one rounding before float's is the reciprocal's and the
 *       product's. Every route (portable, AVX2, AVX-512, AMX) does these operations, so their
 *       outputs are the same bits; a multiply, not a division, because the vector epilogue of a
 *       division (exact through a reciprocal with a rounding check) cost a fifth of a batched
 *       GEMM's time.
 * AVX2 route: _mm256_maddubs_epi16(codes 0..2 unsigned, x int8 signed) -> int16 pair sums,
 * accumulated in int16 over <= 16 blocks (|sum| <= 16*4*2*2*128 = 32768 -> fits: the only value
 * reaching 2^15 is -32768, i.e. every x = -128), then widened with madd(acc, 1) into int32.
 * Portable route: plain C loops (non-x86, or CPUs without AVX2), chosen at run time.
 *
 * Threads: a small persistent pthread pool (the caller works too). Workers spin for tt_spin_us
 * microseconds after a job (to catch the next call cheaply), then sleep on a condvar. Output rows
 * are cut into chunks (runs of 4-row groups for GEMV, one panel each for GEMM) that the threads
 * claim dynamically, so a preempted thread on a busy machine does not stall the call.
 *
 * No global state besides the pool; every entry point is serialised by one mutex, so the library
 * is safe to call from several Python threads (calls just queue).
 *
 * One context type covers every weight kind (tt_ctx.kind): 0 = ternary (this file), 1 = int8,
 * 2 = int4 (group scales), 3 = binary; kinds 1-3 live in tritlm_intk.c (tt_run hands them over).
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TT_X86 1
#define TT_AVX2_FN __attribute__((target("avx2,fma")))
#define TT_AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma")))
#else
#define TT_X86 0
#endif

/* pin a vector in a register at this point: stops gcc from re-associating the int16 adds into a
 * tree of temporaries (which spills the 2x4 tile to the stack) */
#define TT_PIN(v) __asm__("" : "+x"(v))

#define TT_ABI_VERSION 15
#define TT_MAX_THREADS 256
#define TT_BLOCK 128
#define TT_GROUP_BYTES_PER_BLOCK 128 /* 4 rows x 32 bytes */
#define TT_NBUCKETS 3
/* tt_ctx.kind */
#define TT_KIND_TERNARY 0
#define TT_KIND_INT8 1
#define TT_KIND_INT4 2
#define TT_KIND_BINARY 3

static inline void tt_relax(void) {
#if TT_X86
    _mm_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline uint64_t tt_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ============================================================== thread pool */
/* A job is `nchunks` independent chunks; every thread (the caller included) claims chunks with a
 * CAS on P.claim = (job id << 42 | nchunks << 21 | next chunk) until none is left, and the caller
 * returns once all chunks are done. Nobody waits for a worker that is not running: on a busy
 * machine the caller simply does more chunks itself. The chunk count travels in the claim word
 * itself: a late worker that read the word of a finished job must not compare its next chunk with
 * the count of the job being posted (it did, through a separate P.nchunks, and then claimed a
 * chunk past the old job's end under the old word, ran the new job's function on it, and counted
 * it done: the new job's caller could return while a chunk still ran on its stack; seen as rare
 * segfaults in batched decode). A CAS on a stale word fails, so a worker can only claim a chunk
 * of the job that is live at the time of its CAS, and the fn/arg it then reads belong to that job
 * (they are written before the job is published and not rewritten before all its chunks are done). */
#define TT_CLAIM_BITS 21
#define TT_CLAIM_MASK ((1ull << TT_CLAIM_BITS) - 1)
typedef void (*tt_chunk_fn)(const void *arg, int chunk);

static struct {
    pthread_mutex_t call_lock; /* serialises entry points (and pool resizing) */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t th[TT_MAX_THREADS];
    unsigned start_gen[TT_MAX_THREADS];
    int nworkers;              /* running worker threads (tid 1..nworkers) */
    int nthreads;              /* default thread count incl. the caller */
    _Atomic unsigned gen;      /* bumped to wake the workers */
    _Atomic uint64_t claim;    /* job id << 42 | nchunks << 21 | next chunk */
    _Atomic int done;          /* chunks finished in the live job */
    _Atomic(tt_chunk_fn) fn;
    _Atomic(const void *) arg;
    unsigned jobid;
    _Atomic int sleeping;
    _Atomic int limit;         /* workers with tid > limit exit */
    _Atomic int nhelpers;      /* workers with tid > nhelpers sit this job out */
    _Atomic long spin_ns;
    int min_blocks;            /* minimum weight row-blocks (32 bytes each) per GEMV chunk */
    int inited;
} P = {
    .call_lock = PTHREAD_MUTEX_INITIALIZER,
    .mu = PTHREAD_MUTEX_INITIALIZER,
    .cv = PTHREAD_COND_INITIALIZER,
    .nworkers = 0,
    .nthreads = 1,
    .spin_ns = 100000,
    .min_blocks = 256,
};

/* claim the next chunk of the live job; -1 when none is left */
static inline int tt_claim(void) {
    uint64_t v = atomic_load_explicit(&P.claim, memory_order_acquire);
    for (;;) {
        const uint64_t idx = v & TT_CLAIM_MASK, n = (v >> TT_CLAIM_BITS) & TT_CLAIM_MASK;
        if (idx >= n) return -1;
        if (atomic_compare_exchange_weak_explicit(&P.claim, &v, v + 1, memory_order_acq_rel, memory_order_acquire))
            return (int)idx;
    }
}

static inline void tt_work(void) {
    int c;
    while ((c = tt_claim()) >= 0) {
        tt_chunk_fn fn = atomic_load_explicit(&P.fn, memory_order_relaxed);
        fn(atomic_load_explicit(&P.arg, memory_order_relaxed), c);
        atomic_fetch_add_explicit(&P.done, 1, memory_order_release);
    }
}

static void *tt_worker(void *p) {
    const int tid = (int)(intptr_t)p;
    unsigned seen = P.start_gen[tid]; /* gen at creation: a job posted before we run is not missed */
    for (;;) {
        unsigned g;
        const uint64_t t0 = tt_now_ns();
        const long spin = atomic_load_explicit(&P.spin_ns, memory_order_relaxed);
        int it = 0;
        while ((g = atomic_load_explicit(&P.gen, memory_order_acquire)) == seen) {
            tt_relax();
            if (++it >= 64) {
                it = 0;
                if ((long)(tt_now_ns() - t0) > spin) break;
            }
        }
        if (g == seen) {
            pthread_mutex_lock(&P.mu);
            atomic_fetch_add(&P.sleeping, 1);
            while ((g = atomic_load(&P.gen)) == seen) pthread_cond_wait(&P.cv, &P.mu);
            atomic_fetch_sub(&P.sleeping, 1);
            pthread_mutex_unlock(&P.mu);
        }
        seen = g;
        if (tid > atomic_load(&P.limit)) return NULL;
        if (tid <= atomic_load_explicit(&P.nhelpers, memory_order_relaxed)) tt_work();
    }
}

static void tt_wake(void) {
    atomic_fetch_add(&P.gen, 1);
    if (atomic_load(&P.sleeping) > 0) {
        pthread_mutex_lock(&P.mu);
        pthread_cond_broadcast(&P.cv);
        pthread_mutex_unlock(&P.mu);
    }
}

/* resize to exactly `want` workers; caller holds call_lock */
static int tt_pool_resize(int want) {
    if (want < 0) want = 0;
    if (want > TT_MAX_THREADS - 1) want = TT_MAX_THREADS - 1;
    if (want < P.nworkers) {
        atomic_store(&P.limit, want);
        tt_wake();
        for (int i = want + 1; i <= P.nworkers; i++) pthread_join(P.th[i], NULL);
        P.nworkers = want;
    }
    atomic_store(&P.limit, TT_MAX_THREADS);
    while (P.nworkers < want) {
        int tid = P.nworkers + 1;
        P.start_gen[tid] = atomic_load(&P.gen);
        if (pthread_create(&P.th[tid], NULL, tt_worker, (void *)(intptr_t)tid) != 0) return -1;
        P.nworkers = tid;
    }
    return 0;
}

static void tt_atfork_child(void) {
    /* threads do not survive fork: forget them (the child re-creates workers on demand) */
    pthread_mutex_init(&P.call_lock, NULL);
    pthread_mutex_init(&P.mu, NULL);
    pthread_cond_init(&P.cv, NULL);
    P.nworkers = 0;
    atomic_store(&P.sleeping, 0);
}

static void tt_init_once(void) {
    if (!P.inited) {
        P.inited = 1;
        pthread_atfork(NULL, NULL, tt_atfork_child);
    }
}

/* run chunks 0..nchunks-1 of fn on up to nth threads (caller included); caller holds call_lock */
static void tt_parallel(tt_chunk_fn fn, const void *arg, int nchunks, int nth) {
    if (nth > nchunks) nth = nchunks;
    if (nth <= 1 || (uint64_t)nchunks > TT_CLAIM_MASK) { /* 2M+ chunks: more than the word holds */
        for (int c = 0; c < nchunks; c++) fn(arg, c);
        return;
    }
    if (P.nworkers < nth - 1) tt_pool_resize(nth - 1); /* on failure: fewer helpers, still correct */
    P.jobid++;
    atomic_store_explicit(&P.fn, fn, memory_order_relaxed);
    atomic_store_explicit(&P.arg, arg, memory_order_relaxed);
    atomic_store_explicit(&P.done, 0, memory_order_relaxed);
    atomic_store_explicit(&P.nhelpers, nth - 1, memory_order_relaxed);
    atomic_store_explicit(&P.claim, ((uint64_t)P.jobid << (2 * TT_CLAIM_BITS)) | ((uint64_t)nchunks << TT_CLAIM_BITS),
                          memory_order_release);
    tt_wake();
    tt_work();
    int it = 0;
    while (atomic_load_explicit(&P.done, memory_order_acquire) < nchunks) {
        tt_relax();
        if (++it > 2048) { sched_yield(); it = 0; } /* a preempted worker holds a chunk */
    }
}

/* Test entry: `iters` back-to-back jobs of 1..maxc (<= 64) chunks on nth threads, each chunk
 * counting its runs; returns the number of jobs in which some chunk had not run exactly once when
 * the job returned (a chunk run twice, or still running after its caller moved on). */
typedef struct { _Atomic int *runs; } tt_selftest_job;

static void tt_selftest_task(const void *arg, int chunk) {
    atomic_fetch_add(&((const tt_selftest_job *)arg)->runs[chunk], 1);
}

int tt_pool_selftest(int iters, int maxc, int nth) {
    if (maxc < 1 || maxc > 64) return -1;
    _Atomic int runs[64];
    int bad = 0;
    pthread_mutex_lock(&P.call_lock);
    tt_init_once();
    for (int i = 0; i < iters; i++) {
        const int n = 1 + (int)((i * 7u) % (unsigned)maxc);
        for (int c = 0; c < n; c++) atomic_store(&runs[c], 0);
        tt_selftest_job J = {.runs = runs};
        tt_parallel(tt_selftest_task, &J, n, nth);
        for (int c = 0; c < n; c++)
            if (atomic_load(&runs[c]) != 1) { bad++; break; }
    }
    pthread_mutex_unlock(&P.call_lock);
    return bad;
}

/* ============================================================== context */
typedef struct { int pf; int panel_rows; int chunks; int nta; } tt_params;

typedef struct {
    const uint8_t *w;  /* packed weights, i2s_r4 */
    int n, k, kp, kb, ngroups;
    float *wscale;     /* [n] */
    float *bias;       /* [n] or NULL */
    int isa;           /* 2 = AVX-512 VNNI, 1 = AVX2, 0 = portable */
    tt_params params[TT_NBUCKETS];
    int8_t *xq;        /* workspace [cap_m, kp] */
    float *xs;         /* [cap_m] */
    int32_t *sx;       /* [cap_m] */
    int cap_m;
    /* kinds 1-3 (tritlm_intk.c); a ternary context has kind 0 and leaves the rest zero */
    int kind;          /* TT_KIND_* */
    int group;         /* int4: weights per scale group (32, 64 or 128) */
    int ngk;           /* int4: scale groups per row as the kernel walks them, ceil(kp / group) */
    float *gscale;     /* int4: [n, ngk] group scales (groups past ceil(k / group) are 0) */
    size_t rowb;       /* kinds 1-3: bytes per packed row */
    int32_t *wsum;     /* int8 with AVX-512 VNNI: [n] sums of each row's levels (the offset correction) */
    int8_t *xv;        /* AMX: a partial last 16-token block, zero-padded, or the transposed activations (tritlm_amx.c) */
    size_t xv_cap;
    int amx_min_m;     /* AMX: fewest tokens for the activations-as-A tiles (prompts) */
    int amxs_min_m;    /* AMX: fewest tokens for the weights-as-A tiles (batched decode), up to amx_min_m - 1 */
} tt_ctx;

static int tt_cpu_has_avx2(void) {
#if TT_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

static void *tt_aligned_alloc(size_t n) {
    void *p = NULL;
    if (n == 0) n = 64;
    if (posix_memalign(&p, 64, (n + 63) & ~(size_t)63) != 0) return NULL;
    return p;
}

static int tt_bucket(int m) { return m <= 1 ? 0 : (m < 16 ? 1 : 2); }

static int tt_reserve(tt_ctx *c, int m) {
    if (m <= c->cap_m) return 0;
    int cap = c->cap_m ? c->cap_m : 1;
    while (cap < m) cap *= 2;
    int8_t *xq = (int8_t *)tt_aligned_alloc((size_t)cap * c->kp);
    float *xs = (float *)tt_aligned_alloc(sizeof(float) * cap);
    int32_t *sx = (int32_t *)tt_aligned_alloc(sizeof(int32_t) * cap);
    if (!xq || !xs || !sx) { free(xq); free(xs); free(sx); return -1; }
    free(c->xq); free(c->xs); free(c->sx);
    c->xq = xq; c->xs = xs; c->sx = sx; c->cap_m = cap;
    return 0;
}

/* ============================================================== activation quantiser */
static void tt_quant_row_portable(const float *x, int k, int kp, int8_t *q, float *scale, int32_t *sumx) {
    float amax = 0.0f;
    for (int i = 0; i < k; i++) { float a = fabsf(x[i]); amax = a > amax ? a : amax; }
    float s = 127.0f / (amax > 1e-5f ? amax : 1e-5f);
    int32_t sum = 0;
    for (int i = 0; i < k; i++) {
        long v = lrintf(x[i] * s);
        v = v < -128 ? -128 : (v > 127 ? 127 : v);
        q[i] = (int8_t)v;
        sum += (int32_t)v;
    }
    if (kp > k) memset(q + k, 0, (size_t)(kp - k));
    *scale = s;
    *sumx = sum;
}

#if TT_X86
TT_AVX2_FN static void tt_quant_row_avx2(const float *x, int k, int kp, int8_t *q, float *scale, int32_t *sumx) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= k; i += 16) {
        m0 = _mm256_max_ps(m0, _mm256_and_ps(_mm256_loadu_ps(x + i), absmask));
        m1 = _mm256_max_ps(m1, _mm256_and_ps(_mm256_loadu_ps(x + i + 8), absmask));
    }
    m0 = _mm256_max_ps(m0, m1);
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m0), _mm256_extractf128_ps(m0, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    float amax = _mm_cvtss_f32(h);
    for (; i < k; i++) { float a = fabsf(x[i]); amax = a > amax ? a : amax; }
    const float s = 127.0f / (amax > 1e-5f ? amax : 1e-5f);
    const __m256 vs = _mm256_set1_ps(s);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256i ones8 = _mm256_set1_epi8(1);
    const __m256i ones16 = _mm256_set1_epi16(1);
    __m256i vsum = _mm256_setzero_si256();
    i = 0;
    for (; i + 32 <= k; i += 32) {
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), vs));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), vs));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 16), vs));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 24), vs));
        __m256i p01 = _mm256_packs_epi32(i0, i1);
        __m256i p23 = _mm256_packs_epi32(i2, i3);
        __m256i b = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), perm);
        _mm256_storeu_si256((__m256i *)(q + i), b);
        vsum = _mm256_add_epi32(vsum, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, b), ones16));
    }
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(vsum), _mm256_extracti128_si256(vsum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    int32_t sum = _mm_cvtsi128_si32(s4);
    for (; i < k; i++) {
        long v = lrintf(x[i] * s);
        v = v < -128 ? -128 : (v > 127 ? 127 : v);
        q[i] = (int8_t)v;
        sum += (int32_t)v;
    }
    if (kp > k) memset(q + k, 0, (size_t)(kp - k));
    *scale = s;
    *sumx = sum;
}
#endif

static void tt_quant_rows(const float *x, int m, int k, long ldx, int8_t *q, long ldq, float *scale,
                          int32_t *sumx, int kp, int isa) {
    for (int t = 0; t < m; t++) {
#if TT_X86
        if (isa) { tt_quant_row_avx2(x + (size_t)t * ldx, k, kp, q + (size_t)t * ldq, scale + t, sumx + t); continue; }
#endif
        tt_quant_row_portable(x + (size_t)t * ldx, k, kp, q + (size_t)t * ldq, scale + t, sumx + t);
    }
    (void)isa;
}

/* the quantiser over the thread pool: prompts quantise [m, k] floats per call, which one thread
 * took ~5-10% of a 128-token GEMM's time */
typedef struct {
    const float *x; long ldx; int k, kp, isa, rows; int8_t *q; long ldq; float *scale; int32_t *sumx; int m;
} tt_quant_job;

static void tt_quant_task(const void *arg, int chunk) {
    const tt_quant_job *Q = (const tt_quant_job *)arg;
    const int t0 = chunk * Q->rows;
    const int n = t0 + Q->rows < Q->m ? Q->rows : Q->m - t0;
    tt_quant_rows(Q->x + (size_t)t0 * Q->ldx, n, Q->k, Q->ldx, Q->q + (size_t)t0 * Q->ldq, Q->ldq, Q->scale + t0,
                  Q->sumx + t0, Q->kp, Q->isa);
}

/* tt_quant_rows on up to nth threads (caller holds call_lock); rows of one token stay on one thread,
 * so the numbers are those of tt_quant_rows */
static void tt_quant_rows_par(const float *x, int m, int k, long ldx, int8_t *q, long ldq, float *scale,
                              int32_t *sumx, int kp, int isa, int nth) {
    if (nth <= 0) nth = P.nthreads;
    if (nth > TT_MAX_THREADS) nth = TT_MAX_THREADS;
    if (m < 8 || nth <= 1) { tt_quant_rows(x, m, k, ldx, q, ldq, scale, sumx, kp, isa); return; }
    const int rows = (m + 2 * nth - 1) / (2 * nth);
    tt_quant_job Q = {.x = x, .ldx = ldx, .k = k, .kp = kp, .isa = isa, .rows = rows, .q = q, .ldq = ldq,
                      .scale = scale, .sumx = sumx, .m = m};
    tt_parallel(tt_quant_task, &Q, (m + rows - 1) / rows, nth);
}

/* ============================================================== matmul job */
typedef struct {
    const tt_ctx *c;
    const int8_t *xq;   /* [m, ldx], padded to kp with zeros */
    size_t ldx;
    int m;
    const float *xs;    /* [m] activation scales */
    const int32_t *sx;  /* [m] sum of x */
    float *out;         /* [m, n] or NULL */
    int32_t *dots;      /* [m, n] or NULL (raw integer dots) */
    tt_params p;
    int cg;             /* 4-row groups per chunk */
} tt_job;

static inline void tt_store(const tt_job *J, int t, int row, int32_t acc) {
    const tt_ctx *c = J->c;
    if (row >= c->n) return;
    int32_t d = acc - J->sx[t];
    size_t o = (size_t)t * c->n + row;
    if (J->dots) { J->dots[o] = d; return; }
    float v = (float)((double)d * (double)c->wscale[row] * (1.0 / (double)J->xs[t]));
    if (c->bias) v += c->bias[row];
    J->out[o] = v;
}

static inline void tt_chunk_groups(const tt_job *J, int chunk, int *g0, int *g1) {
    *g0 = chunk * J->cg;
    *g1 = *g0 + J->cg < J->c->ngroups ? *g0 + J->cg : J->c->ngroups;
}

/* ---------------------------------------------------------------- portable kernels */
static int32_t tt_dot_row_portable(const tt_ctx *c, int row, const int8_t *x) {
    const int g = row >> 2, r = row & 3;
    const uint8_t *w = c->w + (size_t)g * c->kb * TT_GROUP_BYTES_PER_BLOCK + r * 32;
    int32_t acc = 0;
    for (int b = 0; b < c->kb; b++) {
        const uint8_t *wb = w + (size_t)b * TT_GROUP_BYTES_PER_BLOCK;
        const int8_t *xb = x + (size_t)b * TT_BLOCK;
        int32_t s = 0;
        for (int j = 0; j < 32; j++) {
            const int v = wb[j];
            s += (v & 3) * xb[j] + ((v >> 2) & 3) * xb[j + 32] + ((v >> 4) & 3) * xb[j + 64] + ((v >> 6) & 3) * xb[j + 96];
        }
        acc += s;
    }
    return acc;
}

static void tt_task_portable(const void *arg, int chunk) {
    const tt_job *J = (const tt_job *)arg;
    int g0, g1;
    tt_chunk_groups(J, chunk, &g0, &g1);
    for (int t = 0; t < J->m; t++) {
        const int8_t *x = J->xq + (size_t)t * J->ldx;
        for (int row = 4 * g0; row < 4 * g1 && row < J->c->n; row++) tt_store(J, t, row, tt_dot_row_portable(J->c, row, x));
    }
}

/* ---------------------------------------------------------------- AVX2 kernels */
#if TT_X86
TT_AVX2_INLINE __m128i tt_hsum4(__m256i a, __m256i b, __m256i c, __m256i d) {
    __m256i ab = _mm256_hadd_epi32(a, b);
    __m256i cd = _mm256_hadd_epi32(c, d);
    __m256i abcd = _mm256_hadd_epi32(ab, cd);
    return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

TT_AVX2_INLINE int32_t tt_hsum1(__m256i a) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* GEMV: token t, 4-row groups [g0, g1), weights streamed sequentially */
TT_AVX2_FN static void tt_gemv_avx2(const tt_job *J, int t, int g0, int g1) {
    const tt_ctx *c = J->c;
    const int kb = c->kb;
    const int8_t *x = J->xq + (size_t)t * J->ldx;
    const __m256i m3 = _mm256_set1_epi8(3);
    const __m256i one16 = _mm256_set1_epi16(1);
    const size_t pf = (size_t)J->p.pf;
    const int nta = pf && J->p.nta;
    for (int g = g0; g < g1; g++) {
        const uint8_t *w = c->w + (size_t)g * kb * TT_GROUP_BYTES_PER_BLOCK;
        __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
        for (int b0 = 0; b0 < kb; b0 += 16) {
            const int b1 = b0 + 16 < kb ? b0 + 16 : kb;
            __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
            for (int b = b0; b < b1; b++) {
                const uint8_t *wb = w + (size_t)b * TT_GROUP_BYTES_PER_BLOCK;
                const int8_t *xb = x + (size_t)b * TT_BLOCK;
                if (nta) { /* streamed once: non-temporal hint keeps L2 for the activations */
                    _mm_prefetch((const char *)(wb + pf), _MM_HINT_NTA);
                    _mm_prefetch((const char *)(wb + pf + 64), _MM_HINT_NTA);
                } else if (pf) {
                    _mm_prefetch((const char *)(wb + pf), _MM_HINT_T0);
                    _mm_prefetch((const char *)(wb + pf + 64), _MM_HINT_T0);
                }
                const __m256i x0 = _mm256_loadu_si256((const __m256i *)xb);
                const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xb + 32));
                const __m256i x2 = _mm256_loadu_si256((const __m256i *)(xb + 64));
                const __m256i x3 = _mm256_loadu_si256((const __m256i *)(xb + 96));
#define TT_ROW(R, A)                                                                                   \
    do {                                                                                               \
        const __m256i v = _mm256_loadu_si256((const __m256i *)(wb + 32 * (R)));                        \
        A = _mm256_add_epi16(A, _mm256_maddubs_epi16(_mm256_and_si256(v, m3), x0)); TT_PIN(A);       \
        A = _mm256_add_epi16(A, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 2), m3), x1)); \
        A = _mm256_add_epi16(A, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), m3), x2)); \
        A = _mm256_add_epi16(A, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 6), m3), x3)); \
    } while (0)
                TT_ROW(0, a0);
                TT_ROW(1, a1);
                TT_ROW(2, a2);
                TT_ROW(3, a3);
#undef TT_ROW
            }
            s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(a0, one16));
            s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(a1, one16));
            s2 = _mm256_add_epi32(s2, _mm256_madd_epi16(a2, one16));
            s3 = _mm256_add_epi32(s3, _mm256_madd_epi16(a3, one16));
        }
        const __m128i d4 = tt_hsum4(s0, s1, s2, s3);
        if (!J->dots && !c->bias && 4 * g + 3 < c->n) {
            /* tt_store for 4 rows at once, the same IEEE double ops (bit-identical results) */
            const __m256d dd = _mm256_cvtepi32_pd(_mm_sub_epi32(d4, _mm_set1_epi32(J->sx[t])));
            const __m256d ws = _mm256_cvtps_pd(_mm_loadu_ps(c->wscale + 4 * g));
            const __m256d v = _mm256_mul_pd(_mm256_mul_pd(dd, ws), _mm256_set1_pd(1.0 / (double)J->xs[t]));
            _mm_storeu_ps(J->out + (size_t)t * c->n + 4 * g, _mm256_cvtpd_ps(v));
        } else {
            int32_t r4[4];
            _mm_storeu_si128((__m128i *)r4, d4);
            for (int r = 0; r < 4; r++) tt_store(J, t, 4 * g + r, r4[r]);
        }
    }
}

/* GEMM register tile: 2 rows (wp, wp+32 in each 128-byte group block) x T tokens; pf > 0: prefetch
 * the weight stream pf bytes ahead (the first pass over cold weights; later passes hit the cache) */
TT_AVX2_INLINE void tt_tile_2xT(const uint8_t *wp, const int8_t *x, size_t ldx, int kb, int T, int32_t res[2][4],
                                size_t pf) {
    const __m256i m3 = _mm256_set1_epi8(3);
    const __m256i one16 = _mm256_set1_epi16(1);
    const __m256i z = _mm256_setzero_si256();
    __m256i s00 = z, s01 = z, s02 = z, s03 = z, s10 = z, s11 = z, s12 = z, s13 = z;
    const int8_t *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + 3 * ldx;
    for (int b0 = 0; b0 < kb; b0 += 16) {
        const int b1 = b0 + 16 < kb ? b0 + 16 : kb;
        __m256i a00 = z, a01 = z, a02 = z, a03 = z, a10 = z, a11 = z, a12 = z, a13 = z;
        for (int b = b0; b < b1; b++) {
            const uint8_t *wb = wp + (size_t)b * TT_GROUP_BYTES_PER_BLOCK;
            const size_t xo = (size_t)b * TT_BLOCK;
            if (pf) {
                _mm_prefetch((const char *)(wb + pf), _MM_HINT_T0);
                _mm_prefetch((const char *)(wb + pf + 64), _MM_HINT_T0);
            }
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)wb);
            const __m256i v1 = _mm256_loadu_si256((const __m256i *)(wb + 32));
#define TT_STEP(Q)                                                                                  \
    do {                                                                                            \
        const __m256i u0 = _mm256_and_si256(_mm256_srli_epi16(v0, 2 * (Q)), m3);                    \
        const __m256i u1 = _mm256_and_si256(_mm256_srli_epi16(v1, 2 * (Q)), m3);                    \
        __m256i xv = _mm256_loadu_si256((const __m256i *)(x0 + xo + 32 * (Q)));                     \
        a00 = _mm256_add_epi16(a00, _mm256_maddubs_epi16(u0, xv)); TT_PIN(a00);                     \
        a10 = _mm256_add_epi16(a10, _mm256_maddubs_epi16(u1, xv)); TT_PIN(a10);                     \
        if (T > 1) {                                                                                \
            xv = _mm256_loadu_si256((const __m256i *)(x1 + xo + 32 * (Q)));                         \
            a01 = _mm256_add_epi16(a01, _mm256_maddubs_epi16(u0, xv)); TT_PIN(a01);                 \
            a11 = _mm256_add_epi16(a11, _mm256_maddubs_epi16(u1, xv)); TT_PIN(a11);                 \
        }                                                                                           \
        if (T > 2) {                                                                                \
            xv = _mm256_loadu_si256((const __m256i *)(x2 + xo + 32 * (Q)));                         \
            a02 = _mm256_add_epi16(a02, _mm256_maddubs_epi16(u0, xv)); TT_PIN(a02);                 \
            a12 = _mm256_add_epi16(a12, _mm256_maddubs_epi16(u1, xv)); TT_PIN(a12);                 \
        }                                                                                           \
        if (T > 3) {                                                                                \
            xv = _mm256_loadu_si256((const __m256i *)(x3 + xo + 32 * (Q)));                         \
            a03 = _mm256_add_epi16(a03, _mm256_maddubs_epi16(u0, xv)); TT_PIN(a03);                 \
            a13 = _mm256_add_epi16(a13, _mm256_maddubs_epi16(u1, xv)); TT_PIN(a13);                 \
        }                                                                                           \
    } while (0)
            TT_STEP(0);
            TT_STEP(1);
            TT_STEP(2);
            TT_STEP(3);
#undef TT_STEP
        }
        s00 = _mm256_add_epi32(s00, _mm256_madd_epi16(a00, one16));
        s10 = _mm256_add_epi32(s10, _mm256_madd_epi16(a10, one16));
        if (T > 1) { s01 = _mm256_add_epi32(s01, _mm256_madd_epi16(a01, one16)); s11 = _mm256_add_epi32(s11, _mm256_madd_epi16(a11, one16)); }
        if (T > 2) { s02 = _mm256_add_epi32(s02, _mm256_madd_epi16(a02, one16)); s12 = _mm256_add_epi32(s12, _mm256_madd_epi16(a12, one16)); }
        if (T > 3) { s03 = _mm256_add_epi32(s03, _mm256_madd_epi16(a03, one16)); s13 = _mm256_add_epi32(s13, _mm256_madd_epi16(a13, one16)); }
    }
    if (T == 4) { /* 4 sums per hadd tree: a token quad's row in one vector */
        _mm_storeu_si128((__m128i *)res[0], tt_hsum4(s00, s01, s02, s03));
        _mm_storeu_si128((__m128i *)res[1], tt_hsum4(s10, s11, s12, s13));
        return;
    }
    res[0][0] = tt_hsum1(s00); res[1][0] = tt_hsum1(s10);
    if (T > 1) { res[0][1] = tt_hsum1(s01); res[1][1] = tt_hsum1(s11); }
    if (T > 2) { res[0][2] = tt_hsum1(s02); res[1][2] = tt_hsum1(s12); }
    if (T > 3) { res[0][3] = tt_hsum1(s03); res[1][3] = tt_hsum1(s13); }
}

TT_AVX2_FN static void tt_tile_2x4(const uint8_t *wp, const int8_t *x, size_t ldx, int kb, int32_t res[2][4], size_t pf) { tt_tile_2xT(wp, x, ldx, kb, 4, res, pf); }
TT_AVX2_FN static void tt_tile_2x3(const uint8_t *wp, const int8_t *x, size_t ldx, int kb, int32_t res[2][4], size_t pf) { tt_tile_2xT(wp, x, ldx, kb, 3, res, pf); }
TT_AVX2_FN static void tt_tile_2x2(const uint8_t *wp, const int8_t *x, size_t ldx, int kb, int32_t res[2][4], size_t pf) { tt_tile_2xT(wp, x, ldx, kb, 2, res, pf); }
TT_AVX2_FN static void tt_tile_2x1(const uint8_t *wp, const int8_t *x, size_t ldx, int kb, int32_t res[2][4], size_t pf) { tt_tile_2xT(wp, x, ldx, kb, 1, res, pf); }

/* tt_store for rows row, row + 1 and tokens t0..t0+3 at once, the same IEEE double ops (bit-identical):
 * at K = 768 the scalar epilogue (8 hsums, 8 double divisions per tile) cost ~40% of the tile */
TT_AVX2_INLINE void tt_store_2x4(const tt_job *J, int t0, int row, int32_t res[2][4]) {
    const tt_ctx *c = J->c;
    const __m128i sx = _mm_loadu_si128((const __m128i *)(J->sx + t0));
    const __m256d rx = _mm256_div_pd(_mm256_set1_pd(1.0), _mm256_cvtps_pd(_mm_loadu_ps(J->xs + t0)));
    __m128 v[2];
    for (int r = 0; r < 2; r++) {
        const __m256d dd = _mm256_cvtepi32_pd(_mm_sub_epi32(_mm_loadu_si128((const __m128i *)res[r]), sx));
        const __m256d ws = _mm256_set1_pd((double)c->wscale[row + r]);
        v[r] = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_mul_pd(dd, ws), rx));
        if (c->bias) v[r] = _mm_add_ps(v[r], _mm_set1_ps(c->bias[row + r]));
    }
    const __m128 lo = _mm_unpacklo_ps(v[0], v[1]); /* r0t0 r1t0 r0t1 r1t1 */
    const __m128 hi = _mm_unpackhi_ps(v[0], v[1]); /* r0t2 r1t2 r0t3 r1t3 */
    float *o = J->out + (size_t)t0 * c->n + row;
    const size_t n = (size_t)c->n;
    _mm_storel_pi((__m64 *)o, lo);
    _mm_storeh_pi((__m64 *)(o + n), lo);
    _mm_storel_pi((__m64 *)(o + 2 * n), hi);
    _mm_storeh_pi((__m64 *)(o + 3 * n), hi);
}

/* GEMM: groups [g0, g1) in panels of panel_rows rows; per panel: token quads outer, row pairs inner */
TT_AVX2_FN static void tt_gemm_avx2(const tt_job *J, int g0, int g1) {
    const tt_ctx *c = J->c;
    const int kb = c->kb;
    int pg = J->p.panel_rows / 4;
    if (pg < 1) pg = 1;
    const size_t gstride = (size_t)kb * TT_GROUP_BYTES_PER_BLOCK;
    for (int p0 = g0; p0 < g1; p0 += pg) {
        const int p1 = p0 + pg < g1 ? p0 + pg : g1;
        for (int t0 = 0; t0 < J->m; t0 += 4) {
            const int T = J->m - t0 < 4 ? J->m - t0 : 4;
            const int8_t *x = J->xq + (size_t)t0 * J->ldx;
            for (int g = p0; g < p1; g++) {
                for (int rp = 0; rp < 2; rp++) {
                    const uint8_t *wp = c->w + g * gstride + 64 * rp;
                    /* the panel's first pass reads the weights from DRAM: 1.35-1.45x slower than
                     * from cache at M = 8 without it (700M shapes); row pair 1 reads the lines
                     * row pair 0 brought in */
                    const size_t pf = t0 == 0 && rp == 0 ? (size_t)J->p.pf : 0;
                    int32_t res[2][4];
                    switch (T) {
                        case 4: tt_tile_2x4(wp, x, J->ldx, kb, res, pf); break;
                        case 3: tt_tile_2x3(wp, x, J->ldx, kb, res, pf); break;
                        case 2: tt_tile_2x2(wp, x, J->ldx, kb, res, pf); break;
                        default: tt_tile_2x1(wp, x, J->ldx, kb, res, pf); break;
                    }
                    const int row = 4 * g + 2 * rp;
                    if (T == 4 && !J->dots && row + 1 < c->n) {
                        tt_store_2x4(J, t0, row, res);
                        continue;
                    }
                    for (int t = 0; t < T; t++) {
                        tt_store(J, t0 + t, row, res[0][t]);
                        tt_store(J, t0 + t, row + 1, res[1][t]);
                    }
                }
            }
        }
    }
}

#define TT_GEMV_MAX_M 3
static void tt_task_avx2(const void *arg, int chunk) {
    const tt_job *J = (const tt_job *)arg;
    int g0, g1;
    tt_chunk_groups(J, chunk, &g0, &g1);
    /* 2-3 tokens: the GEMV once per token over 8 groups at a time (32 rows: they stay in L1/L2
     * between tokens, so DRAM still sees the weights once) beats the 2 x T register tile, whose
     * loads and shifts per maddubs do not pay off until T = 4 (measured: M = 2 cost 2.2x M = 1) */
    if (J->m == 1) {
        tt_gemv_avx2(J, 0, g0, g1);
    } else if (J->m <= TT_GEMV_MAX_M) {
        for (int gb = g0; gb < g1; gb += 8) {
            const int ge = gb + 8 < g1 ? gb + 8 : g1;
            for (int t = 0; t < J->m; t++) tt_gemv_avx2(J, t, gb, ge);
        }
    } else {
        tt_gemm_avx2(J, g0, g1);
    }
}
#endif

/* the AVX-512 VNNI route (tt_ctx.isa == 2): tt_task_vnni, tt_cpu_has_avx512vnni */
#include "tritlm_avx512.c"
/* the AMX-INT8 routes for 2+ tokens (tt_ctx.isa == 3): tt_amxs_run, tt_amx_run, tt_cpu_has_amx */
#include "tritlm_amx.c"

static void tt_lb_run(tt_job *J, int nth); /* kinds 1-3: tritlm_intk.c */

/* chunking: GEMM = one panel per chunk; GEMV (and portable) = `chunks` chunks per thread, each of at
 * least min_blocks row-blocks (so tiny matrices stay on one thread). Chunks are claimed
 * dynamically, so a preempted thread does not hold up the others. */
static void tt_run(tt_job *J, int nth) {
    const tt_ctx *c = J->c;
    if (c->kind != TT_KIND_TERNARY) { tt_lb_run(J, nth); return; }
    J->p = c->params[tt_bucket(J->m)];
    if (nth <= 0) nth = P.nthreads;
    if (nth > TT_MAX_THREADS) nth = TT_MAX_THREADS;
#if TT_X86
    /* 2-3 tokens on the VNNI routes (on the AMX route, below both tile routes' thresholds): the
     * streaming GEMV's chunking, tt_vnni_gemv_tg per group pair */
    const int few = c->isa >= 2 && J->m >= 2 && J->m <= TT_VNNI_FEW_M &&
                    (c->isa == 2 || (J->m < c->amxs_min_m && J->m < c->amx_min_m));
#else
    const int few = 0;
#endif
    int gemm = J->m > 1 && c->isa && !few;
    if (few) J->p.pf = c->params[0].pf; /* a stream as the one-token GEMV's: its prefetch distance */
    if (gemm) {
        J->cg = J->p.panel_rows / 4 > 0 ? J->p.panel_rows / 4 : 1;
    } else if (nth <= 1) {
        J->cg = c->ngroups;
    } else {
        const long per = (long)nth * (J->p.chunks > 0 ? J->p.chunks : 1);
        long cg = ((long)c->ngroups + per - 1) / per;
        long mb = P.min_blocks > 0 ? P.min_blocks : 1;
        long cg_min = (mb + 4L * c->kb - 1) / (4L * c->kb);
        if (cg < cg_min) cg = cg_min;
        if (cg > c->ngroups) cg = c->ngroups;
        J->cg = (int)(cg < 1 ? 1 : cg);
    }
    const int nchunks = (c->ngroups + J->cg - 1) / J->cg;
#if TT_X86
    if (c->isa == 3 && !few && (tt_amxs_run(J, nth) == 0 || tt_amx_run(J, nth) == 0)) return;
    if (c->isa >= 2) { tt_parallel(tt_task_vnni, J, nchunks, nth); return; }
    if (c->isa) { tt_parallel(tt_task_avx2, J, nchunks, nth); return; }
#endif
    tt_parallel(tt_task_portable, J, nchunks, nth);
}

/* ============================================================== exported API */
int tt_abi_version(void) { return TT_ABI_VERSION; }
int tt_has_avx2(void) { return tt_cpu_has_avx2(); }
int tt_has_avx512vnni(void) { return tt_cpu_has_avx512vnni(); }
int tt_has_amx(void) { return tt_cpu_has_amx(); }

void tt_set_num_threads(int n) {
    if (n < 1) n = 1;
    if (n > TT_MAX_THREADS) n = TT_MAX_THREADS;
    pthread_mutex_lock(&P.call_lock);
    tt_init_once();
    P.nthreads = n;
    if (P.nworkers > n - 1) tt_pool_resize(n - 1);
    pthread_mutex_unlock(&P.call_lock);
}
int tt_get_num_threads(void) { return P.nthreads; }
void tt_set_spin_us(int us) { atomic_store(&P.spin_ns, (long)(us < 0 ? 0 : us) * 1000L); }
void tt_set_min_chunk_blocks(int b) { P.min_blocks = b < 1 ? 1 : b; }

tt_ctx *tt_ctx_new(const uint8_t *w, int n, int k, int kp, const float *wscale, const float *bias) {
    if (!w || n <= 0 || k <= 0 || kp % TT_BLOCK || kp < k) return NULL;
    tt_ctx *c = (tt_ctx *)calloc(1, sizeof(tt_ctx));
    if (!c) return NULL;
    c->w = w; c->n = n; c->k = k; c->kp = kp; c->kb = kp / TT_BLOCK; c->ngroups = (n + 3) / 4;
    c->wscale = (float *)malloc(sizeof(float) * n);
    if (!c->wscale) { free(c); return NULL; }
    memcpy(c->wscale, wscale, sizeof(float) * n);
    if (bias) {
        c->bias = (float *)malloc(sizeof(float) * n);
        if (!c->bias) { free(c->wscale); free(c); return NULL; }
        memcpy(c->bias, bias, sizeof(float) * n);
    }
    c->isa = tt_cpu_has_avx2();
    /* the weights-as-A tiles up to here: they re-unpack the weights for every 32 tokens but
     * without the activations-as-A route's gathers, which cost more below ~100 tokens at K <= 1536
     * and above ~35 at K >= 2048 (2 threads, weights from memory; 4608 x 1536 at 64 tokens 435
     * against 517 us, 8192 x 1536 740 / 928, 1536 x 1536 170 / 185, 1536 x 4096 431 / 322) */
    c->amx_min_m = c->kp <= 1536 ? 96 : 33;
    c->amxs_min_m = 4; /* 2-3 tokens: the VNNI streaming GEMV (tt_vnni_gemv_tg) */
    for (int i = 0; i < TT_NBUCKETS; i++) { c->params[i].pf = 2048; c->params[i].panel_rows = 32; c->params[i].chunks = 8; c->params[i].nta = 1; }
    return c;
}

void tt_ctx_free(tt_ctx *c) {
    if (!c) return;
    free(c->wscale); free(c->bias); free(c->xq); free(c->xs); free(c->sx); free(c->gscale); free(c->wsum); free(c->xv); free(c);
}

/* isa: 2 = AVX-512 VNNI (every kind; CPUs without it get AVX2), 1 = AVX2
 * (0 when the CPU lacks it), 0 = portable. Returns the isa in use. */
int tt_ctx_set_isa(tt_ctx *c, int isa) {
    const int vnni_kind = c->kind != TT_KIND_INT8 || c->wsum; /* int8 needs its row sums */
    if (isa == 3 && c->kind == TT_KIND_TERNARY && tt_cpu_has_amx()) return c->isa = 3;
    if (isa == 3) isa = 2; /* the other kinds' widest route is VNNI */
    if (isa == 2 && vnni_kind && tt_cpu_has_avx512vnni()) return c->isa = 2;
    c->isa = (isa && tt_cpu_has_avx2()) ? 1 : 0;
    return c->isa;
}
int tt_ctx_get_isa(const tt_ctx *c) { return c->isa; }
void tt_ctx_set_amx_min_m(tt_ctx *c, int m) { c->amx_min_m = m < 1 ? 1 : m; }
/* point the context at another copy of the same packed bytes (the caller moved them, e.g. onto
 * huge pages); under call_lock, so no call is reading the old copy when the caller frees it */
void tt_ctx_set_weights(tt_ctx *c, const uint8_t *w) {
    pthread_mutex_lock(&P.call_lock);
    c->w = w;
    pthread_mutex_unlock(&P.call_lock);
}
void tt_ctx_set_amxs_min_m(tt_ctx *c, int m) { c->amxs_min_m = m < 2 ? 2 : m; }
void tt_ctx_set_params(tt_ctx *c, int bucket, int pf, int panel_rows, int chunks, int nta) {
    if (bucket < 0 || bucket >= TT_NBUCKETS) return;
    c->params[bucket].nta = nta ? 1 : 0;
    c->params[bucket].chunks = chunks < 1 ? 1 : chunks;
    c->params[bucket].pf = pf < 0 ? 0 : pf;
    c->params[bucket].panel_rows = panel_rows < 4 ? 4 : (panel_rows / 4) * 4;
}

/* row r of a call whose rows are quantised by their producer (tt_forward_quantised_locked): what
 * tt_forward_f32_locked's quantiser writes for it; the workspace reserved for the call's m rows */
static inline void tt_quant_row_into(tt_ctx *c, const float *x, int r) {
    tt_quant_rows(x, 1, c->k, c->k, c->xq + (size_t)r * c->kp, c->kp, c->xs + r, c->sx + r, c->kp, c->isa);
}

/* tt_forward_f32_locked after its quantiser: rows 0..m-1 already in the workspace */
static void tt_forward_quantised_locked(tt_ctx *c, int m, float *out, int nth) {
    tt_job J = {.c = c, .xq = c->xq, .ldx = (size_t)c->kp, .m = m, .xs = c->xs, .sx = c->sx, .out = out, .dots = NULL};
    tt_run(&J, nth);
}

/* quantise x [m, k] (row stride ldx floats) into the workspace and run; out [m, n] float32: the
 * body of tt_forward_f32; caller holds call_lock */
static int tt_forward_f32_locked(tt_ctx *c, const float *x, int m, long ldx, float *out, int nth) {
    if (tt_reserve(c, m) != 0) return -1;
    tt_quant_rows_par(x, m, c->k, ldx, c->xq, c->kp, c->xs, c->sx, c->kp, c->isa, nth);
    tt_forward_quantised_locked(c, m, out, nth);
    return 0;
}

int tt_forward_f32(tt_ctx *c, const float *x, int m, long ldx, float *out, int nth) {
    if (m <= 0) return 0;
    pthread_mutex_lock(&P.call_lock);
    tt_init_once();
    const int rc = tt_forward_f32_locked(c, x, m, ldx, out, nth);
    pthread_mutex_unlock(&P.call_lock);
    return rc;
}

/* int8 activations xq [m, k] (row stride ldx bytes) with scales xs [m]; out float32 [m, n], or
 * (out == NULL) raw integer dots sum_k w*x into dots int32 [m, n]. */
int tt_forward_i8(tt_ctx *c, const int8_t *xq, int m, long ldx, const float *xs, float *out, int32_t *dots, int nth) {
    if (m <= 0) return 0;
    if (!out && c->kind == TT_KIND_INT4) return -2; /* group scales: no single integer dot per row */
    pthread_mutex_lock(&P.call_lock);
    tt_init_once();
    if (tt_reserve(c, m) != 0) { pthread_mutex_unlock(&P.call_lock); return -1; }
    const int8_t *xp = xq;
    size_t ld = (size_t)ldx;
    const int copy = c->k != c->kp; /* the kernels read whole blocks (128 / 32 / 64 / 128 wide) */
    if (copy) {
        for (int t = 0; t < m; t++) {
            memcpy(c->xq + (size_t)t * c->kp, xq + (size_t)t * ldx, (size_t)c->k);
            memset(c->xq + (size_t)t * c->kp + c->k, 0, (size_t)(c->kp - c->k));
        }
        xp = c->xq; ld = (size_t)c->kp;
    }
    for (int t = 0; t < m; t++) {
        int32_t s = 0;
        const int8_t *r = xp + (size_t)t * ld;
        for (int i = 0; i < c->k; i++) s += r[i];
        c->sx[t] = s;
    }
    tt_job J = {.c = c, .xq = xp, .ldx = ld, .m = m, .xs = xs, .sx = c->sx, .out = out, .dots = out ? NULL : dots};
    tt_run(&J, nth);
    pthread_mutex_unlock(&P.call_lock);
    return 0;
}

/* standalone quantiser: q [m, ldq] (columns k..kp-1 zeroed), scale [m], sumx [m] (may be NULL) */
void tt_quantize(const float *x, int m, int k, long ldx, int8_t *q, long ldq, int kp, float *scale, int32_t *sumx, int isa) {
    int32_t tmp;
    isa = isa && tt_cpu_has_avx2();
    for (int t = 0; t < m; t++)
        tt_quant_rows(x + (size_t)t * ldx, 1, k, ldx, q + (size_t)t * ldq, ldq, scale + t, sumx ? sumx + t : &tmp, kp, isa);
}

/* int8 / int4 / binary weight kinds (tt_lb_run, tt_ctx_new_int8/int4/binary) */
#include "tritlm_intk.c"
/* fp16-weight GEMV for the LM head, and the half <-> float conversions the decode step's KV cache uses */
#include "tritlm_f16.c"
/* the fused one-token decode step of a whole model (tritlm/infer/engine.py uses it) */
#include "tritlm_decode.c"
