/*
 * AMX-INT8 route for ternary weights (tt_ctx.isa == 3), for prompts: a call with at least
 * amx_min_m tokens (default 16) runs here, fewer (decode, small batches) take the AVX-512 VNNI
 * route, which this route includes. TDPBSUD multiplies a 16 x 64 tile of signed bytes by a
 * 64 x 16 tile of unsigned bytes into 16 x 16 int32 sums: 16384 products per instruction.
 *
 * A = the activations: 16 tokens' int8 rows, read in place (a token count that is not a multiple
 * of 16 has its last rows copied into a zero-padded block). B = the weights: a panel of 32 rows
 * (8 i2s_r4 groups) is unpacked once per call into 2-bit codes 0..2, one byte each, in the order
 * B wants ("VNNI": 4 consecutive inputs of a row side by side, 16 rows across, one 1 KB tile per
 * 64 inputs and 16 rows) into 32 x kp bytes of per-thread scratch. The unpacking gathers the
 * same 4 bytes of 16 rows' 32-byte blocks into one vector; each of the 4 shifts of the 2-bit
 * fields gives one tile row. Four C tiles hold a 32-token x 32-row block of sums over the whole
 * K loop (2 A + 2 B + 4 C = the 8 tiles), token-major, so the epilogue writes rows of the output.
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

/* per-thread scratch for a panel's B tiles (pool threads live as long as the process) */
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

/* ngr (<= 8) groups of 4 rows from w (i2s_r4, kb blocks a row) into B tiles: the tile of inputs
 * 64 kk .. 64 kk + 63 and panel rows 16 h .. 16 h + 15 at wb + (2 kk + h) * 1024, its row kr holding
 * the codes of inputs 64 kk + 4 kr .. + 3 for each of the 16 rows. Rows past 4 ngr are zero. */
TT_AMX_FN static void tt_amx_unpack(const uint8_t *w, int kb, int ngr, uint8_t *wb) {
    const __m512i m3 = _mm512_set1_epi8(3);
    const size_t gstride = (size_t)kb * TT_GROUP_BYTES_PER_BLOCK;
    for (int h = 0; h < 2; h++) {
        /* lane r: byte offset of row 16 h + r's first block; rows past the panel read row 0 and are masked */
        int off[16];
        for (int r = 0; r < 16; r++) {
            const int g = 4 * h + r / 4;
            off[r] = g < ngr ? (int)((size_t)g * gstride + (size_t)(r % 4) * 32) : 0;
        }
        const __m512i idx = _mm512_loadu_si512((const void *)off);
        const int live = ngr - 4 * h; /* groups of this half inside the panel */
        const __mmask16 mk = live >= 4 ? (__mmask16)0xFFFF : (live <= 0 ? (__mmask16)0 : (__mmask16)((1u << (4 * live)) - 1));
        for (int b = 0; b < kb; b++) {
            const uint8_t *base = w + (size_t)b * TT_GROUP_BYTES_PER_BLOCK;
            uint8_t *t0 = wb + ((size_t)(4 * b) + h) * 1024;       /* kk = 2 b */
            uint8_t *t1 = wb + ((size_t)(4 * b + 2) + h) * 1024;   /* kk = 2 b + 1 */
            for (int j = 0; j < 8; j++) {
                const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mk, idx, (const void *)(base + 4 * j), 1);
                _mm512_storeu_si512((void *)(t0 + 64 * j), _mm512_and_si512(v, m3));
                _mm512_storeu_si512((void *)(t0 + 64 * (j + 8)), _mm512_and_si512(_mm512_srli_epi32(v, 2), m3));
                _mm512_storeu_si512((void *)(t1 + 64 * j), _mm512_and_si512(_mm512_srli_epi32(v, 4), m3));
                _mm512_storeu_si512((void *)(t1 + 64 * (j + 8)), _mm512_and_si512(_mm512_srli_epi32(v, 6), m3));
            }
        }
    }
}

/* tt_store over a 32-token x 32-row block of raw sums acc[token][row] (32 wide): per token, 16 rows
 * at a time, the same double operations (bit-identical) */
TT_AMX_FN static void tt_amx_store(const tt_job *J, const int32_t *acc, int row0, int t0, int nt) {
    const tt_ctx *c = J->c;
    const int nr = c->n - row0 < TT_AMX_ROWS ? c->n - row0 : TT_AMX_ROWS;
    const size_t n = (size_t)c->n;
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
            const __m512i s = _mm512_sub_epi32(_mm512_loadu_si512((const void *)(acc + (size_t)t * TT_AMX_ROWS + h)),
                                               _mm512_set1_epi32(J->sx[tg]));
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

/* the 16-token block at t0: its rows in place, or (the last, partial one) the zero-padded copy */
static inline const int8_t *tt_amx_xblock(const tt_job *J, int t0, size_t *ld) {
    if (t0 + 16 <= J->m) { *ld = J->ldx; return J->xq + (size_t)t0 * J->ldx; }
    *ld = (size_t)J->c->kp;
    return J->c->xv;
}

/* one panel (rows 4 g0 .. 4 g0 + 31, its B tiles at wb) against every token block */
TT_AMX_FN static void tt_amx_panel(const tt_job *J, int g0, const uint8_t *wb) {
    const int nk = J->c->kp / 64;
    int32_t acc[TT_AMX_TOK * TT_AMX_ROWS] __attribute__((aligned(64)));
    for (int t0 = 0; t0 < J->m; t0 += TT_AMX_TOK) {
        const int nt = J->m - t0 < TT_AMX_TOK ? J->m - t0 : TT_AMX_TOK;
        size_t l0, l1 = 0;
        const int8_t *x0 = tt_amx_xblock(J, t0, &l0);
        const int8_t *x1 = nt > 16 ? tt_amx_xblock(J, t0 + 16, &l1) : NULL;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        if (x1) {
            for (int kk = 0; kk < nk; kk++) {
                const uint8_t *bk = wb + (size_t)kk * 2048;
                _tile_loadd(6, bk, 64);
                _tile_loadd(4, x0 + (size_t)kk * 64, l0);
                _tile_dpbsud(0, 4, 6);
                _tile_loadd(7, bk + 1024, 64);
                _tile_dpbsud(1, 4, 7);
                _tile_loadd(5, x1 + (size_t)kk * 64, l1);
                _tile_dpbsud(2, 5, 6);
                _tile_dpbsud(3, 5, 7);
            }
        } else {
            for (int kk = 0; kk < nk; kk++) {
                const uint8_t *bk = wb + (size_t)kk * 2048;
                _tile_loadd(4, x0 + (size_t)kk * 64, l0);
                _tile_loadd(6, bk, 64);
                _tile_dpbsud(0, 4, 6);
                _tile_loadd(7, bk + 1024, 64);
                _tile_dpbsud(1, 4, 7);
            }
        }
        /* acc[token][row]: C tile (token half a, row half h) at acc + 16 a * 32 + 16 h */
        _tile_stored(0, acc, TT_AMX_ROWS * 4);
        _tile_stored(1, acc + 16, TT_AMX_ROWS * 4);
        if (x1) {
            _tile_stored(2, acc + 16 * TT_AMX_ROWS, TT_AMX_ROWS * 4);
            _tile_stored(3, acc + 16 * TT_AMX_ROWS + 16, TT_AMX_ROWS * 4);
        }
        tt_amx_store(J, acc, 4 * g0, t0, nt);
    }
}

TT_AMX_FN static void tt_amx_chunk(const tt_job *J, int g0, int g1, uint8_t *wb) {
    tt_amx_cfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) { cfg.colsb[i] = 64; cfg.rows[i] = 16; }
    _tile_loadconfig(&cfg);
    const tt_ctx *c = J->c;
    const size_t gstride = (size_t)c->kb * TT_GROUP_BYTES_PER_BLOCK;
    for (int p0 = g0; p0 < g1; p0 += TT_AMX_ROWS / 4) {
        const int ngr = g1 - p0 < TT_AMX_ROWS / 4 ? g1 - p0 : TT_AMX_ROWS / 4;
        tt_amx_unpack(c->w + (size_t)p0 * gstride, c->kb, ngr, wb);
        tt_amx_panel(J, p0, wb);
    }
    _tile_release();
}

/* a chunk of groups through the tiles; without scratch memory, through the VNNI route */
static void tt_task_amx(const void *arg, int chunk) {
    const tt_job *J = (const tt_job *)arg;
    int g0, g1;
    tt_chunk_groups(J, chunk, &g0, &g1);
    uint8_t *wb = tt_amx_scratch((size_t)TT_AMX_ROWS * J->c->kp);
    if (!wb) { tt_task_vnni(arg, chunk); return; }
    tt_amx_chunk(J, g0, g1, wb);
}

/* Run job J through AMX when it has enough tokens: copies a partial last 16-token block into the
 * context's zero-padded workspace (hence the cast: every context is a heap object of its owner)
 * and spreads the panels over the pool. Returns 0 when it ran, -1 to let the caller take another
 * route. */
static int tt_amx_run(tt_job *J, int nth) {
    tt_ctx *c = (tt_ctx *)J->c;
    if (J->m < c->amx_min_m) return -1;
    const int tail = J->m % 16;
    if (tail) {
        const size_t need = (size_t)16 * c->kp;
        if (need > c->xv_cap) {
            int8_t *p = (int8_t *)tt_aligned_alloc(need);
            if (!p) return -1;
            free(c->xv);
            c->xv = p;
            c->xv_cap = need;
        }
        const int t0 = J->m - tail;
        for (int t = 0; t < tail; t++) memcpy(c->xv + (size_t)t * c->kp, J->xq + (size_t)(t0 + t) * J->ldx, (size_t)c->kp);
        memset(c->xv + (size_t)tail * c->kp, 0, (size_t)(16 - tail) * c->kp);
    }
    J->cg = TT_AMX_ROWS / 4;
    tt_parallel(tt_task_amx, J, (c->ngroups + J->cg - 1) / J->cg, nth);
    return 0;
}
#else
static int tt_cpu_has_amx(void) { return 0; }
#endif
