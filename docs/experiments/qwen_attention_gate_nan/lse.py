"""Per layer / chunk / head: the logsumexp of each query row's scaled attention logits (gate bias and mask included)
in the student's gated_chunk_attention, for a dataset row. No backward (fits in RAM at 8K)."""
import sys, contextlib, math, time
ROOT = __import__("pathlib").Path(__file__).resolve().parents[3]; sys.path.insert(0, str(ROOT))
import torch, torch.nn.functional as F, datasets
from trainkv.training import TrainConfig
from trainkv.training.trainer import build_model, setup_trainable
from trainkv.training.data import collate
from trainkv.methods import method_modules, attention_gate as ag
rows = [int(x) for x in sys.argv[1].split(",")]
mode = sys.argv[2] if len(sys.argv) > 2 else "bf16"
torch.set_num_threads(2)
cfg = TrainConfig.from_args(["--config", str(ROOT) + "/configs/recipes/qwen2.5-coder-0.5b/attention_gate_sft.yaml"],
                            defaults={"run_name": "x", "method": {"method": "attention_gate"}, "data": {"format": "sft"}})
dtype = torch.bfloat16 if mode == "bf16" else torch.float32
model = build_model(cfg, dtype, torch.device("cpu")); model.config.use_cache = False
setup_trainable(model, cfg, upcast=mode == "bf16")
orig = ag.gated_chunk_attention
layer = {"i": 0}
stats = []
def patched(query, key, value, log_gate, scaling, chunk, sinks, window, attention_mask=None):
    b, hq, t, d = query.shape; g = hq // key.shape[1]
    k = key.repeat_interleave(g, 1).float(); q = query.float()
    lg = log_gate.to(query.dtype).float().repeat_interleave(g, 1)
    pos = torch.arange(t)
    for s in range(0, t, chunk):
        e = min(t, s + chunk)
        gated = (pos[:e] >= sinks) & (pos[:e] < s - window)
        bias = torch.where(gated, lg[..., :e], torch.zeros_like(lg[..., :e]))
        sc = (q[:, :, s:e] @ k[:, :, :e].transpose(-1, -2)) * scaling + bias[:, :, None, :]
        mask = torch.ones((e - s, e), dtype=torch.bool).tril(diagonal=s)
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = mask & attention_mask[:, :, s:e, :e].bool()
        sc = sc.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(sc, -1)  # [B, Hq, e-s]
        mx = sc.amax(-1)
        low = (lse < -88.7)
        stats.append((layer["i"], s, e, float(lse.min()), int(low.sum()),
                      [int(low[0, h].sum()) for h in range(hq)], float(mx.min())))
        del sc
    layer["i"] += 1
    return orig(query, key, value, log_gate, scaling, chunk, sinks, window, attention_mask)
ag.gated_chunk_attention = patched
ds = datasets.load_from_disk("/tmp/qwen_ag_step13_ds")
for r in rows:
    batch = collate([ds[r]], 151643)
    stats.clear(); layer["i"] = 0
    mods = method_modules(model)
    for m in mods: m.soft_eviction = True
    t0 = time.time()
    ac = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16" else contextlib.nullcontext()
    with torch.no_grad(), ac:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1)
    for m in mods: m.soft_eviction = False
    T = batch["input_ids"].shape[1]
    print(f"row {r} padded length {T} (T % 128 = {T % 128}), {time.time()-t0:.0f}s")
    for (li, s, e, mn, n, per, mxmin) in stats:
        if n:
            print(f"  layer {li} chunk [{s},{e}) q={e-s} k={e} (k%128={e%128}, q%128={(e-s)%128}): min LSE {mn:.1f}, rows<-88.7: {n} per head {per}")
    lows = [(li, s, e) for (li, s, e, mn, n, per, _) in stats if n]
    print(f"  chunks with a row LSE < -88.7: {len(lows)} of {len(stats)}; global min LSE {min(x[3] for x in stats):.2f}")
    print(f"  chunks with k%128==64 AND a low row: {[x for x in lows if x[2] % 128 == 64]}")
