// Shared by forward.cu and eval.cu (runtime/src/cuda/kernels.rs and eval.rs put it in front of each):
// warp reductions, a row's log-sum-exp and the rows of the f32 reference attention.

#define WARP 32
#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ float warp_max(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The sum of v over the whole block (blockDim a multiple of 32, at most 1024), in f64, returned to
// every thread; part is 32 doubles of shared memory. Begins and ends with a barrier, so part may be
// reused right away.
__device__ __forceinline__ double block_sum_f64(double v, double* part) {
    for (int off = WARP / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    const int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP;
    __syncthreads();
    if (lane == 0) part[wid] = v;
    __syncthreads();
    if (wid == 0) {
        const int nw = blockDim.x / WARP;
        double s = lane < nw ? part[lane] : 0.0;
        for (int off = WARP / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        if (lane == 0) part[0] = s;
    }
    __syncthreads();
    const double total = part[0];
    __syncthreads();
    return total;
}

// Merges online (max, sum of exponentials relative to the max) pairs across the warp.
__device__ __forceinline__ void warp_merge_lse(float& m, float& s) {
    for (int off = WARP / 2; off > 0; off >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, off);
        float s2 = __shfl_xor_sync(0xffffffffu, s, off);
        float mm = fmaxf(m, m2);
        s = (m == NEG_INF ? 0.f : s * expf(m - mm)) + (m2 == NEG_INF ? 0.f : s2 * expf(m2 - mm));
        m = mm;
    }
}

// log(sum(exp(r[0 .. n)))) by the whole block (blockDim a multiple of 32, at most 1024): an online
// (max, sum of exponentials) per thread, merged across the warp, then across warps. The result is
// valid in thread 0.
__device__ float block_logsumexp(const float* __restrict__ r, int n) {
    __shared__ float smax[32], ssum[32];
    float m = NEG_INF, s = 0.f;
    for (int c = threadIdx.x; c < n; c += blockDim.x) {
        float v = r[c];
        if (v > m) {
            s = s * expf(m - v) + 1.f;
            m = v;
        } else {
            s += expf(v - m);
        }
    }
    warp_merge_lse(m, s);
    int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP;
    if (lane == 0) {
        smax[wid] = m;
        ssum[wid] = s;
    }
    __syncthreads();
    if (wid == 0) {
        int nw = blockDim.x / WARP;
        m = lane < nw ? smax[lane] : NEG_INF;
        s = lane < nw ? ssum[lane] : 0.f;
        warp_merge_lse(m, s);
    }
    return m + logf(s);
}

// Causal grouped-query attention without the T x T matrix (flash-style online softmax).
//
// Block: ATT_WARPS warps, one query row each (consecutive tokens q0 .. q0 + ATT_WARPS - 1, the last
// q_last), one head. Keys and values stream through shared memory in tiles of ATT_TILE; in a tile,
// lane j scores key j (dot product over head_dim d against the warp's query, which the caller has
// put in Qs[wid * d ..]), the warp folds the tile into its running max / sum, and each lane
// accumulates output elements lane, lane + 32, ... (d <= 32 * ATT_MAX_E). k and v point at key and
// value row 0 of the head's KV group, ld floats between rows. window <= 0 means no sliding window.
// Shared memory: Ks ATT_TILE rows of d + 1 (padded against bank conflicts), Vs ATT_TILE rows of d,
// Qs ATT_WARPS rows of d. On return the output of an active warp's row qi is acc[i] / l.
#define ATT_WARPS 16
#define ATT_TILE 32
#define ATT_MAX_E 8

__device__ __forceinline__ void attention_rows(const float* __restrict__ k, const float* __restrict__ v,
                                               size_t ld, int d, int window, float scale, int q0, int q_last,
                                               int qi, bool active, float* Ks, float* Vs, const float* Qs,
                                               float (&acc)[ATT_MAX_E], float& l) {
    const int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP;
    const int k_lo = window > 0 ? max(0, q0 + 1 - window) : 0;
    const int my_lo = window > 0 ? max(0, qi + 1 - window) : 0;
#pragma unroll
    for (int i = 0; i < ATT_MAX_E; ++i) acc[i] = 0.f;
    float m = NEG_INF;
    l = 0.f;
    for (int j0 = k_lo; j0 <= q_last; j0 += ATT_TILE) {
        int nt = min(ATT_TILE, q_last + 1 - j0);
        __syncthreads();
        for (int t = threadIdx.x; t < nt * d; t += blockDim.x) {
            int jj = t / d, e = t % d;
            size_t src = (size_t)(j0 + jj) * ld + e;
            Ks[jj * (d + 1) + e] = k[src];
            Vs[jj * d + e] = v[src];
        }
        __syncthreads();
        if (!active || j0 > qi || j0 + nt <= my_lo) continue;
        int j = j0 + lane;
        bool valid = lane < nt && j <= qi && j >= my_lo;
        float sc = NEG_INF;
        if (valid) {
            const float* kr = Ks + lane * (d + 1);
            const float* qr = Qs + wid * d;
            float dot = 0.f;
            for (int e = 0; e < d; ++e) dot = fmaf(qr[e], kr[e], dot);
            sc = dot * scale;
        }
        float m_new = fmaxf(m, warp_max(sc));
        float p = valid ? expf(sc - m_new) : 0.f;
        float corr = m == NEG_INF ? 0.f : expf(m - m_new);
        l = l * corr + warp_sum(p);
        m = m_new;
#pragma unroll
        for (int i = 0; i < ATT_MAX_E; ++i) acc[i] *= corr;
        for (int jj = 0; jj < nt; ++jj) {
            float pj = __shfl_sync(0xffffffffu, p, jj);
            const float* vr = Vs + jj * d;
#pragma unroll
            for (int i = 0; i < ATT_MAX_E; ++i) {
                int e = lane + i * WARP;
                if (e < d) acc[i] = fmaf(pj, vr[e], acc[i]);
            }
        }
    }
}
