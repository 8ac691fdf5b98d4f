// GPTQ "v1" matrix products, compiled at run time by NVRTC (runtime/src/cuda/kernels.rs).
//
// Layout the kernels see (prepared once at load by runtime/src/cuda/gptq.rs):
// * qweight: u32 [K*b/32, N], rows already sorted by g_idx for act-order checkpoints, so that every
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

__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gsrc) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(smem_dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(gsrc) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
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

// One quantized matrix as the kernels read it.
struct QMat {
    const u32* qweight;
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
                           q.qweight + ((size_t)u * L::WORDS + w) * N + n0);
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
                        nxt[r][w] = ld_stream(q.qweight + ((size_t)(u0 + r) * L::WORDS + w) * N + n0);
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
__device__ __forceinline__ void gemv_dense(const u32* qweight, const __half* scales, const void* zeros,
                                           const int* ugroup, const int* perm, const T* X, int M, int K, int N,
                                           int units_per_split, float* ws, u32* counters, float* Y) {
    QMat q = {qweight, scales, zeros, ugroup, perm};
    gemv_block<BITS, T, MT>(q, X, K, M, K, N, units_per_split, gridDim.y, ws, counters, Y, N, 1.0f);
}

// Fused MoE: for each (token, slot) pair p = blockIdx.z, Y[p, :] = scale[p] * X[p / x_div, :] . W_e
// with e = expert_ids[p]; `table` holds 5 device pointers per expert (qweight, scales, zeros,
// ugroup, perm-or-0). One launch covers every pair: no host round-trip per expert.
template <int BITS, typename T>
__device__ __forceinline__ void gemv_moe(const unsigned long long* table, const int* expert_ids,
                                         const float* pair_scale, const T* X, int x_div, int K, int N,
                                         int units_per_split, float* ws, u32* counters, float* Y) {
    const int p = blockIdx.z;
    const int e = expert_ids[p];
    const unsigned long long* t = table + 5 * (size_t)e;
    QMat q = {(const u32*)t[0], (const __half*)t[1], (const void*)t[2], (const int*)t[3], (const int*)t[4]};
    const int nsplit = gridDim.y;
    const int ntiles = gridDim.x;
    gemv_block<BITS, T, 1>(q, X + (size_t)(p / x_div) * K, K, 1, K, N, units_per_split, nsplit,
                           ws + (size_t)p * nsplit * N, counters + (size_t)p * ntiles, Y + (size_t)p * N, N,
                           pair_scale ? pair_scale[p] : 1.0f);
}

// Dequantize to f16 W[K, N] in input-row order (sorted row i goes to row perm[i]).
// grid = (ceil(N/4/256), K/unit_k), block = 256.
template <int BITS>
__device__ __forceinline__ void dequant_f16(const u32* qweight, const __half* scales, const void* zeros,
                                            const int* ugroup, const int* perm, int K, int N, __half* W) {
    typedef Layout<BITS> L;
    const int n0 = (blockIdx.x * blockDim.x + threadIdx.x) * 4;
    const int u = blockIdx.y;
    if (n0 >= N) return;
    u32 wc[4][L::WORDS];
#pragma unroll
    for (int w = 0; w < L::WORDS; ++w) {
        const uint4 r = ld_stream(qweight + ((size_t)u * L::WORDS + w) * N + n0);
        wc[0][w] = r.x; wc[1][w] = r.y; wc[2][w] = r.z; wc[3][w] = r.w;
    }
    const int g = ugroup[u];
    float s[4], z[4];
    load_scales(scales, g, N, n0, s);
    load_zeros<BITS>(zeros, g, N, n0, z);
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
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS, MT <= 2 ? (B == 3 ? 2 : GEMV_MIN_BLOCKS_SMALL_M) : 1)        \
        gptq_gemv_##B##b_##TN##_m##MT(                \
        const u32* qweight, const __half* scales, const void* zeros, const int* ugroup, const int* perm,      \
        const T* X, int M, int K, int N, int units_per_split, float* ws, u32* counters, float* Y) {          \
        gemv_dense<B, T, MT>(qweight, scales, zeros, ugroup, perm, X, M, K, N, units_per_split, ws, counters, \
                             Y);                                                                              \
    }

#define GEMV_ENTRIES(B, TN, T) \
    GEMV_ENTRY(B, TN, T, 1)    \
    GEMV_ENTRY(B, TN, T, 2)    \
    GEMV_ENTRY(B, TN, T, 4)    \
    GEMV_ENTRY(B, TN, T, 8)

#define MOE_ENTRY(B, TN, T)                                                                                  \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS, B == 3 ? 2 : GEMV_MIN_BLOCKS_SMALL_M) gptq_moe_gemv_##B##b_##TN(                   \
        const unsigned long long* table, const int* expert_ids, const float* pair_scale, const T* X,         \
        int x_div, int K, int N, int units_per_split, float* ws, u32* counters, float* Y) {                  \
        gemv_moe<B, T>(table, expert_ids, pair_scale, X, x_div, K, N, units_per_split, ws, counters, Y);    \
    }

#define DEQUANT_ENTRY(B)                                                                                     \
    extern "C" __global__ void __launch_bounds__(256) gptq_dequant_##B##b_f16(                              \
        const u32* qweight, const __half* scales, const void* zeros, const int* ugroup, const int* perm,      \
        int K, int N, __half* W) {                                                                           \
        dequant_f16<B>(qweight, scales, zeros, ugroup, perm, K, N, W);                                      \
    }

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

extern "C" __global__ void convert_bf16_f16(const __nv_bfloat16* x, __half* y, size_t n) {
    const size_t n8 = n / 8;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    const size_t t0 = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    for (size_t i = t0; i < n8; i += stride) {
        const uint4 v = __ldg((const uint4*)x + i);
        uint4 o;
        o.x = bf16x2_to_f16x2(v.x);
        o.y = bf16x2_to_f16x2(v.y);
        o.z = bf16x2_to_f16x2(v.z);
        o.w = bf16x2_to_f16x2(v.w);
        ((uint4*)y)[i] = o;
    }
    if (t0 < n - n8 * 8) {
        const size_t i = n8 * 8 + t0;
        y[i] = __float2half_rn(__bfloat162float(x[i]));
    }
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
