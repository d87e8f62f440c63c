import sys, json, time
ROOT = __import__("pathlib").Path(__file__).resolve().parents[3]; sys.path.insert(0, str(ROOT))
import trainkv
print(trainkv.__file__)
from trainkv.training import TrainConfig
from trainkv.training.data import build_dataset, SampleOrder, data_seed, BatchPlan, get_batch, pad_token_id
from trainkv.models import load_tokenizer
cfg = TrainConfig.from_args(["--config", "configs/recipes/qwen2.5-coder-0.5b/attention_gate_sft.yaml"],
                            defaults={"run_name": "attention_gate_sft", "method": {"method": "attention_gate"}, "data": {"format": "sft"}})
cfg.validate()
tok = load_tokenizer(cfg.model)
t = time.time()
ds = build_dataset(cfg.data, tok, seed=cfg.seed)
print("dataset", len(ds), time.time() - t)
ds.save_to_disk("/tmp/qwen_ag_step13_ds")
order = SampleOrder(len(ds), data_seed(cfg.data, cfg.seed), cfg.data.shuffle)
plan = BatchPlan(cfg.batch_size, 1, cfg.gradient_accumulation_steps, 0)
# also the raw rows for task names
from trainkv.training.data import synthetic_samples
samples = synthetic_samples(cfg.data, tok, data_seed(cfg.data, cfg.seed))
print("raw samples", len(samples))
lab = lambda r: sum(1 for x in ds[r]["labels"] if x != -100)
for step in range(1, 16):
    for start, count in plan.micro_batches((step - 1) * plan.global_batch):
        r = order[start]
        s = samples[r] if len(samples) == len(ds) else None
        print(f"step {step} sample#{start} row {r} len {len(ds[r]['input_ids'])} label_tokens {lab(r)}",
              getattr(s, 'task', None) or getattr(s, 'name', None), getattr(s, 'length', None) if s else None)
