#!/usr/bin/env python3
"""Independent reference for the Rust GPTQ solver: a faithful numpy (float32) port of AutoGPTQ v0.6
`GPTQ.add_batch` / `GPTQ.fasterquant` and `Quantizer` (auto_gptq/quantization/{gptq,quantizer}.py).

Deviation from the original, on purpose: act-order uses a STABLE descending argsort of diag(H)
(torch.argsort is not stable), as the Rust solver does.

Writes, beside this script:
  gptq_ref_<shape>.bin   little-endian f32: W [rows, cols] row-major, then X [tokens, cols] row-major
  gptq_ref.json          shapes, batch split of X, and for every case: settings, codes, scales,
                         zeros, g_idx, loss, plus the reference H of each shape.

Run: python3 gptq_reference.py   (needs numpy)
"""
import json
import os

import numpy as np

F32 = np.float32
HERE = os.path.dirname(os.path.abspath(__file__))


class Quantizer:
    def configure(self, bits, sym):
        self.maxq = F32(2**bits - 1)
        self.sym = sym

    def find_params(self, x):
        x = x.astype(F32)
        tmp = np.zeros(x.shape[0], dtype=F32)
        xmin = np.minimum(x.min(1), tmp)
        xmax = np.maximum(x.max(1), tmp)
        if self.sym:
            xmax = np.maximum(np.abs(xmin), xmax)
            neg = xmin < 0
            xmin[neg] = -xmax[neg]
        both = (xmin == 0) & (xmax == 0)
        xmin[both] = F32(-1)
        xmax[both] = F32(1)
        self.scale = ((xmax - xmin) / self.maxq).astype(F32)
        if self.sym:
            self.zero = np.full_like(self.scale, (self.maxq + 1) / 2)
        else:
            self.zero = np.round(-xmin / self.scale).astype(F32)

    def code(self, x, scale, zero):
        return np.clip(np.round(x / scale) + zero, 0, self.maxq).astype(F32)


class GPTQ:
    def __init__(self, W):
        self.W = W.astype(F32).copy()
        self.rows, self.columns = W.shape
        self.H = np.zeros((self.columns, self.columns), dtype=F32)
        self.nsamples = 0

    def add_batch(self, inp):
        # Expert-style 2-D input: a batch of one call.
        tmp = 1
        inp = inp.reshape(-1, self.columns).T.astype(F32)
        self.H *= F32(self.nsamples / (self.nsamples + tmp))
        self.nsamples += tmp
        inp = F32(np.sqrt(2 / self.nsamples)) * inp
        self.H += inp @ inp.T

    def fasterquant(self, quantizer, blocksize=128, percdamp=0.1, groupsize=-1, actorder=False,
                    static_groups=False):
        W = self.W.copy()
        quantizer.find_params(W)
        init_scale, init_zero = quantizer.scale.copy(), quantizer.zero.copy()
        H = self.H.copy()
        dead = np.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        g_idx = []
        scale = []
        zero = []
        now_idx = 1

        if static_groups:
            groups = []
            for i in range(0, self.columns, groupsize):
                q = Quantizer()
                q.configure(BITS[0], quantizer.sym)
                q.find_params(W[:, i:(i + groupsize)])
                scale.append(q.scale)
                zero.append(q.zero)
                groups.append(q)

        if actorder:
            perm = np.argsort(-np.diag(H), kind="stable")
            W = W[:, perm]
            H = H[perm][:, perm]
            invperm = np.argsort(perm)

        Losses = np.zeros_like(W)
        Q = np.zeros_like(W)
        C = np.zeros(W.shape, dtype=np.uint8)

        damp = F32(percdamp * np.mean(np.diag(H).astype(np.float64)))
        diag = np.arange(self.columns)
        H[diag, diag] += damp
        L = np.linalg.cholesky(H)  # float32 LAPACK
        Linv = np.linalg.inv(L).astype(F32)
        Hinv_full = (Linv.T @ Linv).astype(F32)  # cholesky_inverse
        Hinv = np.linalg.cholesky(Hinv_full).T.astype(F32)  # upper: Hinv_full = U^T U

        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            count = i2 - i1
            W1 = W[:, i1:i2].copy()
            Q1 = np.zeros_like(W1)
            C1 = np.zeros(W1.shape, dtype=np.uint8)
            Err1 = np.zeros_like(W1)
            Losses1 = np.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(count):
                w = W1[:, i]
                d = Hinv1[i, i]
                if groupsize != -1:
                    if not static_groups:
                        if (i1 + i) % groupsize == 0:
                            quantizer.find_params(W[:, (i1 + i):(i1 + i + groupsize)])
                        if ((i1 + i) // groupsize) - now_idx == -1:
                            scale.append(quantizer.scale)
                            zero.append(quantizer.zero)
                            now_idx += 1
                        s, z = quantizer.scale, quantizer.zero
                    else:
                        idx = i1 + i
                        if actorder:
                            idx = perm[idx]
                        g = groups[idx // groupsize]
                        s, z = g.scale, g.zero
                else:
                    s, z = init_scale, init_zero
                c = quantizer.code(w, s, z)
                q = (s * (c - z)).astype(F32)
                C1[:, i] = c.astype(np.uint8)
                Q1[:, i] = q
                Losses1[:, i] = (w - q) ** 2 / d ** 2
                err1 = (w - q) / d
                W1[:, i:] -= np.outer(err1, Hinv1[i, i:]).astype(F32)
                Err1[:, i] = err1
            Q[:, i1:i2] = Q1
            C[:, i1:i2] = C1
            Losses[:, i1:i2] = Losses1 / 2
            W[:, i2:] -= (Err1 @ Hinv[i1:i2, i2:]).astype(F32)

        gs = groupsize if groupsize != -1 else self.columns
        if static_groups and actorder:
            g_idx = [perm[i] // gs for i in range(self.columns)]
        else:
            g_idx = [i // gs for i in range(self.columns)]
        g_idx = np.array(g_idx, dtype=np.int32)
        if actorder:
            Q = Q[:, invperm]
            C = C[:, invperm]
            g_idx = g_idx[invperm]
        if not scale:
            scale.append(init_scale)
            zero.append(init_zero)
        scale = np.stack(scale, 0)  # [G, N] (the transpose of the reference's [N, G])
        zero = np.stack(zero, 0)
        # The reference reports sum(Losses) with Losses = Losses1 / 2; report the sum of (w-q)^2/d^2.
        return C, Q, scale, zero, g_idx, float(np.sum(Losses.astype(np.float64)) * 2), float(damp)


BITS = [4]


def make_inputs(rng, rows, cols, tokens, dead):
    W = (rng.standard_normal((rows, cols)) * 0.05).astype(F32)
    W[0, :] = np.abs(W[0, :])  # a row with no negative weight (xmin stays 0)
    W[1, : cols // 2] = 0  # a row whose first groups are all zero
    mix = rng.standard_normal((cols, cols)) / np.sqrt(cols) + np.eye(cols)
    Z = rng.standard_normal((tokens, cols))
    colscale = np.exp(rng.standard_normal(cols))
    X = ((Z @ mix) * colscale).astype(F32)
    X[:, dead] = 0
    return W, X


def main():
    rng = np.random.default_rng(20231215)
    shapes = {
        "24x64": (24, 64, 96, [3, 17, 40], 32),
        "40x256": (40, 256, 192, [0, 5, 100, 101, 255], 48),
    }
    cases = [
        ("24x64", 4, -1, True, False),
        ("24x64", 3, 32, False, False),
        ("24x64", 8, 32, True, False),
        ("40x256", 4, 128, True, False),
        ("40x256", 3, 32, True, False),
        ("40x256", 4, -1, False, False),
        ("40x256", 8, -1, True, False),
        ("40x256", 2, 64, True, False),
        ("40x256", 4, 32, True, True),
    ]
    out = {"about": __doc__.strip().splitlines()[0], "shapes": {}, "cases": []}
    gptqs = {}
    for name, (rows, cols, tokens, dead, batch) in shapes.items():
        W, X = make_inputs(rng, rows, cols, tokens, dead)
        with open(os.path.join(HERE, f"gptq_ref_{name}.bin"), "wb") as f:
            f.write(W.astype("<f4").tobytes())
            f.write(X.astype("<f4").tobytes())
        g = GPTQ(W)
        for t in range(0, tokens, batch):
            g.add_batch(X[t:t + batch])
        gptqs[name] = g
        out["shapes"][name] = {
            "rows": rows, "cols": cols, "tokens": tokens, "batch": batch, "dead": dead,
            "calls": g.nsamples,
            "h_diag": [float(v) for v in np.diag(g.H)],
            "h_row0": [float(v) for v in g.H[0]],
        }
    for name, bits, gs, act, static in cases:
        q = Quantizer()
        q.configure(bits, True)
        BITS[0] = bits
        C, Q, scale, zero, g_idx, loss, damp = gptqs[name].fasterquant(
            q, percdamp=0.1, groupsize=gs, actorder=act, static_groups=static)
        out["cases"].append({
            "shape": name, "bits": bits, "group_size": gs, "act_order": act, "static_groups": static,
            "codes": "".join("%02x" % v for v in C.reshape(-1)),
            "scales": [float(v) for v in scale.reshape(-1)],
            "zeros": [float(v) for v in zero.reshape(-1)],
            "g_idx": [int(v) for v in g_idx],
            "loss": loss, "damp": damp,
        })
    with open(os.path.join(HERE, "gptq_ref.json"), "w") as f:
        json.dump(out, f, indent=0)


if __name__ == "__main__":
    main()
