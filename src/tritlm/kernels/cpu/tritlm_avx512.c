/*
 * AVX-512 VNNI route for ternary weights (tt_ctx.isa == 2): vpdpbusd multiplies the unsigned
 * 2-bit codes (0..2) by the signed int8 activations and adds groups of 4 products straight into
 * int32 lanes, so there is no int16 stage to saturate and no madd widening. A 64-byte vector holds
 * two rows' 32-byte slices of one 128-weight block (the i2s_r4 layout keeps a group's 4 rows
 * adjacent), and each 32-byte activation quarter is broadcast to both halves. Per 512 weights
 * (one block of a 4-row group): 2 weight loads, 14 shift/and, 8 vpdpbusd, against the AVX2
 * route's 4 weight loads, 28 shift/and, 16 maddubs and 16 adds (4 activation loads each).
 *
 * The int8, int4 and binary kinds' VNNI routes are in tritlm_intk.c (next to their epilogues).
 *
 * Included by tritlm_cpu.c (it uses tt_job, tt_store and the chunking). The dots are the same
 * exact integers as the other routes and the epilogue is the shared tt_store, so the results are
 * bit-identical to the portable and AVX2 routes.
 *
 * Compiled with target attributes only: the library is built for baseline x86-64 and calls
 * this code only after tt_cpu_has_avx512vnni() says the CPU and the OS (XCR0 opmask/ZMM state)
 * support it. Tests run tt_vnni_dots and tt_cpu_has_avx512vnni in an instruction-set emulator
 * (Bochs) when the test machine lacks AVX-512, and natively when it has it.
 */
#if TT_X86
#include <cpuid.h>

#define TT_VNNI_TARGET "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma"
#define TT_VNNI_FN __attribute__((target(TT_VNNI_TARGET)))
#define TT_VNNI_INLINE static inline __attribute__((always_inline, target(TT_VNNI_TARGET)))

/* CPUID leaf 7 (AVX512 F, BW, VL, VNNI) and the OS's XCR0 (SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM
 * state enabled): a CPU with the instructions but an OS that does not save the registers would
 * fault on the first one. Plain cpuid/xgetbv, no libgcc state, so it also runs in the emulator. */
static int tt_cpu_has_avx512vnni(void) {
    unsigned a, b, c, d;
    if (__get_cpuid_max(0, NULL) < 7) return 0;
    __cpuid(1, a, b, c, d);
    if (!(c & (1u << 27))) return 0; /* OSXSAVE: xgetbv is allowed */
    unsigned lo, hi;
    __asm__ __volatile__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    (void)hi;
    if ((lo & 0xE6u) != 0xE6u) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (b >> 16 & 1) && (b >> 30 & 1) && (b >> 31 & 1) && (c >> 11 & 1);
}

/* sum of the 8 int32 lanes of each 256-bit half: two rows */
TT_VNNI_INLINE void tt_vnni_rows2(__m512i acc, int32_t *r0, int32_t *r1) {
    *r0 = tt_hsum1(_mm512_castsi512_si256(acc));
    *r1 = tt_hsum1(_mm512_extracti64x4_epi64(acc, 1));
}

/* one token over G adjacent groups (4 G rows); even and odd quarters in separate accumulators
 * (8 chains for G = 2) so vpdpbusd's latency does not serialise the block loop */
TT_VNNI_INLINE void tt_vnni_gemv_g(const uint8_t *w, size_t gstride, int kb, const int8_t *x, int G, int32_t *dots,
                                   size_t pf, int nta) {
    const __m512i m3 = _mm512_set1_epi8(3);
    __m512i acc[2][2][2];
    for (int g = 0; g < G; g++)
        for (int p = 0; p < 2; p++) acc[g][p][0] = acc[g][p][1] = _mm512_setzero_si512();
    for (int b = 0; b < kb; b++) {
        const int8_t *xb = x + (size_t)b * TT_BLOCK;
        if (pf) { /* each group's stream, pf bytes ahead: the hardware prefetcher alone held ~6.5 GB/s a core */
            for (int g = 0; g < G; g++) {
                const char *p = (const char *)(w + (size_t)g * gstride + (size_t)b * TT_GROUP_BYTES_PER_BLOCK + pf);
                if (nta) { _mm_prefetch(p, _MM_HINT_NTA); _mm_prefetch(p + 64, _MM_HINT_NTA); }
                else { _mm_prefetch(p, _MM_HINT_T0); _mm_prefetch(p + 64, _MM_HINT_T0); }
            }
        }
        const __m512i x0 = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)xb));
        const __m512i x1 = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(xb + 32)));
        const __m512i x2 = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(xb + 64)));
        const __m512i x3 = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(xb + 96)));
        for (int g = 0; g < G; g++) {
            const uint8_t *wb = w + (size_t)g * gstride + (size_t)b * TT_GROUP_BYTES_PER_BLOCK;
            for (int p = 0; p < 2; p++) {
                const __m512i v = _mm512_loadu_si512((const void *)(wb + 64 * p));
                acc[g][p][0] = _mm512_dpbusd_epi32(acc[g][p][0], _mm512_and_si512(v, m3), x0);
                acc[g][p][1] = _mm512_dpbusd_epi32(acc[g][p][1], _mm512_and_si512(_mm512_srli_epi16(v, 2), m3), x1);
                acc[g][p][0] = _mm512_dpbusd_epi32(acc[g][p][0], _mm512_and_si512(_mm512_srli_epi16(v, 4), m3), x2);
                acc[g][p][1] = _mm512_dpbusd_epi32(acc[g][p][1], _mm512_and_si512(_mm512_srli_epi16(v, 6), m3), x3);
            }
        }
    }
    for (int g = 0; g < G; g++)
        for (int p = 0; p < 2; p++)
            tt_vnni_rows2(_mm512_add_epi32(acc[g][p][0], acc[g][p][1]), dots + 4 * g + 2 * p, dots + 4 * g + 2 * p + 1);
}

/* one group (4 rows) x T tokens (1..4): each block's codes are unpacked once for all T tokens */
TT_VNNI_INLINE void tt_vnni_tile(const uint8_t *wg, int kb, const int8_t *x, size_t ldx, int T, int32_t *dots,
                                 size_t ldd, size_t pf) {
    const __m512i m3 = _mm512_set1_epi8(3);
    __m512i acc[4][2];
    for (int t = 0; t < T; t++) acc[t][0] = acc[t][1] = _mm512_setzero_si512();
    for (int b = 0; b < kb; b++) {
        const uint8_t *wb = wg + (size_t)b * TT_GROUP_BYTES_PER_BLOCK;
        if (pf) { /* the first token quad's pass reads the weights from DRAM: the stream pf bytes ahead */
            _mm_prefetch((const char *)(wb + pf), _MM_HINT_T0);
            _mm_prefetch((const char *)(wb + pf + 64), _MM_HINT_T0);
        }
        const __m512i v01 = _mm512_loadu_si512((const void *)wb);
        const __m512i v23 = _mm512_loadu_si512((const void *)(wb + 64));
        for (int q = 0; q < 4; q++) {
            const __m512i u01 = _mm512_and_si512(_mm512_srli_epi16(v01, 2 * q), m3);
            const __m512i u23 = _mm512_and_si512(_mm512_srli_epi16(v23, 2 * q), m3);
            for (int t = 0; t < T; t++) {
                const int8_t *xq = x + (size_t)t * ldx + (size_t)b * TT_BLOCK + 32 * q;
                const __m512i xv = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)xq));
                acc[t][0] = _mm512_dpbusd_epi32(acc[t][0], u01, xv);
                acc[t][1] = _mm512_dpbusd_epi32(acc[t][1], u23, xv);
            }
        }
    }
    for (int t = 0; t < T; t++) {
        tt_vnni_rows2(acc[t][0], dots + (size_t)t * ldd, dots + (size_t)t * ldd + 1);
        tt_vnni_rows2(acc[t][1], dots + (size_t)t * ldd + 2, dots + (size_t)t * ldd + 3);
    }
}

TT_VNNI_FN static void tt_vnni_tile4(const uint8_t *w, int kb, const int8_t *x, size_t ldx, int32_t *d, size_t ldd, size_t pf) { tt_vnni_tile(w, kb, x, ldx, 4, d, ldd, pf); }
TT_VNNI_FN static void tt_vnni_tile3(const uint8_t *w, int kb, const int8_t *x, size_t ldx, int32_t *d, size_t ldd, size_t pf) { tt_vnni_tile(w, kb, x, ldx, 3, d, ldd, pf); }
TT_VNNI_FN static void tt_vnni_tile2(const uint8_t *w, int kb, const int8_t *x, size_t ldx, int32_t *d, size_t ldd, size_t pf) { tt_vnni_tile(w, kb, x, ldx, 2, d, ldd, pf); }

/* Raw dots sum_k q[row, k] * x[t, k] (q: the 2-bit codes 0..2, so the true dot is this minus
 * sum_k x[t, k]) of `ngroups` 4-row groups starting at w (i2s_r4, kb blocks per row) and T tokens
 * (x: T rows of kb * 128 int8, stride ldx) into dots[t * ldd + row]. A leaf function (no calls out
 * of this file, no globals): the emulator tests call it through tt_vnni_dots. */
TT_VNNI_FN static void tt_vnni_dots_impl(const uint8_t *w, int kb, int ngroups, const int8_t *x, size_t ldx, int T,
                                         int32_t *dots, size_t ldd, size_t pf) {
    const size_t gstride = (size_t)kb * TT_GROUP_BYTES_PER_BLOCK;
    for (int t0 = 0; t0 < T; t0 += 4) {
        const int tn = T - t0 < 4 ? T - t0 : 4;
        const int8_t *xt = x + (size_t)t0 * ldx;
        int32_t *dt = dots + (size_t)t0 * ldd;
        int g = 0;
        if (tn == 1) {
            for (; g + 2 <= ngroups; g += 2) tt_vnni_gemv_g(w + g * gstride, gstride, kb, xt, 2, dt + 4 * g, 0, 0);
            if (g < ngroups) tt_vnni_gemv_g(w + g * gstride, gstride, kb, xt, 1, dt + 4 * g, 0, 0);
            continue;
        }
        for (; g < ngroups; g++) {
            const uint8_t *wg = w + g * gstride;
            const size_t p = t0 == 0 ? pf : 0; /* later quads find the weights in the cache */
            if (tn == 4) tt_vnni_tile4(wg, kb, xt, ldx, dt + 4 * g, ldd, p);
            else if (tn == 3) tt_vnni_tile3(wg, kb, xt, ldx, dt + 4 * g, ldd, p);
            else tt_vnni_tile2(wg, kb, xt, ldx, dt + 4 * g, ldd, p);
        }
    }
}

TT_VNNI_FN static void tt_vnni_gemv_pf(const uint8_t *w, size_t gstride, int kb, const int8_t *x, int G, int32_t *dots,
                                       size_t pf, int nta) {
    if (G == 2) tt_vnni_gemv_g(w, gstride, kb, x, 2, dots, pf, nta);
    else tt_vnni_gemv_g(w, gstride, kb, x, 1, dots, pf, nta);
}

/* exported for the tests; the library calls the static one (no PLT hop, and none in the guest) */
TT_VNNI_FN void tt_vnni_dots(const uint8_t *w, int kb, int ngroups, const int8_t *x, size_t ldx, int T, int32_t *dots,
                             size_t ldd) {
    tt_vnni_dots_impl(w, kb, ngroups, x, ldx, T, dots, ldd, 0);
}

/* groups of a chunk in batches of 8 (32 rows: their weights stay in L1/L2 while the token quads
 * pass over them), then the shared epilogue */
static void tt_task_vnni(const void *arg, int chunk) {
    const tt_job *J = (const tt_job *)arg;
    const tt_ctx *c = J->c;
    int g0, g1;
    tt_chunk_groups(J, chunk, &g0, &g1);
    const size_t gstride = (size_t)c->kb * TT_GROUP_BYTES_PER_BLOCK;
    int32_t buf[4 * 32];
    if (J->m == 1) { /* decode: the chunk's groups in pairs, one prefetched stream a group */
        const size_t pf = (size_t)J->p.pf;
        for (int g = g0; g < g1; g += 2) {
            const int G = g + 2 <= g1 ? 2 : 1;
            tt_vnni_gemv_pf(c->w + (size_t)g * gstride, gstride, c->kb, J->xq, G, buf, pf, J->p.nta);
            for (int i = 0; i < 4 * G; i++) tt_store(J, 0, 4 * g + i, buf[i]);
        }
        return;
    }
    for (int gb = g0; gb < g1; gb += 8) {
        const int ge = gb + 8 < g1 ? gb + 8 : g1;
        for (int t0 = 0; t0 < J->m; t0 += 4) {
            const int T = J->m - t0 < 4 ? J->m - t0 : 4;
            tt_vnni_dots_impl(c->w + (size_t)gb * gstride, c->kb, ge - gb, J->xq + (size_t)t0 * J->ldx, J->ldx, T, buf, 32,
                              t0 == 0 ? (size_t)J->p.pf : 0);
            for (int t = 0; t < T; t++)
                for (int i = 0; i < 4 * (ge - gb); i++) tt_store(J, t0 + t, 4 * gb + i, buf[32 * t + i]);
        }
    }
}

/* The serial entries' driver (the emulator tests' entries, one per kind): the job over context c,
 * every chunk of cg groups through `task` on the calling thread. */
static void tt_run_serial(const tt_ctx *c, const int8_t *xq, size_t ldx, int m, const float *xs, const int32_t *sx,
                          float *out, int32_t *dots, int cg, tt_chunk_fn task) {
    tt_job J;
    J.c = c; J.xq = xq; J.ldx = ldx; J.m = m; J.xs = xs; J.sx = sx; J.out = out; J.dots = dots;
    J.cg = cg < 1 ? 1 : cg;
    J.p = (tt_params){0}; /* no prefetch: the emulator runs the routes, not their timing */
    for (int ch = 0; ch * J.cg < c->ngroups; ch++) task(&J, ch);
}

/* The route over a whole matrix on the calling thread, without the pool, the locks or the
 * quantiser: chunks of cg groups, each through tt_task_vnni and the shared epilogue, as tt_run
 * cuts them. Only the emulator tests call it (a leaf: no libc, no globals). sx[t] = sum_k xq[t, k];
 * out [m, n] (dots == NULL) or raw dots [m, n]. */
TT_VNNI_FN void tt_vnni_run_serial(const uint8_t *w, int n, int kb, const float *wscale, const float *bias,
                                   const int8_t *xq, size_t ldx, int m, const float *xs, const int32_t *sx,
                                   float *out, int32_t *dots, int cg) {
    tt_ctx c; /* only the fields the task and tt_store read */
    c.w = w; c.n = n; c.kb = kb; c.kp = kb * TT_BLOCK; c.k = c.kp; c.ngroups = (n + 3) / 4;
    c.wscale = (float *)wscale; c.bias = (float *)bias; c.isa = 2; c.kind = TT_KIND_TERNARY;
    tt_run_serial(&c, xq, ldx, m, xs, sx, out, dots, cg, tt_task_vnni);
}
#else
static int tt_cpu_has_avx512vnni(void) { return 0; }
#endif
