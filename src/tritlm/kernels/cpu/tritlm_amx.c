/*
 * AMX-INT8 routes for ternary weights (tt_ctx.isa == 3). Prompts: a call with at least amx_min_m
 * tokens (default 96 at K <= 1536, else 33: tt_ctx_new) runs the tiles as below. Batched decode: calls of amxs_min_m (default 4) to
 * amx_min_m - 1 tokens run the weights-as-A tiles (the second half of this file). One token takes
 * the AVX-512 VNNI GEMV, which these routes include, and 2-3 tokens below amxs_min_m its
 * few-token form (tt_vnni_gemv_tg). TDPBSUD multiplies a 16 x 64 tile of signed
 * bytes by a 64 x 16 tile of unsigned bytes into 16 x 16 int32 sums: 16384 products per
 * instruction.
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
#define TT_AMX_INLINE static inline __attribute__((always_inline, target(TT_AMX_TARGET)))
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
        tt_vnni_store_block(J, acc, TT_AMX_ROWS, 1, 4 * g0, TT_AMX_ROWS, t0, nt);
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
        /* the chunk's next panel into L2 while this one's token blocks run: without it, each
         * panel's unpacking waited on memory with the tiles idle */
        const int p1 = p0 + TT_AMX_ROWS / 4;
        if (p1 < g1) {
            const char *q = (const char *)(c->w + (size_t)p1 * gstride);
            const size_t nb = (size_t)(g1 - p1 < TT_AMX_ROWS / 4 ? g1 - p1 : TT_AMX_ROWS / 4) * gstride;
            for (size_t o = 0; o < nb; o += 64) _mm_prefetch(q + o, _MM_HINT_T1);
        }
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

/* ------------------------------------------------------------------ weights as A
 * Below amx_min_m tokens the roles swap: A = 16 weight rows x 64 inputs of 2-bit codes
 * (unsigned), B = the activations (signed), transposed once per call so that a tile row holds 4
 * consecutive inputs of every token, C = 16 rows x up to 16 tokens. A row of A is one row's
 * 32-byte block slice broadcast to both halves of a vector, shifted by 0 | 2 (inputs 0..63 of the
 * block) or 4 | 6 (64..127) and masked: no gathers, and each unpacked tile feeds one TDPBUSD for
 * 16 tokens at once. A panel of 32 rows runs the tokens in passes of up to 32 (tiles 0, 1, 6, 7 =
 * C for 2 row halves x 2 token halves, 2, 3 = A, 4, 5 = B), re-unpacking its weights each pass. */

/* tt_amxs_transpose's pass of 8 tokens (x: their rows, ldx bytes apart), 16 int32 entries of each
 * row at a time: two rounds of unpacks give each 128-bit lane of b[k] (k < 4) tokens 0-3 of entry
 * 4 L + k and of b[4 + k] tokens 4-7 of it. A serial scalar loop of 4-byte copies was ~1.5 us of
 * each 8-row call (~0.15 ms of a 700M step at 8 sequences). */
TT_AMX_FN static void tt_amxs_transpose8(const int8_t *x, size_t ldx, int nq, int32_t *d) {
    int q0 = 0;
    for (; q0 + 16 <= nq; q0 += 16) {
        __m512i z[8], a[8], b[8];
        for (int t = 0; t < 8; t++) z[t] = _mm512_loadu_si512((const void *)(x + (size_t)t * ldx + 4 * (size_t)q0));
        for (int h = 0; h < 2; h++)
            for (int i = 0; i < 2; i++) {
                const __m512i lo = z[4 * h + 2 * i], hi = z[4 * h + 2 * i + 1];
                a[4 * h + 2 * i] = _mm512_unpacklo_epi32(lo, hi);     /* entries 4L + 0, 1 */
                a[4 * h + 2 * i + 1] = _mm512_unpackhi_epi32(lo, hi); /* entries 4L + 2, 3 */
            }
        for (int h = 0; h < 2; h++) {
            b[4 * h + 0] = _mm512_unpacklo_epi64(a[4 * h + 0], a[4 * h + 2]);
            b[4 * h + 1] = _mm512_unpackhi_epi64(a[4 * h + 0], a[4 * h + 2]);
            b[4 * h + 2] = _mm512_unpacklo_epi64(a[4 * h + 1], a[4 * h + 3]);
            b[4 * h + 3] = _mm512_unpackhi_epi64(a[4 * h + 1], a[4 * h + 3]);
        }
        int32_t *o = d + (size_t)q0 * 8;
        for (int k = 0; k < 4; k++) {
            /* entries 4 L + k for L = 0..3: tokens 0-3 from b[k] lane L, 4-7 from b[4 + k] lane L */
            const __m512i lo01 = _mm512_shuffle_i32x4(b[k], b[4 + k], _MM_SHUFFLE(1, 0, 1, 0)); /* lanes b0 b1 c0 c1 */
            const __m512i lo23 = _mm512_shuffle_i32x4(b[k], b[4 + k], _MM_SHUFFLE(3, 2, 3, 2));
            const __m512i e01 = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 1, 4, 5, 2, 3, 6, 7), lo01);
            const __m512i e23 = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 1, 4, 5, 2, 3, 6, 7), lo23);
            /* e01: entry k (L 0) then entry 4 + k (L 1), 8 tokens each; e23: entries 8 + k, 12 + k */
            _mm256_storeu_si256((__m256i *)(void *)(o + 8 * k), _mm512_castsi512_si256(e01));
            _mm256_storeu_si256((__m256i *)(void *)(o + 8 * (4 + k)), _mm512_extracti64x4_epi64(e01, 1));
            _mm256_storeu_si256((__m256i *)(void *)(o + 8 * (8 + k)), _mm512_castsi512_si256(e23));
            _mm256_storeu_si256((__m256i *)(void *)(o + 8 * (12 + k)), _mm512_extracti64x4_epi64(e23, 1));
        }
    }
    for (; q0 < nq; q0++)
        for (int t = 0; t < 8; t++) memcpy(d + (size_t)q0 * 8 + t, x + (size_t)t * ldx + 4 * (size_t)q0, 4);
}

/* The activations of passes of up to 32 tokens: pass p (tokens t0 .. t0 + np - 1) at byte t0 * kp,
 * its entry (q, t) = token t's inputs 4 q .. 4 q + 3 (one int32) at (q * np + t - t0) * 4 */
static void tt_amxs_transpose(const tt_job *J, uint8_t *xt) {
    const int m = J->m, nq = J->c->kp / 4;
    for (int t0 = 0; t0 < m; t0 += 32) {
        const int np = m - t0 < 32 ? m - t0 : 32;
        int32_t *d = (int32_t *)(void *)(xt + (size_t)t0 * J->c->kp);
        if (np == 8) {
            tt_amxs_transpose8(J->xq + (size_t)t0 * J->ldx, J->ldx, nq, d);
            continue;
        }
        for (int t = 0; t < np; t++) {
            const int8_t *x = J->xq + (size_t)(t0 + t) * J->ldx;
            for (int q = 0; q < nq; q++) memcpy(d + (size_t)q * np + t, x + 4 * (size_t)q, 4);
        }
    }
}

/* block b of the panel's 32 rows (group bases gp[0..7]) into A tiles at a: [row half][input half]
 * [16 rows x 64 codes]. Unrolled: with a loop the address arithmetic, not the vector work, was
 * the bottleneck. */
TT_AMX_INLINE void tt_amxs_unpack(const uint8_t *const gp[8], size_t off, uint8_t *a) {
    const __m512i sh01 = _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0), sh23 = _mm512_set_epi64(6, 6, 6, 6, 4, 4, 4, 4);
    const __m512i m3 = _mm512_set1_epi8(3);
#pragma GCC unroll 8
    for (int g = 0; g < 8; g++) {
        const uint8_t *src = gp[g] + off;
#pragma GCC unroll 4
        for (int s = 0; s < 4; s++) {
            const int r = 4 * g + s;
            const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(const void *)(src + 32 * s)));
            uint8_t *d = a + (size_t)(r >> 4) * 2048 + (size_t)(r & 15) * 64;
            _mm512_store_si512((void *)d, _mm512_and_si512(_mm512_srlv_epi64(v, sh01), m3));
            _mm512_store_si512((void *)(d + 1024), _mm512_and_si512(_mm512_srlv_epi64(v, sh23), m3));
        }
    }
}

/* A panel's sums waiting for their epilogue, which runs spread over the next panel's blocks: C
 * tiles 0 / 1 (tokens t0 .. t0 + 15 of row halves a / b) at cr, cr + 256, tiles 6 / 7 (tokens
 * t0 + 16 ..) at cr + 512, cr + 768, row-major (row r's sums at + 16 r); `done` of the 2 np units
 * stored (unit u: token u % np of row half u / np). Run in one piece after the panel's K loop,
 * the epilogue left the weight stream without requests: the next panel's prefetches are issued
 * from the K loop, so each epilogue was a gap the stream never made up (8192 x 1536 at 8 tokens
 * from memory: 198-202 -> 170-179 us; 700M's Linears at 8 sequences 11.1 -> 9.9 ms). */
typedef struct {
    int32_t *cr;
    int ga, na, gb, nb, t0, np, done;
} tt_amxs_epi;

/* E's tokens [ta, tb) of row half `half` */
TT_AMX_INLINE void tt_amxs_epi_tokens(const tt_job *J, const tt_amxs_epi *E, int half, int ta, int tb) {
    while (ta < tb) {
        const int te = ta < 16 && tb > 16 ? 16 : tb;
        const int32_t *src = E->cr + (ta < 16 ? 0 : 512) + (half ? 256 : 0) + (ta & 15);
        tt_vnni_store_block(J, src, 1, 16, 4 * (half ? E->gb : E->ga), 4 * (half ? E->nb : E->na), E->t0 + ta, te - ta);
        ta = te;
    }
}

/* E's epilogue up to unit `to` */
TT_AMX_INLINE void tt_amxs_epi_run(const tt_job *J, tt_amxs_epi *E, int to) {
    const int np = E->np;
    if (to > 2 * np) to = 2 * np;
    while (E->done < to) {
        const int half = E->done >= np, hend = half ? 2 * np : np;
        const int stop = to < hend ? to : hend;
        if (!half || E->nb > 0) tt_amxs_epi_tokens(J, E, half, E->done - half * np, stop - half * np);
        E->done = stop;
    }
}

/* two 16-row halves: groups ga .. ga + na - 1 (na <= 4) in A tile 2, gb .. gb + nb - 1 (nb <= 4)
 * in A tile 3 (missing groups repeat the last one and are never stored), against one pass of np
 * tokens from t0 (nt0 = min(np, 16) in the first token half, the rest in the second; B tiles of
 * pass byte offset xp); the sums to E, prev's epilogue on the way. The halves come from the two
 * halves of the chunk (tt_amxs_chunk): 4 adjacent groups are one stream, 4 KB pages apart from the
 * other half's (see tt_task_vnni on streams sharing a page). ab = 3 x 4 KB of scratch: block b + 1
 * is unpacked before block b's tiles run, so a tile load never waits on the stores just issued
 * (AMX loads do not forward from the store buffer), and the third buffer keeps those stores off
 * the one still being read. Each half's next 4 groups are prefetched into L2 on the way, 512
 * bytes a block each (8 or 12 groups ahead: slower). */
TT_AMX_FN static void tt_amxs_panel(const tt_job *J, int ga, int na, int gb, int nb, int t0, int np, const uint8_t *xp,
                                    uint8_t *ab, int prefetch, tt_amxs_epi *prev, tt_amxs_epi *E) {
    const tt_ctx *c = J->c;
    const int kb = c->kb, nt0 = np < 16 ? np : 16, two = np > 16;
    const size_t gstride = (size_t)kb * TT_GROUP_BYTES_PER_BLOCK;
    const uint8_t *gp[8];
    for (int g = 0; g < 4; g++) gp[g] = c->w + (size_t)(ga + (g < na ? g : na - 1)) * gstride;
    for (int g = 0; g < 4; g++) gp[4 + g] = nb > 0 ? c->w + (size_t)(gb + (g < nb ? g : nb - 1)) * gstride : gp[3];
    const size_t bstride = (size_t)16 * np * 4; /* bytes of 16 q-rows of the pass */
    const size_t ldb = (size_t)4 * np;
    const int pfa = prefetch && ga + 8 <= c->ngroups, pfb = prefetch && nb > 0 && gb + 8 <= c->ngroups;
    const char *pa = (const char *)(c->w + (size_t)(ga + 4) * gstride);
    const char *pb = (const char *)(c->w + (size_t)(gb + 4) * gstride);
    const int units = 2 * prev->np;
    _tile_zero(0);
    _tile_zero(1);
    if (two) {
        _tile_zero(6);
        _tile_zero(7);
    }
    tt_amxs_unpack(gp, 0, ab);
    for (int b = 0; b < kb; b++) {
        if (b + 1 < kb) tt_amxs_unpack(gp, (size_t)(b + 1) * TT_GROUP_BYTES_PER_BLOCK, ab + (size_t)((b + 1) % 3) * 4096);
        if (pfa)
            for (int l = 0; l < 8; l++) _mm_prefetch(pa + (size_t)b * 512 + 64 * l, _MM_HINT_T1);
        if (pfb)
            for (int l = 0; l < 8; l++) _mm_prefetch(pb + (size_t)b * 512 + 64 * l, _MM_HINT_T1);
        tt_amxs_epi_run(J, prev, (units * (b + 1) + kb - 1) / kb);
        const uint8_t *a = ab + (size_t)(b % 3) * 4096;
        for (int kk = 0; kk < 2; kk++) {
            const uint8_t *x0 = xp + (size_t)(2 * b + kk) * bstride;
            _tile_loadd(4, x0, ldb);
            _tile_loadd(2, a + 1024 * kk, 64);
            _tile_loadd(3, a + 2048 + 1024 * kk, 64);
            _tile_dpbusd(0, 2, 4);
            _tile_dpbusd(1, 3, 4);
            if (two) {
                _tile_loadd(5, x0 + 4 * nt0, ldb);
                _tile_dpbusd(6, 2, 5);
                _tile_dpbusd(7, 3, 5);
            }
        }
    }
    _tile_stored(0, E->cr, 64);
    _tile_stored(1, E->cr + 256, 64);
    if (two) {
        _tile_stored(6, E->cr + 512, 64);
        _tile_stored(7, E->cr + 768, 64);
    }
    *E = (tt_amxs_epi){.cr = E->cr, .ga = ga, .na = na, .gb = gb, .nb = nb, .t0 = t0, .np = np, .done = 0};
}

/* a chunk of groups, split in two halves read side by side (panel i: groups 4 i .. 4 i + 3 of
 * each half); the token passes outer (a chunk's weights stay in L2 between passes), the tile
 * shapes configured per pass; each panel's epilogue runs during the next (the last after the
 * loop). ab: the unpacking's 3 x 4 KB, then two 4 KB sum buffers taken in turn. */
TT_AMX_FN static void tt_amxs_chunk(const tt_job *J, int g0, int g1, uint8_t *ab) {
    const int m = J->m;
    tt_amxs_epi E[2] = {{.cr = (int32_t *)(void *)(ab + 3 * 4096)}, {.cr = (int32_t *)(void *)(ab + 4 * 4096)}};
    int cur = 0;
    const int h = ((g1 - g0 + 1) / 2 + 3) / 4 * 4; /* first half: a multiple of 4 groups */
    for (int t0 = 0; t0 < m; t0 += 32) {
        const int np = m - t0 < 32 ? m - t0 : 32, nt0 = np < 16 ? np : 16, nt1 = np > 16 ? np - 16 : nt0;
        tt_amx_cfg cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette = 1;
        for (int i = 0; i < 8; i++) cfg.rows[i] = 16;
        cfg.colsb[0] = cfg.colsb[1] = cfg.colsb[4] = (uint16_t)(4 * nt0);
        cfg.colsb[2] = cfg.colsb[3] = 64;
        cfg.colsb[5] = cfg.colsb[6] = cfg.colsb[7] = (uint16_t)(4 * nt1);
        _tile_loadconfig(&cfg);
        const uint8_t *xp = (const uint8_t *)J->c->xv + (size_t)t0 * J->c->kp;
        const int ha = g0 + h < g1 ? g0 + h : g1; /* end of the first half */
        for (int ga = g0; ga < ha; ga += 4) {
            const int gb = ga + h, na = ha - ga < 4 ? ha - ga : 4;
            const int nb = g1 - gb >= 4 ? 4 : (g1 > gb ? g1 - gb : 0);
            tt_amxs_panel(J, ga, na, gb, nb, t0, np, xp, ab, t0 == 0, &E[cur ^ 1], &E[cur]);
            cur ^= 1;
        }
    }
    _tile_release();
    tt_amxs_epi_run(J, &E[cur ^ 1], 2 * E[cur ^ 1].np);
}

static void tt_task_amxs(const void *arg, int chunk) {
    const tt_job *J = (const tt_job *)arg;
    int g0, g1;
    tt_chunk_groups(J, chunk, &g0, &g1);
    uint8_t *ab = tt_amx_scratch(5 * 4096);
    if (!ab) { tt_task_vnni(arg, chunk); return; }
    tt_amxs_chunk(J, g0, g1, ab);
}

/* the context's workspace (xv) for max(16, m) tokens of kp bytes, grown when needed; NULL when
 * memory is short */
static int8_t *tt_amx_xv(tt_ctx *c, int m) {
    const size_t need = (size_t)(m > 16 ? m : 16) * c->kp;
    if (need > c->xv_cap) {
        int8_t *p = (int8_t *)tt_aligned_alloc(need);
        if (!p) return NULL;
        free(c->xv);
        c->xv = p;
        c->xv_cap = need;
    }
    return c->xv;
}

/* Run job J through the weights-as-A tiles when its token count is in [amxs_min_m, amx_min_m):
 * the activations transposed into the context's workspace, then chunks over the pool: with one
 * pass (up to 32 tokens) two chunks a thread, each a contiguous stream the panel prefetch runs
 * ahead on; with more, chunks of 4 panels, whose weights the later passes find in L2. Returns 0
 * when it ran, -1 to let the caller take another route. */
static int tt_amxs_run(tt_job *J, int nth) {
    tt_ctx *c = (tt_ctx *)J->c;
    if (J->m < c->amxs_min_m || J->m >= c->amx_min_m) return -1;
    if (!tt_amx_xv(c, J->m)) return -1;
    tt_amxs_transpose(J, (uint8_t *)c->xv);
    if (J->m <= 32) {
        const int per = 2 * (nth > 0 ? nth : 1);
        J->cg = ((c->ngroups + per - 1) / per + 7) / 8 * 8;
    } else {
        J->cg = 32;
    }
    tt_parallel(tt_task_amxs, J, (c->ngroups + J->cg - 1) / J->cg, nth);
    return 0;
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
        if (!tt_amx_xv(c, 16)) return -1;
        const int t0 = J->m - tail;
        for (int t = 0; t < tail; t++) memcpy(c->xv + (size_t)t * c->kp, J->xq + (size_t)(t0 + t) * J->ldx, (size_t)c->kp);
        memset(c->xv + (size_t)tail * c->kp, 0, (size_t)(16 - tail) * c->kp);
    }
    /* chunks of up to 8 panels, at least 3 a thread: a thread streams its chunk's weights in
     * order (with one-panel chunks the threads took turns, each stream jumping every panel), and
     * the panel prefetch has a next panel to fetch. 8192 x 1536 from memory, 128 / 512 tokens:
     * 2013-2101 / 7678 -> 1644 / 6212 us; 1536 x 1536 at 96: 301 -> 234 us (16 panels a chunk:
     * slower at 1536 rows, the two threads' shares uneven). */
    const int npan = (c->ngroups + TT_AMX_ROWS / 4 - 1) / (TT_AMX_ROWS / 4), th = nth > 0 ? nth : 1;
    int per = npan / (3 * th);
    per = per < 1 ? 1 : (per > 8 ? 8 : per);
    J->cg = per * (TT_AMX_ROWS / 4);
    tt_parallel(tt_task_amx, J, (c->ngroups + J->cg - 1) / J->cg, nth);
    return 0;
}
#else
static int tt_cpu_has_amx(void) { return 0; }
#endif
