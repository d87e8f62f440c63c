"""Repro of the step-13 loss forward+backward on CPU. Usage: repro.py ROW [ROW...] --dtype bf16|fp32 [--layers N] [--anomaly] [--hooks] [--full-logits]"""
import argparse, contextlib, time, sys, resource, math
ROOT = __import__("pathlib").Path(__file__).resolve().parents[3]; sys.path.insert(0, str(ROOT))
import torch, torch.nn.functional as F
import datasets
import trainkv
from trainkv.training import TrainConfig
from trainkv.training.trainer import build_model, setup_trainable
from trainkv.training.data import collate, IGNORE_INDEX
from trainkv.methods import method_modules, attention_gate as ag

p = argparse.ArgumentParser()
p.add_argument("rows", type=int, nargs="+")
p.add_argument("--dtype", default="bf16")
p.add_argument("--layers", type=int, default=None)
p.add_argument("--anomaly", action="store_true")
p.add_argument("--hooks", action="store_true")
p.add_argument("--full-logits", action="store_true")
p.add_argument("--progress", type=float, default=12 / 150)
p.add_argument("--truncate", type=int, default=None)
a = p.parse_args()
print("trainkv from", trainkv.__file__, "torch", torch.__version__, flush=True)
torch.set_num_threads(2)
cfg = TrainConfig.from_args(["--config", str(ROOT) + "/configs/recipes/qwen2.5-coder-0.5b/attention_gate_sft.yaml"],
                            defaults={"run_name": "x", "method": {"method": "attention_gate"}, "data": {"format": "sft"}})
dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
model = build_model(cfg, dtype, torch.device("cpu"))
if a.layers:
    model.model.layers = model.model.layers[: a.layers]
    model.config.num_hidden_layers = a.layers
    model.config.layer_types = model.config.layer_types[: a.layers] if getattr(model.config, "layer_types", None) else None
model.config.use_cache = False
named = setup_trainable(model, cfg, upcast=a.dtype == "bf16")
model.train()
print("gate param dtype", named[0][1].dtype, "model dtype", next(model.model.embed_tokens.parameters()).dtype, flush=True)

if not a.full_logits:
    # memory saver: logits only at the loss positions (exact for the KL: other positions are multiplied by 0)
    def distillation_loss(model, mods, batch, loss="kl", kl_reduction="token"):
        labels = batch["labels"]
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        mask = F.pad(labels[:, 1:] != -100, (0, 1), value=False) & batch["attention_mask"].bool()
        idx = mask.any(0).nonzero().flatten()
        try:
            for m in mods: m.soft_eviction = False
            with torch.no_grad():
                teacher = model(**inputs, logits_to_keep=idx).logits.float()
            for m in mods: m.soft_eviction = True
            student = model(**inputs, logits_to_keep=idx).logits.float()
        finally:
            for m in mods: m.soft_eviction = False
        kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="none").sum(-1)
        kl = ag.reduce_kl(kl, mask[:, idx], kl_reduction)
        return kl, {"kl": kl.item()}
    ag.distillation_loss = distillation_loss

ds = datasets.load_from_disk("/tmp/qwen_ag_step13_ds")
first_bad = []
def fwd_hook(name):
    def h(mod, inp, out):
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for o in outs:
            if torch.is_tensor(o) and o.is_floating_point() and not bool(torch.isfinite(o).all()):
                first_bad.append(("fwd", name, tuple(o.shape)))
                break
    return h
def bwd_hook(name):
    def h(mod, gin, gout):
        for kind, gs in (("grad_out", gout), ("grad_in", gin)):
            for g in gs:
                if torch.is_tensor(g) and not bool(torch.isfinite(g).all()):
                    first_bad.append(("bwd-" + kind, name, tuple(g.shape), int((~torch.isfinite(g)).sum())))
                    return
    return h
if a.hooks:
    for n, mod in model.named_modules():
        if n.count(".") <= 4 or "trainkv_method" in n:
            mod.register_forward_hook(fwd_hook(n))
            mod.register_full_backward_hook(bwd_hook(n))

for r in a.rows:
    ex = ds[r]
    if a.truncate:
        ex = {"input_ids": ex["input_ids"][-a.truncate:], "labels": ex["labels"][-a.truncate:]}
    batch = collate([ex], 151643)
    print(f"row {r}: len {len(ex['input_ids'])} padded {batch['input_ids'].shape[1]} loss tokens {int((batch['labels'] != -100).sum())}", flush=True)
    first_bad.clear()
    model.zero_grad(set_to_none=True)
    t = time.time()
    ac = torch.autocast("cpu", dtype=torch.bfloat16) if a.dtype == "bf16" else contextlib.nullcontext()
    with torch.autograd.set_detect_anomaly(a.anomaly):
        with ac:
            loss, logs = ag.AttentionGate.training_loss(model, batch, a.progress)
        print(f"  loss {loss.item()!r} logs {logs} ({time.time()-t:.0f}s)", flush=True)
        (loss / 2).backward()
    bad = [n for n, p in named if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    norm = torch.norm(torch.stack([p.grad.float().norm() for _, p in named if p.grad is not None]))
    print(f"  grad norm {norm.item()!r}, non-finite in {len(bad)} params, first {bad[:3]} ({time.time()-t:.0f}s)")
    print(f"  first non-finite (hooks): {first_bad[:8]}")
    print(f"  maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1e6:.1f} GB", flush=True)
