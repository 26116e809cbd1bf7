#!/usr/bin/env python3
"""External parity checks of moe.h against independent implementations.

Oracles: Hugging Face transformers (DeepseekV3ForCausalLM) + PyTorch autograd for the model,
ml_dtypes / numpy for the number formats, and a short PyTorch MTP reference written here from
the paper's formulas (transformers' forward does not run MTP). The C side is build/parity_tool
(tests/parity/parity_tool.c) and build/train_tiny.

Cases (each prints "ok   NAME" or "FAIL NAME", then indented measured-vs-tolerance lines):
  a  forward_*     logits and mean next-token CE of a random model saved by transformers
  b  grads_*       d(loss)/d(every parameter tensor) vs torch autograd
  c  trained_checkpoint   a checkpoint written by the C trainer, loaded by transformers
  d  decode_* / encode_*  FP8 (e4m3fn, e5m2), BF16, F16 conversions vs ml_dtypes / numpy
  e  mtp_d1 / mtp_d2      multi-token-prediction loss and gradients vs the reference below
  f  forward_yarn_* / forward_rope_halves / grads_rope_halves_yarn   YaRN with unequal and with
     absent mscale fields, rope_interleave false (and both with gradients); each also reports
     how far the reference logits move with the feature switched off, and fails if that is
     not >100x the tolerance (a case that could not fail)
The last line is "SUITE: N passed, M failed"; exit status 1 if any case failed.

Tolerances (from the project's issue):
  logits: max|logit_moe - logit_torch| <= 1e-4 * max|logit_torch|   (FP32)
  loss:   |loss_moe - loss_torch| <= 1e-5
  grads:  per tensor, relative error := max|g_moe - g_torch| / max|g_torch| <= 1e-3
          (a tensor whose torch gradient is exactly zero must have max|g_moe| <= 1e-12)

Where the official DeepSeek code and transformers differ, which case is covered:
  * Group masking: the reference text says HF masks dropped groups with 0.0 and moe.h/official
    code with -inf. The pinned transformers 5.24.0 masks with -inf (see NOTES.md), so both sides
    implement the official rule and a bias of either sign is a fair test. With a zero
    e_score_correction_bias (the init value) and sigmoid scores in (0, 1), 0.0 and -inf masking
    can never differ. So the tiny config gets a bias that makes most biased scores negative
    (per group one expert with b in [0, 0.5), the others b in [-1.2, -1.0)): each token's top-k
    must then take negative scores from the kept groups, where 0.0 masking would pick experts of
    dropped groups instead (checked: with 0.0 masking the tiny logits move by ~0.7·max|logit|).
    Config 2 (n_group 1, nothing masked) gets a random positive bias, so selection (biased
    scores) and gate weights (unbiased scores) differ there too.
  * RoPE layout: HF's rope_interleave=True (the default) rotates adjacent pairs
    (x[2j], x[2j+1]) of the stored weights, as moe.h does; no permutation of q_b_proj /
    kv_a_proj_with_mqa is applied or needed. rope_interleave=False (case f) is rotate_half,
    moe.h's MOE_ROPE_HALVES layout (moe_config.rope_layout).
  * Weights are re-initialised with unit-scale random values (not HF's std 0.02) so that
    attention, routing and norms are far from their degenerate uniform regime.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback

import numpy as np

t_start = time.time()
try:
    import ml_dtypes
    import torch
    import torch.nn.functional as F
    import transformers
    from safetensors.numpy import load_file as np_load_file
    from safetensors.torch import load_file as pt_load_file, save_file as pt_save_file
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer
except Exception as exc:  # a broken venv is one failed case, not a traceback
    print("FAIL imports")
    print(f"    {type(exc).__name__}: {exc}")
    print("SUITE: 0 passed, 1 failed")
    sys.exit(1)

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
TOOL = os.environ.get("MOE_PARITY_TOOL", os.path.join(ROOT, "build", "parity_tool"))
TRAINER = os.environ.get("MOE_TRAIN_TINY", os.path.join(ROOT, "build", "train_tiny"))
WORK = os.path.join(ROOT, "build", "parity")

LOGIT_REL_TOL = 1e-4
LOSS_TOL = 1e-5
GRAD_REL_TOL = 1e-3
GRAD_ZERO_TOL = 1e-12
MTP_LAMBDA = 0.3

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
np.seterr(all="ignore")  # the conversion oracles cast NaN/inf/out-of-range on purpose

# --------------------------------------------------------------------------------------------
# harness


class ToolError(Exception):
    pass


class Check:
    def __init__(self):
        self.lines = []
        self.ok = True

    def info(self, text):
        self.lines.append(text)

    def fail(self, text):
        self.ok = False
        self.lines.append("FAILED: " + text)

    def le(self, label, measured, tol):
        good = bool(measured <= tol)  # NaN measured -> False
        self.ok &= good
        self.lines.append(f"{label}: {measured:.3e} (tol {tol:.1e}){'' if good else '  <-- FAIL'}")
        return good

    def count(self, label, bad, total):
        good = bad == 0
        self.ok &= good
        self.lines.append(f"{label}: {bad} mismatches of {total}{'' if good else '  <-- FAIL'}")
        return good


CASES = []


def case(name):
    def register(fn):
        CASES.append((name, fn))
        return fn
    return register


def run_tool(*args, timeout=300):
    if not os.path.isfile(TOOL) or not os.access(TOOL, os.X_OK):
        raise ToolError(f"{os.path.relpath(TOOL, ROOT)} not found: build it with ./build.sh "
                        "(or cc -O2 -fopenmp -I. tests/parity/parity_tool.c -o build/parity_tool -lm)")
    cmd = [TOOL] + [str(a) for a in args]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ToolError(f"timed out after {timeout} s: {' '.join(cmd)}")
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
        raise ToolError(f"parity_tool {args[0]} exited {r.returncode}: " + " | ".join(tail))
    return r


def fresh_dir(*parts):
    d = os.path.join(WORK, *parts)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    return d


# --------------------------------------------------------------------------------------------
# d. number formats

FP8 = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}
MAXCODE = {"e4m3": 0x7E, "e5m2": 0x7B}  # largest finite magnitude code (448, 57344)


def oracle_decode(fmt):
    if fmt in FP8:
        return np.arange(256, dtype=np.uint8).view(FP8[fmt]).astype(np.float32)
    codes = np.arange(65536, dtype=np.uint16)
    if fmt == "bf16":
        return codes.view(ml_dtypes.bfloat16).astype(np.float32)
    return codes.view(np.float16).astype(np.float32)


def tool_decode(fmt):
    out = os.path.join(WORK, "conv", f"decode_{fmt}.f32")
    run_tool("decode", fmt, out)
    v = np.fromfile(out, dtype=np.float32)
    n = 256 if fmt in FP8 else 65536
    if v.size != n:
        raise ToolError(f"decode {fmt} wrote {v.size} values, want {n}")
    return v


def check_decode(ck, fmt):
    want = oracle_decode(fmt)
    got = tool_decode(fmt)
    wn, gn = np.isnan(want), np.isnan(got)
    nan_bad = int(np.count_nonzero(wn != gn))
    same = want.view(np.uint32) == got.view(np.uint32)
    val_bad = int(np.count_nonzero(~same & ~wn & ~gn))
    ck.count(f"{fmt}: non-NaN codes decoded bit-exactly", val_bad, int(np.count_nonzero(~wn)))
    ck.count(f"{fmt}: NaN codes decoded to NaN (payload not compared)", nan_bad, int(np.count_nonzero(wn)))
    if val_bad:
        i = int(np.flatnonzero(~same & ~wn & ~gn)[0])
        ck.info(f"first mismatch: code 0x{i:X}: moe.h {got[i]!r}, oracle {want[i]!r}")


def encode_inputs():
    """All 2^16 BF16-representable floats + >= 10^6 others: random bit patterns (NaN payloads,
    infinities, FP32 subnormals), log-uniform magnitudes around the FP8/F16 ranges, every tie
    (midpoint of adjacent representable values) of each format with its neighbours one FP32 ulp
    away, and hand-picked specials (saturation thresholds, +-0, +-inf, NaNs)."""
    rng = np.random.default_rng(1234)
    parts = [(np.arange(65536, dtype=np.uint32) << 16).view(np.float32)]
    parts.append(rng.integers(0, 2**32, size=400_000, dtype=np.uint64).astype(np.uint32).view(np.float32))
    sub = rng.integers(1, 1 << 23, size=20_000, dtype=np.uint32) | (rng.integers(0, 2, size=20_000, dtype=np.uint32) << 31)
    parts.append(sub.view(np.float32))  # FP32 subnormals (both signs)
    mag = np.exp2(rng.uniform(-28.0, 18.0, size=300_000))  # FP8/F16 subnormal..overflow range
    parts.append((mag * rng.choice([-1.0, 1.0], size=mag.size)).astype(np.float32))
    for fmt in ("e4m3", "e5m2", "bf16", "f16"):
        vals = oracle_decode(fmt).astype(np.float64)
        vals = np.unique(vals[np.isfinite(vals)])
        mids = ((vals[:-1] + vals[1:]) / 2).astype(np.float32)  # exact in FP32 for these formats
        assert np.all(mids.astype(np.float64) == (vals[:-1] + vals[1:]) / 2)
        parts += [mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf))]
        top = vals.max()  # ties and neighbours just above the largest finite value
        for t in (top, top * 1.03125, top * 1.0625, top * 1.125, top * 2):
            t32 = np.float32(t)
            parts.append(np.array([t32, -t32, np.nextafter(t32, np.float32(np.inf)), np.nextafter(t32, np.float32(0))],
                                  dtype=np.float32))
    specials = [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 448.0, 464.0, 480.0, 57344.0, 61440.0, 65504.0,
                65520.0, 3.4028235e38, 1e-45, -1e-45, 1.17549435e-38, 2.0**-9, 2.0**-10, 2.0**-16, 2.0**-17,
                2.0**-24, 2.0**-25, 2.0**-133, 2.0**-134]
    spec = np.array(specials, dtype=np.float32)
    payload_nans = np.array([0x7F800001, 0x7FBFFFFF, 0x7FC00000, 0x7FFFFFFF, 0xFF800001, 0xFFC00000, 0xFFFFFFFF],
                            dtype=np.uint32).view(np.float32)
    parts += [spec, -spec, payload_nans]
    return np.concatenate(parts).astype(np.float32)


def check_encode(ck, fmt, x):
    path_in = os.path.join(WORK, "conv", "encode_in.f32")
    if not os.path.exists(path_in):
        x.tofile(path_in)
    out = os.path.join(WORK, "conv", f"encode_{fmt}.bin")
    run_tool("encode", fmt, path_in, out)
    code_t = np.uint8 if fmt in FP8 else np.uint16
    got = np.fromfile(out, dtype=code_t)
    if got.size != x.size:
        raise ToolError(f"encode {fmt} wrote {got.size} codes, want {x.size}")
    isnan = np.isnan(x)
    ck.info(f"inputs: {x.size} values ({int(np.count_nonzero(isnan))} NaN, "
            f"{int(np.count_nonzero(np.isinf(x)))} inf)")
    if fmt in FP8:
        raw = x.astype(FP8[fmt]).view(np.uint8)
        neg = np.signbit(x)
        want = raw.copy()
        # moe.h = CUDA __NV_SATFINITE: out-of-range and +-inf saturate to +-max finite; NaN -> 0x7F.
        # ml_dtypes: float8_e4m3fn maps overflow and +-inf to NaN; float8_e5m2 maps them to +-inf.
        if fmt == "e4m3":
            ml_special = ((raw & 0x7F) == 0x7F) & ~isnan
            label = "overflow/inf -> NaN in ml_dtypes, remapped to +-448 (0x7E/0xFE)"
        else:
            ml_special = ((raw & 0x7F) == 0x7C) & ~isnan
            label = "overflow/inf -> inf in ml_dtypes, remapped to +-57344 (0x7B/0xFB)"
        want[ml_special] = np.where(neg[ml_special], 0x80 | MAXCODE[fmt], MAXCODE[fmt])
        want[isnan] = 0x7F
        ck.info(f"remapped: {int(np.count_nonzero(ml_special))} {label}; "
                f"{int(np.count_nonzero(isnan))} NaN -> 0x7F")
        bad_special = int(np.count_nonzero((got != want) & (ml_special | isnan)))
        bad_rest = int(np.count_nonzero((got != want) & ~(ml_special | isnan)))
        ck.count(f"{fmt}: remapped cases (saturation, NaN) per moe.h convention", bad_special,
                 int(np.count_nonzero(ml_special | isnan)))
        ck.count(f"{fmt}: all other values bit-exact vs ml_dtypes", bad_rest, int(np.count_nonzero(~(ml_special | isnan))))
    else:
        if fmt == "bf16":
            want = x.astype(ml_dtypes.bfloat16).view(np.uint16).copy()
        else:
            want = x.astype(np.float16).view(np.uint16).copy()
        payload = int(np.count_nonzero(isnan & (want != 0x7FFF)))
        want[isnan] = 0x7FFF  # moe.h: canonical NaN
        ck.info(f"NaN inputs: {int(np.count_nonzero(isnan))}, of which the oracle keeps another payload/sign "
                f"in {payload} (expected 0x7FFF from moe.h)")
        bad_rest = int(np.count_nonzero((got != want) & ~isnan))
        ck.count(f"{fmt}: non-NaN inputs bit-exact vs {'ml_dtypes' if fmt == 'bf16' else 'numpy'}",
                 bad_rest, int(np.count_nonzero(~isnan)))
        ck.count(f"{fmt}: NaN inputs -> canonical 0x7FFF", int(np.count_nonzero((got != want) & isnan)),
                 int(np.count_nonzero(isnan)))
    bad = np.flatnonzero(got != want)
    if bad.size:
        i = int(bad[0])
        ck.info(f"first mismatch: x = {x[i]!r} (0x{x[i:i+1].view(np.uint32)[0]:08X}): "
                f"moe.h 0x{int(got[i]):X}, expected 0x{int(want[i]):X}")


ENCODE_X = None


def get_encode_inputs():
    global ENCODE_X
    if ENCODE_X is None:
        os.makedirs(os.path.join(WORK, "conv"), exist_ok=True)
        p = os.path.join(WORK, "conv", "encode_in.f32")
        if os.path.exists(p):
            os.remove(p)
        ENCODE_X = encode_inputs()
    return ENCODE_X


for _fmt in ("e4m3", "e5m2", "bf16", "f16"):
    case(f"decode_{_fmt}")(lambda ck, f=_fmt: (os.makedirs(os.path.join(WORK, "conv"), exist_ok=True),
                                               check_decode(ck, f)))
for _fmt in ("e4m3", "e5m2", "bf16", "f16"):
    case(f"encode_{_fmt}")(lambda ck, f=_fmt: check_encode(ck, f, get_encode_inputs()))

# --------------------------------------------------------------------------------------------
# model construction

TINY = dict(  # reference §12.1
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=4, first_k_dense_replace=1, moe_layer_freq=1,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32,
    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
    topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
    num_nextn_predict_layers=1, max_position_embeddings=64, rope_theta=10000, rope_scaling=None,
    rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False, tie_word_embeddings=False,
    bos_token_id=0, eos_token_id=1)

CONFIG2 = dict(  # other dims; q_lora_rank null (q_proj), no renormalisation, one group, 2 shared experts
    vocab_size=300, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
    num_hidden_layers=3, first_k_dense_replace=1, moe_layer_freq=1,
    num_attention_heads=3, num_key_value_heads=3, q_lora_rank=None, kv_lora_rank=20,
    qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=12,
    n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, n_group=1, topk_group=1,
    topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=False, routed_scaling_factor=1.7,
    num_nextn_predict_layers=0, max_position_embeddings=64, rope_theta=5000.0, rope_scaling=None,
    rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False, tie_word_embeddings=False,
    bos_token_id=0, eos_token_id=1)


# YaRN and RoPE-layout variants of the tiny config (issue 17). transformers' DeepseekV3 multiplies
# cos/sin by yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim) when both
# are given, else by 0.1*ln(factor) + 1, and the softmax scale by yarn_get_mscale(factor,
# mscale_all_dim)**2 when mscale_all_dim is given. original_max_position_embeddings 16 < T = 32,
# so the frequency ramp matters too (with d_R = 8: pairs j >= 1 are interpolated).
YARN_UNEQUAL = dict(TINY, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0})
YARN_ABSENT = dict(TINY, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
HALVES = dict(TINY, rope_interleave=False)
HALVES_YARN = dict(CONFIG2, rope_interleave=False, qk_rope_head_dim=6,
                   rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8, "mscale": 1.0,
                                 "mscale_all_dim": 0.5})


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def init_(name, p, g):
    """Unit-scale random init: linear [out, in] ~ N(0, 1/in), embedding N(0, 1), norms 1 + 0.1 N."""
    with torch.no_grad():
        if p.dim() == 1:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith("embed_tokens.weight"):
            p.copy_(torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


class MTPModule(torch.nn.Module):
    """MTP module k (reference §4.1): its own enorm, hnorm, eh_proj [d, 2d], TRM_k (transformers'
    DeepseekV3DecoderLayer with layer index N+k-1, i.e. an MLA + MoE block) and shared_head.norm.
    Embedding and output head are the main model's."""

    def __init__(self, cfg, layer_idx):
        super().__init__()
        d = cfg.hidden_size
        self.enorm = torch.nn.Parameter(torch.ones(d))
        self.hnorm = torch.nn.Parameter(torch.ones(d))
        self.eh_proj = torch.nn.Parameter(torch.empty(d, 2 * d))
        self.head_norm = torch.nn.Parameter(torch.ones(d))
        self.block = DeepseekV3DecoderLayer(cfg, layer_idx)
        self.eps = cfg.rms_norm_eps


def hf_named(prefix, name, t, inter):
    """(HF checkpoint name, tensor) pairs of one in-memory tensor: transformers 5.x keeps the
    experts fused ([E, 2I, H] gate rows first, then up; [E, H, I]); the files are per expert."""
    if name.endswith("mlp.experts.gate_up_proj"):
        base = prefix + name[: -len("gate_up_proj")]
        out = []
        for e in range(t.shape[0]):
            out.append((f"{base}{e}.gate_proj.weight", t[e, :inter]))
            out.append((f"{base}{e}.up_proj.weight", t[e, inter:]))
        return out
    if name.endswith("mlp.experts.down_proj"):
        base = prefix + name[: -len("down_proj")]
        return [(f"{base}{e}.down_proj.weight", t[e]) for e in range(t.shape[0])]
    return [(prefix + name, t)]


MTP_NAMES = {"enorm": "enorm.weight", "hnorm": "hnorm.weight", "eh_proj": "eh_proj.weight",
             "head_norm": "shared_head.norm.weight"}


def mtp_hf_items(cfg, k, mod, use_grad):
    L = cfg.num_hidden_layers + k - 1
    pre = f"model.layers.{L}."
    items = []
    for name, p in mod.named_parameters():
        t = (p.grad if p.grad is not None else torch.zeros_like(p)) if use_grad else p.detach()
        if name.startswith("block."):
            items += hf_named(pre, name[len("block."):], t, cfg.moe_intermediate_size)
        else:
            items.append((pre + MTP_NAMES[name], t))
    if not use_grad:
        for name, b in mod.block.named_buffers():
            if name.endswith("e_score_correction_bias"):
                items.append((pre + name, b))
    return items


class Built:
    pass


def build(cfg_dict, seed, bias_mode, mtp_depth, out_dir):
    """A random DeepseekV3ForCausalLM (+ MTP modules), saved by transformers' save_pretrained,
    then the MTP tensors appended under the hub names (save_pretrained writes none)."""
    cd = dict(cfg_dict)
    cd["num_nextn_predict_layers"] = mtp_depth
    cfg = DeepseekV3Config(**cd)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    model.config._attn_implementation = "eager"
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        init_(name, p, g)
    mtps = []
    for k in range(1, mtp_depth + 1):
        mod = MTPModule(model.config, cfg.num_hidden_layers + k - 1).float().eval()
        for name, p in mod.named_parameters():
            init_(name, p, g)
        mtps.append(mod)
    E = cfg.n_routed_experts
    with torch.no_grad():
        for owner in [model] + mtps:
            for name, b in owner.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    if bias_mode == "mixed":
                        # one "hot" expert per group with b in [0, 0.5), the others b in [-1.2, -1.0):
                        # their biased scores s + b are negative, so the top-k of a token must take
                        # negative scores from the kept groups -- where 0.0 masking of the dropped
                        # groups (older transformers) would pick dropped experts instead.
                        G = cfg.n_group
                        v = -1.0 - 0.2 * torch.rand(E, generator=g)
                        hot = torch.randint(0, E // G, (G,), generator=g) + torch.arange(G) * (E // G)
                        v[hot] = 0.5 * torch.rand(G, generator=g)
                        b.copy_(v)
                    elif bias_mode == "positive":
                        b.copy_(torch.rand(E, generator=g) * 0.3)
    model.save_pretrained(out_dir, safe_serialization=True)
    st_path = os.path.join(out_dir, "model.safetensors")
    sd = pt_load_file(st_path)
    want = {n for name, p in model.named_parameters()
            for n, _ in hf_named("", name, p, cfg.moe_intermediate_size)}
    want |= {n for n, _ in model.named_buffers() if n.endswith("e_score_correction_bias")}
    if set(sd) != want:
        raise RuntimeError(f"save_pretrained wrote unexpected names: {sorted(set(sd) ^ want)[:6]}")
    if mtp_depth:
        for k, mod in enumerate(mtps, 1):
            L = cfg.num_hidden_layers + k - 1
            for n, t in mtp_hf_items(cfg, k, mod, use_grad=False):
                sd[n] = t.detach().clone().contiguous()
            sd[f"model.layers.{L}.embed_tokens.weight"] = model.model.embed_tokens.weight.detach().clone()
            sd[f"model.layers.{L}.shared_head.head.weight"] = model.lm_head.weight.detach().clone()
        pt_save_file(sd, st_path, metadata={"format": "pt"})
    add_router_hooks(model)
    for mod in mtps:
        add_router_hooks(mod)
    b = Built()
    b.cfg, b.model, b.mtps, b.dir = model.config, model, mtps, out_dir
    return b


MARGINS = []


def router_margin_hook(mod, inputs, output):
    """Smallest gap, over tokens, at the two routing decisions (group top-`topk_group`, expert
    top-k among kept groups) of transformers' DeepseekV3TopkRouter: a gap near FP32 rounding
    would make the selection implementation-defined and the comparison meaningless."""
    with torch.no_grad():
        x = inputs[0].reshape(-1, mod.hidden_dim).float()
        sc = torch.sigmoid(x @ mod.weight.float().t()) + mod.e_score_correction_bias
        G, per = mod.num_group, mod.num_experts // mod.num_group
        gaps = []
        gs = sc.view(-1, G, per).topk(min(2, per), dim=-1)[0].sum(-1)
        keep = torch.ones_like(gs, dtype=torch.bool)
        if G > mod.topk_group:
            o = gs.sort(dim=-1, descending=True)[0]
            gaps.append(float((o[:, mod.topk_group - 1] - o[:, mod.topk_group]).min()))
            keep = torch.zeros_like(keep).scatter_(1, gs.topk(mod.topk_group, dim=-1)[1], True)
        masked = sc.masked_fill(~keep.repeat_interleave(per, dim=1), float("-inf"))
        o = masked.sort(dim=-1, descending=True)[0]
        if o.shape[1] > mod.top_k:
            nxt = o[:, mod.top_k]
            gap = torch.where(torch.isfinite(nxt), o[:, mod.top_k - 1] - nxt, torch.full_like(nxt, float("inf")))
            gaps.append(float(gap.min()))
        MARGINS.append(min(gaps) if gaps else float("inf"))


def add_router_hooks(module):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    for m in module.modules():
        if isinstance(m, DeepseekV3TopkRouter):
            m.register_forward_hook(router_margin_hook)


def fixed_ids(vocab, B, T, seed):
    return np.random.default_rng(seed).integers(0, vocab, size=(B, T + 1)).astype(np.int32)


def causal_mask(L):
    return torch.full((L, L), float("-inf")).triu(1)[None, None]


def reference(b, ids_np, lam):
    """Loss parts, logits and HF-named gradients of total = CE + (lam/D)·Σ_k L_k (lam = 0: CE).
    MTP depth k (reference §4.1–4.2, embedding first as the released weights/vLLM):
      h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]), i = 0..T-k-1,
      h^0  = main model's final hidden state after model.norm,
      h^k  = TRM_k(h') over the shortened sequence (causal, positions 0..T-k-1),
      logits_k = lm_head(shared_head.norm(h^k)), target t_{i+k+1},
      L_k  = -(1/T)·Σ_i log p (per sequence; averaged over the batch: / (B·T))."""
    model, cfg = b.model, b.cfg
    ids = torch.from_numpy(ids_np.astype(np.int64))
    B, T = ids.shape[0], ids.shape[1] - 1
    V = cfg.vocab_size
    model.zero_grad(set_to_none=True)
    for m in b.mtps:
        m.zero_grad(set_to_none=True)
    h = model.model(input_ids=ids[:, :T]).last_hidden_state
    logits = model.lm_head(h)
    ce = F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1))
    parts = {"main": float(ce.detach())}
    total = ce
    D = len(b.mtps) if lam > 0 else 0
    if D:
        hprev, acc = h, 0.0
        for k, mod in enumerate(b.mtps, 1):
            L = T - k
            emb = model.model.embed_tokens(ids[:, k:k + L])
            x = torch.cat([rms(emb, mod.enorm, mod.eps), rms(hprev[:, :L], mod.hnorm, mod.eps)], dim=-1)
            x = x @ mod.eh_proj.t()
            pos = torch.arange(L)[None]
            pe = model.model.rotary_emb(x, pos)
            hk = mod.block(x, attention_mask=causal_mask(L), position_ids=pos, position_embeddings=pe)
            lg = model.lm_head(rms(hk, mod.head_norm, mod.eps))
            nll = F.cross_entropy(lg.reshape(-1, V), ids[:, k + 1:k + 1 + L].reshape(-1), reduction="sum")
            parts[f"mtp{k}"] = float(nll.detach()) / (B * L)  # loss.txt prints the mean CE of the B·(T−k) predictions
            acc = acc + nll / (B * T)
            hprev = hk
        total = ce + (lam / D) * acc
    parts["total"] = float(total.detach())
    total.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        for n, t in hf_named("", name, g, cfg.moe_intermediate_size):
            grads[n] = t.detach().numpy()
    for k, mod in enumerate(b.mtps, 1):
        for n, t in mtp_hf_items(cfg, k, mod, use_grad=True):
            grads[n] = t.detach().numpy()
    return parts, logits.detach().numpy(), grads


def tool_forward(hf_dir, ids, out_dir, lam=None):
    B, T1 = ids.shape
    os.makedirs(out_dir, exist_ok=True)
    ids_path = os.path.join(out_dir, "ids.i32")
    np.ascontiguousarray(ids, dtype=np.int32).tofile(ids_path)
    args = ["forward", hf_dir, B, T1 - 1, ids_path, out_dir] + ([repr(float(lam))] if lam is not None else [])
    run_tool(*args)
    logits = np.fromfile(os.path.join(out_dir, "logits.f32"), dtype=np.float32)
    parts = {}
    with open(os.path.join(out_dir, "loss.txt")) as f:
        for line in f:
            w = line.split()
            if len(w) == 2:
                parts[w[0]] = float(w[1])
    gpath = os.path.join(out_dir, "grads.safetensors")
    grads = np_load_file(gpath) if os.path.exists(gpath) else None
    return parts, logits, grads


def compare_logits(ck, want, got):
    if got.size != want.size:
        ck.fail(f"logits.f32 holds {got.size} values, want {want.size} {list(want.shape)}")
        return
    got = got.reshape(want.shape)
    scale = float(np.abs(want).max())
    err = float(np.abs(got.astype(np.float64) - want).max())
    ck.le(f"max|dlogit| / max|logit| (max|logit| = {scale:.3g})", err / scale, LOGIT_REL_TOL)


def compare_losses(ck, want, got, keys):
    for k in keys:
        if k not in got:
            ck.fail(f"loss.txt has no '{k}' line (has {sorted(got)})")
            continue
        ck.le(f"|d loss {k}| ({want[k]:.6f})", abs(got[k] - want[k]), LOSS_TOL)


IGNORED_GRAD_SUFFIXES = ("e_score_correction_bias", ".embed_tokens.weight", ".shared_head.head.weight")


def compare_grads(ck, want, got, label):
    if got is None:
        ck.fail("parity_tool wrote no grads.safetensors")
        return
    missing = [n for n in want if n not in got]
    if missing:
        ck.fail(f"{len(missing)} gradient tensors missing from grads.safetensors, e.g. {missing[:3]}")
    extra = [n for n in got if n not in want]
    unexplained = [n for n in extra if not (n.endswith(IGNORED_GRAD_SUFFIXES) and n.startswith("model.layers."))]
    if unexplained:
        ck.fail(f"grads.safetensors has names the model lacks: {unexplained[:3]}")
    if extra:
        ck.info(f"not compared: {len(extra)} non-parameter tensors (gate bias buffers, MTP copies of embedding/head)")
    worst, worst_name, n_cmp, bad = 0.0, "", 0, []
    for n, g_t in want.items():
        if n not in got:
            continue
        g_m = got[n]
        if g_m.shape != g_t.shape:
            bad.append(f"{n}: shape {list(g_m.shape)} want {list(g_t.shape)}")
            continue
        n_cmp += 1
        den = float(np.abs(g_t).max())
        diff = float(np.abs(g_m.astype(np.float64) - g_t).max())
        if den == 0.0:
            if diff > GRAD_ZERO_TOL:
                bad.append(f"{n}: torch gradient is 0, moe.h max {diff:.3e}")
            continue
        rel = diff / den
        if not rel <= GRAD_REL_TOL:
            bad.append(f"{n}: rel {rel:.3e}")
        if rel > worst or rel != rel:
            worst, worst_name = rel, n
    ck.le(f"{label}: worst relative grad error over {n_cmp} tensors [{worst_name}]", worst, GRAD_REL_TOL)
    if bad:
        ck.fail(f"{len(bad)} tensors out of tolerance, e.g. " + "; ".join(bad[:4]))


# --------------------------------------------------------------------------------------------
# a, b, e: models built by transformers

BUILT = {}


def get_built(key):
    if key not in BUILT:
        spec = {
            "tiny": (TINY, 11, "mixed", 1),
            "tiny_asis": (TINY, 11, "mixed", 1),
            "cfg2": (CONFIG2, 22, "positive", 0),
            "tiny_d2": (TINY, 33, "mixed", 2),
            "yarn_unequal": (YARN_UNEQUAL, 44, "mixed", 0),
            "yarn_absent": (YARN_ABSENT, 55, "mixed", 0),
            "halves": (HALVES, 66, "mixed", 0),
            "halves_yarn": (HALVES_YARN, 77, "positive", 0),
        }[key]
        cfg, seed, bias, D = spec
        d = fresh_dir("models", key)
        if key == "tiny_asis":  # exactly what save_pretrained writes for the tiny config: it keeps
            # num_nextn_predict_layers 1 in config.json but writes no MTP tensors
            BUILT[key] = build(cfg, seed, bias, 0, d)
            with open(os.path.join(d, "config.json")) as f:
                c = json.load(f)
            c["num_nextn_predict_layers"] = 1
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(c, f, indent=2)
        else:
            BUILT[key] = build(cfg, seed, bias, D, d)
    return BUILT[key]


RUNS = {}


def get_run(key, B, T, lam):
    """(reference, tool) results for model `key` on fixed ids; cached so a and b share one run."""
    rk = (key, B, T, lam)
    if rk not in RUNS:
        b = get_built(key)
        ids = fixed_ids(b.cfg.vocab_size, B, T, seed=7)
        MARGINS.clear()
        ref = reference(b, ids, lam) + (min(MARGINS) if MARGINS else float("inf"),)
        out = fresh_dir("runs", f"{key}_lam{lam}")
        try:
            tool = tool_forward(b.dir, ids, out, lam if lam > 0 else None)
        except ToolError as e:
            tool = e
        RUNS[rk] = (ref, tool)
    ref, tool = RUNS[rk]
    if isinstance(tool, ToolError):
        raise tool
    return ref, tool


def margin_info(ck, ref):
    ck.info(f"router: smallest selection margin over all tokens/MoE layers {ref[3]:.2e} "
            "(informative; a near-tie would make routing implementation-defined)")


@case("forward_tiny")
def _(ck):
    ck.info("tiny config (reference §12.1), gate bias making most biased scores negative, MTP tensors of depth 1 "
            "in the file; CE only (no LAMBDA)")
    ref, (tp, tl, _) = get_run("tiny", 2, 32, 0.0)
    compare_logits(ck, ref[1], tl)
    compare_losses(ck, ref[0], tp, ["main", "total"])
    margin_info(ck, ref)


@case("grads_tiny")
def _(ck):
    ref, (tp, tl, tg) = get_run("tiny", 2, 32, 0.0)
    compare_grads(ck, ref[2], tg, "CE gradients (MTP tensors must get exactly 0)")


@case("forward_tiny_as_saved")
def _(ck):
    ck.info("the directory exactly as save_pretrained wrote it: num_nextn_predict_layers 1, no MTP tensors")
    ref, (tp, tl, _) = get_run("tiny_asis", 2, 32, 0.0)
    compare_logits(ck, ref[1], tl)
    compare_losses(ck, ref[0], tp, ["main"])


@case("forward_cfg2")
def _(ck):
    ck.info("config 2: q_lora_rank null (q_proj), norm_topk_prob false, n_group 1, 2 shared experts, "
            "rope_theta 5000 (HF writes it inside rope_parameters), random positive gate bias")
    ref, (tp, tl, _) = get_run("cfg2", 3, 20, 0.0)
    compare_logits(ck, ref[1], tl)
    compare_losses(ck, ref[0], tp, ["main", "total"])
    margin_info(ck, ref)


@case("grads_cfg2")
def _(ck):
    ref, (tp, tl, tg) = get_run("cfg2", 3, 20, 0.0)
    compare_grads(ck, ref[2], tg, "CE gradients")


def sensitivity(ck, key, B, T, what, mutate, restore):
    """How far the reference logits move when the feature under test is switched off in the
    reference model itself: what a C side that ignored the feature would be off by. A case
    whose sensitivity is far above LOGIT_REL_TOL can fail."""
    b = get_built(key)
    ids = torch.from_numpy(fixed_ids(b.cfg.vocab_size, B, T, seed=7).astype(np.int64))
    with torch.no_grad():
        base = b.model(input_ids=ids[:, :T]).logits
        mutate(b.model)
        try:
            off = b.model(input_ids=ids[:, :T]).logits
        finally:
            restore(b.model)
    rel = float((off - base).abs().max() / base.abs().max())
    ck.info(f"sensitivity: {what} would move the logits by {rel:.3g} of max|logit|")
    if not rel > 100 * LOGIT_REL_TOL:
        ck.fail(f"the case cannot tell: {what} moves the logits by only {rel:.3g}")


def set_attn(model, name, values):
    for layer, v in zip(model.model.layers, values):
        setattr(layer.self_attn, name, v)


def yarn_case(ck, key, B, T, grads):
    b = get_built(key)
    rp = b.cfg.rope_parameters
    ck.info(f"rope_parameters as transformers holds them: { {k: rp[k] for k in sorted(rp)} }; rope_interleave "
            f"{b.cfg.rope_interleave}; cos/sin factor {b.model.model.rotary_emb.attention_scaling:.6f}, softmax scale "
            f"{b.model.model.layers[0].self_attn.scaling:.6f} (plain {b.cfg.qk_head_dim ** -0.5:.6f})")
    ref, (tp, tl, tg) = get_run(key, B, T, 0.0)
    compare_logits(ck, ref[1], tl)
    compare_losses(ck, ref[0], tp, ["main", "total"])
    if grads:
        compare_grads(ck, ref[2], tg, "CE gradients")
    rot = b.model.model.rotary_emb
    af = rot.attention_scaling
    if abs(af - 1.0) > 1e-6:
        sensitivity(ck, key, B, T, "cos/sin without the YaRN attention factor",
                    lambda m: setattr(m.model.rotary_emb, "attention_scaling", 1.0),
                    lambda m: setattr(m.model.rotary_emb, "attention_scaling", af))
    sc = [layer.self_attn.scaling for layer in b.model.model.layers]
    plain = b.cfg.qk_head_dim ** -0.5
    if abs(sc[0] - plain) > 1e-9:
        sensitivity(ck, key, B, T, "the plain softmax scale (no mscale_all_dim)",
                    lambda m: set_attn(m, "scaling", [plain] * len(sc)), lambda m: set_attn(m, "scaling", sc))
    if not b.cfg.rope_interleave:
        sensitivity(ck, key, B, T, "adjacent-pair RoPE instead of rotate_half",
                    lambda m: setattr(m.config, "rope_interleave", True), lambda m: setattr(m.config, "rope_interleave", False))
    margin_info(ck, ref)


@case("forward_yarn_unequal_mscale")
def _(ck):
    ck.info("tiny config with YaRN factor 4 over original_max_position_embeddings 16, mscale 0.707 != mscale_all_dim 1.0")
    yarn_case(ck, "yarn_unequal", 2, 32, False)


@case("forward_yarn_absent_mscale")
def _(ck):
    ck.info("tiny config with YaRN factor 4, no mscale, mscale_all_dim, beta_fast or beta_slow in the file")
    yarn_case(ck, "yarn_absent", 2, 32, False)


@case("forward_rope_halves")
def _(ck):
    ck.info("tiny config with rope_interleave false (rotate_half over q_pe and k_pe)")
    yarn_case(ck, "halves", 2, 32, False)


@case("grads_rope_halves_yarn")
def _(ck):
    ck.info("config 2 (q_proj, d_R = 6) with rope_interleave false and YaRN factor 8, mscale 1.0, mscale_all_dim 0.5: "
            "logits, loss and every gradient")
    yarn_case(ck, "halves_yarn", 3, 20, True)


def mtp_case(ck, key, D):
    ck.info(f"MTP depth D={D}, lambda={MTP_LAMBDA}: total = CE + (lambda/D)·Σ_k L_k, L_k normalised by T; "
            "loss.txt mtpK compared as the mean CE over the B·(T−k) predictions")
    ref, (tp, tl, tg) = get_run(key, 2, 32, MTP_LAMBDA)
    compare_logits(ck, ref[1], tl)
    compare_losses(ck, ref[0], tp, ["main"] + [f"mtp{k}" for k in range(1, D + 1)] + ["total"])
    compare_grads(ck, ref[2], tg, "gradients of the total (main + MTP tensors)")
    margin_info(ck, ref)


@case("mtp_d1")
def _(ck):
    mtp_case(ck, "tiny", 1)


@case("mtp_d2")
def _(ck):
    mtp_case(ck, "tiny_d2", 2)


# --------------------------------------------------------------------------------------------
# c. a checkpoint trained by the C trainer, read by transformers


@case("trained_checkpoint")
def _(ck):
    if not os.path.isfile(TRAINER):
        raise ToolError(f"{os.path.relpath(TRAINER, ROOT)} not found: build it with ./build.sh")
    out = fresh_dir("trained")
    # A 40 kB corpus keeps train_tiny's closing pass over the whole validation split (10%) short.
    data = os.path.join(out, "corpus.txt")
    src = os.path.join(ROOT, "data", "austen.txt")
    if os.path.exists(src):
        with open(src, "rb") as f:
            text = f.read(40000)
    else:
        words = [b"the", b"of", b"and", b"a", b"to", b"in", b"was", b"her", b"it", b"not", b"be", b"she"]
        rng = np.random.default_rng(5)
        text = b" ".join(words[i] for i in rng.integers(0, len(words), size=9000))[:40000]
    with open(data, "wb") as f:
        f.write(text)
    cmd = [TRAINER, "--steps", "40", "--seconds", "30", "--batch", "4", "--seq", "32", "--sample", "0",
           "--data", data, "--out", out]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=ROOT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ToolError("train_tiny (--seconds 30) did not finish within 150 s: hung? " + " ".join(cmd[1:]))
    if r.returncode != 0:
        raise ToolError(f"train_tiny exited {r.returncode}: " + " | ".join((r.stderr or r.stdout).strip().splitlines()[-5:]))
    ck.info(f"train_tiny: {time.time() - t0:.1f} s")
    hf = os.path.join(out, "hf")
    model, info = DeepseekV3ForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager",
                                                         output_loading_info=True)
    model.eval()
    missing, mismatched = info.get("missing_keys", []), info.get("mismatched_keys", [])
    unexpected = info.get("unexpected_keys", [])
    if missing or mismatched:
        ck.fail(f"transformers: {len(missing)} missing keys {sorted(missing)[:3]}, "
                f"{len(mismatched)} mismatched {list(mismatched)[:3]}")
    ck.info(f"transformers ignored {len(unexpected)} unexpected tensors (MTP layers: HF does not run MTP)")
    # every tensor transformers holds equals the file (no silent re-initialisation)
    sd = pt_load_file(os.path.join(hf, "model.safetensors")) if os.path.exists(os.path.join(hf, "model.safetensors")) else None
    if sd is not None:
        inter = model.config.moe_intermediate_size
        worst = 0.0
        for name, p in list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers()
                                                          if n.endswith("e_score_correction_bias")]:
            for n, t in hf_named("", name, p.detach(), inter):
                if n in sd:
                    worst = max(worst, float((sd[n].float() - t).abs().max()))
        ck.le("max |HF-held weight - file|", worst, 0.0)
        nb = [float(b.abs().max()) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
        ck.info(f"trained gate biases: max |b| = {max(nb) if nb else 0:.3g} (non-zero: group selection exercised)")
    ids = fixed_ids(model.config.vocab_size, 2, 32, seed=99)
    with torch.no_grad():
        t = torch.from_numpy(ids.astype(np.int64))
        logits = model(input_ids=t[:, :32]).logits
        ce = float(F.cross_entropy(logits.reshape(-1, model.config.vocab_size), t[:, 1:].reshape(-1)))
    tp, tl, _ = tool_forward(hf, ids, os.path.join(out, "run"))
    compare_logits(ck, logits.numpy(), tl)
    compare_losses(ck, {"main": ce}, tp, ["main"])


# --------------------------------------------------------------------------------------------


def main():
    print(f"parity: torch {torch.__version__}, transformers {transformers.__version__}, "
          f"ml_dtypes {ml_dtypes.__version__}, numpy {np.__version__}, python {sys.version.split()[0]}")
    print(f"parity: tool {os.path.relpath(TOOL, ROOT)}, work dir {os.path.relpath(WORK, ROOT)}")
    for binary, sources in ((TOOL, ["moe.h", "tests/parity/parity_tool.c"]),
                            (TRAINER, ["moe.h", "examples/train_tiny.c"])):
        if os.path.isfile(binary):
            newer = [p for p in sources if os.path.exists(os.path.join(ROOT, p))
                     and os.path.getmtime(os.path.join(ROOT, p)) > os.path.getmtime(binary)]
            if newer:
                print(f"parity: warning: {os.path.relpath(binary, ROOT)} is older than {', '.join(newer)} "
                      "(./build.sh test parity rebuilds it)")
    only = sys.argv[1:]
    os.makedirs(WORK, exist_ok=True)
    passed = failed = 0
    for name, fn in CASES:
        if only and not any(o in name for o in only):
            continue
        ck = Check()
        t0 = time.time()
        try:
            fn(ck)
        except ToolError as e:
            ck.fail(str(e))
        except Exception as e:  # a bug in a case is a failed case with a short trace
            ck.fail(f"{type(e).__name__}: {e}")
            for line in traceback.format_exc().strip().splitlines()[-4:]:
                ck.info("  " + line)
        if ck.ok:
            passed += 1
        else:
            failed += 1
        print(f"{'ok  ' if ck.ok else 'FAIL'} {name}  ({time.time() - t0:.1f} s)")
        for line in ck.lines:
            print("    " + line)
        sys.stdout.flush()
    print(f"parity: {time.time() - t_start:.1f} s in all")
    print(f"SUITE: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
