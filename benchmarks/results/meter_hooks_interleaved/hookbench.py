import time, torch, statistics
from tta.budget import Meter
from tta.model.loading import load_model
torch.set_num_threads(1)
lm = load_model("default", device="cpu")
m = lm.model
meter = Meter(); meter.attach(m)
ids = torch.randint(0, 10, (8, 200))
ts = []
with torch.no_grad():
    for rep in range(5):
        t = time.perf_counter()
        out = m(input_ids=ids, use_cache=True)
        past = out.past_key_values
        nxt = torch.ones(8, 1, dtype=torch.long)
        for _ in range(100):
            out = m(input_ids=nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
        ts.append(time.perf_counter() - t)
print(f"{statistics.median(ts):.3f}", [round(x, 3) for x in ts])
