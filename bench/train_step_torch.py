#!/usr/bin/env python3
"""bench/train_step_torch.py — the PyTorch twin of bench/train_step.c's training step.

The same DeepSeek-V3-shaped model as moe.h, written in plain PyTorch 2.x (no transformers: its
forward has no MTP, and its MoE loops over experts in Python), built from the directory that
`bench_train_step --dump DIR CONFIG B T` writes: moe.h's initial weights under the Hugging Face
DeepseekV3 names (model.safetensors, config.json), the tokens [B, T+1] (tokens.i32), the step's
hyper-parameters (run.txt) and moe.h's losses of its first steps (losses.txt).

One training step, as moe.h's (bench/train_step.c, trainer_step):
  loss  = CE(main) + (λ/D)·Σ_k (T−k)/T·CE_k + balance terms, with
          MLA: q = W_qb·RMSNorm(W_qa·x), [c_kv; k_pe] = W_kva·x, [k_nope; v] = W_kvb·RMSNorm(c_kv),
               RoPE on adjacent pairs of q_pe and the shared k_pe, causal softmax(q·k/√d_qk)·v;
          DeepSeekMoE: sigmoid scores s, s + bias for selection only, groups ranked by the sum of
               their top-2, top-k among the kept groups, gates = s normalised × routed scale,
               a shared SwiGLU expert, the routed ones as grouped GEMMs over rows sorted by expert
               (torch._grouped_mm when this torch has it on the CPU, else one GEMM per expert
               over its slice of the sorted rows; never a Python loop over tokens);
          the sequence-wise balance loss α/B·Σ_b Σ_i f_i·P_i (every MoE layer, MTP's too);
          MTP depth k: h' = W_eh·[RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)], one MoE block,
               logits through the shared head after its own norm;
  then  backward, global-norm clipping, AdamW (decay on matrices, not on norms), and the
        auxiliary-loss-free bias update b += γ·sign(mean load − load).
FP32 by default; --precision bf16 runs the forward under torch.autocast(cpu, bfloat16) (the
GEMMs in BF16, as moe.h's BF16 mode) with the router and the attention core in FP32, as moe.h
keeps them.

Three variants of the same step, the fastest of which is the baseline:
  grouped_mm  eager, the routed experts by torch._grouped_mm (where this torch has it);
  loop        eager, one GEMM per expert;
  compiled    torch.compile of the whole loss (forward and backward; TorchInductor's default
              mode, its C++/OpenMP kernels; experts by grouped_mm where it works, so the graph
              has no data-dependent shapes). Measured on Zen 4: 1.47× eager on the tiny FP32
              step at 1 thread, no faster on the small one (its GEMMs dominate), slower at 2
              threads; mode="max-autotune" was slower still (tiny 23 against 17 ms, small 1,267
              against 907 ms eager, 1 thread), so it is not a variant. The optimizer is torch's
              fused AdamW in every variant.

  --check   the twin against moe.h (see check()), every variant: FP32 losses must agree within
            loss_tol of run.txt (relative), gradients within grad_tol; BF16 losses are
            reported. Last line:
            CHECK ok|FAIL <fp32 loss max rel diff> <loss_tol> <bf16 loss max rel diff>
                  <grad max rel diff> <grad_tol> <torch version> <variants>
  (default) time steps: two warm-up steps, then steps until --seconds have passed (at least 3);
            with --variant auto (the default) every variant, steps alternating, and the
            fastest one's median is reported (a variant that fails to compile is left out, with
            its reason on stderr). Last line:
            ROW <median ms/step> <tokens/s> <variant> ...
Lines of the check table start with two spaces (bench_train_step echoes them).
"""
import argparse
import json
import logging
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def read_run(d):
    run = {}
    with open(os.path.join(d, "run.txt")) as f:
        for line in f:
            k, v = line.split()
            run[k] = float(v)
    return run


def read_losses(d):
    out = {}
    with open(os.path.join(d, "losses.txt")) as f:
        for line in f:
            w = line.split()
            out[(w[0], w[1], int(w[2]))] = {k: float(v) for k, v in (x.split("=") for x in w[3:])}
    return out


class Cfg:
    def __init__(self, c):
        self.V, self.d = c["vocab_size"], c["hidden_size"]
        self.inter, self.I = c["intermediate_size"], c["moe_intermediate_size"]
        self.L, self.first_dense = c["num_hidden_layers"], c["first_k_dense_replace"]
        self.H, self.qr, self.kvr = c["num_attention_heads"], c["q_lora_rank"] or 0, c["kv_lora_rank"]
        self.dn, self.dr, self.dv = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
        self.E, self.n_shared, self.K = c["n_routed_experts"], c["n_shared_experts"] or 0, c["num_experts_per_tok"]
        self.G, self.topk_group = c.get("n_group") or 1, c.get("topk_group") or 1
        self.norm_topk, self.rsf = bool(c.get("norm_topk_prob")), float(c["routed_scaling_factor"])
        self.D = c.get("num_nextn_predict_layers") or 0
        self.theta, self.eps = float(c.get("rope_theta", 10000.0)), float(c["rms_norm_eps"])
        unsupported = []
        if c.get("scoring_func", "sigmoid") != "sigmoid":
            unsupported.append("scoring_func " + str(c.get("scoring_func")))
        if c.get("topk_method", "noaux_tc") != "noaux_tc":
            unsupported.append("topk_method " + str(c.get("topk_method")))
        if c.get("rope_scaling"):
            unsupported.append("rope_scaling")
        if c.get("tie_word_embeddings"):
            unsupported.append("tie_word_embeddings")
        if unsupported:
            raise SystemExit("train_step_torch: the twin does not implement " + ", ".join(unsupported))


# ---- parameters: the twin's own layout, filled from the HF names --------------------------

def load_params(d, cfg):
    """Parameters (name -> tensor) in the twin's layout: fused [gate; up] matrices, expert
    stacks transposed for x @ W ([E, d, 2I] and [E, I, d]); expert biases as buffers."""
    sd = load_file(os.path.join(d, "model.safetensors"))
    P, bufs = {}, {}

    def block(pre, is_moe):
        if cfg.qr:
            P[pre + "q_a"] = sd[pre + "self_attn.q_a_proj.weight"]
            P[pre + "q_a_norm"] = sd[pre + "self_attn.q_a_layernorm.weight"]
            P[pre + "q_b"] = sd[pre + "self_attn.q_b_proj.weight"]
        else:
            P[pre + "q"] = sd[pre + "self_attn.q_proj.weight"]
        P[pre + "kv_a"] = sd[pre + "self_attn.kv_a_proj_with_mqa.weight"]
        P[pre + "kv_a_norm"] = sd[pre + "self_attn.kv_a_layernorm.weight"]
        P[pre + "kv_b"] = sd[pre + "self_attn.kv_b_proj.weight"]
        P[pre + "o"] = sd[pre + "self_attn.o_proj.weight"]
        P[pre + "attn_norm"] = sd[pre + "input_layernorm.weight"]
        P[pre + "ffn_norm"] = sd[pre + "post_attention_layernorm.weight"]
        if not is_moe:
            P[pre + "w13"] = torch.cat([sd[pre + "mlp.gate_proj.weight"], sd[pre + "mlp.up_proj.weight"]], 0)
            P[pre + "w2"] = sd[pre + "mlp.down_proj.weight"]
            return
        P[pre + "gate"] = sd[pre + "mlp.gate.weight"]
        bufs[pre + "bias"] = sd[pre + "mlp.gate.e_score_correction_bias"].clone()
        e = pre + "mlp.experts."
        P[pre + "ew13"] = torch.stack([torch.cat([sd[f"{e}{i}.gate_proj.weight"], sd[f"{e}{i}.up_proj.weight"]], 0).t()
                                       for i in range(cfg.E)]).contiguous()
        P[pre + "ew2"] = torch.stack([sd[f"{e}{i}.down_proj.weight"].t() for i in range(cfg.E)]).contiguous()
        if cfg.n_shared:
            s = pre + "mlp.shared_experts."
            P[pre + "sw13"] = torch.cat([sd[s + "gate_proj.weight"], sd[s + "up_proj.weight"]], 0)
            P[pre + "sw2"] = sd[s + "down_proj.weight"]

    P["embed"] = sd["model.embed_tokens.weight"]
    P["norm"] = sd["model.norm.weight"]
    P["head"] = sd["lm_head.weight"]
    for layer in range(cfg.L):
        block(f"model.layers.{layer}.", layer >= cfg.first_dense)
    for k in range(cfg.D):
        pre = f"model.layers.{cfg.L + k}."
        P[pre + "enorm"] = sd[pre + "enorm.weight"]
        P[pre + "hnorm"] = sd[pre + "hnorm.weight"]
        P[pre + "eh"] = sd[pre + "eh_proj.weight"]
        P[pre + "head_norm"] = sd[pre + "shared_head.norm.weight"]
        block(pre, True)
    P = {k: torch.nn.Parameter(v.float().contiguous()) for k, v in P.items()}
    return P, bufs


def to_hf(T, cfg):
    """The inverse of load_params: twin-layout tensors (e.g. gradients) under the HF names."""
    out = {"model.embed_tokens.weight": T["embed"], "model.norm.weight": T["norm"], "lm_head.weight": T["head"]}
    simple = {"q_a": "self_attn.q_a_proj.weight", "q_a_norm": "self_attn.q_a_layernorm.weight", "q_b": "self_attn.q_b_proj.weight",
              "q": "self_attn.q_proj.weight", "kv_a": "self_attn.kv_a_proj_with_mqa.weight",
              "kv_a_norm": "self_attn.kv_a_layernorm.weight", "kv_b": "self_attn.kv_b_proj.weight", "o": "self_attn.o_proj.weight",
              "attn_norm": "input_layernorm.weight", "ffn_norm": "post_attention_layernorm.weight", "gate": "mlp.gate.weight",
              "w2": "mlp.down_proj.weight", "sw2": "mlp.shared_experts.down_proj.weight", "enorm": "enorm.weight",
              "hnorm": "hnorm.weight", "eh": "eh_proj.weight", "head_norm": "shared_head.norm.weight"}
    for name, t in T.items():
        if not name.startswith("model.layers."):
            continue
        pre, key = name[:name.index(".", len("model.layers.")) + 1], name[name.index(".", len("model.layers.")) + 1:]
        if key in simple:
            out[pre + simple[key]] = t
        elif key in ("w13", "sw13"):
            g, u = t.chunk(2, 0)
            mlp = pre + ("mlp." if key == "w13" else "mlp.shared_experts.")
            out[mlp + "gate_proj.weight"], out[mlp + "up_proj.weight"] = g, u
        elif key == "ew13":
            for e in range(cfg.E):
                g, u = t[e].t().chunk(2, 0)
                out[f"{pre}mlp.experts.{e}.gate_proj.weight"], out[f"{pre}mlp.experts.{e}.up_proj.weight"] = g, u
        elif key == "ew2":
            for e in range(cfg.E):
                out[f"{pre}mlp.experts.{e}.down_proj.weight"] = t[e].t()
        else:
            raise KeyError(name)
    return out


# ---- the model --------------------------------------------------------------------------

def rms(x, w, eps):
    return F.rms_norm(x.float(), (x.shape[-1],), w, eps)


def rope_table(T, dr, theta):
    j = torch.arange(dr // 2, dtype=torch.float64)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-2.0 * j / dr)
    return torch.cos(ang).float(), torch.sin(ang).float()  # [T, dr/2]


def rope(x, cs):
    """Rotate adjacent pairs (x[2j], x[2j+1]) by position·θ^(−2j/d_R); x [B, T, h, d_R]."""
    cos, sin = cs[0][:, None, :], cs[1][:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2)


class Twin:
    def __init__(self, cfg, P, bufs, run, bf16, experts):
        self.c, self.P, self.bufs, self.run, self.bf16, self.experts = cfg, P, bufs, run, bf16, experts
        self.loads = {k[:-len("bias")]: torch.zeros(cfg.E, dtype=torch.int64) for k in bufs}  # per MoE layer prefix
        self.cs = {}

    def rope_cs(self, T):
        if T not in self.cs:
            self.cs[T] = rope_table(T, self.c.dr, self.c.theta)
        return self.cs[T]

    def mla(self, pre, x, B, T):
        c, P = self.c, self.P
        if c.qr:
            q = F.linear(rms(F.linear(x, P[pre + "q_a"]), P[pre + "q_a_norm"], c.eps), P[pre + "q_b"])
        else:
            q = F.linear(x, P[pre + "q"])
        q = q.view(B, T, c.H, c.dn + c.dr)
        kva = F.linear(x, P[pre + "kv_a"])
        ckv, kpe = kva[..., :c.kvr], kva[..., c.kvr:]
        kvb = F.linear(rms(ckv, P[pre + "kv_a_norm"], c.eps), P[pre + "kv_b"]).view(B, T, c.H, c.dn + c.dv)
        cs = self.rope_cs(T)
        with torch.autocast("cpu", enabled=False):  # the attention core in FP32, as moe.h
            qn, qp = q.float().split([c.dn, c.dr], -1)
            q = torch.cat([qn, rope(qp, cs)], -1)
            kp = rope(kpe.float().view(B, T, 1, c.dr), cs).expand(B, T, c.H, c.dr)
            kn, v = kvb.float().split([c.dn, c.dv], -1)
            k = torch.cat([kn, kp], -1)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                               scale=(c.dn + c.dr) ** -0.5)
        return F.linear(o.transpose(1, 2).reshape(B, T, c.H * c.dv), P[pre + "o"])

    @staticmethod
    def swiglu(x, w13, w2):
        g, u = F.linear(x, w13).chunk(2, -1)
        return F.linear(F.silu(g) * u, w2)

    def routed(self, pre, xs, offs, counts):
        """SwiGLU experts over rows sorted by expert: xs [R, d], expert e owns rows
        offs[e-1]..offs[e] (counts[e] of them)."""
        w13, w2 = self.P[pre + "ew13"], self.P[pre + "ew2"]
        if self.bf16:
            xs, w13, w2 = xs.bfloat16(), w13.bfloat16(), w2.bfloat16()
        if self.experts == "grouped_mm":
            g, u = torch._grouped_mm(xs, w13, offs=offs).chunk(2, -1)
            return torch._grouped_mm(F.silu(g) * u, w2, offs=offs)
        outs = []
        w13s, w2s = w13.unbind(0), w2.unbind(0)  # one view each (indexing w13[e] per expert would
        for e, part in enumerate(xs.split(counts.tolist())):  # make E full-size zero gradients in backward)
            if part.shape[0]:
                g, u = (part @ w13s[e]).chunk(2, -1)
                outs.append((F.silu(g) * u) @ w2s[e])
        return torch.cat(outs, 0)

    def moe(self, pre, x, B, T):
        c, P = self.c, self.P
        N, E, K = B * T, c.E, c.K
        u = x.reshape(N, c.d)
        with torch.autocast("cpu", enabled=False):  # the router in FP32, as moe.h
            s = torch.sigmoid(F.linear(u.float(), P[pre + "gate"]))  # [N, E]
            with torch.no_grad():
                sb = s + self.bufs[pre + "bias"]
                gs = sb.view(N, c.G, E // c.G).topk(2, -1).values.sum(-1)  # group score: sum of its top-2
                keep = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, gs.topk(c.topk_group, -1).indices, True)
                masked = sb.masked_fill(~keep.repeat_interleave(E // c.G, 1), float("-inf"))
                idx = masked.topk(K, -1).indices  # [N, K]
            w = s.gather(1, idx)
            if c.norm_topk:
                w = w / w.sum(-1, keepdim=True)
            w = w * c.rsf
        y = self.swiglu(u, P[pre + "sw13"], P[pre + "sw2"]) if c.n_shared else torch.zeros_like(u)
        with torch.no_grad():
            flat = idx.reshape(-1)
            order = torch.argsort(flat, stable=True)  # packed row r -> (token, slot) order[r]
            counts = torch.bincount(flat, minlength=E)
            self.loads[pre] += counts
            offs = counts.cumsum(0).to(torch.int32)
            tok = order // K
        yo = self.routed(pre, u.index_select(0, tok), offs, counts)
        yo = yo * w.reshape(-1)[order].unsqueeze(1).to(yo.dtype)
        y = y.index_add(0, tok, yo.to(y.dtype))
        bal = None
        alpha = self.run["balance_alpha"]
        if alpha > 0:  # α/B·Σ_b Σ_i f_i·P_i, f_i = E/(K·T)·(count of i in sequence b), P_i = mean_t s_i/Σ_j s_j
            with torch.no_grad():
                f = torch.zeros(B, E).scatter_add_(1, idx.view(B, T * K), torch.ones(B, T * K)) * (E / (K * T))
            with torch.autocast("cpu", enabled=False):
                Pm = (s / s.sum(-1, keepdim=True)).view(B, T, E).mean(1)
                bal = (f * Pm).sum() * (alpha / B)
        return y.view(B, T, c.d), bal

    def block(self, pre, x, B, T, is_moe):
        c, P = self.c, self.P
        h = x + self.mla(pre, rms(x, P[pre + "attn_norm"], c.eps), B, T)
        hn = rms(h, P[pre + "ffn_norm"], c.eps)
        if is_moe:
            y, bal = self.moe(pre, hn, B, T)
        else:
            y, bal = self.swiglu(hn, P[pre + "w13"], P[pre + "w2"]), None
        return h + y, bal

    def loss(self, toks):
        """toks [B, T+1] int64 -> (total, parts)."""
        c, P, run = self.c, self.P, self.run
        B, T = toks.shape[0], toks.shape[1] - 1
        bals = []
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            x = F.embedding(toks[:, :T], P["embed"])
            for layer in range(c.L):
                x, bal = self.block(f"model.layers.{layer}.", x, B, T, layer >= c.first_dense)
                if bal is not None:
                    bals.append(bal)
            h = rms(x, P["norm"], c.eps)
            ce = F.cross_entropy(F.linear(h, P["head"]).float().reshape(-1, c.V), toks[:, 1:].reshape(-1))
            total, parts = ce, {"main": ce}
            lam = run["mtp_lambda"]
            D = c.D if lam > 0 else 0
            hprev, mtp = h, None
            for k in range(1, D + 1):
                if T - k < 1:
                    break
                pre, Tk = f"model.layers.{c.L + k - 1}.", T - k
                e = F.embedding(toks[:, k:k + Tk], P["embed"])
                cat = torch.cat([rms(e, P[pre + "enorm"], c.eps), rms(hprev[:, :Tk], P[pre + "hnorm"], c.eps)], -1)
                hk, bal = self.block(pre, F.linear(cat, P[pre + "eh"]), B, Tk, True)
                if bal is not None:
                    bals.append(bal)
                lg = F.linear(rms(hk, P[pre + "head_norm"], c.eps), P["head"]).float()
                cek = F.cross_entropy(lg.reshape(-1, c.V), toks[:, k + 1:k + 1 + Tk].reshape(-1))
                parts[f"mtp{k}"] = cek
                term = cek * (Tk / T)  # the paper normalises L_k by T
                mtp = term if mtp is None else mtp + term
                hprev = hk
            if mtp is not None:
                total = total + mtp * (lam / D)
            if bals:
                bal = bals[0]
                for b in bals[1:]:
                    bal = bal + b
                parts["balance"] = bal
                total = total + bal
        parts["total"] = total
        return total, parts

    def update_bias(self, gamma):
        with torch.no_grad():
            for k, load in self.loads.items():
                total = int(load.sum())
                if total > 0 and gamma > 0:
                    self.bufs[k + "bias"] += gamma * torch.sign(total - self.c.E * load).float()
                load.zero_()


class Trainer:
    def __init__(self, d, bf16, variant, weights=None, lr=None):
        """d: the directory bench_train_step --dump wrote; variant: see the top; weights: where
        the weights are (d); lr: the learning rate (run.txt's lr)."""
        weights = weights or d
        with open(os.path.join(weights, "config.json")) as f:
            self.cfg = Cfg(json.load(f))
        self.run = read_run(d)
        if lr is not None:
            self.run["lr"] = lr
        P, bufs = load_params(weights, self.cfg)
        self.twin = Twin(self.cfg, P, bufs, self.run, bf16, "loop")
        self.compiled = None
        self.set_variant(variant)
        B, T = int(self.run["batch"]), int(self.run["seq"])
        self.toks = torch.from_numpy(np.fromfile(os.path.join(d, "tokens.i32"), dtype=np.int32).astype(np.int64)).view(B, T + 1)
        self.P = P
        self.params = list(P.values())
        decay = [p for p in self.params if p.dim() >= 2]  # matrices; norms (1-D) get no weight decay, as moe.h
        no_decay = [p for p in self.params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": self.run["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
        kw = dict(lr=self.run["lr"], betas=(self.run["beta1"], self.run["beta2"]), eps=self.run["eps"])
        try:  # the fused CPU kernel where this torch has it (2.4+), else the multi-tensor one
            self.opt = torch.optim.AdamW(groups, fused=True, **kw)
            self.opt_kind = "fused"
        except (RuntimeError, TypeError, ValueError):
            self.opt = torch.optim.AdamW(groups, foreach=True, **kw)
            self.opt_kind = "foreach"

    def set_variant(self, v):
        if v == "compiled":
            if self.compiled is None:
                self.compiled_experts = "grouped_mm" if grouped_mm_works(self.cfg.d, self.cfg.I) else "loop"
                self.compiled = torch.compile(self.twin.loss, fullgraph=True)  # one graph, or an error
            self.twin.experts, self.loss = self.compiled_experts, self.compiled
        else:
            self.twin.experts, self.loss = v, self.twin.loss

    def step(self, on_grads=None):
        total, parts = self.loss(self.toks)
        total.backward()
        if on_grads:  # the gradients before clipping and the update
            on_grads(self)
        if self.run["clip"] > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.run["clip"], foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.twin.update_bias(self.run["bias_gamma"])
        return {k: float(v.detach()) for k, v in parts.items()}


def leave_out(v, e, variants):
    """Called in an except block for variant v that failed with e: the compiled variant is left
    out (said on stderr) while another remains (torch.compile needs a C++ compiler and may not
    support this torch's build); anything else fails."""
    if v != "compiled" or len(variants) == 1:
        raise
    print(f"train_step_torch: the compiled variant is left out: {type(e).__name__}: {e}", file=sys.stderr)


def grouped_mm_works(d, inter):
    """torch._grouped_mm on the CPU, forward and backward, FP32 and BF16, against plain GEMMs.
    It wants rows of a multiple of 16 bytes: d and I multiples of 8 (BF16)."""
    if not hasattr(torch, "_grouped_mm") or d % 8 or inter % 8:
        return False
    try:
        g = torch.Generator().manual_seed(0)
        for dt in (torch.float32, torch.bfloat16):
            x = torch.randn(10, 16, generator=g).to(dt).requires_grad_()
            w = torch.randn(3, 16, 8, generator=g).to(dt).requires_grad_()
            offs = torch.tensor([4, 4, 10], dtype=torch.int32)  # an empty group in the middle
            y = torch._grouped_mm(x, w, offs=offs)
            ref = torch.cat([x[:4] @ w[0], x[4:10] @ w[2]])
            y.backward(torch.ones_like(y))
            if (y.float() - ref.float()).abs().max() > 1e-2 * (1 + ref.float().abs().max()) or x.grad is None:
                return False
        return True
    except Exception:  # not implemented on this torch's CPU backend
        return False


def main():
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found" (a CPU machine)
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--variant", default="auto", choices=["auto", "grouped_mm", "loop", "compiled"])
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    with open(os.path.join(a.dir, "config.json")) as f:
        c = json.load(f)
    grouped = grouped_mm_works(c["hidden_size"], c["moe_intermediate_size"])
    variants = [a.variant] if a.variant != "auto" else (["grouped_mm"] if grouped else []) + ["loop", "compiled"]
    if a.check:
        check(a, variants)
        return
    # every variant, steps alternating, the fastest reported (the model and its numbers are the
    # same in each; check() holds every variant to moe.h's losses)
    tr = Trainer(a.dir, a.precision == "bf16", variants[0])
    B, T = tr.toks.shape[0], tr.toks.shape[1] - 1
    times = {v: [] for v in variants}
    start = time.perf_counter()
    for i in range(512):
        for v in list(times):
            tr.set_variant(v)
            t0 = time.perf_counter()
            try:
                tr.step()
            except Exception as e:
                leave_out(v, e, times)
                del times[v]
                continue
            if i >= 2:  # two warm-up steps of each (the compiled variant compiles in its first)
                times[v].append(time.perf_counter() - t0)
        if min(len(t) for t in times.values()) >= 3 and sum(times[next(iter(times))]) > a.seconds:
            break
    med = {v: statistics.median(t) for v, t in times.items()}
    best = min(med, key=med.get)
    others = " ".join(f"{v}={1e3 * m:.1f}ms" for v, m in med.items())
    print(f"ROW {1e3 * med[best]:.3f} {B * T / med[best]:.1f} {best} steps={len(times[best])} {others} "
          f"wall={time.perf_counter() - start:.1f}s")


def compare_grads(tr, path):
    """Per tensor, max|g_torch - g_moe| / max|g_moe| (tests/parity's measure); the worst one."""
    want = load_file(path)
    got = to_hf({k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in tr.P.items()}, tr.cfg)
    worst, worst_name = 0.0, ""
    for name, g in want.items():
        if name not in got:
            continue  # buffers (expert biases) have no gradient in the twin
        den = float(g.abs().max())
        diff = float((got[name].detach().float() - g).abs().max())
        rel = diff / den if den > 0 else (0.0 if diff <= 1e-12 else float("inf"))
        if not rel <= worst:
            worst, worst_name = rel, name
    missing = [n for n in got if n not in want]
    if missing:
        raise SystemExit(f"train_step_torch: moe.h wrote no gradient for {missing[:3]}")
    return worst, worst_name, len(want)


def check(a, variants):
    """The twin against moe.h: on the timed model ("init": moe.h's initialisation), the losses of
    the first steps (each after the previous AdamW update); on a unit-scale variant ("unit",
    where attention, RoPE and routing move the loss), the first step's loss and gradients. For
    each variant (see leave_out). FP32 is gated (loss_tol, relative, on every part: total, main,
    MTP, balance; grad_tol on gradients); BF16 is reported."""
    ref = read_losses(a.dir)
    run = read_run(a.dir)
    steps, tol, gtol = int(run["check_steps"]), run["loss_tol"], run["grad_tol"]
    worst = {"fp32": 0.0, "bf16": 0.0}
    gworst = 0.0
    print(f"  PyTorch {torch.__version__} twin vs moe.h, the same weights and tokens; losses moe.h / torch (relative difference):")
    for model in ("init", "unit"):
        weights = a.dir if model == "init" else os.path.join(a.dir, "unit")
        for v in list(variants):
            for prec in ("fp32", "bf16"):
                if v not in variants:
                    break
                tr = Trainer(a.dir, prec == "bf16", v, weights)
                for s in range(1, (steps if model == "init" else 1) + 1):
                    grads = []
                    on_grads = None
                    if model == "unit" and prec == "fp32":
                        def on_grads(t):
                            grads.append(compare_grads(t, os.path.join(a.dir, "unit", "grads", "model.safetensors")))
                    try:
                        got, want = tr.step(on_grads), ref[(model, prec, s)]
                    except Exception as e:
                        leave_out(v, e, variants)
                        variants.remove(v)
                        break
                    cells = []
                    for k in ["total", "main"] + [x for x in sorted(want) if x.startswith("mtp")] + ["balance"]:
                        if k not in want:
                            continue
                        g = got.get(k, float("nan"))
                        rel = abs(g - want[k]) / max(abs(want[k]), 1e-30)
                        worst[prec] = max(worst[prec], rel) if rel == rel else float("inf")
                        cells.append(f"{k} {want[k]:.7g} / {g:.7g} ({rel:.1e})")
                    print(f"  {model} {v:10s} {prec} step {s}: " + ", ".join(cells))
                    for gw, gname, n in grads:
                        gworst = max(gworst, gw) if gw == gw else float("inf")
                        print(f"  {model} {v:10s} {prec} step {s}: gradients of {n} tensors, worst max|dg|/max|g| {gw:.1e} ({gname})")
    ok = worst["fp32"] <= tol and gworst <= gtol
    print(f"CHECK {'ok' if ok else 'FAIL'} {worst['fp32']:.3e} {tol:.3e} {worst['bf16']:.3e} {gworst:.3e} {gtol:.3e} "
          f"{torch.__version__} {'+'.join(variants)}")


if __name__ == "__main__":
    main()
