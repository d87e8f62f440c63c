"""Load a trained gate checkpoint in a single-device runtime and generate with eviction (issue 9, step d).

    python scripts/gpu/check_export.py --checkpoint runs/multi_gpu/z3/final --reference runs/multi_gpu/g1/final \
        --output $OUT/export_check.json

Checks that ``trainkv.load_gated`` accepts the checkpoint (e.g. one written under ZeRO-3 by 2
processes), that the weights attached to the model are the file's, and that greedy generation with
the checkpoint's eviction settings runs on a passkey prompt (eval split) and on a short chat
question. With ``--reference`` (the same recipe's final checkpoint from another launcher) it also
reports how far the two runs' gate weights are apart. Writes one JSON; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def weight_diffs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    common = sorted(set(a) & set(b))
    diffs = {k: float((a[k].float() - b[k].float()).abs().max()) for k in common}
    norms = {k: float(b[k].float().abs().max()) for k in common}
    worst = max(diffs, key=diffs.get) if diffs else None
    return {"tensors": len(common), "only_in_checkpoint": sorted(set(a) - set(b))[:5],
            "only_in_reference": sorted(set(b) - set(a))[:5], "max_abs_diff": diffs.get(worst),
            "max_abs_diff_tensor": worst, "reference_max_abs_of_that_tensor": norms.get(worst)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="gate checkpoint directory (a run's final/)")
    ap.add_argument("--reference", default=None, help="another run's final/ to compare the weights with")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--context-tokens", type=int, default=1200, help="passkey prompt length (default 1200)")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--output", required=True)
    args = ap.parse_args(argv)

    from safetensors.torch import load_file

    import trainkv
    from trainkv.data.tasks import generate_samples
    from trainkv.eval.prompts import build_prompt

    t0 = time.perf_counter()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = trainkv.load_gated(args.checkpoint, device=args.device, dtype=dtype)
    load_s = time.perf_counter() - t0
    config = model.trainkv_checkpoint["config"]
    from trainkv.hub.load import _alias_for

    tok = trainkv.load_tokenizer(_alias_for(config["base_model"]) or config["base_model"])
    saved = load_file(str(Path(args.checkpoint) / "model.safetensors"))
    attached = {k: v.detach().cpu() for k, v in trainkv.method_state_dict(model).items()}
    mismatched = sorted(k for k in saved if k not in attached or not torch.equal(attached[k].float(), saved[k].to(attached[k].dtype).float()))
    checks = {"load_gated": True, "weights_attached_as_saved": not mismatched and set(saved) <= set(attached)}

    sample = generate_samples("passkey", tok, 1, args.context_tokens, seed=1234, split="eval")[0]
    prompt = build_prompt(sample, tok)
    ids = torch.tensor([prompt.context_ids + prompt.question_ids], device=args.device)
    cache = model.new_cache()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=args.max_new_tokens,
                             do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    layer0 = cache.layers[0]
    kept = layer0.kept_counts().tolist()
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)
    chat = {k: v.to(args.device) for k, v in chat.items()}
    with torch.no_grad():
        chat_out = model.generate(**chat, max_new_tokens=args.max_new_tokens, do_sample=False)
    chat_answer = tok.decode(chat_out[0, chat["input_ids"].shape[1]:], skip_special_tokens=True)
    checks["generated"] = bool(answer.strip()) and bool(chat_answer.strip())
    checks["evicted"] = max(max(row) for row in kept) < layer0.seen

    result = {
        "checkpoint": args.checkpoint, "base_model": config["base_model"], "method": config["method"]["method"],
        "eviction": config["eviction"], "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "load_seconds": round(load_s, 2), "checks": checks,
        "mismatched_tensors": mismatched[:5],
        "passkey": {"context_tokens": ids.shape[1], "expected": list(sample.answers), "generated": answer,
                    "correct": any(a in answer for a in sample.answers), "layer0_seen": layer0.seen,
                    "layer0_kept_per_head": kept},
        "chat": {"prompt": "What is the capital of France?", "generated": chat_answer},
    }
    if args.reference:
        result["reference"] = {"path": args.reference,
                               **weight_diffs(saved, load_file(str(Path(args.reference) / "model.safetensors")))}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("checks", "passkey", "chat")}, indent=None)[:1500])
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
