import os, sys, random, collections
import torch
import kernels
M = {n: sys.modules["kernels." + n] for n in ("activation","rms_norm","rotary","store_kv","paged_attention")}
WORST = collections.defaultdict(float)
INFO = {}
def rel(a, b):
    a, b = a.double(), b.double()
    ok = ~torch.isnan(b)
    return ((a[ok]-b[ok]).norm() / b[ok].norm().clamp_min(1e-30)).item(), bool((torch.isnan(a) & ok).any())
def note(name, err, desc):
    if err > WORST[name]:
        WORST[name] = err; INFO[name] = desc
def wrap():
    pa = M["paged_attention"]; f_pa = pa.paged_attention_triton
    def pa_w(q, k_cache, v_cache, bt, sl, qsl, scale, sliding_window=None, max_query_len=None, max_seq_len=None, **kw):
        out = f_pa(q, k_cache, v_cache, bt, sl, qsl, scale, sliding_window, max_query_len, max_seq_len, **kw)
        ref = pa.paged_attention_ref(q, k_cache, v_cache, bt, sl, qsl, scale, sliding_window)
        e, nan = rel(out, ref)
        note("paged_attention", e, (tuple(q.shape), q.stride(), sliding_window, max_query_len, max_seq_len, nan))
        return out
    pa.paged_attention_triton = pa_w
    ro = M["rotary"]; f_ro = ro.apply_rotary_triton
    def ro_w(positions, q, k, cs, is_neox=True):
        q0, k0 = q.clone(), k.clone()
        ro.apply_rotary_ref(positions, q0, k0, cs, is_neox)
        f_ro(positions, q, k, cs, is_neox)
        eq, _ = rel(q, q0); ek, _ = rel(k, k0)
        note("rotary", max(eq, ek), (tuple(q.shape), q.stride(), tuple(k.shape), k.stride(), tuple(cs.shape), eq, ek))
        return q, k
    ro.apply_rotary_triton = ro_w
    rn = M["rms_norm"]; f_rn = rn.rms_norm_triton
    def rn_w(x, w, eps, residual=None, out=None):
        r = rn.rms_norm_ref(x, w, eps, residual)
        o = f_rn(x, w, eps, residual, out)
        e0, _ = rel(o[0], r[0]); e1, _ = rel(o[1], r[1])
        note("rms_norm", max(e0, e1), (tuple(x.shape), x.stride(), residual is not None, e0, e1))
        return o
    rn.rms_norm_triton = rn_w
    sk = M["store_kv"]; f_sk = sk.store_kv_triton
    def sk_w(k, v, kc, vc, sm):
        kc2, vc2 = kc.clone(), vc.clone()
        sk.store_kv_ref(k, v, kc2, vc2, sm)
        f_sk(k, v, kc, vc, sm)
        valid = sm[sm >= 0]
        e0, _ = rel(kc.view(-1, *kc.shape[2:])[valid], kc2.view(-1, *kc.shape[2:])[valid])
        e1, _ = rel(vc.view(-1, *kc.shape[2:])[valid], vc2.view(-1, *kc.shape[2:])[valid])
        note("store_kv", max(e0, e1), (tuple(k.shape), k.stride(), e0, e1))
    sk.store_kv_triton = sk_w
    ac = M["activation"]; f_ac = ac.silu_and_mul_triton
    def ac_w(x, out=None):
        o = f_ac(x, out); e, _ = rel(o, ac.silu_and_mul_ref(x))
        note("silu", e, (tuple(x.shape), x.stride()))
        return o
    ac.silu_and_mul_triton = ac_w
wrap()
from gpu_worker.loader import load_model
from tests.factories import make_checkpoint, PagedSequences
WIDE_LLAMA = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=512)
WIDE = {"gpt_neox": dict(hidden_size=256, num_attention_heads=4, intermediate_size=512), "gpt2": dict(n_embd=256, n_head=4)}
dev = torch.device("cuda")
for arch in sys.argv[1:]:
    WORST.clear(); INFO.clear()
    path = make_checkpoint(f"/tmp/ck/{arch}", arch=arch, **WIDE.get(arch, WIDE_LLAMA))
    model, cfg = load_model(path, dev, torch.float32)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 1000) for _ in range(rng.randint(1, 300))] for _ in range(16)]
    paged = PagedSequences(cfg, 16, 1024, torch.float32, seed=1, device=dev)
    logits = paged.step(model, list(enumerate(prompts)))
    toks = [int(l[-1].argmax()) for l in logits]
    for _ in range(8):
        logits = paged.step(model, [(s, [t]) for s, t in enumerate(toks)])
        toks = [int(l[-1].argmax()) for l in logits]
    print("==", arch)
    for k in WORST: print(f"  {k}: worst rel err {WORST[k]:.3g}  {INFO[k]}")
