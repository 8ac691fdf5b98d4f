// GPTQ "v1" matrix products, compiled at run time by NVRTC (runtime/src/cuda/kernels.rs).
//
// Layout the kernels see (prepared once at load by runtime/src/cuda/gptq.rs):
// * qweight: u32 [R = K*b/32, N] (row-major), or the tensor-core layout when `strip_rows` = R > 0
//   (chosen at upload for the layers the tensor-core GEMV runs): strip-major [N/32][R][32], each
//   warp's 32-column strip one contiguous stream, or tile-major (qw_slot_step) in the entries of
//   GPTQ_MODULE 5 (3-bit layers the host uploads that way, qw_tile_major),
//   rows already sorted by g_idx for act-order checkpoints, so that every
//   "unit" (8 k-rows at 4 bits, 4 at 8 bits, 32 at 3 bits: the rows held by one packed word, or by
//   three words at 3 bits) belongs to a single group;
// * ugroup: i32 [K/unit_k], the group of each unit;
// * perm: i32 [K] or null: sorted row i holds original input row perm[i]; X columns are gathered
//   through it (GEMV) or the dequantized rows are scattered through it (dequant for the GEMM path);
// * scales: f16 [G, N]; zeros: the stored (zero - 1) codes, packed [G, N/8] u32 at 4 bits, [G, N/4]
//   u32 (= bytes) at 8 bits, unpacked bytes [G, N] at 3 bits.
//
// Dequantization: w = s * (q - (stored_zero + 1)). Products accumulate in fp32. Inside a group the
// kernel sums x*q and x separately and applies s*(sum_xq - z*sum_x) at the group's end. Each code is
// turned into a float with one LOP3 and one FADD: (word & (mask << p)) | 0x4B000000 is the float
// 2^23 + q*2^p (exact while p + b <= 23), and x was stored pre-multiplied by 2^-p.

#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef unsigned int u32;
typedef unsigned char u8;

#define GEMV_WARPS 8
#define GEMV_THREADS (GEMV_WARPS * 32)
#define GEMV_COLS 128 // 32 lanes x 4 columns
// Tuning knobs (MIXTRAL_GPTQ_NVRTC_DEFINES can override them for benchmark sweeps).
#ifndef GEMV_MIN_BLOCKS_3BIT // resident blocks per SM asked of ptxas for 3-bit MT <= 2 and the fused MoE
#define GEMV_MIN_BLOCKS_3BIT 2
#endif
#ifndef GEMV_MIN_BLOCKS_SMALL_M // resident blocks per SM asked of ptxas for MT <= 2
#define GEMV_MIN_BLOCKS_SMALL_M 3
#endif
#ifndef GEMV_UNR // units per pipelined batch at 4/8 bits (half of it at 3 bits)
#define GEMV_UNR 4
#endif

#ifndef GEMV_RING_SLOTS // uint4 slots per thread of the cp.async ring (MT <= 2); 0: register pipeline
#define GEMV_RING_SLOTS 0
#endif

// Whether the GEMV of this bit width and row count streams its packed words through the cp.async
// ring (at least 2 units per lane).
template <int BITS, int MT> __host__ __device__ constexpr bool gemv_ring() {
    return MT <= 2 && GEMV_RING_SLOTS / (BITS == 3 ? 3 : 1) >= 2;
}

// Offset (in floats) of the ring in dynamic shared memory: after the X staging area / the warp
// reduction buffer, whichever is larger, rounded to 16 bytes. runtime/src/cuda/gptq.rs (`plan`)
// computes the same layout.
template <int BITS, int MT> __device__ __forceinline__ int gemv_ring_offset_floats(int units_per_split) {
    const int uk = BITS == 3 ? 32 : (BITS == 4 ? 8 : 4);
    const int a = MT * units_per_split * uk, b = GEMV_WARPS * MT * GEMV_COLS;
    return ((a > b ? a : b) + 3) & ~3;
}

// A 16-byte copy to shared memory from L2 (cp.async.cg), or with L1 also keeping the line (.ca).
template <bool L1 = false> __device__ __forceinline__ void cp_async16(void* smem_dst, const void* gsrc) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(smem_dst);
    if constexpr (L1)
        asm volatile("cp.async.ca.shared.global [%0], [%1], 16;" ::"r"(d), "l"(gsrc) : "memory");
    else
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(gsrc) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Programmatic dependent launch (sm_90; runtime/src/cuda/gptq.rs launches the register-pipelined
// GEMV and MoE entries, permute_x16, convert_bf16_f16 and gptq_dequant_* with it). `pdl_wait` returns
// once the previous kernel in the stream has finished and its writes are visible: a kernel reads
// nothing that kernel may write (X, expert ids, pair scales) and writes nothing before it. Only the
// weights (written by uploads, never by a kernel) are read earlier. `pdl_launch_dependents` lets the
// next such launch start its blocks as this one's leave the SMs. Both do nothing in a launch without
// the attribute.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// pdl_wait after the loads issued above it. ptxas may otherwise hoist griddepcontrol.wait above
// them (delaying a load past the wait is legal), which takes away their head start: it did so in
// every register-pipelined entry (SASS: ACQBULK before the first weight load). A branch that never
// runs (`nonzero`, a launch argument that is never 0) ends the basic block before the wait.
__device__ __forceinline__ void pdl_wait_after_loads(int nonzero) {
    if (nonzero == 0) __trap();
    pdl_wait();
}
// Loads of what the previous kernel may write (X): coherent (ld.global.ca). A load through a `const
// __restrict__` pointer or __ldg is non-coherent (ld.global.nc), which promises the data does not
// change while the kernel runs; under dependent launch it does, before pdl_wait, and ptxas may
// then move such a load above the wait (it did in permute_x16's first version).
template <typename V> __device__ __forceinline__ V ld_dep(const V* p) { return __ldca(p); }
__device__ __forceinline__ void pdl_launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float pow2i(int e) { return __int_as_float((127 + e) << 23); }

__device__ __forceinline__ uint4 ld_stream(const u32* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

__device__ __forceinline__ u32 lds_u16(unsigned addr) {
    unsigned short v;
    asm volatile("ld.shared.u16 %0, [%1];" : "=h"(v) : "r"(addr));
    return v;
}

__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }
__device__ __forceinline__ void prefetch_l1(const void* p) { asm volatile("prefetch.global.L1 [%0];" ::"l"(p)); }

__device__ __forceinline__ u32 comp(const uint4& v, int c) {
    return c == 0 ? v.x : (c == 1 ? v.y : (c == 2 ? v.z : v.w));
}

// ---- per-bit-width layout: rows per unit, words per unit, and for row j of a unit the word view
// ---- that holds it in bits [p, p+b) with p + b <= 23.
template <int BITS> struct Layout;

template <> struct Layout<4> {
    static constexpr int UK = 8, WORDS = 1, NVIEWS = 2;
    __device__ static __forceinline__ void views(const u32* w, u32* v) { v[0] = w[0]; v[1] = w[0] >> 16; }
    __host__ __device__ static constexpr int view(int j) { return j < 4 ? 0 : 1; }
    __host__ __device__ static constexpr int pos(int j) { return (j & 3) * 4; }
};

template <> struct Layout<8> {
    static constexpr int UK = 4, WORDS = 1, NVIEWS = 2;
    __device__ static __forceinline__ void views(const u32* w, u32* v) { v[0] = w[0]; v[1] = w[0] >> 16; }
    __host__ __device__ static constexpr int view(int j) { return j < 2 ? 0 : 1; }
    __host__ __device__ static constexpr int pos(int j) { return (j & 1) * 8; }
};

// 3 bits: 32 values in 3 words; value k starts at bit 3k of the 96-bit concatenation w0|w1|w2.
template <> struct Layout<3> {
    static constexpr int UK = 32, WORDS = 3, NVIEWS = 8;
    __device__ static __forceinline__ void views(const u32* w, u32* v) {
        v[0] = w[0];
        v[1] = w[0] >> 21;
        v[2] = __funnelshift_r(w[0], w[1], 30);
        v[3] = w[1];
        v[4] = w[1] >> 22;
        v[5] = __funnelshift_r(w[1], w[2], 31);
        v[6] = w[2];
        v[7] = w[2] >> 23;
    }
    __host__ __device__ static constexpr int view(int k) {
        return k <= 6 ? 0 : k <= 9 ? 1 : k == 10 ? 2 : k <= 17 ? 3 : k <= 20 ? 4 : k == 21 ? 5 : k <= 28 ? 6 : 7;
    }
    __host__ __device__ static constexpr int pos(int k) {
        return k <= 6 ? 3 * k : k <= 9 ? 3 * (k - 7) : k == 10 ? 0 : k <= 17 ? 1 + 3 * (k - 11)
             : k <= 20 ? 3 * (k - 18) : k == 21 ? 0 : k <= 28 ? 2 + 3 * (k - 22) : 3 * (k - 29);
    }
};

// Position of row j of a unit, for run-time j (used when staging X).
template <int BITS> __device__ __forceinline__ int row_pos(int j) {
    if (BITS == 4) return (j & 3) * 4;
    if (BITS == 8) return (j & 1) * 8;
    return Layout<3>::pos(j);
}

// q * 2^p as a float, exact.
// (a & b) | c in one LOP3 (ptxas otherwise splits an AND and an OR of two immediates in two).
__device__ __forceinline__ u32 and_or(u32 a, u32 b, u32 c) {
    u32 r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

template <int BITS> __device__ __forceinline__ float code_f(u32 view, int p, u32 magic) {
    const u32 mask = ((1u << BITS) - 1u) << p;
    return __int_as_float(and_or(view, mask, magic)) - 8388608.0f;
}

template <int BITS> __device__ __forceinline__ int code_i(u32 view, int p) {
    return (int)((view >> p) & ((1u << BITS) - 1u));
}

// The four stored zero codes (zero - 1) of columns n0..n0+3 in group g.
template <int BITS> __device__ __forceinline__ void load_zeros(const void* zeros, int g, int N, int n0, float* z) {
    if (BITS == 4) {
        const u32 w = ((const u32*)zeros)[(size_t)g * (N / 8) + n0 / 8] >> ((n0 & 7) * 4);
#pragma unroll
        for (int c = 0; c < 4; ++c) z[c] = (float)((w >> (4 * c)) & 15u) + 1.0f;
    } else {
        const u32 w = *(const u32*)((const u8*)zeros + (size_t)g * N + n0);
#pragma unroll
        for (int c = 0; c < 4; ++c) z[c] = (float)((w >> (8 * c)) & 255u) + 1.0f;
    }
}

__device__ __forceinline__ void load_scales(const __half* scales, int g, int N, int n0, float* s) {
    const uint2 r = *(const uint2*)(scales + (size_t)g * N + n0);
    s[0] = __half2float(__ushort_as_half((unsigned short)(r.x & 0xFFFF)));
    s[1] = __half2float(__ushort_as_half((unsigned short)(r.x >> 16)));
    s[2] = __half2float(__ushort_as_half((unsigned short)(r.y & 0xFFFF)));
    s[3] = __half2float(__ushort_as_half((unsigned short)(r.y >> 16)));
}

// MT consecutive floats from shared memory, with 16-byte (or 8-byte) loads.
template <int MT> __device__ __forceinline__ void load_x(const float* p, float* v) {
    if (MT % 4 == 0) {
#pragma unroll
        for (int i = 0; i < MT; i += 4) {
            const float4 t = *(const float4*)(p + i);
            v[i] = t.x; v[i + 1] = t.y; v[i + 2] = t.z; v[i + 3] = t.w;
        }
    } else if (MT == 2) {
        const float2 t = *(const float2*)p;
        v[0] = t.x; v[1] = t.y;
    } else {
#pragma unroll
        for (int i = 0; i < MT; ++i) v[i] = p[i];
    }
}

// Which module of this file is being compiled (the list is at the end of the file).
#ifndef GPTQ_MODULE
#define GPTQ_MODULE 0
#endif
// Whether the tensor-core layout of BITS-bit words is tile-major in this module's entries: at 3 bits
// in GPTQ_MODULE 5 (`gptq_tile3`), strip-major everywhere else. The host uploads a 3-bit layer
// tile-major where it never runs the `_narrow` entries and is not an expert of the fused MoE
// (runtime/src/cuda/gptq.rs, `auto_word_layout`), and then loads its entries from that module. On an
// H100 tile-major was 1-1.5 % faster at 4096 x 14336 and 14336 x 4096 but 2-7 % slower at 4096 x 4096
// and 4096 x 1024 at 4 and 8 bits (BENCHMARKS.md, "the tile-major layout ... tried"); at 3 bits the
// GEMV was 0.7-1.4 % faster at the three larger shapes but 1.1 % slower at 4096 x 1024, and the fused
// MoE 1-3 % slower (BENCHMARKS.md, "tile-major words at 3 bits only"); in this module, 0.9-1.6 %
// faster at those shapes ("tile-major words for 3-bit layers that never run the narrow entries").
__host__ __device__ constexpr bool qw_tile_major(int bits) { return GPTQ_MODULE == 5 && bits == 3; }
// Packed rows of one slot of the tensor-core layout, what one warp-wide step of the GEMV reads: a
// 32-row tile at 4 and 8 bits (512 or 1024 bytes of a strip), a 128-row super-tile at 3 bits (1536).
__host__ __device__ constexpr int qw_slot_rows(int bits) { return bits == 3 ? 12 : bits == 4 ? 4 : 8; }
// Where slot j of strip s lies in the tensor-core layout, in words: s * qw_strip_step + j *
// qw_slot_step. Strip-major [N/32][R][32]: each strip's slots in one run. Tile-major
// [R/SR][N/32][SR][32] (qw_tile_major): slot j of every strip side by side, so that the warps of
// the grid that are at the same step read one region.
template <int BITS> __device__ __forceinline__ size_t qw_strip_step(int strip_rows) {
    return qw_tile_major(BITS) ? (size_t)qw_slot_rows(BITS) * 32 : (size_t)strip_rows * 32;
}
template <int BITS> __device__ __forceinline__ size_t qw_slot_step(int N) {
    return qw_tile_major(BITS) ? (size_t)qw_slot_rows(BITS) * N : (size_t)qw_slot_rows(BITS) * 32;
}

// The packed word at (word row `row`, column n): row-major [R, N], or the tensor-core layout when
// strip_rows = R > 0. Four consecutive columns from a multiple of 4 are consecutive in each.
// (Strip-major in a branch of its own, as before the tile-major option: with one expression for both
// layouts ptxas scheduled the scalar GEMV differently.)
template <int BITS>
__device__ __forceinline__ const u32* qw_at(const u32* qw, int strip_rows, size_t row, int n, int N) {
    if constexpr (qw_tile_major(BITS)) {
        if (!strip_rows) return qw + row * N + n;
        constexpr int SR = qw_slot_rows(BITS);
        return qw + (row / SR) * qw_slot_step<BITS>(N) + (size_t)(n >> 5) * qw_strip_step<BITS>(strip_rows) +
               (row % SR) * 32 + (n & 31);
    } else {
        return strip_rows ? qw + ((size_t)(n >> 5) * strip_rows + row) * 32 + (n & 31) : qw + row * N + n;
    }
}

// One quantized matrix as the kernels read it.
struct QMat {
    const u32* qweight;
    int strip_rows; // 0: row-major qweight; R: strip-major (see the top of this file)
    const __half* scales;
    const void* zeros;
    const int* ugroup;
    const int* perm; // null when rows are in input order
};

// One block: 128 output columns x a range of units (split-K), for up to MT rows of X.
// Partial sums of the splits meet in `ws`; the last block of a column tile to finish adds them in a
// fixed order (deterministic) and writes Y = out_scale * (X . W) as f32.
template <int BITS, typename T, int MT>
__device__ __forceinline__ void gemv_block(const QMat q, const T* __restrict__ X, int ldx, int M, int K, int N,
                                           int units_per_split, int nsplit, float* __restrict__ ws,
                                           u32* __restrict__ counter, float* __restrict__ Y, int ldy,
                                           float out_scale) {
    typedef Layout<BITS> L;
    extern __shared__ float smem[];
    __shared__ int s_last;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int tile = blockIdx.x, split = blockIdx.y;
    const int units = K / L::UK;
    const int u_begin = split * units_per_split;
    const int u_end = min(units, u_begin + units_per_split);
    const int nu = u_end - u_begin;
    const int kc = nu * L::UK;
    const int k_begin = u_begin * L::UK;

    const int n0 = tile * GEMV_COLS + lane * 4;
    const bool active = n0 < N;
    float acc[MT][4], gacc[MT][4], xsum[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        xsum[m] = 0.0f;
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[m][c] = gacc[m][c] = 0.0f;
    }
    float s[4], z[4];
    int cur_g = -1;

    const int per_warp = (nu + GEMV_WARPS - 1) / GEMV_WARPS;
    const int wu_begin = u_begin + warp * per_warp;
    const int wu_end = min(u_end, wu_begin + per_warp);
    constexpr bool RING = gemv_ring<BITS, MT>();
    constexpr int RS = RING ? GEMV_RING_SLOTS / L::WORDS : 2;

    float* xs = smem; // [kc][MT]: the MT rows of one k are adjacent (vector loads below)
    // 0x4B000000 kept in a register (the value ptxas cannot fold into the LOP3's one immediate).
    u32 magic;
    asm volatile("mov.b32 %0, 0x4B000000;" : "=r"(magic));

    // The work of one unit u whose packed words (WORDS uint4 = 4 columns each) are in `wv`.
    auto unit_body = [&](int u, int g, const uint4* wv) {
        if (g != cur_g) {
            if (cur_g >= 0) {
#pragma unroll
                for (int m = 0; m < MT; ++m) {
#pragma unroll
                    for (int c = 0; c < 4; ++c) {
                        acc[m][c] = fmaf(s[c], gacc[m][c] - z[c] * xsum[m], acc[m][c]);
                        gacc[m][c] = 0.0f;
                    }
                    xsum[m] = 0.0f;
                }
            }
            load_scales(q.scales, g, N, n0, s);
            load_zeros<BITS>(q.zeros, g, N, n0, z);
            cur_g = g;
        }
        u32 v[4][L::NVIEWS];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            u32 wc[L::WORDS];
#pragma unroll
            for (int w = 0; w < L::WORDS; ++w) wc[w] = comp(wv[w], c);
            L::views(wc, v[c]);
        }
        const float* xu = xs + (u - u_begin) * L::UK * MT;
#pragma unroll
        for (int j = 0; j < L::UK; ++j) {
            const int p = L::pos(j);
            float xv[MT];
            load_x<MT>(xu + j * MT, xv);
#pragma unroll
            for (int m = 0; m < MT; ++m) xsum[m] = fmaf(xv[m], pow2i(p), xsum[m]);
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const float f = code_f<BITS>(v[c][L::view(j)], p, magic);
#pragma unroll
                for (int m = 0; m < MT; ++m) gacc[m][c] = fmaf(xv[m], f, gacc[m][c]);
            }
        }
    };

    // Stage X[m, perm[k]] * 2^-pos(k) for this block's k range: XS_ILP elements per thread in
    // flight (indices first, then the values), so the gather costs one or two round trips.
    auto stage_x = [&]() {
        constexpr int XS_ILP = 4;
        const int total = MT * kc;
        for (int i0 = tid; i0 < total; i0 += XS_ILP * GEMV_THREADS) {
            int src[XS_ILP];
#pragma unroll
            for (int t = 0; t < XS_ILP; ++t) {
                const int i = i0 + t * GEMV_THREADS;
                const int kk = i / MT;
                const int k = k_begin + kk;
                src[t] = i < total ? (q.perm ? __ldg(q.perm + k) : k) : 0;
            }
            float v[XS_ILP];
#pragma unroll
            for (int t = 0; t < XS_ILP; ++t) {
                const int i = i0 + t * GEMV_THREADS;
                const int kk = i / MT, m = i - kk * MT;
                v[t] = (i < total && m < M) ? to_f32(X[(size_t)m * ldx + src[t]]) : 0.0f;
            }
#pragma unroll
            for (int t = 0; t < XS_ILP; ++t) {
                const int i = i0 + t * GEMV_THREADS;
                const int kk = i / MT;
                if (i < total) xs[i] = v[t] * pow2i(-row_pos<BITS>(kk % L::UK));
            }
        }
    };

    if constexpr (RING) {
        // Lane-private cp.async ring in shared memory: RS slots of WORDS uint4 per thread, RS - 1
        // units in flight; no registers held by loads in flight, no barrier (each lane reads only
        // what it copied). Unit i goes to slot i % RS (i counted from wu_begin).
        uint4* ring = (uint4*)(smem + gemv_ring_offset_floats<BITS, MT>(units_per_split));
        auto issue = [&](int i) {
            const int slot = i % RS;
            const int u = wu_begin + i;
#pragma unroll
            for (int w = 0; w < L::WORDS; ++w)
                cp_async16(ring + (slot * L::WORDS + w) * GEMV_THREADS + tid,
                           qw_at<BITS>(q.qweight, q.strip_rows, (size_t)u * L::WORDS + w, n0, N));
        };
        const int nw = wu_end - wu_begin;
        if (active) {
#pragma unroll
            for (int i = 0; i < RS - 1; ++i) {
                if (i < nw) issue(i);
                cp_async_commit();
            }
        }
        stage_x();
        __syncthreads();
        if (active && nw > 0) {
            int g_next = q.ugroup[wu_begin];
            for (int i = 0; i < nw; ++i) {
                const int g = g_next;
                if (i + 1 < nw) g_next = q.ugroup[wu_begin + i + 1];
                cp_async_wait<RS - 2>();
                const int slot = i % RS;
                uint4 wv[L::WORDS];
#pragma unroll
                for (int w = 0; w < L::WORDS; ++w) wv[w] = ring[(slot * L::WORDS + w) * GEMV_THREADS + tid];
                // Slot (i - 1) % RS was read in the previous iteration and its values used.
                if (i + RS - 1 < nw) issue(i + RS - 1);
                cp_async_commit();
                unit_body(wu_begin + i, g, wv);
            }
            cp_async_wait<0>();
        }
    } else {
        constexpr int UNR = BITS == 3 ? (GEMV_UNR / 2 > 0 ? GEMV_UNR / 2 : 1) : GEMV_UNR;
        // Software pipeline: the next batch of packed words is in flight while this one is computed;
        // the first batch is requested before X is staged.
        uint4 nxt[UNR][L::WORDS];
        auto load_batch = [&](int u0) {
#pragma unroll
            for (int r = 0; r < UNR; ++r) {
                if (u0 + r < wu_end) {
#pragma unroll
                    for (int w = 0; w < L::WORDS; ++w)
                        nxt[r][w] = ld_stream(qw_at<BITS>(q.qweight, q.strip_rows, (size_t)(u0 + r) * L::WORDS + w, n0, N));
                }
            }
        };
        if (active && wu_begin < wu_end) load_batch(wu_begin);
        stage_x();
        __syncthreads();
        if (active) {
            for (int u0 = wu_begin; u0 < wu_end; u0 += UNR) {
                uint4 words[UNR][L::WORDS];
#pragma unroll
                for (int r = 0; r < UNR; ++r)
#pragma unroll
                    for (int w = 0; w < L::WORDS; ++w) words[r][w] = nxt[r][w];
                if (u0 + UNR < wu_end) load_batch(u0 + UNR);
#pragma unroll
                for (int r = 0; r < UNR; ++r) {
                    const int u = u0 + r;
                    if (u < wu_end) unit_body(u, q.ugroup[u], words[r]);
                }
            }
        }
    }
    if (active && cur_g >= 0) {
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[m][c] = fmaf(s[c], gacc[m][c] - z[c] * xsum[m], acc[m][c]);
    }
    __syncthreads(); // xs is reused below

    // Reduce the warps: red[warp][m][col].
    float* red = smem;
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int c = 0; c < 4; ++c) red[(warp * MT + m) * GEMV_COLS + lane * 4 + c] = acc[m][c];
    __syncthreads();

    const int col_base = tile * GEMV_COLS;
    if (tid < GEMV_COLS) {
        const int col = col_base + tid;
        for (int m = 0; m < M && m < MT; ++m) {
            float v = 0.0f;
#pragma unroll
            for (int w = 0; w < GEMV_WARPS; ++w) v += red[(w * MT + m) * GEMV_COLS + tid];
            if (col < N) {
                if (nsplit == 1) Y[(size_t)m * ldy + col] = v * out_scale;
                else ws[((size_t)split * MT + m) * N + col] = v;
            }
        }
    }
    if (nsplit == 1) return;

    __threadfence();
    __syncthreads();
    if (tid == 0) {
        const u32 prev = atomicAdd(counter + tile, 1u);
        s_last = prev == (u32)(nsplit - 1);
    }
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    if (tid < GEMV_COLS) {
        const int col = col_base + tid;
        if (col < N) {
            for (int m = 0; m < M && m < MT; ++m) {
                float v = 0.0f;
                for (int sp = 0; sp < nsplit; ++sp) v += __ldcg(ws + ((size_t)sp * MT + m) * N + col);
                Y[(size_t)m * ldy + col] = v * out_scale;
            }
        }
    }
    if (tid == 0) counter[tile] = 0u;
}

// Dense: Y[M, N] (f32) = X[M, K] . dequant(W), M <= MT.
// grid = (ceil(N/128), nsplit), block = 256, dynamic shared memory = gemv_smem_bytes(...).
template <int BITS, typename T, int MT>
__device__ __forceinline__ void gemv_dense(const u32* qweight, int strip_rows, const __half* scales, const void* zeros,
                                           const int* ugroup, const int* perm, const T* X, int M, int K, int N,
                                           int units_per_split, float* ws, u32* counters, float* Y) {
    QMat q = {qweight, strip_rows, scales, zeros, ugroup, perm};
    gemv_block<BITS, T, MT>(q, X, K, M, K, N, units_per_split, gridDim.y, ws, counters, Y, N, 1.0f);
}

// Fused MoE: for each (token, slot) pair p = blockIdx.z, Y[p, :] = scale[p] * X[p / x_div, :] . W_e
// with e = expert_ids[p]; `table` holds 5 device pointers per expert (qweight, scales, zeros,
// ugroup, perm-or-0). One launch covers every pair: no host round-trip per expert.
template <int BITS, typename T>
__device__ __forceinline__ void gemv_moe(const unsigned long long* table, int strip_rows, const int* expert_ids,
                                         const float* pair_scale, const T* X, int x_div, int K, int N,
                                         int units_per_split, float* ws, u32* counters, float* Y) {
    const int p = blockIdx.z;
    const int e = expert_ids[p];
    const unsigned long long* t = table + 5 * (size_t)e;
    QMat q = {(const u32*)t[0], strip_rows, (const __half*)t[1], (const void*)t[2], (const int*)t[3],
              (const int*)t[4]};
    const int nsplit = gridDim.y;
    const int ntiles = gridDim.x;
    gemv_block<BITS, T, 1>(q, X + (size_t)(p / x_div) * K, K, 1, K, N, units_per_split, nsplit,
                           ws + (size_t)p * nsplit * N, counters + (size_t)p * ntiles, Y + (size_t)p * N, N,
                           pair_scale ? pair_scale[p] : 1.0f);
}

// ---- Tensor-core GEMV for M <= 8 (4 and 8 bits) ----
//
// One warp computes 32 output columns for up to 8 rows of X with mma.sync m16n8k16 and fp32
// accumulation: A = the codes minus the zero, (q - z), for 16 output columns (small integers, so
// exact in f16 and bf16), B = X (column m of the n8 tile is row m of X; columns M..7 are zero). The
// group scale is applied in fp32 when a group ends (acc += s * group_acc), as in the scalar GEMV:
// the result is as exact as that kernel's, for about one instruction per weight instead of five.
//
// Per 32-row k-tile, lane (g = lane / 4, c = lane % 4) reads 16 bytes of packed codes for columns
// n0 + 4g .. n0 + 4g + 3: at 4 bits the word of rows 8c..8c+7, at 8 bits the two words of rows
// 8c..8c+3 and 8c+4..8c+7. Two codes at bits p and p + 16 of a word become one f16x2 (or bf16x2)
// with one LOP3 (or PRMT) against an exponent "magic", and one HSUB2 removes the magic and the zero.
// In A, row g is column 4g + 2i and row g + 8 column 4g + 2i + 1 (i = 0, 1: two MMAs per 16 k). The
// k order inside each 8-row block that the pairs produce is undone by storing X in shared memory in
// the same order (`mma_order`), so that lane (g, c) reads its B fragment of X row g with one 16-byte
// load.
//
// Requirements (checked on the host, runtime/src/cuda/gptq.rs `mma_eligible`): K and N multiples of
// 32, and every 32-row tile (after the act-order sort) inside one group. qweight is strip-major
// (q.strip_rows = R): with the row-major layout a warp's 32 columns are 128-byte pieces 4N bytes
// apart, and DRAM pages, not bytes, bound the speed (measured: 4- and 8-bit took the same time).

#ifndef MMA_WARPS // warps per block (independent: each has its own strip and k-run)
#define MMA_WARPS 4
#endif
#ifndef MMA_STAGES // slots of the per-lane cp.async ring: tiles in flight + 1 (runtime/src/cuda/gptq.rs reads it)
#define MMA_STAGES 4
#endif
#ifndef MMA_MIN_BLOCKS // resident blocks per SM asked of ptxas (runtime/src/cuda/gptq.rs reads it too)
#define MMA_MIN_BLOCKS 7
#endif
#ifndef MMAD_DEPTH // tiles in flight per warp in the register-pipelined tensor-core GEMV at 4 bits (mmad_depth)
#define MMAD_DEPTH 2
#endif
#ifndef MMAD_DEPTH8 // the same at 8 bits (1 KiB tiles)
#define MMAD_DEPTH8 2
#endif
// Warps per block (= k-splits per strip) the register-pipelined GEMV allows: its launch bound, which
// runtime/src/cuda/gptq.rs reads back from the driver. 28 keeps ptxas at 72 registers, 32 at 64.
#ifndef MMAD_MAX_WARPS // at 4 bits: 32 (BENCHMARKS.md, "Warps per block by bit width")
#define MMAD_MAX_WARPS 32
#endif
#ifndef MMAD_MAX_WARPS8 // at 8 bits
#define MMAD_MAX_WARPS8 28
#endif
#ifndef MMADG_MAX_WARPS // the entry for groups of one tile (g32, gptq_mmadg_gemv_*), 4 and 8 bits
#define MMADG_MAX_WARPS 28
#endif
#ifndef MMAD_DEPTH3 // 128-row super-tiles in flight per warp at 3 bits (1.5 KiB each)
#define MMAD_DEPTH3 1
#endif
#ifndef MMAD_MAX_WARPS3 // the same at 3 bits
#define MMAD_MAX_WARPS3 28
#endif
// The launch bound, in warps, of the register-pipelined entries at B bits (but gptq_mmadg_gemv_*).
#define MMAD_WARPS(B) ((B) == 3 ? MMAD_MAX_WARPS3 : (B) == 8 ? MMAD_MAX_WARPS8 : MMAD_MAX_WARPS)
// The GEMV's `_gather` entry at 4 bits (act-order with K above 4096) allows 28: 72 registers, no
// spill; 14336 x 4096 g128 M = 1 took 13.05 against 13.62 us at 32 (BENCHMARKS.md, "4-bit
// act-order gathers in 28 warps").
#ifndef MMAD_MAX_WARPS_GATHER
#define MMAD_MAX_WARPS_GATHER 28
#endif
// The `_gather_slice` entries at 4 bits (act-order with K up to 4096) are compiled in a module of
// their own (GPTQ_MODULE 1 below, runtime/src/cuda/kernels.rs), because ptxas schedules each entry
// of one module with the others' code in view: made 4 tiles deep in 16 warps inside the GPTQ module,
// they got faster, but the 8-bit `_gather_slice` entries lost 2-6 % and the 4-bit plain entry 2-4 %
// at 4096 x 4096 (BENCHMARKS.md, "act-order slices four tiles deep"). In their own module the other
// entries' code is as it was, and on an H100 (g128, M = 1, us; BENCHMARKS.md, "the 4-bit act-order
// slices in a module of their own") 20 warps of 4 tiles took 6.36 at 4096 x 4096 and 4.69 at
// 4096 x 1024 against 6.58 and 5.20 for 24 warps of 2 in the GPTQ module (the same bound and depth in
// their own module: 6.58 and 5.20; 16 warps of 4: 6.48 and 4.79). 20 x 4: 96 registers, no stack.
// At 2 tiles deep, 32 warps had spilled the group's zero word before the dependent-launch wait
// (BENCHMARKS.md, "4-bit act-order slices in 24 warps").
#ifndef MMAD_MAX_WARPS_SLICE
#define MMAD_MAX_WARPS_SLICE 20
#endif
// Tiles in flight per warp of those entries (mmad_depth).
#ifndef MMAD_DEPTH_SLICE
#define MMAD_DEPTH_SLICE 4
#endif
// The `_gather_slice` entry at 8 bits allows 24 (the plain and `_gather` entries 28): on an H100, g128
// M = 1 took 8.85 against 9.07 us at 4096 x 4096 and 5.48 against 5.77 at 4096 x 1024, while 24 for
// every 8-bit entry lost 2 % at the two large shapes (BENCHMARKS.md, "first H100 figures").
#ifndef MMAD_MAX_WARPS8_SLICE
#define MMAD_MAX_WARPS8_SLICE 24
#endif
// Weight pieces (16 bytes per lane; a pipeline slot is 1 of them at 4 bits, 2 at 8 and 3 at 3, a
// super-tile) an act-order entry issues before the dependent-launch wait; the others follow right
// after the block's copy of X is issued, so that fewer of the block's weight loads queue ahead of X,
// which every product waits for. Knobs for the 8-bit `_gather_slice` (GPTQ_MODULE 0, K up to 4096)
// and the 4- and 8-bit `_gather` entries (K above 4096), one slot of their two each; for the 4-bit
// slices (GPTQ_MODULE 1), 3 slots of 4; for the 3-bit entries (modules 0 and 5), whose one super-tile
// (MMAD_DEPTH3) has 3 pieces, 1 in the slices and 2 in the `_gather` entries. On an H100
// (BENCHMARKS.md, "one weight slot before the wait", when the knobs counted slots, and "3-bit
// act-order, part of the super-tile before the wait"), g128 M = 1, us, against every piece before
// the wait, in alternating runs of one call: 8-bit slice at 4096 x 4096 8.39-8.40 against 8.65-8.72
// (1 or 3 pieces: 8.65-8.66, 8.43-8.46 against 8.36-8.38 with 2); at 14336 x 4096 the 4-bit
// `_gather` 14.51-14.54 against 14.73-14.75 and the 8-bit 22.80-22.83 against 23.34-23.41 (1 or 3
// pieces: 23.28-23.32, 22.88-22.91 against 22.81 with 2); 4-bit slice at 4096 x 4096 6.18-6.20
// against 6.29-6.32 (2 of 4: 6.31-6.37; 1: 6.57 against 6.30, "the whole of X before the first
// product"), but at 4096 x 1024 4.76-4.77 against 4.68-4.69, so narrow 4-bit layers run a
// `_gather_slice_narrow` entry with every slot before the wait; 3-bit slice at 4096 x 4096 6.16 with
// 1 piece against 6.22-6.25 (2: 6.33-6.35); 3-bit `_gather` at 14336 x 4096 12.58-12.59 with 2
// against 12.86-12.90 (1: 12.68-12.73). Slower, so not knobs: the other `_narrow` slices at 4096 x 1024 (8-bit 6.18-6.20 with 1 slot of
// 4, 5.92-5.93 with 2, against 5.29-5.31; 3-bit 4.88-4.89 with 1 of 2 against 4.71-4.72). The
// `_narrow`, `_tall` and `_rows` entries, the g32 entries (MMADG_ENTRY) and the fused MoE issue every
// piece before the wait.
#ifndef MMAD_SLICE8_PRE_PIECES
#define MMAD_SLICE8_PRE_PIECES 2
#endif
#ifndef MMAD_GATHER4_PRE_PIECES
#define MMAD_GATHER4_PRE_PIECES 1
#endif
#ifndef MMAD_GATHER8_PRE_PIECES
#define MMAD_GATHER8_PRE_PIECES 2
#endif
#ifndef MMAD_SLICE4_PRE_PIECES
#define MMAD_SLICE4_PRE_PIECES 3
#endif
#ifndef MMAD_SLICE3_PRE_PIECES
#define MMAD_SLICE3_PRE_PIECES 1
#endif
#ifndef MMAD_GATHER3_PRE_PIECES
#define MMAD_GATHER3_PRE_PIECES 2
#endif
// Every piece before the wait (mmad_gemv's default).
#define MMAD_PRE_ALL 1024
// A setting of the GEMV's entry of kind G at B bits: G3 for the `_gather` entry at 3 bits, S3 for the
// `_gather_slice` one, G4, S4, G8 and S8 likewise at 4 and 8 bits, OTHER for the plain entries.
#define MMAD_PER_KIND(B, G, G3, S3, G4, S4, G8, S8, OTHER)               \
    ((B) == 3 && (G) == MMAD_GATHER         ? (G3)                       \
     : (B) == 3 && (G) == MMAD_GATHER_SLICE ? (S3)                       \
     : (B) == 4 && (G) == MMAD_GATHER       ? (G4)                       \
     : (B) == 4 && (G) == MMAD_GATHER_SLICE ? (S4)                       \
     : (B) == 8 && (G) == MMAD_GATHER       ? (G8)                       \
     : (B) == 8 && (G) == MMAD_GATHER_SLICE ? (S8)                       \
                                            : (OTHER))
// The pieces before the wait of MMAD_ENTRY's entry of kind G at B bits.
#define MMAD_PRE_PIECES(B, G)                                                                             \
    MMAD_PER_KIND(B, G, MMAD_GATHER3_PRE_PIECES, MMAD_SLICE3_PRE_PIECES, MMAD_GATHER4_PRE_PIECES,         \
                  MMAD_SLICE4_PRE_PIECES, MMAD_GATHER8_PRE_PIECES, MMAD_SLICE8_PRE_PIECES, MMAD_PRE_ALL)
#ifndef MMAD_MAX_WARPS8_GATHER // the `_gather` entry at 8 bits (sweeps)
#define MMAD_MAX_WARPS8_GATHER MMAD_MAX_WARPS8
#endif
// The 3-bit act-order entries keep the 3-bit bound: 24, 20 and 16 lost or tied on an H100 (same section).
#ifndef MMAD_MAX_WARPS3_SLICE // the `_gather_slice` entry at 3 bits (sweeps)
#define MMAD_MAX_WARPS3_SLICE MMAD_MAX_WARPS3
#endif
#ifndef MMAD_MAX_WARPS3_GATHER // the `_gather` entry at 3 bits (sweeps)
#define MMAD_MAX_WARPS3_GATHER MMAD_MAX_WARPS3
#endif
// Narrow layers (few strips: runtime/src/cuda/gptq.rs, `mmad_narrow`, says where) run the plain and
// the `_gather_slice` entries as `_narrow` entries in a module of their own
// (GPTQ_MODULE 2 below): deeper pipelines in fewer warps. One block runs per strip, so only a few SMs
// work, and the bytes each keeps in flight set the speed. On an H100 (BENCHMARKS.md, "entries for
// narrow layers"), 4096 x 1024 g128 M = 1, us, against the other entries: 3-bit 4.22 / 4.60 at 2
// super-tiles in 20 warps (act-order 4.71 / 5.05), 4-bit 4.31 / 4.54 at 4 tiles in 20 (16: 4.49, 3 in
// 24: 4.93), 8-bit 4.93 / 5.28 at 4 tiles in 20 (act-order 5.30 / 5.53; 16 warps: the same without
// act-order, 5.75 with it). The 4-bit `_gather_slice` entry here is the 4-bit slices' code
// (20 warps, 4 deep) with every slot before the dependent-launch wait: see MMAD_SLICE4_PRE_PIECES.
#ifndef MMAD_DEPTH_NARROW
#define MMAD_DEPTH_NARROW 4
#endif
#ifndef MMAD_MAX_WARPS_NARROW
#define MMAD_MAX_WARPS_NARROW 20
#endif
#ifndef MMAD_DEPTH8_NARROW
#define MMAD_DEPTH8_NARROW 4
#endif
#ifndef MMAD_MAX_WARPS8_NARROW
#define MMAD_MAX_WARPS8_NARROW 20
#endif
#ifndef MMAD_DEPTH3_NARROW
#define MMAD_DEPTH3_NARROW 2
#endif
#ifndef MMAD_MAX_WARPS3_NARROW
#define MMAD_MAX_WARPS3_NARROW 20
#endif
// Tall layers (K above 8192 and a strip per SM at most: runtime/src/cuda/gptq.rs, `mmad_tall`, says
// where) run the plain 4-bit entry as `_tall` entries in a module of their own (GPTQ_MODULE 3 below):
// 28 warps (72 registers, no spill, against 64 registers and a spill at the plain entry's 32), each
// block of D tiles reloaded before it is computed (mmad_gemv's RELOAD_FIRST). One block of many warps
// runs per SM, so the plain entry's bound buys nothing there. On an H100 (BENCHMARKS.md, "entries for
// tall layers"), 14336 x 4096 g128, us: M = 1 13.57 against 13.90, M = 4 15.50 against 15.76 (in an
// earlier run, 28 warps without the reload first took 13.59 and with it 13.48); but 8192 x 4096 9.34
// against 9.02, and 4096 x 14336 (448 strips, 4 blocks per SM) 14.32 against 14.07.
#ifndef MMAD_MAX_WARPS_TALL
#define MMAD_MAX_WARPS_TALL 28
#endif
#ifndef MMAD_DEPTH_TALL // tiles in flight per warp of those entries (mmad_depth)
#define MMAD_DEPTH_TALL 2
#endif
#ifndef MMAD_TALL_RELOAD_FIRST // (sweeps: 0 turns the reload first off in the `_tall` entries)
#define MMAD_TALL_RELOAD_FIRST 1
#endif
// Entries whose warps take the next group's scales and zero word through L1 (mmad_gemv's GROUP_L1):
// bit 3 b + k for b = 0, 1, 2 (4, 8, 3 bits) and k = 0, 1, 2 (MMAD_PLAIN, MMAD_GATHER,
// MMAD_GATHER_SLICE), in the GEMV's entries (MMAD_GROUP_L1) and in those for narrow layers
// (MMAD_GROUP_L1_NARROW); the tall, g32 and fused MoE entries never do. Measured on an H100
// (BENCHMARKS.md, "the next group's data through L1"), M = 1, g128, us, through L1 against ahead
// into registers: 4-bit 4096 x 14336 13.86 / 14.07, 4096 x 4096 5.56 / 5.72, 4096 x 1024
// (narrow) 4.22 / 4.31; 8-bit 4096 x 4096 7.95 / 8.43, act-order 8.73 / 8.91; but the 4-bit tall
// entries 13.82 / 13.50, the 3-bit GEMV at 4096 x 14336 12.21 / 11.88 and the 4-bit fused MoE's
// w2 at one token 22.3 / 21.9.
#ifndef MMAD_GROUP_L1
#define MMAD_GROUP_L1 57 // 4-bit plain; 8-bit plain, _gather, _gather_slice
#endif
#ifndef MMAD_GROUP_L1_NARROW
#define MMAD_GROUP_L1_NARROW 73 // 4-, 8- and 3-bit plain
#endif
#define MMAD_GROUP_L1_BIT(B, G) (3 * ((B) == 4 ? 0 : (B) == 8 ? 1 : 2) + (G))
#define MMAD_GROUP_L1_ON(MASK, B, G) ((G) <= MMAD_GATHER_SLICE && (((MASK) >> MMAD_GROUP_L1_BIT(B, G)) & 1) != 0)
#define MMAD_NARROW_WARPS(B) ((B) == 3 ? MMAD_MAX_WARPS3_NARROW : (B) == 8 ? MMAD_MAX_WARPS8_NARROW : MMAD_MAX_WARPS_NARROW)
#define MMAD_NARROW_DEPTH(B) ((B) == 3 ? MMAD_DEPTH3_NARROW : (B) == 8 ? MMAD_DEPTH8_NARROW : MMAD_DEPTH_NARROW)
// The launch bound of the GEMV's entry G (MMAD_PLAIN, MMAD_GATHER, MMAD_GATHER_SLICE) at B bits.
#define MMAD_GEMV_WARPS(B, G)                                                                             \
    MMAD_PER_KIND(B, G, MMAD_MAX_WARPS3_GATHER, MMAD_MAX_WARPS3_SLICE, MMAD_MAX_WARPS_GATHER,             \
                  MMAD_MAX_WARPS_SLICE, MMAD_MAX_WARPS8_GATHER, MMAD_MAX_WARPS8_SLICE, MMAD_WARPS(B))
// The fused MoE's act-order `_gather` entries at 4 bits: MMAD_MAX_WARPS unless a sweep says otherwise.
// At 32 warps they spill the group's zero word just after loading it, before the dependent-launch wait
// (runtime/tests/cuda_nvrtc.rs), as the 4-bit `_gather_slice` entries did; the fused MoE's bound of 32
// had been chosen over 28 on measurements (BENCHMARKS.md), before that spill was known, and an H100
// sweep with the spill known kept it: 28 and 24 were 3-14 % slower at 1 token ("first H100 figures").
#ifndef MMAD_MAX_WARPS_MOE_GATHER
#define MMAD_MAX_WARPS_MOE_GATHER MMAD_MAX_WARPS
#endif
// The launch bound of the fused MoE's entry G (MMAD_PLAIN, MMAD_GATHER_SYNC) at B bits.
#define MMAD_MOE_WARPS(B, G) ((B) == 4 && (G) == MMAD_GATHER_SYNC ? MMAD_MAX_WARPS_MOE_GATHER : MMAD_WARPS(B))
#ifndef MMAD_MOE_L2_AHEAD // fused MoE at 4 bits: each lane also asks L2 for its words this many tiles
#define MMAD_MOE_L2_AHEAD 2 // past the reload (0: off). Faster there, slower in the plain GEMV (BENCHMARKS.md)
#endif
// The same at 3 bits, in 128-row super-tiles: on an H100 (BENCHMARKS.md, "the 3-bit fused MoE asks L2"),
// 8 experts act-order g128, 1 token, w1/w3 25.13 -> 23.56 us and w2 25.71 -> 23.81 at 1 ahead (2: 24.84
// and 24.96; 3: 25.02 and 26.05), 4 tokens within 0.7 %. The GEMV's 3-bit entries do not prefetch.
#ifndef MMAD_MOE_L2_AHEAD3
#define MMAD_MOE_L2_AHEAD3 1
#endif
#ifndef MMAD_X_CHUNKS // its MMA_X_CHUNKS (the first tiles' registers are live while X is staged)
#define MMAD_X_CHUNKS 1
#endif
#ifndef MMAD_PERM_EARLY // act-order in the GEMV's `_gather` entries: staging rounds whose indices are loaded
#define MMAD_PERM_EARLY 1 // before the dependent-launch wait (1 fastest at 3 and 4 bits, BENCHMARKS.md)
#endif
#ifndef MMAD_MOE_PERM_EARLY // the same in the fused MoE's `_gather` entries (before its copy of X; 0 measured
#define MMAD_MOE_PERM_EARLY 0 // fastest there)
#endif
// Act-order in the register-pipelined entries: the kinds of entry that read the permutation's u16 copy
// (2 bytes an index, after the i32 ones in the same buffer) instead of the i32 indices, a bit each (1
// `_gather`, 2 `_gather_slice`, 4 the fused MoE's `_gather`: MMAD_PERM16_BIT below), so that one sweep
// times each kind's choice on its own. All three measured faster with the u16 copy (BENCHMARKS.md); the
// host's MMAD_PERM16_DEFAULT (cuda/gptq.rs) must say the same.
#ifndef MMAD_PERM16
#define MMAD_PERM16 7
#endif
#ifndef MMA_X_CHUNKS // 16-byte chunks of X each lane stages per round trip
#define MMA_X_CHUNKS 3
#endif
#define MMA_THREADS (MMA_WARPS * 32)

template <typename T> struct IsBf16 { static constexpr bool value = false; };
template <> struct IsBf16<__nv_bfloat16> { static constexpr bool value = true; };

// Halves between rows of a warp's X area: the 32-row tiles plus 32 or 64 halves, so that rows are
// 64 bytes apart modulo 128 and the 16-byte fragment loads of rows g and g + 1 use different banks.
// runtime/src/cuda/gptq.rs (`mma_plan`) computes the same.
__host__ __device__ __forceinline__ int mma_xstride(int tiles_per_warp) {
    return tiles_per_warp * 32 + ((tiles_per_warp & 1) ? 64 : 32);
}

// Ring rows: one 128-byte packed row of the warp's strip each, padded so that the fragment reads
// (lane (g, c): 16 bytes at column 16g of row c at 4 bits, rows 2c and 2c + 1 at 8 bits) hit 8
// different 16-byte bank groups per quarter-warp: pitch 160 bytes at 4 bits, 144 at 8 bits.
__host__ __device__ constexpr int mma_ring_pitch(int bits) { return bits == 4 ? 160 : 144; }
// One ring slot: the tile's 4 (8) packed rows.
__host__ __device__ constexpr int mma_slot_bytes(int bits) { return (bits == 4 ? 4 : 8) * mma_ring_pitch(bits); }
// Bytes of one group's data in a warp's area: the strip's 32 scales (64 bytes), then its 32 zeros
// (16 or 32 bytes; 32 reserved).
#define MMA_GROUP_BYTES 96

// Groups a warp's run of tiles_per_warp tiles can meet: each tile lies in one group, and with
// uniform groups of group_rows rows a run of L = 32 tiles_per_warp rows meets at most
// (L - 1) / group_rows + 2. runtime/src/cuda/gptq.rs (`mma_groups_cap`) computes the same.
__host__ __device__ __forceinline__ int mma_groups_cap(int tiles_per_warp, int group_rows) {
    return group_rows > 0 ? min(tiles_per_warp, (32 * tiles_per_warp - 1) / group_rows + 2) : tiles_per_warp;
}

// Bytes of shared memory per warp of the tensor-core GEMV: X, the tiles' groups, the groups' scales
// and zeros, the ring. runtime/src/cuda/gptq.rs (`mma_warp_smem`) computes the same.
__host__ __device__ __forceinline__ int mma_warp_smem(int M, int tiles_per_warp, int bits, int group_rows) {
    return M * mma_xstride(tiles_per_warp) * 2 + ((tiles_per_warp * 4 + 15) & ~15) +
           mma_groups_cap(tiles_per_warp, group_rows) * MMA_GROUP_BYTES + MMA_STAGES * mma_slot_bytes(bits);
}

// X of one 8-row block (words w0..w3 = (x0,x1) (x2,x3) (x4,x5) (x6,x7)) in the order the B
// fragments pair the codes: 3 and 4 bits (x0,x4) (x1,x5) (x2,x6) (x3,x7); 8 bits (x0,x2) (x1,x3)
// (x4,x6) (x5,x7).
template <int BITS> __device__ __forceinline__ uint4 mma_order(u32 w0, u32 w1, u32 w2, u32 w3) {
    if (BITS != 8)
        return make_uint4(__byte_perm(w0, w2, 0x5410), __byte_perm(w0, w2, 0x7632), __byte_perm(w1, w3, 0x5410),
                          __byte_perm(w1, w3, 0x7632));
    return make_uint4(__byte_perm(w0, w1, 0x5410), __byte_perm(w0, w1, 0x7632), __byte_perm(w2, w3, 0x5410),
                      __byte_perm(w2, w3, 0x7632));
}

// acc (4 floats) += A . B for one m16n8k16: A = 16 output columns x 16 k of (q - z) codes
// (a0: row g, k 2c..2c+1; a1: row g + 8; a2, a3: the same rows at k + 8), B = 16 k x 8 rows of X
// (b0: k 2c..2c+1 of X row g; b1: k + 8). acc: (column row g, X rows 2c, 2c + 1), then row g + 8.
__device__ __forceinline__ void mma_16816(float* acc, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1, bool bf) {
    if (bf) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};"
                     : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};"
                     : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
}

__device__ __forceinline__ u32 h2_sub(u32 a, u32 b) {
    const __half2 r = __hsub2(*(const __half2*)&a, *(const __half2*)&b);
    return *(const u32*)&r;
}
__device__ __forceinline__ u32 h2_fma(u32 a, u32 b, u32 c) {
    const __half2 r = __hfma2(*(const __half2*)&a, *(const __half2*)&b, *(const __half2*)&c);
    return *(const u32*)&r;
}
__device__ __forceinline__ u32 b2_fma(u32 a, u32 b, u32 c) {
    const __nv_bfloat162 r = __hfma2(*(const __nv_bfloat162*)&a, *(const __nv_bfloat162*)&b, *(const __nv_bfloat162*)&c);
    return *(const u32*)&r;
}
__device__ __forceinline__ u32 b2_sub(u32 a, u32 b) {
    const __nv_bfloat162 r = __hsub2(*(const __nv_bfloat162*)&a, *(const __nv_bfloat162*)&b);
    return *(const u32*)&r;
}
__device__ __forceinline__ u32 f2_to_b2(float lo, float hi) {
    const __nv_bfloat162 r = __floats2bfloat162_rn(lo, hi);
    return *(const u32*)&r;
}
// Per-column constants of the current group for the B operand (lane's 4 columns).
template <int BITS, bool BF> struct MmaZero {
    u32 lo[4]; // magic + z, as x2 (f16/bf16); at 8-bit bf16: unused; 3 bits: see mma_pairs3
    u32 hi[4]; // 4-bit f16: -(64 + z) for the shifted nibbles; 8-bit bf16: (2^23 + z) as float bits;
               // 3-bit f16: see mma_pairs3
    // w: the lane's four stored (zero - 1) codes at bits BITS * j (bytes j at 3 bits). Every constant
    // is an exact small number, so its encoding is built with integer operations: f16 1024 + z =
    // 0x6400 + z and -(64 + z) = 0xD400 + 16 z (z <= 16), bf16 128 + z = 0x4300 + z and -(8 + z) =
    // 0xC100 + 16 z, f32 2^23 + z = 0x4B000000 + z.
    __device__ __forceinline__ void set(u32 w) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const u32 z = ((w >> (BITS * j)) & ((1u << BITS) - 1u)) + 1u; // (not used at 3 bits)
            if (BITS == 3) {
                // f16 (-(64 + z), -(1024 + z)) = (0xD400 + 16 z, 0xE400 + z); bf16 (-(8 + z),
                // -(128 + z)) = (0xC100 + 16 z, 0xC300 + z): one multiply-add of the code (z - 1);
                // f16 also (-(8 + z), -(128 + z)) = (0xC800 + 128 z, 0xD800 + 8 z) (mma_pairs3).
                const u32 code = __byte_perm(w, 0u, 0x4440 + j);
                lo[j] = code * 0x00010010u + (BF ? 0xC301C110u : 0xE401D410u);
                if (!BF) hi[j] = code * 0x00080080u + 0xD808C880u;
            } else if (BITS == 4 && !BF) {
                lo[j] = (0x6400u + z) * 0x10001u;
                hi[j] = (0xD400u + (z << 4)) * 0x10001u;
            } else if (BITS == 4) {
                lo[j] = (0x4300u + z) * 0x10001u;
            } else if (!BF) {
                lo[j] = (0x6400u + z) * 0x10001u;
            } else {
                hi[j] = 0x4B000000u + z;
            }
        }
    }
};

// The (q - z) pairs of one packed word as f16x2/bf16x2 (4 bits: (q0,q4) (q1,q5) (q2,q6) (q3,q7);
// 8 bits: (q0,q2) (q1,q3), the other two left unset), for the lane's column j.
template <int BITS, bool BF>
__device__ __forceinline__ void mma_pairs(u32 w, const MmaZero<BITS, BF>& zc, int j, u32* p) {
    if (BITS == 4 && !BF) {
        u32 mh;
        asm volatile("mov.b32 %0, 0x64006400;" : "=r"(mh));
        const u32 sixteenth = 0x2C002C00u; // f16x2 (1/16, 1/16)
        const u32 w8 = w >> 8;
        p[0] = h2_sub(and_or(w, 0x000F000Fu, mh), zc.lo[j]);
        p[1] = h2_fma(and_or(w, 0x00F000F0u, mh), sixteenth, zc.hi[j]);
        p[2] = h2_sub(and_or(w8, 0x000F000Fu, mh), zc.lo[j]);
        p[3] = h2_fma(and_or(w8, 0x00F000F0u, mh), sixteenth, zc.hi[j]);
    } else if (BITS == 4) {
        u32 mb;
        asm volatile("mov.b32 %0, 0x43004300;" : "=r"(mb));
        p[0] = b2_sub(and_or(w, 0x000F000Fu, mb), zc.lo[j]);
        p[1] = b2_sub(and_or(w >> 4, 0x000F000Fu, mb), zc.lo[j]);
        p[2] = b2_sub(and_or(w >> 8, 0x000F000Fu, mb), zc.lo[j]);
        p[3] = b2_sub(and_or(w >> 12, 0x000F000Fu, mb), zc.lo[j]);
    } else if (!BF) {
        p[0] = h2_sub(__byte_perm(w, 0x64646464u, 0x4240), zc.lo[j]); // (q0, q2)
        p[1] = h2_sub(__byte_perm(w, 0x64646464u, 0x4341), zc.lo[j]); // (q1, q3)
    } else {
        const float zf = __uint_as_float(zc.hi[j]);
        const float q0 = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7440)) - zf;
        const float q1 = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7441)) - zf;
        const float q2 = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7442)) - zf;
        const float q3 = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7443)) - zf;
        p[0] = f2_to_b2(q0, q2);
        p[1] = f2_to_b2(q1, q3);
    }
}

// 3 bits: the (q - z) pairs (v0,v4) (v1,v5) (v2,v6) (v3,v7) of values 8t .. 8t + 7 of one column's
// 32-value unit (w0, w1, w2; value k at bit 3k of the 96-bit w0|w1|w2), the pairing of 4 bits. One
// SHF brings a pair's codes into one half each, one LOP3 keeps them under the magic exponent (f16
// 1024, bf16 128), and one FMA unscales them and subtracts the zero, exactly:
// * bf16 (7 mantissa bits, codes at bits <= 4): pair e from the unit shifted right by 24t + 3e - 4,
//   v_{8t+e} at bits 4..6 and v_{8t+e+4} at 16..18: halves 128 + 16 a and 128 + b, times (1/16, 1),
//   plus (-(8 + z), -(128 + z)) (zlo);
// * f16 (10 mantissa bits): one shift serves two pairs. Shifted right by 24t - 4, (v0, v4) sit at
//   bits 4 and 16 as above and (v1, v5) at 7 and 19: halves 1024 + 128 a and 1024 + 8 b, times
//   (1/128, 1/8), plus (-(8 + z), -(128 + z)) (zhi); shifted right by 24t + 2, (v2, v6) and (v3, v7)
//   likewise. The first kind takes (1/16, 1) and (-(64 + z), -(1024 + z)) (zlo).
template <bool BF, int T>
__device__ __forceinline__ void mma_pairs3(u32 w0, u32 w1, u32 w2, u32 zlo, u32 zhi, u32* p) {
    auto shifted = [&](int r) {
        return r < 0 ? w0 << -r : r < 32 ? __funnelshift_r(w0, w1, r) : r < 64 ? __funnelshift_r(w1, w2, r - 32) : w2 >> (r - 64);
    };
    u32 magic;
    if (BF) {
        asm volatile("mov.b32 %0, 0x43004300;" : "=r"(magic));
#pragma unroll
        for (int e = 0; e < 4; ++e)
            p[e] = b2_fma(and_or(shifted(24 * T + 3 * e - 4), 0x00070070u, magic), 0x3F803D80u, zlo); // (1/16, 1)
    } else {
        asm volatile("mov.b32 %0, 0x64006400;" : "=r"(magic));
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const u32 src = shifted(24 * T + 6 * h - 4);
            p[2 * h] = h2_fma(and_or(src, 0x00070070u, magic), 0x3C002C00u, zlo);     // (1/16, 1)
            p[2 * h + 1] = h2_fma(and_or(src, 0x00380380u, magic), 0x30002000u, zhi); // (1/128, 1/8)
        }
    }
}

// One 32-row tile for the lane's four columns (words wv[h] = columns 4g + j): A row g is column
// 4g + 2i, row g + 8 is column 4g + 2i + 1 (i = 0, 1: acc[i]); x holds the lane's B fragments of
// X row g in the pairs' k order (mma_order).
template <int BITS, bool BF>
__device__ __forceinline__ void mma_tile(const uint4* wv, const uint4& x, const MmaZero<BITS, BF>& zc, float (*acc)[4]) {
    if (BITS == 4) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            u32 pa[4], pb[4];
            mma_pairs<BITS, BF>(comp(wv[0], 2 * i), zc, 2 * i, pa);
            mma_pairs<BITS, BF>(comp(wv[0], 2 * i + 1), zc, 2 * i + 1, pb);
            // k slots 2c, 2c+1 <- (q0, q4), 2c+8, 2c+9 <- (q1, q5); then (q2, q6), (q3, q7).
            mma_16816(acc[i], pa[0], pb[0], pa[1], pb[1], x.x, x.y, BF);
            mma_16816(acc[i], pa[2], pb[2], pa[3], pb[3], x.z, x.w, BF);
        }
    } else {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                u32 pa[2], pb[2];
                mma_pairs<BITS, BF>(comp(wv[h], 2 * i), zc, 2 * i, pa);
                mma_pairs<BITS, BF>(comp(wv[h], 2 * i + 1), zc, 2 * i + 1, pb);
                mma_16816(acc[i], pa[0], pb[0], pa[1], pb[1], h == 0 ? x.x : x.z, h == 0 ? x.y : x.w, BF);
            }
        }
    }
}

// 3 bits: step T (0..3) of a 128-row super-tile, whose lane (g, c) holds the whole 32-row unit c
// of columns 4g .. 4g + 3 (wv[h]: word h of each column's unit) and takes its values 8T .. 8T + 7;
// x holds X at those rows (mma_stage_x stages them so). Otherwise as mma_tile at 4 bits.
template <bool BF, int T>
__device__ __forceinline__ void mma_tile3(const uint4* wv, const uint4& x, const MmaZero<3, BF>& zc, float (*acc)[4]) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        u32 pa[4], pb[4];
        mma_pairs3<BF, T>(comp(wv[0], 2 * i), comp(wv[1], 2 * i), comp(wv[2], 2 * i), zc.lo[2 * i], zc.hi[2 * i], pa);
        mma_pairs3<BF, T>(comp(wv[0], 2 * i + 1), comp(wv[1], 2 * i + 1), comp(wv[2], 2 * i + 1), zc.lo[2 * i + 1],
                          zc.hi[2 * i + 1], pb);
        mma_16816(acc[i], pa[0], pb[0], pa[1], pb[1], x.x, x.y, BF);
        mma_16816(acc[i], pa[2], pb[2], pa[3], pb[3], x.z, x.w, BF);
    }
}

// A warp's sums for its four columns (acc[i]: columns 4g + 2i and 4g + 2i + 1, X rows 2c and 2c + 1):
// gacc collects the current group's sum of x * (q - z), which flush() scales into acc.
template <int BITS, bool BF> struct MmaAcc {
    float acc[2][4], gacc[2][4];
    float s[4];
    MmaZero<BITS, BF> zc;
    __device__ __forceinline__ void init() {
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][r] = gacc[i][r] = 0.0f;
    }
    __device__ __forceinline__ void flush() {
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                acc[i][r] = fmaf(s[2 * i + (r >> 1)], gacc[i][r], acc[i][r]);
                gacc[i][r] = 0.0f;
            }
    }
    // The next group: sr holds the f16 scales of columns 4g .. 4g + 3, zw their stored zero codes at
    // bits BITS * j.
    __device__ __forceinline__ void group(uint2 sr, u32 zw) {
        const u32 sw[2] = {sr.x, sr.y};
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            s[2 * j] = __half2float(__ushort_as_half((unsigned short)(sw[j] & 0xFFFF)));
            s[2 * j + 1] = __half2float(__ushort_as_half((unsigned short)(sw[j] >> 16)));
        }
        zc.set(zw);
    }
};

// Act-order with a small X (xblock != 0): the block first copies X [M][K] to the front of its
// shared memory with 16-byte loads, and the warps gather their permuted columns from there: a
// warp-wide 2-byte gather from global memory touches up to 32 sectors per instruction. Ends with the
// block's only barrier; returns the bytes taken (rounded up to 16).
template <typename T> __device__ __forceinline__ size_t mma_copy_x_block(const T* __restrict__ X, int M, int K, float* smem) {
    const uint4* src = (const uint4*)X;
    uint4* dst = (uint4*)smem;
    const int n16 = M * K / 8;
    for (int i0 = threadIdx.x; i0 < n16; i0 += 4 * blockDim.x) {
        uint4 v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u)
            if (i0 + u * (int)blockDim.x < n16) v[u] = ld_dep(src + i0 + u * blockDim.x);
#pragma unroll
        for (int u = 0; u < 4; ++u)
            if (i0 + u * (int)blockDim.x < n16) dst[i0 + u * blockDim.x] = v[u];
    }
    __syncthreads();
    return ((size_t)M * K * 2 + 15) & ~(size_t)15;
}

// The same copy with cp.async (no registers in between), for the register-pipelined GEMV: the copy
// is in flight when this returns; cp_async_wait and __syncthreads complete it.
template <typename T> __device__ __forceinline__ void mma_copy_x_block_async(const T* X, int M, int K, float* smem) {
    const int n16 = M * K / 8;
    for (int i = threadIdx.x; i < n16; i += blockDim.x) cp_async16((uint4*)smem + i, (const uint4*)X + i);
    cp_async_commit();
}

// Stages a warp's X (tiles t_begin .. t_begin + nt - 1 of every row) in fragment order (mma_order)
// at xs [M][xstride]: 8 consecutive k of one row per chunk, a 16-byte load (or, for act-order, one
// index load pair from `perm`, the run's indices in global or shared memory, and 8 gathers, from the
// block's copy of X when xblock is not null) and a 16-byte store; CH chunks per lane and round trip.
// Ends with __syncwarp.
// At 3 bits (runs of whole 128-row super-tiles), the chunk staged at tile 4s + t, lane slot c holds
// rows 128 s + 32 c + 8 t .. + 7: lane c's rows of step t of super-tile s (mma_tile3).
// mma_stage_x's walk over a warp's chunks: chunk ch = m * cpr + kc (cpr chunks per row), kept as
// (m, kc) and stepped by 32 chunks (a lane's next) without a division.
__device__ __forceinline__ void stage_step(int cpr, int& m, int& kc) {
    kc += 32;
    while (kc >= cpr) {
        kc -= cpr;
        ++m;
    }
}
// Where staged chunk kk (in halves) reads X: the same place, or at 3 bits the transposed one.
template <int BITS> __device__ __forceinline__ int stage_src_k(int kk) {
    if (BITS != 3) return kk;
    const int kc = kk >> 3;
    return ((kc & ~15) | ((kc & 3) << 2) | ((kc >> 2) & 3)) << 3;
}
// The 8 act-order indices of one staged chunk, as loaded from a warp's run of the permutation
// (global memory, or with SHARED the warp's copy in shared memory): i32 indices with two 16-byte
// loads, or (I = unsigned short, MMAD_PERM16) the u16 copy, two indices a word, with one.
template <typename I> struct Idx8;
template <> struct Idx8<int> {
    int v[8];
    template <bool SHARED> __device__ __forceinline__ void load(const int* perm, int kk) {
        const int4* pp = (const int4*)(perm + kk);
        const int4 p0 = SHARED ? pp[0] : __ldg(pp), p1 = SHARED ? pp[1] : __ldg(pp + 1);
        v[0] = p0.x; v[1] = p0.y; v[2] = p0.z; v[3] = p0.w;
        v[4] = p1.x; v[5] = p1.y; v[6] = p1.z; v[7] = p1.w;
    }
    __device__ __forceinline__ unsigned get(int e) const { return (unsigned)v[e]; }
};
template <> struct Idx8<unsigned short> {
    u32 v[4];
    template <bool SHARED> __device__ __forceinline__ void load(const unsigned short* perm, int kk) {
        const uint4* pp = (const uint4*)(perm + kk);
        const uint4 p = SHARED ? pp[0] : __ldg(pp);
        v[0] = p.x; v[1] = p.y; v[2] = p.z; v[3] = p.w;
    }
    __device__ __forceinline__ unsigned get(int e) const { return e & 1 ? v[e >> 1] >> 16 : v[e >> 1] & 0xffffu; }
};
// The index type of act-order gathers: int, or unsigned short for the u16 copy.
template <bool U16> struct PermIndex { typedef int type; };
template <> struct PermIndex<true> { typedef unsigned short type; };
// Act-order: the indices mma_stage_x<BITS, CH> reads in its first PRE round trips, loaded ahead of it
// (the permutation is written by uploads only, so this may run before the dependent-launch wait).
template <int BITS, int CH, int PRE, typename I>
__device__ __forceinline__ void mma_stage_idx_early(const I* perm, int M, int nt, int lane, Idx8<I> (*idx)[CH]) {
    const int cpr = nt * 4, chunks = M * cpr;
    if (chunks == 0) return;
    int m = 0, kc = lane - 32;
    stage_step(cpr, m, kc);
#pragma unroll
    for (int r = 0; r < PRE; ++r)
#pragma unroll
        for (int u = 0; u < CH; ++u) {
            if (lane + (r * CH + u) * 32 < chunks) idx[r][u].template load<false>(perm, stage_src_k<BITS>(kc * 8));
            stage_step(cpr, m, kc);
        }
}

// mma_stage_x without act-order, with every chunk's copy issued at once (cp.async.ca: kept in L1, as
// mma_stage_x's ld.global.ca does, so that the blocks of one SM share X; .cg, from L2 only, was slower)
// and put in fragment order in place once all have landed: one round trip per warp, where
// mma_stage_x's rounds of CH chunks per lane (loads held in registers) take one each, 8-16 at M = 4-8.
// Ends with __syncwarp.
template <int BITS, typename T>
__device__ __forceinline__ void mma_stage_x_async(const T* __restrict__ X, int M, int K, int t_begin, int nt, T* xs,
                                                  int xstride, int lane) {
    const int k0 = t_begin * 32, cpr = nt * 4; // chunks per row
    const int chunks = M * cpr;
    // f(m, kc) for each of the lane's chunks (row m, chunk kc of the row)
    auto each_chunk = [&](auto f) {
        int m = 0, kc = lane - 32;
        if (chunks > 0) stage_step(cpr, m, kc);
        for (int ch = lane; ch < chunks; ch += 32) {
            f(m, kc);
            stage_step(cpr, m, kc);
        }
    };
    each_chunk([&](int m, int kc) {
        cp_async16<true>(xs + m * xstride + kc * 8, X + (size_t)m * K + k0 + stage_src_k<BITS>(kc * 8));
    });
    cp_async_commit();
    cp_async_wait<0>();
    each_chunk([&](int m, int kc) {
        uint4* p = (uint4*)(xs + m * xstride + kc * 8);
        const uint4 v = *p;
        *p = mma_order<BITS>(v.x, v.y, v.z, v.w);
    });
    __syncwarp();
}

template <int BITS, int CH, typename T, bool PERM_SHARED = false, int PRE = 0, typename I = int>
__device__ __forceinline__ void mma_stage_x(const I* perm, const T* __restrict__ X, int M, int K, const float* xblock,
                                            int t_begin, int nt, T* xs, int xstride, int lane,
                                            const Idx8<I> (*pre)[CH] = nullptr) {
    const int k0 = t_begin * 32, cpr = nt * 4; // chunks per row
    const int chunks = M * cpr;
    const unsigned short* xb = (const unsigned short*)X;
    const unsigned xsh = xblock ? (unsigned)__cvta_generic_to_shared(xblock) : 0u; // act-order gathers
    int m_next = 0, kc_next = lane - 32;
    if (chunks > 0) stage_step(cpr, m_next, kc_next);
    int round = 0; // (PRE: rounds whose indices `pre` holds)
    for (int ch0 = lane; ch0 < chunks; ch0 += CH * 32, ++round) {
        u32 w[CH][4];
        int mu[CH], ku[CH];
#pragma unroll
        for (int u = 0; u < CH; ++u) {
            mu[u] = m_next;
            ku[u] = kc_next * 8;
            stage_step(cpr, m_next, kc_next);
        }
#pragma unroll
        for (int u = 0; u < CH; ++u) {
            const int ch = ch0 + u * 32;
            const int m = mu[u], kk = stage_src_k<BITS>(ku[u]);
            if (ch < chunks && !perm) {
                const uint4 v = ld_dep((const uint4*)(xb + (size_t)m * K + k0 + kk));
                w[u][0] = v.x; w[u][1] = v.y; w[u][2] = v.z; w[u][3] = v.w;
            }
        }
        if (perm) {
            Idx8<I> idx[CH];
            if (PRE > 0 && round < PRE) {
#pragma unroll
                for (int r = 0; r < PRE; ++r)
                    if (r == round)
#pragma unroll
                        for (int u = 0; u < CH; ++u) idx[u] = pre[r][u];
            } else {
#pragma unroll
                for (int u = 0; u < CH; ++u) {
                    const int ch = ch0 + u * 32;
                    if (ch < chunks) idx[u].template load<PERM_SHARED>(perm, stage_src_k<BITS>(ku[u]));
                }
            }
#pragma unroll
            for (int u = 0; u < CH; ++u) {
                const int ch = ch0 + u * 32;
                const int m = mu[u];
                if (ch < chunks) {
                    u32 h[8];
                    if (xblock) {
                        // 32-bit shared addresses: one shift-add and one 2-byte load per element
                        const unsigned row = xsh + 2u * (unsigned)(m * K);
#pragma unroll
                        for (int e = 0; e < 8; ++e) h[e] = lds_u16(row + 2u * idx[u].get(e));
                    } else {
#pragma unroll
                        for (int e = 0; e < 8; ++e) h[e] = ld_dep(xb + (size_t)m * K + (int)idx[u].get(e));
                    }
#pragma unroll
                    for (int e = 0; e < 4; ++e) w[u][e] = h[2 * e] | (h[2 * e + 1] << 16);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < CH; ++u) {
            const int ch = ch0 + u * 32;
            const int m = mu[u], kk = ku[u];
            if (ch < chunks) *(uint4*)(xs + m * xstride + kk) = mma_order<BITS>(w[u][0], w[u][1], w[u][2], w[u][3]);
        }
    }
    __syncwarp();
}

// Stores lane (g, c)'s sums (X rows 2c and 2c + 1 where below M, the lane's four columns) at
// out[row * stride + col .. + 3].
__device__ __forceinline__ void mma_store_sums(const float (*acc)[4], int M, float* out, size_t stride, int col) {
    const int c = threadIdx.x & 3;
    const float4 r0 = make_float4(acc[0][0], acc[0][2], acc[1][0], acc[1][2]);
    const float4 r1 = make_float4(acc[0][1], acc[0][3], acc[1][1], acc[1][3]);
    if (2 * c < M) *(float4*)(out + (2 * c) * stride + col) = r0;
    if (2 * c + 1 < M) *(float4*)(out + (2 * c + 1) * stride + col) = r1;
}

// Writes a warp's sums (lane (g, c): X rows 2c and 2c + 1, columns n0 + 4g .. n0 + 4g + 3): to Y
// when nsplit is 1, else to its split's partial in ws; the last warp of the strip to finish adds the
// partials in split order (deterministic) and resets the strip's counter.
__device__ __forceinline__ void mma_finish(const float (*acc)[4], int M, int N, int n0, int strip, int split, int nsplit,
                                           float* __restrict__ ws, u32* __restrict__ counters, float* __restrict__ Y) {
    const int lane = threadIdx.x & 31;
    mma_store_sums(acc, M, nsplit == 1 ? Y : ws + (size_t)split * 8 * N, N, n0 + 4 * (lane >> 2));
    if (nsplit == 1) return;
    __threadfence();
    __syncwarp();
    u32 last = 0;
    if (lane == 0) last = atomicAdd(counters + strip, 1u) == (u32)(nsplit - 1);
    last = __shfl_sync(0xffffffffu, last, 0);
    if (!last) return;
    __threadfence();
    for (int m = 0; m < M; ++m) {
        float v = 0.0f;
        for (int sp = 0; sp < nsplit; ++sp) v += __ldcg(ws + ((size_t)sp * 8 + m) * N + n0 + lane);
        Y[(size_t)m * N + n0 + lane] = v;
    }
    if (lane == 0) counters[strip] = 0u;
}

// The ring variant of the tensor-core GEMV: any grouping (a tile's group may come from ugroup), and
// the plan's choice where the register-pipelined variant (mmad_gemv, below) would hold too much of X
// per block. One warp's work: 32 output columns (a strip) for up to 8 rows of X over a run of 32-row
// k-tiles. Warps are independent (the only block-level barrier ends the optional X copy): grid-wide,
// warp w takes strip w / nsplit and k-split w % nsplit, the splits of a strip being `tiles_per_warp`
// tiles each. The plan (runtime/src/cuda/gptq.rs, `mma_plan`) sizes the grid in whole waves of
// resident warps, each streaming its run through its own cp.async ring of MMA_STAGES slots in shared
// memory (the loop stays rolled). Split partials meet in `ws`; the last warp of a strip to finish
// adds them in split order (deterministic).
// Dynamic shared memory: X [M][K] rounded up to 16 bytes when xblock, then MMA_WARPS *
// mma_warp_smem(M, tiles_per_warp, bits, group_rows) bytes.
template <int BITS, typename T>
__device__ __forceinline__ void mma_gemv(const QMat q, const T* __restrict__ X, int M, int K, int N,
                                         int group_rows, int nsplit, int tiles_per_warp, int xblock,
                                         float* __restrict__ ws, u32* __restrict__ counters,
                                         float* __restrict__ Y) {
    constexpr bool BF = IsBf16<T>::value;
    constexpr int UNITS_PER_TILE = BITS == 4 ? 4 : 8; // packed rows (words) per 32-row tile
    constexpr int LPT = BITS == 4 ? 1 : 2;             // 16-byte loads per lane and tile
    constexpr int S = MMA_STAGES;
    extern __shared__ float smem[];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, c = lane & 3;
    const int wid = blockIdx.x * MMA_WARPS + warp;
    const int strips = N / 32;
    const size_t xblock_bytes = xblock ? mma_copy_x_block(X, M, K, smem) : 0;
    if (wid >= strips * nsplit) return; // no barrier below: whole warps may leave
    const int strip = wid / nsplit, split = wid - strip * nsplit;
    const int n0 = strip * 32;
    const int tiles = K / 32;
    const int t_begin = min(tiles, split * tiles_per_warp);
    const int nt = min(tiles, t_begin + tiles_per_warp) - t_begin;
    const int xstride = mma_xstride(tiles_per_warp);
    // This warp's area: X [M][xstride] halves, the group of each tile, the scales and zeros of each
    // group the run meets, the ring of S slots.
    unsigned char* area =
        (unsigned char*)smem + xblock_bytes + (size_t)warp * mma_warp_smem(M, tiles_per_warp, BITS, group_rows);
    T* xs = (T*)area;
    int* gs = (int*)(area + (size_t)M * xstride * 2);
    unsigned char* garea = area + (size_t)M * xstride * 2 + ((tiles_per_warp * 4 + 15) & ~15);
    unsigned char* ring = garea + mma_groups_cap(tiles_per_warp, group_rows) * MMA_GROUP_BYTES;
    constexpr int PITCH = mma_ring_pitch(BITS), SLOT = mma_slot_bytes(BITS);
    constexpr int ZBYTES = BITS == 4 ? 16 : 32; // a strip's zeros of one group

    // The group of each tile of the run, in gs: arithmetic when every group holds group_rows sorted
    // rows (the plan passes group_rows > 0 then), else read from ugroup (one load before the first copy).
    for (int i = lane; i < nt; i += 32)
        gs[i] = group_rows > 0 ? (t_begin + i) * 32 / group_rows
                               : __ldg(q.ugroup + (size_t)(t_begin + i) * UNITS_PER_TILE);
    __syncwarp();

    // The scales and zeros of every group the run meets, in order, copied once before the first
    // tile (they join its commit group): the lane of each tile that starts a group copies that
    // group's 64 bytes of scales and 16 (32) bytes of zeros to garea slot k, k counting the starts.
    for (int t0 = 0, k0 = 0; t0 < nt; t0 += 32) {
        const int t = t0 + lane;
        const bool start = t < nt && (t == 0 || gs[t] != gs[t - 1]);
        const unsigned starts = __ballot_sync(0xffffffffu, start);
        if (start) {
            const int grp = gs[t];
            unsigned char* d = garea + (k0 + __popc(starts & ((1u << lane) - 1u))) * MMA_GROUP_BYTES;
            const unsigned char* sc = (const unsigned char*)(q.scales + (size_t)grp * N + n0);
            const unsigned char* zs = (const unsigned char*)q.zeros + (size_t)grp * N * BITS / 8 + (size_t)n0 * BITS / 8;
#pragma unroll
            for (int p = 0; p < 4; ++p) cp_async16(d + 16 * p, sc + 16 * p);
#pragma unroll
            for (int p = 0; p < ZBYTES / 16; ++p) cp_async16(d + 64 + 16 * p, zs + 16 * p);
        }
        k0 += __popc(starts);
    }

    // Tile t of the strip is 512 (1024) contiguous bytes in the strip-major layout (q.strip_rows = R):
    // packed rows t * UNITS_PER_TILE .. + UNITS_PER_TILE - 1, 128 bytes (32 columns) each. Lane l copies
    // bytes 16 l (and 512 + 16 l) in order, so that global and shared addresses follow the lanes alike;
    // tile i of the run (i counted from t_begin) goes to ring slot i % S, row r at r * PITCH.
    // (a tile is a slot at 4 and 8 bits). Strip-major keeps an expression of its own: the tile-major
    // one, equal in value there, changes how ptxas schedules these entries (cuobjdump -sass).
    const size_t tstep = qw_tile_major(BITS) ? qw_slot_step<BITS>(N) : UNITS_PER_TILE * 32;
    const u32* wsrc = qw_tile_major(BITS)
                          ? q.qweight + (size_t)strip * qw_strip_step<BITS>(q.strip_rows) +
                                (size_t)t_begin * tstep + (lane >> 3) * 32 + 4 * (lane & 7)
                          : q.qweight + (size_t)strip * q.strip_rows * 32 +
                                ((size_t)t_begin * UNITS_PER_TILE + (lane >> 3)) * 32 + 4 * (lane & 7);
    const int wdst = (lane >> 3) * PITCH + 16 * (lane & 7);
    auto issue = [&](int i) {
        unsigned char* slot = ring + (i % S) * SLOT;
        const u32* src = wsrc + (size_t)i * tstep;
#pragma unroll
        for (int h = 0; h < LPT; ++h) cp_async16(slot + wdst + h * 4 * PITCH, src + h * 4 * 32);
    };
#pragma unroll
    for (int i = 0; i < S - 1; ++i) {
        if (i < nt) issue(i);
        cp_async_commit();
    }

    mma_stage_x<BITS, MMA_X_CHUNKS>(q.perm ? q.perm + t_begin * 32 : nullptr, X, M, K, xblock ? smem : nullptr, t_begin,
                                    nt, xs, xstride, lane);

    MmaAcc<BITS, BF> a;
    a.init();
    int cur_g = -1;
    // B column g is X row g; lanes past the last row repeat it (their output columns are dropped).
    const T* xrow = xs + min(g, M - 1) * xstride + 8 * c;

    // Tile i of the run, group gt: at a group change, the next group's scales and zeros come from
    // garea (lane (g, c): scales of columns 4g .. 4g + 3, their zero word).
    const unsigned char* gnext = garea;
    auto body = [&](int i, int gt, const uint4* wv) {
        if (gt != cur_g) {
            if (cur_g >= 0) a.flush();
            const uint2 sr = *(const uint2*)(gnext + 8 * g);
            const u32 zw = BITS == 4 ? *(const u32*)(gnext + 64 + 4 * (g >> 1)) >> ((g & 1) * 16)
                                     : *(const u32*)(gnext + 64 + 4 * g);
            gnext += MMA_GROUP_BYTES;
            a.group(sr, zw);
            cur_g = gt;
        }
        const uint4 x = *(const uint4*)(xrow + i * 32);
        mma_tile<BITS, BF>(wv, x, a.zc, a.gacc);
    };

    const int wread = LPT * c * PITCH + 16 * g; // lane (g, c): packed rows LPT c + h, columns 4g ..
#pragma unroll 1
    for (int i = 0; i < nt; ++i) {
        cp_async_wait<S - 2>(); // this lane's pieces of tile i have landed
        __syncwarp();           // ... and every lane's (each reads what others copied)
        const unsigned char* slot = ring + (i % S) * SLOT;
        // Lane (g, c): packed row LPT * c + h of the tile, columns 4g .. 4g + 3.
        uint4 wv[LPT];
#pragma unroll
        for (int h = 0; h < LPT; ++h) wv[h] = *(const uint4*)(slot + wread + h * PITCH);
        // Slot (i + S - 1) % S = (i - 1) % S was read by every lane in the previous iteration, before
        // the __syncwarp above; slot i % S (read by body) is another one.
        if (i + S - 1 < nt) issue(i + S - 1);
        cp_async_commit();
        body(i, gs[i], wv);
    }
    cp_async_wait<0>();
    if (cur_g >= 0) a.flush();

    mma_finish(a.acc, M, N, n0, strip, split, nsplit, ws, counters, Y);
}

// The tensor-core GEMV for uniform groups (group_rows > 0, a multiple of 32). One block per 32-column
// strip, its nsplit warps (at most the entry's launch bound) the strip's k-splits, added in shared
// memory at the end: no split-K workspace, fence or atomic. X is staged as in mma_gemv, but each lane loads its
// 16 bytes (two pieces at 8 bits) of every tile straight from global memory into a register
// pipeline D tiles deep, and the scales and zero word of the next group are loaded one group ahead
// into registers. Without the ring's waits, barriers and shared-memory round trip, a tile costs
// fewer instructions.
// Lane (g, c) of tile t reads packed row LPT c + h, columns 4g .. 4g + 3: bytes (LPT c + h) * 128 + 16 g
// of the tile's 512 (1024) contiguous bytes, so each warp-wide load is whole 128-byte lines.
// BLOCKED: the run is whole blocks of D tiles and no group starts inside a block (mmad_blocked), so
// the group and bounds checks run once per block; otherwise once per tile. The loop body is D tiles
// unrolled, so D trades tiles in flight against code size (measured: deeper was slower).
// Dynamic shared memory: X [M][K] rounded up to 16 bytes with xblock, then nsplit warp areas of
// M * xstride * 2 bytes, plus the run's indices (tiles_per_warp * 128 bytes, 64 with the u16 copy)
// each in `_gather_slice`.
// The entries' ws and counters are not used.
// The group data in flight of mmad_gemv's groups of one tile (empty otherwise).
// Loads pieces H0 .. H1 - 1 of pipeline slot d of a warp's run (if it holds any of its nt tiles)
// into buf: each lane has LPT 16-byte pieces per slot, slots SST uint4 apart from wp.
template <int H0, int H1, int D, int LPT, int TPB>
__device__ __forceinline__ void mmad_load_pieces(uint4 (&buf)[D][LPT], int d, const uint4* wp, int SST, int nt) {
    if (d * TPB < nt)
#pragma unroll
        for (int h = H0; h < H1; ++h) buf[d][h] = ld_stream((const u32*)(wp + d * SST + h * 8));
}
// Loads whole slots D0 .. D1 - 1 (mmad_load_pieces).
template <int D0, int D1, int D, int LPT, int TPB>
__device__ __forceinline__ void mmad_load_slots(uint4 (&buf)[D][LPT], const uint4* wp, int SST, int nt) {
#pragma unroll
    for (int d = D0; d < D1; ++d) mmad_load_pieces<0, LPT, D, LPT, TPB>(buf, d, wp, SST, nt);
}

template <int D, bool ON> struct MmadGroupPipe {
    uint2 sr[D];
    u32 zw[D];
    const uint2* sp;
    const u32* zp;
};
template <int D> struct MmadGroupPipe<D, false> {};

// yscale multiplies every output (the fused MoE's routing weight; the plain entries pass 1, which
// the compiler folds away). L2_AHEAD > 0: with each reload, each lane also asks L2 for its words of
// the tile L2_AHEAD further on (prefetch.global.L2), which only the fused MoE entry does.
// GATHER: act-order X gathered through q.perm, in entries of their own (`_gather`,
// `_gather_slice`), so that the gathers' registers do not weigh on the code of the layers without
// act-order (MMAD_PLAIN, which ignores q.perm; its launches never ask for xblock). xblock: the block
// first copies X to shared memory, where the warps gather from: with cp.async (MMAD_GATHER,
// MMAD_GATHER_SLICE) or with loads and stores (MMAD_GATHER_SYNC, the fused MoE's). With
// MMAD_GATHER_SLICE each warp copies its run's indices to its area before the dependent-launch wait;
// the others read them from global memory while they stage X (runtime/src/cuda/gptq.rs,
// `perm_slice`, says where each runs, with the measurements).
// X_ASYNC (the `_rows` entries): X staged by mma_stage_x_async, in one round trip.
// RELOAD_FIRST (4 and 8 bits, the `_tall` entries): each block of D tiles is copied and its slots
// reloaded before the block is computed. Otherwise ptxas issues a block's reloads after its last
// tile's products (SASS), so that every round trip of a warp's chain waits for D tiles of arithmetic.
#define MMAD_PLAIN 0
#define MMAD_GATHER 1
#define MMAD_GATHER_SLICE 2
#define MMAD_GATHER_SYNC 3
// MMAD_PERM16's bits: the entries of kind G read the u16 copy of the permutation.
#define MMAD_PERM16_BIT(G) ((G) == MMAD_GATHER ? 1 : (G) == MMAD_GATHER_SLICE ? 2 : (G) == MMAD_GATHER_SYNC ? 4 : 0)
#define MMAD_PERM16_ON(G) ((MMAD_PERM16 & MMAD_PERM16_BIT(G)) != 0)
template <int BITS, typename T, int D, bool BLOCKED, bool TILE_GROUPS, int L2_AHEAD, int GATHER,
          bool RELOAD_FIRST = false, bool GROUP_L1 = false, bool X_ASYNC = false, int PRE_ASKED = MMAD_PRE_ALL>
__device__ __forceinline__ void mmad_gemv(const QMat q, const T* __restrict__ X, int M, int K, int N, int group_rows,
                                          int nsplit, int tiles_per_warp, int xblock, float* __restrict__ Y,
                                          float yscale = 1.0f) {
    constexpr bool BF = IsBf16<T>::value;
    // A pipeline slot holds TPB tiles (at 3 bits a 128-row super-tile, see mma_tile3): LPT 16-byte
    // loads per lane, TS uint4 in all.
    constexpr int TPB = BITS == 3 ? 4 : 1;
    constexpr int LPT = BITS == 4 ? 1 : (BITS == 8 ? 2 : 3);
    constexpr int TS = 32 * LPT;
    static_assert(BITS != 3 || BLOCKED, "3 bits: whole super-tiles");
    static_assert(!TILE_GROUPS || (BLOCKED && BITS != 3), "groups of one tile: whole blocks, 4 or 8 bits");
    static_assert(!RELOAD_FIRST || (BITS != 3 && L2_AHEAD == 0 && !TILE_GROUPS), "reload first: the GEMV's 4/8-bit tiles");
    static_assert(!X_ASYNC || GATHER == MMAD_PLAIN, "X staged with cp.async: without act-order");
    extern __shared__ float smem[];

    pdl_launch_dependents();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, c = lane & 3;
    const int strip = blockIdx.x, split = warp; // nsplit warps per block
    const int n0 = strip * 32;
    const int tiles = K / 32;
    const int t_begin = min(tiles, split * tiles_per_warp);
    const int nt = min(tiles, t_begin + tiles_per_warp) - t_begin;
    const int xstride = mma_xstride(tiles_per_warp);
    constexpr bool slice = GATHER == MMAD_GATHER_SLICE;
    // A warp's area: its staged X, then with `slice` its run's indices (runtime/src/cuda/gptq.rs,
    // `mma_warp_smem`, computes the same size).
    const size_t x_area = (size_t)M * xstride * 2;
    // The act-order index type of this entry (MMAD_PERM16).
    typedef typename PermIndex<MMAD_PERM16_ON(GATHER)>::type I;
    const size_t warp_bytes = x_area + (slice ? (size_t)tiles_per_warp * 32 * sizeof(I) : 0);

    // The first D slots, in flight before anything else.
    // Slots lie SST uint4 apart (TS: one run per strip; tile-major: every strip's slot in between).
    const int SST = qw_tile_major(BITS) ? (N / 32) * TS : TS;
    const uint4* wp = (const uint4*)(q.qweight + (size_t)strip * qw_strip_step<BITS>(q.strip_rows)) +
                      (size_t)(t_begin / TPB) * SST + LPT * c * 8 + g;
    // PRE_P of their D * LPT pieces per lane before the wait (PRE_ASKED, from the entry:
    // MMAD_PRE_PIECES), the rest after the block's copy of X.
    uint4 buf[D][LPT];
    // PRE_S whole slots, then PRE_H pieces of slot PRE_S.
    constexpr int PRE_P = PRE_ASKED < D * LPT ? PRE_ASKED : D * LPT;
    constexpr int PRE_S = PRE_P / LPT, PRE_H = PRE_P % LPT;
    static_assert(PRE_P >= 1, "at least one piece before the wait");
    static_assert(GATHER != MMAD_GATHER_SYNC || PRE_P == D * LPT, "the fused MoE: every piece before the wait");
    mmad_load_slots<0, PRE_S, D, LPT, TPB>(buf, wp, SST, nt);
    if constexpr (PRE_H > 0) mmad_load_pieces<0, PRE_H, D, LPT, TPB>(buf, PRE_S, wp, SST, nt);

    // Groups: tpg tiles each. sp and zp point at the scales and zero word of the group loaded next
    // (into nsr, nzw), gl counts the groups after it; past the last group they stay on it.
    const int tpg = group_rows / 32;
    const int g0 = min(t_begin / tpg, K / group_rows - 1); // (a warp without tiles reads the last group)
    int gl = K / group_rows - 1 - g0;
    // Zero words per group: packed at 4 and 8 bits, one byte per column at 3 bits.
    const int zwords = BITS == 4 ? N / 8 : N / 4;
    const uint2* sp = (const uint2*)(q.scales + (size_t)g0 * N + n0 + 4 * g);
    const u32* zp = (const u32*)q.zeros + (size_t)g0 * zwords + (BITS == 4 ? n0 / 8 + g / 2 : n0 / 4 + g);
    const int zshift = BITS == 4 ? (g & 1) * 16 : 0;
    uint2 nsr = __ldg(sp);
    u32 nzw = __ldg(zp);
    // GROUP_L1 (MMAD_GROUP_L1): the next group's scales and zero word asked of L1 ahead and loaded
    // at the group's start, instead of loaded ahead into registers (nsr, nzw), which ptxas may
    // spill (the 4-bit GEMV at 64 registers did, at every group): a spill's store waits for the
    // load, a whole memory round trip.
    static_assert(!GROUP_L1 || !TILE_GROUPS, "groups of one tile travel with the tiles");
    auto next_group = [&]() {
        if (gl > 0) {
            sp += N / 4;
            zp += zwords;
            --gl;
        }
        if constexpr (GROUP_L1) {
            prefetch_l1(sp);
            prefetch_l1(zp);
        } else {
            nsr = __ldg(sp);
            nzw = __ldg(zp);
        }
    };

    const size_t xblock_bytes = xblock ? ((size_t)M * K * 2 + 15) & ~(size_t)15 : 0;
    unsigned char* areas = (unsigned char*)smem + xblock_bytes;
    T* xs = (T*)(areas + warp * warp_bytes);
    // Act-order: the run's indices (written by uploads only), with `slice` copied now. With
    // MMAD_PERM16 they are the u16 copy that follows the K i32 indices in the same buffer.
    const I* layer_perm = MMAD_PERM16_ON(GATHER) ? (const I*)(q.perm + K) : (const I*)q.perm;
    const I* run_perm = GATHER == MMAD_PLAIN ? nullptr
                        : slice              ? (const I*)((unsigned char*)xs + x_area)
                                             : layer_perm + t_begin * 32;
    if constexpr (slice) {
        constexpr int per16 = 16 / sizeof(I); // indices per 16-byte copy
        for (int i = lane; i < nt * 32 / per16; i += 32)
            cp_async16((I*)run_perm + per16 * i, layer_perm + t_begin * 32 + per16 * i);
        cp_async_commit();
    }

    // Act-order with the indices in global memory: the first rounds' indices loaded now.
    constexpr int PRE = GATHER == MMAD_GATHER ? MMAD_PERM_EARLY : GATHER == MMAD_GATHER_SYNC ? MMAD_MOE_PERM_EARLY : 0;
    Idx8<I> pre[PRE > 0 ? PRE : 1][MMAD_X_CHUNKS];
    if constexpr (PRE > 0) mma_stage_idx_early<BITS, MMAD_X_CHUNKS, PRE>(run_perm, M, nt, lane, pre);

    // Everything above reads only the layer's words; everything below may read what the previous
    // kernel wrote (X) or write what it reads (Y).
    pdl_wait_after_loads(nsplit);
    if constexpr (GATHER == MMAD_GATHER_SYNC) {
        if (xblock) mma_copy_x_block(X, M, K, smem); // (ends with __syncthreads)
        cp_async_wait<0>();                            // (none in flight: kept, it is the code measured)
        __syncwarp();
    } else {
        // (MMAD_PLAIN keeps the copy reachable: without it, ptxas scheduled the 3-bit plain entries
        // 2 % slower, BENCHMARKS.md)
        if (xblock) mma_copy_x_block_async(X, M, K, smem);
        if constexpr (PRE_H > 0) mmad_load_pieces<PRE_H, LPT, D, LPT, TPB>(buf, PRE_S, wp, SST, nt);
        if constexpr (PRE_S + (PRE_H > 0) < D) mmad_load_slots<PRE_S + (PRE_H > 0), D, D, LPT, TPB>(buf, wp, SST, nt);
        if constexpr (GATHER != MMAD_PLAIN) {
            cp_async_wait<0>();
            if (xblock)
                __syncthreads();
            else
                __syncwarp();
        }
    }
    if constexpr (X_ASYNC)
        mma_stage_x_async<BITS>(X, M, K, t_begin, nt, xs, xstride, lane);
    else
        mma_stage_x<BITS, MMAD_X_CHUNKS, T, slice, PRE, I>(run_perm, X, M, K, xblock ? smem : nullptr, t_begin, nt, xs,
                                                           xstride, lane, pre);
    const T* xrow = xs + min(g, M - 1) * xstride + 8 * c;

    MmaAcc<BITS, BF> a;
    a.init();
    // Groups of one tile (TILE_GROUPS, g32): every tile starts a group, whose scales and zero word
    // travel D tiles ahead with the tile's words (gp.sr, gp.zw), from gp.sp and gp.zp (tile i0 + D).
    MmadGroupPipe<D, TILE_GROUPS> gp;
    if constexpr (TILE_GROUPS) {
        gp.sp = sp + D * (N / 4);
        gp.zp = zp + D * zwords;
        gp.sr[0] = nsr;
        gp.zw[0] = nzw;
#pragma unroll
        for (int d = 1; d < D; ++d)
            if (d < nt) {
                gp.sr[d] = __ldg(sp + d * (N / 4));
                gp.zw[d] = __ldg(zp + d * zwords);
            }
    } else {
        a.group(nsr, nzw >> zshift);
    }
    int left = tpg - (t_begin - g0 * tpg); // tiles left in the current group
    if constexpr (!TILE_GROUPS) next_group();
    auto group_check = [&](int tiles_done) {
        if (left == 0) {
            a.flush();
            if constexpr (GROUP_L1)
                a.group(__ldg(sp), __ldg(zp) >> zshift);
            else
                a.group(nsr, nzw >> zshift);
            left = tpg;
            next_group();
        }
        left -= tiles_done;
    };
    // Tile i computes from buf[i % D], then reloads it with tile i + D; wq and xq follow tile i0 + D
    // and i0, so that every address in the unrolled body is a constant offset.
    const uint4* wq = wp + D * SST;
    const T* xq = xrow;
    if constexpr (BITS == 3) {
        // D super-tiles in flight, each reloaded piece by piece with the one D later: after step 1 no
        // step reads word 0 of the units, after step 2 word 1, after step 3 word 2.
#pragma unroll 1
        for (int i0 = 0; i0 < nt; i0 += 4 * D) {
#pragma unroll
            for (int d = 0; d < D; ++d) {
                if (i0 + 4 * d < nt) {
                    group_check(4);
                    uint4* b = buf[d];
                    const bool more = i0 + 4 * (d + D) < nt;
                    const uint4* wn = wq + d * SST;
                    const T* xd = xq + d * 128;
                    // (L2_AHEAD: the lane's words of the super-tile L2_AHEAD past the reloaded one)
                    const bool ahead = L2_AHEAD > 0 && i0 + 4 * (d + D + L2_AHEAD) < nt;
                    const uint4* wa = wn + L2_AHEAD * SST;
                    mma_tile3<BF, 0>(b, *(const uint4*)xd, a.zc, a.gacc);
                    mma_tile3<BF, 1>(b, *(const uint4*)(xd + 32), a.zc, a.gacc);
                    if (more) b[0] = ld_stream((const u32*)wn);
                    if constexpr (L2_AHEAD > 0)
                        if (ahead) prefetch_l2(wa);
                    mma_tile3<BF, 2>(b, *(const uint4*)(xd + 64), a.zc, a.gacc);
                    if (more) b[1] = ld_stream((const u32*)(wn + 8));
                    if constexpr (L2_AHEAD > 0)
                        if (ahead) prefetch_l2(wa + 8);
                    mma_tile3<BF, 3>(b, *(const uint4*)(xd + 96), a.zc, a.gacc);
                    if (more) b[2] = ld_stream((const u32*)(wn + 16));
                    if constexpr (L2_AHEAD > 0)
                        if (ahead) prefetch_l2(wa + 16);
                }
            }
            wq += D * SST;
            xq += D * 128;
        }
    } else {
#pragma unroll 1
    for (int i0 = 0; i0 < nt; i0 += D) {
        if (BLOCKED && !TILE_GROUPS) group_check(D);
        const bool more = i0 + D < nt;
        if constexpr (RELOAD_FIRST && BLOCKED && !TILE_GROUPS) {
            // The block's words copied, its D slots reloaded at once, then its tiles computed from
            // the copies: ptxas otherwise issues the reloads only after the block's last tile.
            uint4 w[D][LPT];
#pragma unroll
            for (int d = 0; d < D; ++d)
#pragma unroll
                for (int h = 0; h < LPT; ++h) w[d][h] = buf[d][h];
            if (more)
#pragma unroll
                for (int d = 0; d < D; ++d)
#pragma unroll
                    for (int h = 0; h < LPT; ++h) buf[d][h] = ld_stream((const u32*)(wq + d * SST + h * 8));
#pragma unroll
            for (int d = 0; d < D; ++d) mma_tile<BITS, BF>(w[d], *(const uint4*)(xq + d * 32), a.zc, a.gacc);
            wq += D * SST;
            xq += D * 32;
            continue;
        }
#pragma unroll
        for (int d = 0; d < D; ++d) {
            const int i = i0 + d;
            if (BLOCKED || i < nt) {
                if constexpr (TILE_GROUPS) {
                    if (i > 0) a.flush();
                    a.group(gp.sr[d], gp.zw[d] >> zshift);
                    if (more) {
                        gp.sr[d] = __ldg(gp.sp + d * (N / 4));
                        gp.zw[d] = __ldg(gp.zp + d * zwords);
                    }
                } else if (!BLOCKED) {
                    group_check(1);
                }
                const uint4 x = *(const uint4*)(xq + d * 32);
                if constexpr (RELOAD_FIRST) {
                    // The tile's words copied, its slot reloaded, then the tile computed from the copy.
                    uint4 w[LPT];
#pragma unroll
                    for (int h = 0; h < LPT; ++h) w[h] = buf[d][h];
                    if (BLOCKED ? more : i + D < nt)
#pragma unroll
                        for (int h = 0; h < LPT; ++h) buf[d][h] = ld_stream((const u32*)(wq + d * SST + h * 8));
                    mma_tile<BITS, BF>(w, x, a.zc, a.gacc);
                } else {
                    mma_tile<BITS, BF>(buf[d], x, a.zc, a.gacc);
                    if (BLOCKED ? more : i + D < nt)
#pragma unroll
                        for (int h = 0; h < LPT; ++h) buf[d][h] = ld_stream((const u32*)(wq + d * SST + h * 8));
                }
                if constexpr (L2_AHEAD > 0)
                    if (i + D + L2_AHEAD < nt) prefetch_l2(wq + (d + L2_AHEAD) * SST);
            }
        }
        wq += D * SST;
        xq += D * 32;
        if constexpr (TILE_GROUPS) {
            gp.sp += D * (N / 4);
            gp.zp += D * zwords;
        }
    }
    }
    a.flush();

    // The block's warps are the strip's splits: each leaves its sums [M][32] in its own area (its X
    // is no longer read, and the area holds M x xstride >= M x 64 halves), then the block adds them
    // in split order (deterministic) and writes Y.
    __syncwarp();
    mma_store_sums(a.acc, M, (float*)xs, 32, 4 * g);
    __syncthreads();
    for (int t = threadIdx.x; t < M * 32; t += blockDim.x) {
        float v = 0.0f;
        for (int w = 0; w < nsplit; ++w) v += ((const float*)(areas + w * warp_bytes))[t];
        Y[(size_t)(t >> 5) * N + n0 + (t & 31)] = v * yscale;
    }
}

// Pipeline depth of the register-pipelined GEMV's entry of kind `gather`: MMAD_DEPTH 512-byte tiles
// at 4 bits (MMAD_DEPTH_SLICE in the `_gather_slice` entries), MMAD_DEPTH8 1 KiB tiles at 8 bits;
// runtime/src/cuda/gptq.rs (`mmad_depth`) reads the same defines.
__host__ __device__ constexpr int mmad_depth(int bits, int gather = MMAD_PLAIN) {
    return bits == 4 ? (gather == MMAD_GATHER_SLICE ? MMAD_DEPTH_SLICE : MMAD_DEPTH) : MMAD_DEPTH8;
}

// Whether every warp's run is whole blocks of D tiles with group starts only at block starts: the
// plan picks tiles_per_warp as a multiple of D where it can (runtime/src/cuda/gptq.rs, `mma_plan`).
__device__ __forceinline__ bool mmad_blocked(int D, int K, int group_rows, int tiles_per_warp) {
    const int tiles = K / 32, tpg = group_rows / 32;
    return tiles % D == 0 && tiles_per_warp % D == 0 && (tpg % D == 0 || tpg == tiles);
}
// The same with a group per tile (g32): whole blocks, the group data pipelined with the tiles.
__device__ __forceinline__ bool mmad_tile_groups(int D, int K, int group_rows, int tiles_per_warp) {
    return group_rows == 32 && (K / 32) % D == 0 && tiles_per_warp % D == 0;
}

// Dequantize to f16 W[K, N] in input-row order (sorted row i goes to row perm[i]).
// grid = (ceil(N/4/256), K/unit_k), block = 256.
template <int BITS>
__device__ __forceinline__ void dequant_f16(const u32* qweight, int strip_rows, const __half* scales, const void* zeros,
                                            const int* ugroup, const int* perm, int K, int N, __half* W) {
    typedef Layout<BITS> L;
    const int n0 = (blockIdx.x * blockDim.x + threadIdx.x) * 4;
    const int u = blockIdx.y;
    if (n0 >= N) return;
    // Under dependent launch the layer's words, scales and zeros (written by uploads only) are loaded
    // before the wait; W, which the previous kernel (cuBLAS, reading the previous layer) may still
    // read, is written after it. On an H100 (BENCHMARKS.md, "the copy of X as a dependent launch",
    // call 6) this took the 4096 x 1024 dequantization from 5.2 to 4.1 us, and dequantize + cuBLAS
    // at M = 2048 from 41.2-41.4 to 39.9-40.1 us.
    u32 wc[4][L::WORDS];
#pragma unroll
    for (int w = 0; w < L::WORDS; ++w) {
        const uint4 r = ld_stream(qw_at<BITS>(qweight, strip_rows, (size_t)u * L::WORDS + w, n0, N));
        wc[0][w] = r.x; wc[1][w] = r.y; wc[2][w] = r.z; wc[3][w] = r.w;
    }
    const int g = ugroup[u];
    float s[4], z[4];
    load_scales(scales, g, N, n0, s);
    load_zeros<BITS>(zeros, g, N, n0, z);
    pdl_wait_after_loads(N);
    u32 v[4][L::NVIEWS];
#pragma unroll
    for (int c = 0; c < 4; ++c) L::views(wc[c], v[c]);
#pragma unroll
    for (int j = 0; j < L::UK; ++j) {
        const int k = u * L::UK + j;
        const int row = perm ? perm[k] : k;
        __half h[4];
#pragma unroll
        for (int c = 0; c < 4; ++c)
            h[c] = __float2half_rn(s[c] * ((float)code_i<BITS>(v[c][L::view(j)], L::pos(j)) - z[c]));
        uint2 out;
        out.x = (u32)__half_as_ushort(h[0]) | ((u32)__half_as_ushort(h[1]) << 16);
        out.y = (u32)__half_as_ushort(h[2]) | ((u32)__half_as_ushort(h[3]) << 16);
        *(uint2*)(W + (size_t)row * N + n0) = out;
    }
}

// ---- entry points: {op}_{bits}b_{dtype}[_m{MT}] ----

#define GEMV_ENTRY(B, TN, T, MT)                                                                              \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS, MT <= 2 ? (B == 3 ? GEMV_MIN_BLOCKS_3BIT : GEMV_MIN_BLOCKS_SMALL_M) : 1)        \
        gptq_gemv_##B##b_##TN##_m##MT(                \
        const u32* qweight, int strip_rows, const __half* scales, const void* zeros, const int* ugroup,       \
        const int* perm, const T* X, int M, int K, int N, int units_per_split, float* ws, u32* counters,      \
        float* Y) {                                                                                          \
        gemv_dense<B, T, MT>(qweight, strip_rows, scales, zeros, ugroup, perm, X, M, K, N, units_per_split, ws, counters, \
                             Y);                                                                              \
    }

#define GEMV_ENTRIES(B, TN, T) \
    GEMV_ENTRY(B, TN, T, 1)    \
    GEMV_ENTRY(B, TN, T, 2)    \
    GEMV_ENTRY(B, TN, T, 4)    \
    GEMV_ENTRY(B, TN, T, 8)

#define MOE_ENTRY(B, TN, T)                                                                                  \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS, B == 3 ? GEMV_MIN_BLOCKS_3BIT : GEMV_MIN_BLOCKS_SMALL_M) gptq_moe_gemv_##B##b_##TN(                   \
        const unsigned long long* table, int strip_rows, const int* expert_ids, const float* pair_scale,      \
        const T* X, int x_div, int K, int N, int units_per_split, float* ws, u32* counters, float* Y) {      \
        gemv_moe<B, T>(table, strip_rows, expert_ids, pair_scale, X, x_div, K, N, units_per_split, ws,       \
                       counters, Y);                                                                         \
    }

#define DEQUANT_ENTRY(B)                                                                                     \
    extern "C" __global__ void __launch_bounds__(256) gptq_dequant_##B##b_f16(                              \
        const u32* qweight, int strip_rows, const __half* scales, const void* zeros, const int* ugroup,       \
        const int* perm, int K, int N, __half* W) {                                                          \
        dequant_f16<B>(qweight, strip_rows, scales, zeros, ugroup, perm, K, N, W);                           \
    }

#define MMA_ENTRY(B, TN, T)                                                                                  \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS, MMA_MIN_BLOCKS) gptq_mma_gemv_##B##b_##TN(      \
        const u32* qweight, int strip_rows, const __half* scales, const void* zeros, const int* ugroup,       \
        const int* perm, const T* X, int M, int K, int N, int group_rows, int nsplit, int tiles_per_warp,   \
        int xblock, float* ws, u32* counters, float* Y) {                                                    \
        QMat q = {qweight, strip_rows, scales, zeros, ugroup, perm};                                         \
        mma_gemv<B, T>(q, X, M, K, N, group_rows, nsplit, tiles_per_warp, xblock, ws, counters, Y);          \
    }

// The register-pipelined GEMV's entry of kind G at B bits, under launch bound WARPS, D tiles in flight
// (at 3 bits D whole 128-row super-tiles: K and the groups multiples of 128 rows).
// L1: the next group's data through L1 (mmad_gemv's GROUP_L1). XA: X staged with cp.async (X_ASYNC).
// PRE: weight pieces per lane issued before the dependent-launch wait (mmad_gemv's PRE_ASKED).
#define MMAD_ENTRY_AT(B, TN, T, G, SFX, WARPS, D, RF, L1, XA, PRE)                                             \
    extern "C" __global__ void __launch_bounds__((WARPS) * 32) gptq_mmad_gemv_##B##b_##TN##SFX(                \
        const u32* qweight, int strip_rows, const __half* scales, const void* zeros, const int* ugroup,        \
        const int* perm, const T* X, int M, int K, int N, int group_rows, int nsplit, int tiles_per_warp,      \
        int xblock, float* ws, u32* counters, float* Y) {                                                      \
        QMat q = {qweight, strip_rows, scales, zeros, ugroup, perm};                                           \
        if constexpr (B == 3) {                                                                                \
            mmad_gemv<B, T, (D), true, false, 0, G, false, L1, XA, (PRE)>(q, X, M, K, N, group_rows, nsplit,    \
                                                                          tiles_per_warp, xblock, Y);          \
        } else {                                                                                               \
            if (mmad_blocked((D), K, group_rows, tiles_per_warp))                                              \
                mmad_gemv<B, T, (D), true, false, 0, G, RF, L1, XA, (PRE)>(q, X, M, K, N, group_rows, nsplit,   \
                                                                           tiles_per_warp, xblock, Y);         \
            else                                                                                               \
                mmad_gemv<B, T, (D), false, false, 0, G, RF, L1, XA, (PRE)>(q, X, M, K, N, group_rows, nsplit,  \
                                                                            tiles_per_warp, xblock, Y);        \
        }                                                                                                      \
    }
#define MMAD_ENTRY(B, TN, T, G, SFX)                                                                           \
    MMAD_ENTRY_AT(B, TN, T, G, SFX, MMAD_GEMV_WARPS(B, G), (B) == 3 ? MMAD_DEPTH3 : mmad_depth(B, G), false,  \
                  MMAD_GROUP_L1_ON(MMAD_GROUP_L1, B, G), false, MMAD_PRE_PIECES(B, G))
// The same for narrow layers (`_narrow`: runtime/src/cuda/gptq.rs, `mmad_narrow`), deeper in fewer warps.
#define MMAD_NARROW_ENTRY(B, TN, T, G, SFX)                                                                    \
    MMAD_ENTRY_AT(B, TN, T, G, SFX##_narrow, MMAD_NARROW_WARPS(B), MMAD_NARROW_DEPTH(B), false,              \
                  MMAD_GROUP_L1_ON(MMAD_GROUP_L1_NARROW, B, G), false, MMAD_PRE_ALL)
// The same for tall layers at 4 bits (`_tall`: runtime/src/cuda/gptq.rs, `mmad_tall`), plain only.
#define MMAD_TALL_ENTRY(TN, T)                                                                                 \
    MMAD_ENTRY_AT(4, TN, T, MMAD_PLAIN, _tall, MMAD_MAX_WARPS_TALL, MMAD_DEPTH_TALL, MMAD_TALL_RELOAD_FIRST != 0, \
                  false, false, MMAD_PRE_ALL)
// The plain 8-bit entry for launches of several rows (`_rows`: runtime/src/cuda/gptq.rs, `mmad_rows`), with
// X staged in one round trip (X_ASYNC).
#define MMAD_ROWS_ENTRY(TN, T)                                                                                 \
    MMAD_ENTRY_AT(8, TN, T, MMAD_PLAIN, _rows, MMAD_WARPS(8), MMAD_DEPTH8, false,                             \
                  MMAD_GROUP_L1_ON(MMAD_GROUP_L1, 8, MMAD_PLAIN), true, MMAD_PRE_ALL)

// Groups of one tile (g32, runtime/src/cuda/gptq.rs `mmad_tile_groups`), as its own entry so that the
// other layers' kernel keeps its code.
#define MMADG_ENTRY(B, TN, T, G, SFX)                                                                        \
    extern "C" __global__ void __launch_bounds__(MMADG_MAX_WARPS * 32) gptq_mmadg_gemv_##B##b_##TN##SFX(    \
        const u32* qweight, int strip_rows, const __half* scales, const void* zeros, const int* ugroup,       \
        const int* perm, const T* X, int M, int K, int N, int group_rows, int nsplit, int tiles_per_warp,   \
        int xblock, float* ws, u32* counters, float* Y) {                                                    \
        QMat q = {qweight, strip_rows, scales, zeros, ugroup, perm};                                         \
        constexpr int D = mmad_depth(B);                                                                     \
        if (mmad_tile_groups(D, K, group_rows, tiles_per_warp))                                               \
            mmad_gemv<B, T, D, true, true, 0, G>(q, X, M, K, N, group_rows, nsplit, tiles_per_warp, xblock, Y); \
        else                                                                                                 \
            mmad_gemv<B, T, D, false, false, 0, G>(q, X, M, K, N, group_rows, nsplit, tiles_per_warp, xblock, Y); \
    }

// Fused MoE on the tensor cores: block (strip, p) runs the register-pipelined GEMV of one row for
// pair p = blockIdx.y, Y[p, :] = scale[p] * X[p / x_div, :] . W_e with e = expert_ids[p] (`table` as
// in gemv_moe: 5 pointers per expert). Every expert shares bits, shape, grouping and act-order, so
// one plan (runtime/src/cuda/gptq.rs, `mma_choice` on the first expert) fits them all. Groups of
// one tile (g32 at 4 and 8 bits) run their own entry, gptq_mmadg_moe_* (as the GEMV's mmadg).
// The start of a fused MoE entry: pair p = blockIdx.y's expert weights (q), X row (x), Y row (y) and
// scale (s), after the dependent-launch wait (the expert ids and pair scales may come from the
// previous kernel).
#define MMAD_MOE_PAIR(T)                                                                                     \
    pdl_wait();                                                                                              \
    const int p = blockIdx.y;                                                                                \
    const unsigned long long* t = table + 5 * (size_t)expert_ids[p];                                        \
    QMat q = {(const u32*)t[0], strip_rows, (const __half*)t[1], (const void*)t[2], (const int*)t[3],         \
              (const int*)t[4]};                                                                             \
    const T* x = X + (size_t)(p / x_div) * K;                                                                \
    float* y = Y + (size_t)p * N;                                                                            \
    const float s = pair_scale ? pair_scale[p] : 1.0f;
#define MMAD_MOE_PARAMS(T)                                                                                   \
    const unsigned long long* table, int strip_rows, const int* expert_ids, const float* pair_scale,         \
        const T* X, int x_div, int K, int N, int group_rows, int nsplit, int tiles_per_warp, int xblock,     \
        float* Y
#define MMAD_MOE_ENTRY(B, TN, T, G, SFX)                                                                     \
    extern "C" __global__ void __launch_bounds__(MMAD_MOE_WARPS(B, G) * 32) gptq_mmad_moe_##B##b_##TN##SFX( \
        MMAD_MOE_PARAMS(T)) {                                                                                \
        MMAD_MOE_PAIR(T)                                                                                     \
        if constexpr (B == 3) {                                                                              \
            mmad_gemv<B, T, MMAD_DEPTH3, true, false, MMAD_MOE_L2_AHEAD3, G>(q, x, 1, K, N, group_rows, nsplit, tiles_per_warp, xblock, y, s); \
        } else {                                                                                             \
            constexpr int D = mmad_depth(B), L2A = B == 4 ? MMAD_MOE_L2_AHEAD : 0;                          \
            if (mmad_blocked(D, K, group_rows, tiles_per_warp))                                               \
                mmad_gemv<B, T, D, true, false, L2A, G>(q, x, 1, K, N, group_rows, nsplit, tiles_per_warp, xblock, y, s); \
            else                                                                                             \
                mmad_gemv<B, T, D, false, false, L2A, G>(q, x, 1, K, N, group_rows, nsplit, tiles_per_warp, xblock, y, s); \
        }                                                                                                    \
    }
// Groups of one tile (g32 at 4 and 8 bits): each tile's scales and zero word travel through the
// pipeline with its words (TILE_GROUPS), as in gptq_mmadg_gemv_*, under the same launch bound.
#define MMADG_MOE_ENTRY(B, TN, T, G, SFX)                                                                    \
    extern "C" __global__ void __launch_bounds__(MMADG_MAX_WARPS * 32) gptq_mmadg_moe_##B##b_##TN##SFX(     \
        MMAD_MOE_PARAMS(T)) {                                                                                \
        MMAD_MOE_PAIR(T)                                                                                     \
        constexpr int D = mmad_depth(B), L2A = B == 4 ? MMAD_MOE_L2_AHEAD : 0;                              \
        if (mmad_tile_groups(D, K, group_rows, tiles_per_warp))                                               \
            mmad_gemv<B, T, D, true, true, L2A, G>(q, x, 1, K, N, group_rows, nsplit, tiles_per_warp, xblock, y, s); \
        else                                                                                                 \
            mmad_gemv<B, T, D, false, false, L2A, G>(q, x, 1, K, N, group_rows, nsplit, tiles_per_warp, xblock, y, s); \
    }

// The register-pipelined entries without act-order (or with X put in order first) and with act-order
// X gathered inside (`_gather`); the plain GEMV also with the indices copied first (`_gather_slice`);
// the fused MoE's `_gather` copies X with loads and stores (MMAD_GATHER_SYNC).
#define MMAD_ENTRIES(KIND, B, TN, T)   \
    KIND(B, TN, T, MMAD_PLAIN, )       \
    KIND(B, TN, T, MMAD_GATHER, _gather)
#define MMAD_ENTRIES_SLICE(KIND, B, TN, T) \
    MMAD_ENTRIES(KIND, B, TN, T)           \
    KIND(B, TN, T, MMAD_GATHER_SLICE, _gather_slice)
#define MMAD_ENTRIES_SYNC(KIND, B, TN, T) \
    KIND(B, TN, T, MMAD_PLAIN, )          \
    KIND(B, TN, T, MMAD_GATHER_SYNC, _gather)

// This file is compiled into six modules (runtime/src/cuda/kernels.rs): GPTQ_MODULE 0 (`gptq`, every
// entry but those below), 1 (`gptq_slice4`: the 4-bit `_gather_slice` entries, MMAD_MAX_WARPS_SLICE above
// says why), 2 (`gptq_narrow`: the `_narrow` entries, MMAD_DEPTH_NARROW above), 3 (`gptq_tall`: the
// `_tall` entries, MMAD_MAX_WARPS_TALL above), 4 (`gptq_rows`: the `_rows` entries, so that the
// entries of one row keep their code) and 5 (`gptq_tile3`: the 3-bit entries a tile-major layer
// runs, under the names they have in module 0, qw_tile_major above).
#if GPTQ_MODULE == 0
GEMV_ENTRIES(3, f16, __half)
GEMV_ENTRIES(4, f16, __half)
GEMV_ENTRIES(8, f16, __half)
GEMV_ENTRIES(3, bf16, __nv_bfloat16)
GEMV_ENTRIES(4, bf16, __nv_bfloat16)
GEMV_ENTRIES(8, bf16, __nv_bfloat16)
MOE_ENTRY(3, f16, __half)
MOE_ENTRY(4, f16, __half)
MOE_ENTRY(8, f16, __half)
MOE_ENTRY(3, bf16, __nv_bfloat16)
MOE_ENTRY(4, bf16, __nv_bfloat16)
MOE_ENTRY(8, bf16, __nv_bfloat16)
MMA_ENTRY(4, f16, __half)
MMA_ENTRY(8, f16, __half)
MMA_ENTRY(4, bf16, __nv_bfloat16)
MMA_ENTRY(8, bf16, __nv_bfloat16)
MMAD_ENTRIES_SLICE(MMAD_ENTRY, 3, f16, __half)
MMAD_ENTRIES(MMAD_ENTRY, 4, f16, __half) // (its `_gather_slice`: GPTQ_MODULE 1)
MMAD_ENTRIES_SLICE(MMAD_ENTRY, 8, f16, __half)
MMAD_ENTRIES_SLICE(MMAD_ENTRY, 3, bf16, __nv_bfloat16)
MMAD_ENTRIES(MMAD_ENTRY, 4, bf16, __nv_bfloat16)
MMAD_ENTRIES_SLICE(MMAD_ENTRY, 8, bf16, __nv_bfloat16)
MMAD_ENTRIES(MMADG_ENTRY, 4, f16, __half)
MMAD_ENTRIES(MMADG_ENTRY, 8, f16, __half)
MMAD_ENTRIES(MMADG_ENTRY, 4, bf16, __nv_bfloat16)
MMAD_ENTRIES(MMADG_ENTRY, 8, bf16, __nv_bfloat16)
MMAD_ENTRIES_SYNC(MMAD_MOE_ENTRY, 3, f16, __half)
MMAD_ENTRIES_SYNC(MMAD_MOE_ENTRY, 4, f16, __half)
MMAD_ENTRIES_SYNC(MMAD_MOE_ENTRY, 8, f16, __half)
MMAD_ENTRIES_SYNC(MMAD_MOE_ENTRY, 3, bf16, __nv_bfloat16)
MMAD_ENTRIES_SYNC(MMAD_MOE_ENTRY, 4, bf16, __nv_bfloat16)
MMAD_ENTRIES_SYNC(MMAD_MOE_ENTRY, 8, bf16, __nv_bfloat16)
MMAD_ENTRIES_SYNC(MMADG_MOE_ENTRY, 4, f16, __half)
MMAD_ENTRIES_SYNC(MMADG_MOE_ENTRY, 8, f16, __half)
MMAD_ENTRIES_SYNC(MMADG_MOE_ENTRY, 4, bf16, __nv_bfloat16)
MMAD_ENTRIES_SYNC(MMADG_MOE_ENTRY, 8, bf16, __nv_bfloat16)
DEQUANT_ENTRY(3)
DEQUANT_ENTRY(4)
DEQUANT_ENTRY(8)

// bf16 -> f16 (the GEMM path runs cuBLAS in f16 so that the dequantized weights keep 11 bits;
// values beyond the f16 range become inf, which shows in the output rather than hiding).
// 8 elements per thread with 16-byte loads and stores (x and y are the starts of device
// allocations, so 16-byte aligned); the n % 8 tail is done element by element.
__device__ __forceinline__ u32 bf16x2_to_f16x2(u32 v) {
    const float lo = __uint_as_float(v << 16), hi = __uint_as_float(v & 0xFFFF0000u);
    const __half2 h = __floats2half2_rn(lo, hi);
    return *(const u32*)&h;
}

// L2 policies of the copy (bit 0: X read evict-first, bit 1: the f16 copy written evict-last, so that
// cuBLAS finds it in L2; 0 for neither). On an H100 (BENCHMARKS.md, "the bf16 -> f16 copy of X with
// L2 policies"), M = 2048, prepared dense, us: 4096 x 1024 37.1-37.3 with both against 38.4-38.6 with
// neither and 38.1-38.3 with the stores' alone; 4096 x 4096 105.4-106.6 against 107.0-107.7. The lines
// kept are those of the device's one copy buffer (the workspace's `xconv`), which the next call rewrites.
// The copy is a dependent launch (gptq.rs): its blocks are in place when the previous kernel (often
// the previous call's cuBLAS product) ends. On an H100 (BENCHMARKS.md, "the copy of X as a dependent
// launch"), 4096 x 1024 at M = 2048 took 35.3-35.7 us against 36.7-37.6 as an ordinary launch.
#ifndef CONVERT_L2_HINTS
#define CONVERT_L2_HINTS 3
#endif
extern "C" __global__ void convert_bf16_f16(const __nv_bfloat16* x, __half* y, size_t n) {
    const size_t n8 = n / 8;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    const size_t t0 = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
#if (CONVERT_L2_HINTS & 1) != 0
    unsigned long long first;
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(first));
#endif
#if (CONVERT_L2_HINTS & 2) != 0
    unsigned long long last;
    asm("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(last));
#endif
    // Under dependent launch: X may come from the previous kernel, which may also still read y (the
    // previous call's copy, read by cuBLAS); so nothing is read or written before this. Coherent
    // loads below (no .nc), which ptxas cannot move above the wait.
    pdl_wait();
    for (size_t i = t0; i < n8; i += stride) {
#if (CONVERT_L2_HINTS & 1) != 0
        uint4 v;
        asm volatile("ld.global.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                     : "l"((const uint4*)x + i), "l"(first)
                     : "memory");
#else
        const uint4 v = ld_dep((const uint4*)x + i);
#endif
        uint4 o;
        o.x = bf16x2_to_f16x2(v.x);
        o.y = bf16x2_to_f16x2(v.y);
        o.z = bf16x2_to_f16x2(v.z);
        o.w = bf16x2_to_f16x2(v.w);
#if (CONVERT_L2_HINTS & 2) != 0
        asm volatile("st.global.L2::cache_hint.v4.u32 [%0], {%1, %2, %3, %4}, %5;" ::"l"((uint4*)y + i), "r"(o.x),
                     "r"(o.y), "r"(o.z), "r"(o.w), "l"(last)
                     : "memory");
#else
        ((uint4*)y)[i] = o;
#endif
    }
    if (t0 < n - n8 * 8) {
        const size_t i = n8 * 8 + t0;
        y[i] = __float2half_rn(__bfloat162float(ld_dep(x + i)));
    }
}

// Act-order X in the sorted rows' order, so that the tensor-core GEMV of several rows reads it
// directly instead of gathering it per warp: xs[m][i] = x[m][perm[i]] (f16 or bf16 bits).
// grid = (ceil(K / 256), M), block = 256. (Fewer blocks of 8 elements per thread, to find room
// beside a GEMV that fills the SMs, were not faster overall: BENCHMARKS.md.)
extern "C" __global__ void __launch_bounds__(256) permute_x16(const unsigned short* __restrict__ x, const int* __restrict__ perm,
                                                         int K, unsigned short* __restrict__ xs) {
    pdl_launch_dependents(); // (the tensor-core GEMV that reads xs waits for this kernel to finish)
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const size_t row = (size_t)blockIdx.y * K;
    const int src = i < K ? __ldg(perm + i) : 0; // perm is written by uploads only
    pdl_wait(); // x may come from the previous kernel, which may still read xs
    if (i < K) xs[row + i] = ld_dep(x + row + src);
}

// Sum the top-k rows of each token: y[t, n] = sum_s Yp[t*topk + s, n] (f32).
extern "C" __global__ void moe_combine_f32(const float* yp, int topk, int tokens, int N, float* y) {
    const size_t total = (size_t)tokens * N;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t t = i / N, n = i - t * N;
        float v = 0.0f;
        for (int s = 0; s < topk; ++s) v += yp[(t * topk + s) * N + n];
        y[i] = v;
    }
}

// Reference kernels for `mixtral-gptq bench kernels`: what one launch costs with nothing to do, and
// what it takes to stream n16 16-byte words once (4 loads in flight per thread, grid-stride), the
// same bytes a GEMV reads, so that the GEMV's time can be read against a practical floor.
// `bench_stream_read_dep` is that floor under the GEMV's launch rules (a programmatic dependent
// launch): the next launch may start as this one's blocks leave, and each thread issues only its
// first 4 loads before `griddepcontrol.wait`, as the GEMV issues only its first tiles before it
// waits for X. (The `_dep` read-only runs below do the same with their first D pieces.)
extern "C" __global__ void bench_noop() {}

// The streaming reads' last words (from i, one per thread and step) and their end.
__device__ __forceinline__ void stream_read_rest(const uint4* p, size_t n16, size_t i, size_t step, u32 acc,
                                                 u32* out) {
    for (; i < n16; i += step) {
        const uint4 v = ld_stream((const u32*)(p + i));
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
    if ((threadIdx.x & 31) == 0 && acc == 0x9E3779B9u) atomicXor(out, acc); // keeps the loads alive
}

extern "C" __global__ void __launch_bounds__(256) bench_stream_read(const uint4* p, size_t n16, u32* out) {
    u32 acc = 0;
    const size_t step = (size_t)gridDim.x * blockDim.x;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * step < n16; i += 4 * step) {
        uint4 v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) v[u] = ld_stream((const u32*)(p + i + u * step));
#pragma unroll
        for (int u = 0; u < 4; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    stream_read_rest(p, n16, i, step, acc, out);
}
extern "C" __global__ void __launch_bounds__(256) bench_stream_read_dep(const uint4* p, size_t n16, u32* out) {
    pdl_launch_dependents();
    u32 acc = 0;
    const size_t step = (size_t)gridDim.x * blockDim.x;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    uint4 v[4];
    bool full = i + 3 * step < n16;
    if (full)
#pragma unroll
        for (int u = 0; u < 4; ++u) v[u] = ld_stream((const u32*)(p + i + u * step));
    pdl_wait_after_loads((int)(n16 != 0));
    while (full) {
#pragma unroll
        for (int u = 0; u < 4; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
        i += 4 * step;
        full = i + 3 * step < n16;
        if (full)
#pragma unroll
            for (int u = 0; u < 4; ++u) v[u] = ld_stream((const u32*)(p + i + u * step));
    }
    stream_read_rest(p, n16, i, step, acc, out);
}

// Reference kernels for `mixtral-gptq bench reads`: read-only launches with the register-pipelined
// GEMV's access pattern, to tell its weight stream from the rest of its work. Block b (a strip) has
// one warp per k-split; warp w reads its run of up to L 512-byte pieces of the strip's P (lane l:
// bytes 16 l .. 16 l + 15 of each), at most D in flight: the load of piece t + D is issued after
// piece t's words are used, and its address depends on them (through `zero`, a launch argument that
// is 0), as the GEMV's next load waits for the registers of the tile it computes. Piece t of (b, w)
// lies at b P + w L + t (strip-major: where the GEMV's words are) or, with `time_major`,
// at t (blocks x warps) + b warps + w: every warp's piece t side by side, so that the grid reads one
// contiguous region at a time.
template <int D, bool DEP>
__device__ __forceinline__ void read_runs(const uint4* p, int P, int L, int time_major, u32 zero, u32* out) {
    if constexpr (DEP) pdl_launch_dependents();
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int n = min(L, P - w * L); // pieces of this warp's run
    if (n <= 0) return;
    // (in pieces; the host keeps buffers under 2^27 pieces, 64 GiB, so 32 bits hold every index)
    const u32 step = time_major ? gridDim.x * nw : 1u;
    const u32 base = time_major ? blockIdx.x * nw + w : blockIdx.x * (u32)P + (u32)(w * L);
    const uint4* q = p + lane;
    uint4 v[D];
    u32 acc = 0;
#pragma unroll
    for (int d = 0; d < D; ++d)
        if (d < n) v[d] = ld_stream((const u32*)(q + (size_t)(base + d * step) * 32));
    if constexpr (DEP) pdl_wait_after_loads(P); // (P, a launch argument, is never 0)
    for (int t0 = 0; t0 < n; t0 += D) {
#pragma unroll
        for (int d = 0; d < D; ++d) {
            const int t = t0 + d;
            if (t < n) {
                acc = acc * 0x9E3779B1u + (v[d].x ^ v[d].y ^ v[d].z ^ v[d].w);
                if (t + D < n) v[d] = ld_stream((const u32*)(q + (size_t)((base + (t + D) * step) * 32 + (acc & zero))));
            }
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0 && acc == 0x9E3779B9u) atomicXor(out, acc); // keeps the loads alive
}
#define READ_RUNS_ENTRY(D)                                                                                   \
    extern "C" __global__ void __launch_bounds__(1024) bench_read_runs_d##D(const uint4* p, int P, int L,    \
                                                                            int time_major, u32 zero, u32* out) { \
        read_runs<D, false>(p, P, L, time_major, zero, out);                                                 \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(1024) bench_read_runs_d##D##_dep(                           \
        const uint4* p, int P, int L, int time_major, u32 zero, u32* out) {                                  \
        read_runs<D, true>(p, P, L, time_major, zero, out);                                                  \
    }
READ_RUNS_ENTRY(1)
READ_RUNS_ENTRY(2)
READ_RUNS_ENTRY(3)
READ_RUNS_ENTRY(4)
READ_RUNS_ENTRY(6)
READ_RUNS_ENTRY(8)

#elif GPTQ_MODULE == 1
MMAD_ENTRY(4, f16, __half, MMAD_GATHER_SLICE, _gather_slice)
MMAD_ENTRY(4, bf16, __nv_bfloat16, MMAD_GATHER_SLICE, _gather_slice)
#elif GPTQ_MODULE == 2
#define MMAD_NARROW_ENTRIES(TN, T)                                   \
    MMAD_NARROW_ENTRY(3, TN, T, MMAD_PLAIN, )                        \
    MMAD_NARROW_ENTRY(3, TN, T, MMAD_GATHER_SLICE, _gather_slice)    \
    MMAD_NARROW_ENTRY(4, TN, T, MMAD_PLAIN, )                        \
    MMAD_NARROW_ENTRY(4, TN, T, MMAD_GATHER_SLICE, _gather_slice)    \
    MMAD_NARROW_ENTRY(8, TN, T, MMAD_PLAIN, )                        \
    MMAD_NARROW_ENTRY(8, TN, T, MMAD_GATHER_SLICE, _gather_slice)
MMAD_NARROW_ENTRIES(f16, __half)
MMAD_NARROW_ENTRIES(bf16, __nv_bfloat16)
#elif GPTQ_MODULE == 3
MMAD_TALL_ENTRY(f16, __half)
MMAD_TALL_ENTRY(bf16, __nv_bfloat16)
#elif GPTQ_MODULE == 4
MMAD_ROWS_ENTRY(f16, __half)
MMAD_ROWS_ENTRY(bf16, __nv_bfloat16)
#elif GPTQ_MODULE == 5
GEMV_ENTRIES(3, f16, __half)
GEMV_ENTRIES(3, bf16, __nv_bfloat16)
MMAD_ENTRIES_SLICE(MMAD_ENTRY, 3, f16, __half)
MMAD_ENTRIES_SLICE(MMAD_ENTRY, 3, bf16, __nv_bfloat16)
DEQUANT_ENTRY(3)
#else
#error "GPTQ_MODULE: 0, 1, 2, 3, 4 or 5"
#endif
