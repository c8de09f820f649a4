/*
 * AMX-INT8 route for ternary weights (tt_ctx.isa == 3), for prompts: a call with at least
 * tt_amx_min_m tokens runs here, fewer (decode, small batches) take the AVX-512 VNNI route, which
 * this route includes. TDPBUSD multiplies a 16 x 64 tile of unsigned bytes by a 64 x 16 tile of
 * signed bytes into 16 x 16 int32 sums, 16384 products per instruction.
 *
 * A = the weights: a panel of 32 rows (8 i2s_r4 groups) is unpacked once into 2-bit codes 0..2,
 * one byte each (32 x kp bytes of per-thread scratch), and read as two 16-row tiles per 64 inputs.
 * B = the activations: the int8 rows laid out once per call as B wants them ("VNNI" order:
 * 4 consecutive inputs of a token side by side, tokens across; [kp / 4][mp][4] bytes, mp = the
 * token count rounded up to 32 with zero tokens). Four C tiles hold a 32-row x 32-token block for
 * the whole K loop (2 A + 2 B + 4 C = the 8 tiles).
 *
 * The sums are the same exact integers as every other route (codes times activations, minus the
 * token's activation sum), and the epilogue is tt_store's arithmetic in the same IEEE double
 * operations, vectorised over 16 rows: the results are bit-identical to the portable route.
 *
 * Linux gives a process the AMX tile-data state only when asked (arch_prctl ARCH_REQ_XCOMP_PERM);
 * tt_cpu_has_amx asks, and says no when the CPU, XCR0 or the kernel says no. Each chunk loads its
 * tile configuration and releases the tiles when done, so other AMX users on the same thread
 * (oneDNN inside torch) never see our configuration, nor we theirs. Compiled with target
 * attributes only, like the other routes.
 */
#if TT_X86
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define TT_AMX_TARGET "amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma"
#define TT_AMX_FN __attribute__((target(TT_AMX_TARGET)))
#define TT_AMX_ROWS 32 /* rows per panel: two 16-row A tiles */
#define TT_AMX_TOK 32  /* tokens per block: two 16-token B tiles */

typedef struct {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tt_amx_cfg;

/* CPUID leaf 7 EDX bits 24 / 25 (AMX-TILE, AMX-INT8), XCR0 bits 17 / 18 (tile config and tile
 * data state enabled by the OS), the VNNI route this one falls back to, and Linux's permission */
static int tt_cpu_has_amx(void) {
    if (!tt_cpu_has_avx512vnni()) return 0;
    unsigned a, b, c, d;
    __cpuid_count(7, 0, a, b, c, d);
    if (!((d >> 24) & 1) || !((d >> 25) & 1)) return 0;
    unsigned lo, hi;
    __asm__ __volatile__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    (void)hi;
    if ((lo & (3u << 17)) != (3u << 17)) return 0;
#if defined(__linux__) && defined(SYS_arch_prctl)
    /* ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA; granted once per process, asking again is a no-op */
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#else
    return 0;
#endif
}

/* per-thread scratch for a panel's unpacked codes (pool threads live as long as the process) */
static _Thread_local uint8_t *tt_amx_wu;
static _Thread_local size_t tt_amx_wu_cap;

static uint8_t *tt_amx_scratch(size_t n) {
    if (n > tt_amx_wu_cap) {
        uint8_t *p = (uint8_t *)tt_aligned_alloc(n);
        if (!p) return NULL;
        free(tt_amx_wu);
        tt_amx_wu = p;
        tt_amx_wu_cap = n;
    }
    return tt_amx_wu;
}

/* the activations in B's order: xv[(kr * mp + t) * 4 + i] = xq[t, 4 kr + i], zero for t >= m.
 * Chunks of 16 kr (64 bytes of each token's row) over the pool. */
typedef struct { const int8_t *xq; size_t ldx; int m, mp, nkr; int32_t *xv; } tt_amx_xjob;

static void tt_amx_layout_task(const void *arg, int chunk) {
    const tt_amx_xjob *X = (const tt_amx_xjob *)arg;
    const int k0 = chunk * 16, k1 = k0 + 16 < X->nkr ? k0 + 16 : X->nkr;
    const size_t mp = (size_t)X->mp;
    for (int t = 0; t < X->m; t++) {
        int32_t r[16];
        memcpy(r, X->xq + (size_t)t * X->ldx + 4 * (size_t)k0, 4 * (size_t)(k1 - k0));
        for (int kr = k0; kr < k1; kr++) X->xv[kr * mp + t] = r[kr - k0];
    }
    for (int kr = k0; kr < k1; kr++) memset(X->xv + kr * mp + X->m, 0, 4 * (mp - (size_t)X->m));
}

/* into the context's workspace c->xv (grown as needed); -1 when out of memory */
static int tt_amx_layout_x(tt_ctx *c, const int8_t *xq, size_t ldx, int m, int mp, int nth) {
    const size_t need = (size_t)c->kp * (size_t)mp;
    if (need > c->xv_cap) {
        int8_t *p = (int8_t *)tt_aligned_alloc(need);
        if (!p) return -1;
        free(c->xv);
        c->xv = p;
        c->xv_cap = need;
    }
    tt_amx_xjob X = {.xq = xq, .ldx = ldx, .m = m, .mp = mp, .nkr = c->kp / 4, .xv = (int32_t *)c->xv};
    tt_parallel(tt_amx_layout_task, &X, (X.nkr + 15) / 16, nth);
    return 0;
}

/* ngr (<= 8) groups of 4 rows from w (i2s_r4, kb blocks a row) into one code byte per weight:
 * row r of the panel at wu + r * ldw, rows past 4 ngr zero */
TT_AMX_FN static void tt_amx_unpack(const uint8_t *w, int kb, int ngr, uint8_t *wu, size_t ldw) {
    const __m512i m3 = _mm512_set1_epi8(3);
    for (int g = 0; g < ngr; g++) {
        uint8_t *r0 = wu + (size_t)(4 * g) * ldw;
        for (int b = 0; b < kb; b++) {
            const uint8_t *wb = w + ((size_t)g * kb + b) * TT_GROUP_BYTES_PER_BLOCK;
            const __m512i v01 = _mm512_loadu_si512((const void *)wb);
            const __m512i v23 = _mm512_loadu_si512((const void *)(wb + 64));
            uint8_t *o = r0 + (size_t)b * TT_BLOCK;
#define TT_UNPACK_Q(Q)                                                                                   \
    do {                                                                                                 \
        const __m512i u01 = _mm512_and_si512(_mm512_srli_epi16(v01, 2 * (Q)), m3);                      \
        const __m512i u23 = _mm512_and_si512(_mm512_srli_epi16(v23, 2 * (Q)), m3);                      \
        _mm256_storeu_si256((__m256i *)(o + 32 * (Q)), _mm512_castsi512_si256(u01));                    \
        _mm256_storeu_si256((__m256i *)(o + ldw + 32 * (Q)), _mm512_extracti64x4_epi64(u01, 1));        \
        _mm256_storeu_si256((__m256i *)(o + 2 * ldw + 32 * (Q)), _mm512_castsi512_si256(u23));          \
        _mm256_storeu_si256((__m256i *)(o + 3 * ldw + 32 * (Q)), _mm512_extracti64x4_epi64(u23, 1));    \
    } while (0)
            TT_UNPACK_Q(0);
            TT_UNPACK_Q(1);
            TT_UNPACK_Q(2);
            TT_UNPACK_Q(3);
#undef TT_UNPACK_Q
        }
    }
    if (ngr < TT_AMX_ROWS / 4) memset(wu + (size_t)(4 * ngr) * ldw, 0, (size_t)(TT_AMX_ROWS - 4 * ngr) * ldw);
}

/* tt_store over a 32-row x 32-token block of raw sums acc[row][token] (row-major, 32 wide):
 * per token, 16 rows at a time, the same double operations (bit-identical) */
TT_AMX_FN static void tt_amx_store(const tt_job *J, const int32_t *acc, int row0, int t0, int nt) {
    const tt_ctx *c = J->c;
    const int nr = c->n - row0 < TT_AMX_ROWS ? c->n - row0 : TT_AMX_ROWS;
    const size_t n = (size_t)c->n;
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(TT_AMX_TOK));
    for (int h = 0; h < nr; h += 16) {
        const int rows = nr - h < 16 ? nr - h : 16;
        const __mmask16 mk = (__mmask16)(rows == 16 ? 0xFFFF : (1u << rows) - 1);
        const __mmask8 mlo = (__mmask8)(mk & 0xFF), mhi = (__mmask8)(mk >> 8);
        /* rows past n read scale 1 (their lanes are never stored) */
        const __m512d ws0 = _mm512_cvtps_pd(_mm256_mask_loadu_ps(_mm256_set1_ps(1.0f), mlo, c->wscale + row0 + h));
        const __m512d ws1 = _mm512_cvtps_pd(_mm256_mask_loadu_ps(_mm256_set1_ps(1.0f), mhi, c->wscale + row0 + h + 8));
        __m512 bias = _mm512_setzero_ps();
        if (c->bias) bias = _mm512_maskz_loadu_ps(mk, c->bias + row0 + h);
        for (int t = 0; t < nt; t++) {
            const int tg = t0 + t;
            __m512i s = _mm512_i32gather_epi32(idx, (const void *)(acc + (size_t)h * TT_AMX_TOK + t), 4);
            s = _mm512_sub_epi32(s, _mm512_set1_epi32(J->sx[tg]));
            if (J->dots) {
                _mm512_mask_storeu_epi32(J->dots + (size_t)tg * n + row0 + h, mk, s);
                continue;
            }
            const __m512d xs = _mm512_set1_pd((double)J->xs[tg]);
            const __m512d d0 = _mm512_cvtepi32_pd(_mm512_castsi512_si256(s));
            const __m512d d1 = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(s, 1));
            const __m256 f0 = _mm512_cvtpd_ps(_mm512_div_pd(_mm512_mul_pd(d0, ws0), xs));
            const __m256 f1 = _mm512_cvtpd_ps(_mm512_div_pd(_mm512_mul_pd(d1, ws1), xs));
            __m512 v = _mm512_insertf32x8(_mm512_castps256_ps512(f0), f1, 1);
            if (c->bias) v = _mm512_add_ps(v, bias);
            _mm512_mask_storeu_ps(J->out + (size_t)tg * n + row0 + h, mk, v);
        }
    }
}

/* one panel (rows 4 g0 .. 4 g0 + 31, unpacked at wu, stride kp) against every token block */
TT_AMX_FN static void tt_amx_panel(const tt_job *J, int g0, const uint8_t *wu) {
    const tt_ctx *c = J->c;
    const int nk = c->kp / 64;
    const size_t ldw = (size_t)c->kp;
    const int mp = (J->m + TT_AMX_TOK - 1) / TT_AMX_TOK * TT_AMX_TOK;
    const size_t ldb = (size_t)mp * 4;
    int32_t acc[TT_AMX_ROWS * TT_AMX_TOK] __attribute__((aligned(64)));
    for (int t0 = 0; t0 < J->m; t0 += TT_AMX_TOK) {
        const int nt = J->m - t0 < TT_AMX_TOK ? J->m - t0 : TT_AMX_TOK;
        const int8_t *xb = J->c->xv + (size_t)t0 * 4;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        if (nt > 16) {
            for (int kk = 0; kk < nk; kk++) {
                _tile_loadd(4, wu + (size_t)kk * 64, ldw);
                _tile_loadd(6, xb + (size_t)kk * 16 * ldb, ldb);
                _tile_dpbusd(0, 4, 6);
                _tile_loadd(7, xb + (size_t)kk * 16 * ldb + 64, ldb);
                _tile_dpbusd(1, 4, 7);
                _tile_loadd(5, wu + 16 * ldw + (size_t)kk * 64, ldw);
                _tile_dpbusd(2, 5, 6);
                _tile_dpbusd(3, 5, 7);
            }
        } else {
            for (int kk = 0; kk < nk; kk++) {
                _tile_loadd(4, wu + (size_t)kk * 64, ldw);
                _tile_loadd(6, xb + (size_t)kk * 16 * ldb, ldb);
                _tile_dpbusd(0, 4, 6);
                _tile_loadd(5, wu + 16 * ldw + (size_t)kk * 64, ldw);
                _tile_dpbusd(2, 5, 6);
            }
        }
        /* acc[row][token]: C tile (row half r, token half t) at acc + 16 r * 32 + 16 t */
        _tile_stored(0, acc, TT_AMX_TOK * 4);
        _tile_stored(2, acc + 16 * TT_AMX_TOK, TT_AMX_TOK * 4);
        if (nt > 16) {
            _tile_stored(1, acc + 16, TT_AMX_TOK * 4);
            _tile_stored(3, acc + 16 * TT_AMX_TOK + 16, TT_AMX_TOK * 4);
        }
        tt_amx_store(J, acc, 4 * g0, t0, nt);
    }
}

TT_AMX_FN static void tt_amx_chunk(const tt_job *J, int g0, int g1, uint8_t *wu) {
    tt_amx_cfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) { cfg.colsb[i] = 64; cfg.rows[i] = 16; }
    _tile_loadconfig(&cfg);
    const tt_ctx *c = J->c;
    const size_t gstride = (size_t)c->kb * TT_GROUP_BYTES_PER_BLOCK;
    for (int p0 = g0; p0 < g1; p0 += TT_AMX_ROWS / 4) {
        const int ngr = g1 - p0 < TT_AMX_ROWS / 4 ? g1 - p0 : TT_AMX_ROWS / 4;
        tt_amx_unpack(c->w + (size_t)p0 * gstride, c->kb, ngr, wu, (size_t)c->kp);
        tt_amx_panel(J, p0, wu);
    }
    _tile_release();
}

/* a chunk of groups through the tiles; without scratch memory, through the VNNI route */
static void tt_task_amx(const void *arg, int chunk) {
    const tt_job *J = (const tt_job *)arg;
    int g0, g1;
    tt_chunk_groups(J, chunk, &g0, &g1);
    uint8_t *wu = tt_amx_scratch((size_t)TT_AMX_ROWS * J->c->kp);
    if (!wu) { tt_task_vnni(arg, chunk); return; }
    tt_amx_chunk(J, g0, g1, wu);
}

/* Run job J through AMX when it has enough tokens: lays the activations out for B (in the context's
 * workspace, hence the cast: every context is a heap object of its owner) and spreads the panels
 * over the pool. Returns 0 when it ran, -1 to let the caller take another route. */
static int tt_amx_run(tt_job *J, int nth) {
    tt_ctx *c = (tt_ctx *)J->c;
    if (J->m < c->amx_min_m) return -1;
    const int mp = (J->m + TT_AMX_TOK - 1) / TT_AMX_TOK * TT_AMX_TOK;
    if (tt_amx_layout_x(c, J->xq, J->ldx, J->m, mp, nth) != 0) return -1;
    J->cg = TT_AMX_ROWS / 4;
    tt_parallel(tt_task_amx, J, (c->ngroups + J->cg - 1) / J->cg, nth);
    return 0;
}
#else
static int tt_cpu_has_amx(void) { return 0; }
#endif
