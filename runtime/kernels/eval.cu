// Kernels of the layer-major evaluation (runtime/src/cuda/eval.rs): every window's hidden states
// stay on the GPU in f32, one layer's weights at a time in f16/bf16 for cuBLAS tensor-core GEMMs.
//
// "half" below means the element type of the GEMM operands of one linear group: __half for
// dequantized GPTQ weights (f16 keeps the 11-bit products s * (q - z) exact to rounding), or
// __nv_bfloat16 for dense bf16 checkpoints. Entries are suffixed `_f16` / `_bf16`.

#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef unsigned int u32;
// WARP, NEG_INF, warp_max, warp_sum and attention_rows come from rows.cuh, which
// runtime/src/cuda/eval.rs puts in front of this file.

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// ---- embedding: out[i, :] = table[ids[i], :] (f32) ----
extern "C" __global__ void eval_embed_f32(const float* __restrict__ table, const u32* __restrict__ ids,
                                          float* __restrict__ out, int cols) {
    const float* s = table + (size_t)ids[blockIdx.x] * cols;
    float* o = out + (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = s[c];
}

// ---- RMSNorm of each row into the GEMM dtype, optionally with the router logits ----
// y = w * (x * rsqrt(mean(x^2) + eps)) (sum of squares in f64 as cpu.rs); when `gate` is set
// (n_exp rows of `cols` f32), logits[row, e] = sum_c y_c * gate[e, c] with y in f32, as the CPU
// router sees it. One block (256 threads) per row; n_exp <= 64.
#define RMS_V 16  // values per thread kept in registers (rows up to 256 * 16 = 4096 wide)
template <typename T>
__device__ void rms_norm_rows(const float* __restrict__ x, const float* __restrict__ w, T* __restrict__ out,
                              int cols, float eps, const float* __restrict__ gate, int n_exp,
                              float* __restrict__ logits) {
    __shared__ double part[32];
    __shared__ float gpart[64][8];
    const float* r = x + (size_t)blockIdx.x * cols;
    T* o = out + (size_t)blockIdx.x * cols;
    const bool regs = cols <= (int)blockDim.x * RMS_V;
    float v[RMS_V];
    double ss = 0.0;
    if (regs) {
#pragma unroll
        for (int j = 0; j < RMS_V; ++j) {
            int c = threadIdx.x + j * blockDim.x;
            v[j] = c < cols ? r[c] : 0.f;
            ss += (double)v[j] * (double)v[j];
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) ss += (double)r[c] * (double)r[c];
    }
    float inv = 1.f / sqrtf((float)(block_sum_f64(ss, part) / cols) + eps);
    if (regs) {
#pragma unroll
        for (int j = 0; j < RMS_V; ++j) {
            int c = threadIdx.x + j * blockDim.x;
            v[j] = c < cols ? w[c] * (v[j] * inv) : 0.f;
            if (c < cols) o[c] = from_f32<T>(v[j]);
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = from_f32<T>(w[c] * (r[c] * inv));
    }
    if (gate == nullptr) return;
    for (int e = 0; e < n_exp; ++e) {
        const float* g = gate + (size_t)e * cols;
        float acc = 0.f;
        if (regs) {
#pragma unroll
            for (int j = 0; j < RMS_V; ++j) {
                int c = threadIdx.x + j * blockDim.x;
                if (c < cols) acc = fmaf(v[j], g[c], acc);
            }
        } else {
            for (int c = threadIdx.x; c < cols; c += blockDim.x) acc = fmaf(w[c] * (r[c] * inv), g[c], acc);
        }
        acc = warp_sum(acc);
        if (threadIdx.x % WARP == 0) gpart[e][threadIdx.x / WARP] = acc;
    }
    __syncthreads();
    if ((int)threadIdx.x < n_exp) {
        float s = 0.f;
        for (int i = 0; i < (int)blockDim.x / WARP; ++i) s += gpart[threadIdx.x][i];
        logits[(size_t)blockIdx.x * n_exp + threadIdx.x] = s;
    }
}

#define RMS_ENTRY(TN, T)                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) eval_rms_norm_##TN(                                 \
        const float* x, const float* w, T* out, int cols, float eps, const float* gate, int n_exp,      \
        float* logits) {                                                                                  \
        rms_norm_rows<T>(x, w, out, cols, eps, gate, n_exp, logits);                                      \
    }
RMS_ENTRY(f16, __half)
RMS_ENTRY(bf16, __nv_bfloat16)

// ---- router: softmax in f32, top-k (lower index first on ties), renormalised ----
extern "C" __global__ void eval_route(const float* __restrict__ logits, int tokens, int n_exp, int k,
                                      int* __restrict__ ids, float* __restrict__ wts) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= tokens) return;
    const float* l = logits + (size_t)t * n_exp;
    float mx = NEG_INF;
    for (int e = 0; e < n_exp; ++e) mx = fmaxf(mx, l[e]);
    float p[64];
    float sum = 0.f;
    for (int e = 0; e < n_exp; ++e) {
        p[e] = expf(l[e] - mx);
        sum += p[e];
    }
    for (int e = 0; e < n_exp; ++e) p[e] /= sum;
    unsigned long long taken = 0ull;
    int chosen[8];
    float total = 0.f;
    for (int s = 0; s < k; ++s) {
        int best = -1;
        for (int e = 0; e < n_exp; ++e) {
            if (taken >> e & 1ull) continue;
            if (best < 0 || p[e] > p[best]) best = e;
        }
        taken |= 1ull << best;
        chosen[s] = best;
        total += p[best];
    }
    for (int s = 0; s < k; ++s) {
        ids[(size_t)t * k + s] = chosen[s];
        wts[(size_t)t * k + s] = p[chosen[s]] / total;
    }
}

// ---- RoPE on the q and k parts of the fused qkv rows (in place, f32), and an f16 copy of q, k, v ----
// Row layout: q [qw] | k [kw] | v [kw], row stride `ld`. HF rotate_half convention; angle =
// pos * inv_freq[j] in f32 as cpu.rs. One block per token.
extern "C" __global__ void eval_rope_qkv(float* __restrict__ qkv, int ld, const u32* __restrict__ pos,
                                         const float* __restrict__ inv_freq, int qw, int kw, int d,
                                         __half* __restrict__ h16) {
    int half = d / 2;
    float* r = qkv + (size_t)blockIdx.x * ld;
    __half* o = h16 ? h16 + (size_t)blockIdx.x * (qw + 2 * kw) : nullptr;
    float p = (float)pos[blockIdx.x];
    int pairs = (qw + kw) / 2;
    for (int t = threadIdx.x; t < pairs; t += blockDim.x) {
        int h = t / half, j = t % half;
        float s, c;
        sincosf(p * inv_freq[j], &s, &c);
        int base = h * d;
        float x1 = r[base + j], x2 = r[base + half + j];
        float o1 = x1 * c - x2 * s, o2 = x2 * c + x1 * s;
        r[base + j] = o1;
        r[base + half + j] = o2;
        if (o) {
            o[base + j] = __float2half_rn(o1);
            o[base + half + j] = __float2half_rn(o2);
        }
    }
    if (o)
        for (int c = threadIdx.x; c < kw; c += blockDim.x) o[qw + kw + c] = __float2half_rn(r[qw + kw + c]);
}

// ---- causal GQA attention over many windows ----
// `blocks[b]` = {window start token, window length, first query (window-local), unused}; query
// head = blockIdx.y. q/k/v rows of token t live at base + t * ld (+ q_off / k_off / v_off).
// window <= 0: no sliding window. Output rows of `qw` halves.

// Reference kernel (f32 CUDA cores; any head_dim <= 256): attention_rows (rows.cuh), ATT_WARPS
// query rows per block, one per warp.

template <typename T>
__device__ void attention_f32_rows(const float* __restrict__ qkv, int ld, int q_off, int k_off, int v_off,
                                   const int4* __restrict__ blocks, int n_heads, int n_kv_heads, int d,
                                   int window, float scale, T* __restrict__ out, int ldo) {
    extern __shared__ float smem[];
    float* Ks = smem;
    float* Vs = Ks + ATT_TILE * (d + 1);
    float* Qs = Vs + ATT_TILE * d;
    int4 blk = blocks[blockIdx.x];
    int start = blk.x, T_ = blk.y, q0 = blk.z;
    int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP;
    int h = blockIdx.y;
    int g = h / (n_heads / n_kv_heads);
    int qi = q0 + wid;
    bool active = qi < T_;
    int q_last = min(q0 + ATT_WARPS, T_) - 1;
    const float* base = qkv + (size_t)start * ld;
    if (active)
        for (int e = lane; e < d; e += WARP) Qs[wid * d + e] = base[(size_t)qi * ld + q_off + h * d + e];
    float acc[ATT_MAX_E], l;
    attention_rows(base + k_off + g * d, base + v_off + g * d, ld, d, window, scale, q0, q_last, qi, active, Ks, Vs,
                   Qs, acc, l);
    if (active) {
        float inv = 1.f / l;
        T* o = out + (size_t)(start + qi) * ldo + h * d;
#pragma unroll
        for (int i = 0; i < ATT_MAX_E; ++i) {
            int e = lane + i * WARP;
            if (e < d) o[e] = from_f32<T>(acc[i] * inv);
        }
    }
}

#define ATT_F32_ENTRY(TN, T)                                                                              \
    extern "C" __global__ void __launch_bounds__(ATT_WARPS * WARP) eval_attention_f32_##TN(              \
        const float* qkv, int ld, int q_off, int k_off, int v_off, const int4* blocks, int n_heads,        \
        int n_kv_heads, int d, int window, float scale, T* out, int ldo) {                                 \
        attention_f32_rows<T>(qkv, ld, q_off, k_off, v_off, blocks, n_heads, n_kv_heads, d, window, scale, \
                              out, ldo);                                                                   \
    }
ATT_F32_ENTRY(f16, __half)
ATT_F32_ENTRY(bf16, __nv_bfloat16)

// Tensor-core kernel (mma.sync m16n8k16, f16 inputs from eval_rope_qkv's copy, f32 accumulation),
// flash-attention-2 style: 4 warps x 16 query rows = 64 queries per block, key/value tiles of 64
// in shared memory. Each warp keeps its Q fragments, S = Q K^T and O in registers;
// the fragment layouts are those of the PTX ISA for m16n8k16 (g = lane / 4, c = lane % 4: A holds
// rows g, g+8 and columns 2c, 2c+1, 2c+8, 2c+9; B columns n = g, rows 2c.. ; C rows g, g+8,
// columns 2c, 2c+1), loaded with ldmatrix (V with .trans).
#define TC_WARPS 4
#define TC_Q 64
#define TC_K 64

__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 b16 matrices from shared memory: lane l gives the address of row l % 8 of matrix l / 8;
// register i receives row lane / 4, columns 2 (lane % 4) .. +1 of matrix i (transposed with .trans).
__device__ __forceinline__ void ldsm_x4(u32* r, const void* p) {
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void ldsm_x4_trans(u32* r, const void* p) {
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

// 16-byte global -> shared copy that bypasses registers; zeros when !ok.
__device__ __forceinline__ void cp_async16_zfill(void* dst, const void* src, bool ok) {
    unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    int n = ok ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(n) : "memory");
}

__device__ __forceinline__ u32 pack_half2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *(u32*)&h;
}

template <int D, typename T>
__device__ void attention_tc(const __half* __restrict__ qkv, int ld, int q_off, int k_off, int v_off,
                             const int4* __restrict__ blocks, int n_heads, int n_kv_heads, int window,
                             float scale, T* __restrict__ out, int ldo) {
    constexpr int LDH = D + 8;     // halves per Q/K/V row (16-byte rows, conflict-free ldmatrix)
    constexpr int NT = TC_K / 8;   // key n-tiles of S
    constexpr int DT = D / 8;      // d n-tiles of O
    extern __shared__ __align__(16) unsigned char tc_smem[];
    __half* Qs = (__half*)tc_smem;
    __half* Ks = Qs + TC_Q * LDH;  // two buffers of [K tile | V tile]

    const int4 blk = blocks[blockIdx.x];
    const int start = blk.x, T_ = blk.y, q0 = blk.z;
    const int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP;
    const int gr = lane / 4, gc = lane % 4;
    const int lr = lane % 8, lm = lane / 8;  // ldmatrix: row and matrix this lane addresses
    const int h = blockIdx.y;
    const int kvh = h / (n_heads / n_kv_heads);
    const __half* base = qkv + (size_t)start * ld;
    const int q_last = min(q0 + TC_Q, T_) - 1;
    const int k_lo = window > 0 ? max(0, q0 + 1 - window) : 0;
    constexpr int CH = D / 8;
    // Scores in log2 units: exp(x * scale) = exp2(x * scale * log2(e)).
    const float sl2 = scale * 1.4426950408889634f;

    for (int i = threadIdx.x; i < TC_Q * CH; i += blockDim.x) {
        int r = i / CH, c = (i % CH) * 8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (q0 + r < T_) v = *(const uint4*)(base + (size_t)(q0 + r) * ld + q_off + h * D + c);
        *(uint4*)(Qs + r * LDH + c) = v;
    }
    __syncthreads();
    const int w0 = q0 + wid * 16;  // first query row of this warp
    u32 qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        // matrices: rows 0-7 / 8-15 x columns kk*16 + 0-7 / 8-15, in the order a0..a3 wants.
        ldsm_x4(qf[kk], Qs + (wid * 16 + (lm % 2) * 8 + lr) * LDH + kk * 16 + (lm / 2) * 8);
    }
    float o[DT][4];
#pragma unroll
    for (int n = 0; n < DT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
    const int qi[2] = {w0 + gr, w0 + gr + 8};
    int lo[2];
    for (int r = 0; r < 2; ++r) lo[r] = window > 0 ? max(0, qi[r] + 1 - window) : 0;
    const int w_lo = window > 0 ? max(0, w0 + 1 - window) : 0;

    // K/V tiles stream through two buffers with cp.async: tile t + 1 loads while tile t computes.
    auto load_tile = [&](int j0, int buf) {
        __half* kd = Ks + buf * 2 * TC_K * LDH;
        __half* vd = kd + TC_K * LDH;
        for (int i = threadIdx.x; i < TC_K * CH; i += blockDim.x) {
            int rr = i / CH, c = (i % CH) * 8;
            bool ok = j0 + rr <= q_last;
            const __half* row = base + (size_t)(ok ? j0 + rr : q_last) * ld + kvh * D + c;
            cp_async16_zfill(kd + rr * LDH + c, row + k_off, ok);
            cp_async16_zfill(vd + rr * LDH + c, row + v_off, ok);
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
    };
    if (k_lo <= q_last) load_tile(k_lo, 0);
    int buf = 0;
    for (int j0 = k_lo; j0 <= q_last; j0 += TC_K, buf ^= 1) {
        if (j0 + TC_K <= q_last) {
            load_tile(j0 + TC_K, buf ^ 1);
            asm volatile("cp.async.wait_group 1;" ::: "memory");
        } else {
            asm volatile("cp.async.wait_group 0;" ::: "memory");
        }
        __syncthreads();
        const __half* Kt = Ks + buf * 2 * TC_K * LDH;
        const __half* Vt = Kt + TC_K * LDH;
        if (!(w0 >= T_ || j0 > w0 + 15 || j0 + TC_K <= w_lo)) {
        float s[NT][4];
#pragma unroll
        for (int n = 0; n < NT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk += 2) {
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                // b0, b1 of k-steps kk and kk + 1 for keys n*8 .. n*8+7.
                u32 b[4];
                ldsm_x4(b, Kt + (n * 8 + lr) * LDH + kk * 16 + lm * 8);
                mma16816(s[n], qf[kk], b[0], b[1]);
                mma16816(s[n], qf[kk + 1], b[2], b[3]);
            }
        }
        // Masking only where the tile reaches the diagonal, the window's start or its end.
        const bool need_mask = j0 + TC_K - 1 > w0 || window > 0 || w0 + 15 >= T_;
        float tmax[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                int r = i / 2;
                float v = s[n][i] * sl2;
                if (need_mask) {
                    int j = j0 + n * 8 + gc * 2 + (i & 1);
                    if (!(qi[r] < T_ && j <= qi[r] && j >= lo[r])) v = NEG_INF;
                }
                s[n][i] = v;
                tmax[r] = fmaxf(tmax[r], v);
            }
        float corr[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 1));
            tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 2));
            float mn = fmaxf(m[r], tmax[r]);
            corr[r] = mn == NEG_INF ? 1.f : (m[r] == NEG_INF ? 0.f : exp2f(m[r] - mn));
            m[r] = mn;
        }
        // A row whose keys are all masked so far has m = -inf: its p are 0 (not exp2(-inf + inf)).
        const float mb[2] = {m[0] == NEG_INF ? 0.f : m[0], m[1] == NEG_INF ? 0.f : m[1]};
        float psum[2] = {0.f, 0.f};
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                int r = i / 2;
                float p = exp2f(s[n][i] - mb[r]);
                s[n][i] = p;
                psum[r] += p;
            }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            psum[r] += __shfl_xor_sync(0xffffffffu, psum[r], 1);
            psum[r] += __shfl_xor_sync(0xffffffffu, psum[r], 2);
            l[r] = l[r] * corr[r] + psum[r];
        }
#pragma unroll
        for (int n = 0; n < DT; ++n) {
            o[n][0] *= corr[0];
            o[n][1] *= corr[0];
            o[n][2] *= corr[1];
            o[n][3] *= corr[1];
        }
#pragma unroll
        for (int ks = 0; ks < TC_K / 16; ++ks) {
            u32 pa[4];
            pa[0] = pack_half2(s[2 * ks][0], s[2 * ks][1]);
            pa[1] = pack_half2(s[2 * ks][2], s[2 * ks][3]);
            pa[2] = pack_half2(s[2 * ks + 1][0], s[2 * ks + 1][1]);
            pa[3] = pack_half2(s[2 * ks + 1][2], s[2 * ks + 1][3]);
#pragma unroll
            for (int n = 0; n < DT; n += 2) {
                // b0, b1 of d-tiles n and n + 1: keys ks*16 + 0-7 / 8-15, transposed.
                u32 b[4];
                ldsm_x4_trans(b, Vt + (ks * 16 + (lm % 2) * 8 + lr) * LDH + (n + lm / 2) * 8);
                mma16816(o[n], pa, b[0], b[1]);
                mma16816(o[n + 1], pa, b[2], b[3]);
            }
        }
        }
        __syncthreads();  // every warp is done with `buf` before the next load overwrites it
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (qi[r] >= T_) continue;
        float inv = 1.f / l[r];
        T* orow = out + (size_t)(start + qi[r]) * ldo + h * D;
#pragma unroll
        for (int n = 0; n < DT; ++n) {
            orow[n * 8 + gc * 2] = from_f32<T>(o[n][2 * r] * inv);
            orow[n * 8 + gc * 2 + 1] = from_f32<T>(o[n][2 * r + 1] * inv);
        }
    }
}

#define ATT_TC_ENTRY(D, TN, T)                                                                            \
    extern "C" __global__ void __launch_bounds__(TC_WARPS * WARP) eval_attention_tc_d##D##_##TN(          \
        const __half* qkv, int ld, int q_off, int k_off, int v_off, const int4* blocks, int n_heads,       \
        int n_kv_heads, int window, float scale, T* out, int ldo) {                                        \
        attention_tc<D, T>(qkv, ld, q_off, k_off, v_off, blocks, n_heads, n_kv_heads, window, scale, out,  \
                           ldo);                                                                           \
    }
ATT_TC_ENTRY(32, f16, __half)
ATT_TC_ENTRY(32, bf16, __nv_bfloat16)
ATT_TC_ENTRY(64, f16, __half)
ATT_TC_ENTRY(64, bf16, __nv_bfloat16)
ATT_TC_ENTRY(128, f16, __half)
ATT_TC_ENTRY(128, bf16, __nv_bfloat16)

// ---- MoE pieces ----
// out[i, :] = src[rows[i], :] for 16-bit elements; cols % 8 == 0 uses 16-byte moves.
extern "C" __global__ void eval_gather_u16(const unsigned short* __restrict__ src, const int* __restrict__ rows,
                                           unsigned short* __restrict__ out, int cols) {
    const unsigned short* s = src + (size_t)rows[blockIdx.x] * cols;
    unsigned short* o = out + (size_t)blockIdx.x * cols;
    if (cols % 8 == 0) {
        for (int c = threadIdx.x; c < cols / 8; c += blockDim.x) ((uint4*)o)[c] = ((const uint4*)s)[c];
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = s[c];
    }
}

// g[r, c] = silu(h[r, c]) * h[r, inter + c] from the fused [rows, 2 * inter] f32 output of w1|w3,
// written as in cpu.rs so that the exponential's argument is never positive.
__device__ __forceinline__ float load_f32(const float* p) { return *p; }
__device__ __forceinline__ float load_f32(const __half* p) { return __half2float(*p); }

template <typename S, typename T>
__device__ void silu_mul_rows(const S* __restrict__ h, int inter, T* __restrict__ g) {
    // Row blockIdx.y, two columns per thread.
    const int c = (blockIdx.x * blockDim.x + threadIdx.x) * 2;
    if (c >= inter) return;
    const S* hr = h + (size_t)blockIdx.y * 2 * inter;
    T* gr = g + (size_t)blockIdx.y * inter;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        if (c + i >= inter) break;
        float x = load_f32(hr + c + i), u = load_f32(hr + inter + c + i);
        float e = expf(-fabsf(x));
        float num = x >= 0.f ? x : x * e;
        gr[c + i] = from_f32<T>(num / (1.f + e) * u);
    }
}
extern "C" __global__ void eval_silu_mul_f16(const float* h, int inter, __half* g) {
    silu_mul_rows<float, __half>(h, inter, g);
}
extern "C" __global__ void eval_silu_mul_bf16(const float* h, int inter, __nv_bfloat16* g) {
    silu_mul_rows<float, __nv_bfloat16>(h, inter, g);
}
// The same from an f16 [rows, 2 * inter] (f16 experts write their w1|w3 products in f16).
extern "C" __global__ void eval_silu_mul_h16_f16(const __half* h, int inter, __half* g) {
    silu_mul_rows<__half, __half>(h, inter, g);
}
extern "C" __global__ void eval_silu_mul_h16_bf16(const __half* h, int inter, __nv_bfloat16* g) {
    silu_mul_rows<__half, __nv_bfloat16>(h, inter, g);
}

// x[rows[i], :] += wts[i] * y[i, :]; rows are distinct within one launch. One block per i.
extern "C" __global__ void eval_scatter_add(float* __restrict__ x, const float* __restrict__ y,
                                            const int* __restrict__ rows, const float* __restrict__ wts,
                                            int cols) {
    float w = wts[blockIdx.x];
    float* o = x + (size_t)rows[blockIdx.x] * cols;
    const float* s = y + (size_t)blockIdx.x * cols;
    if (cols % 4 == 0) {
        for (int c = threadIdx.x; c < cols / 4; c += blockDim.x) {
            float4 a = ((float4*)o)[c];
            const float4 b = ((const float4*)s)[c];
            a.x += w * b.x;
            a.y += w * b.y;
            a.z += w * b.z;
            a.w += w * b.w;
            ((float4*)o)[c] = a;
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] += w * s[c];
    }
}

// ---- GPTQ v1 dequantization straight from the checkpoint tensors (no act-order sorting) ----
// W[k, n] = scales[g, n] * (q[k, n] - (stored_zero[g, n] + 1)), g = g_idx[k]; qweight packed
// along K ([K*b/32, N] words), qzeros along N ([G, N*b/32]), LSB first, 3-bit values may straddle
// two words. One thread per (k, n) pair of columns n, n+1.
__device__ __forceinline__ u32 bits_at(const u32* words, size_t stride, size_t index, int b) {
    size_t bit = index * b;
    size_t w = bit / 32;
    int s = bit % 32;
    unsigned long long v = words[w * stride] >> s;
    if (s + b > 32) v |= (unsigned long long)words[(w + 1) * stride] << (32 - s);
    return (u32)(v & ((1ull << b) - 1));
}

template <typename T>
__device__ void dequant_gidx(const u32* __restrict__ qweight, const u32* __restrict__ qzeros,
                             const __half* __restrict__ scales, const int* __restrict__ g_idx, int bits,
                             int K, int N, T* __restrict__ W) {
    int n = (blockIdx.x * blockDim.x + threadIdx.x) * 2;
    int k = blockIdx.y;
    if (n >= N) return;
    int g = g_idx[k];
    int zw = N * bits / 32;
    T out[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        int c = n + i;
        float q = (float)bits_at(qweight + c, N, k, bits);
        float z = (float)bits_at(qzeros + (size_t)g * zw, 1, c, bits) + 1.f;
        out[i] = from_f32<T>(__half2float(scales[(size_t)g * N + c]) * (q - z));
    }
    T* o = W + (size_t)k * N + n;
    o[0] = out[0];
    o[1] = out[1];
}
extern "C" __global__ void eval_dequant_f16(const u32* qweight, const u32* qzeros, const __half* scales,
                                            const int* g_idx, int bits, int K, int N, __half* W) {
    dequant_gidx<__half>(qweight, qzeros, scales, g_idx, bits, K, N, W);
}
extern "C" __global__ void eval_dequant_bf16(const u32* qweight, const u32* qzeros, const __half* scales,
                                             const int* g_idx, int bits, int K, int N, __nv_bfloat16* W) {
    dequant_gidx<__nv_bfloat16>(qweight, qzeros, scales, g_idx, bits, K, N, W);
}

// ---- head: -log_softmax(logits[i])[targets[i]] per row, rows with a negative target skipped ----
extern "C" __global__ void eval_nll(const float* __restrict__ logits, const int* __restrict__ targets,
                                    float* __restrict__ out, int vocab) {
    int tgt = targets[blockIdx.x];
    if (tgt < 0) return;
    const float* r = logits + (size_t)blockIdx.x * vocab;
    float lse = block_logsumexp(r, vocab);
    if (threadIdx.x == 0) out[blockIdx.x] = lse - r[tgt];
}

// ---- synthetic weights for `bench eval`: a counter-based hash, no host round trip ----
__device__ __forceinline__ u32 hash32(unsigned long long x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return (u32)x;
}
extern "C" __global__ void eval_fill_u32(u32* out, size_t n, unsigned long long seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = hash32(seed * 0x9E3779B97F4A7C15ull + i);
}
// Uniform in [lo, hi) as f16 / bf16 / f32.
extern "C" __global__ void eval_fill_f16(__half* out, size_t n, unsigned long long seed, float lo, float hi) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __float2half_rn(lo + (hi - lo) * (hash32(seed * 0x9E3779B97F4A7C15ull + i) >> 8) * (1.f / 16777216.f));
}
extern "C" __global__ void eval_fill_bf16(__nv_bfloat16* out, size_t n, unsigned long long seed, float lo,
                                          float hi) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16_rn(lo + (hi - lo) * (hash32(seed * 0x9E3779B97F4A7C15ull + i) >> 8) *
                                              (1.f / 16777216.f));
}
extern "C" __global__ void eval_fill_f32(float* out, size_t n, unsigned long long seed, float lo, float hi) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = lo + (hi - lo) * (hash32(seed * 0x9E3779B97F4A7C15ull + i) >> 8) * (1.f / 16777216.f);
}
