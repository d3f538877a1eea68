"""What the meter charges for forward-mode AD, Jacobians and the products priced this session,
in units of the plain work: run on the old code and the new (see README.md)."""
import torch

from tta.budget import Meter
from tta.model.loading import load_model

torch.manual_seed(0)
a, b = torch.randn(8, 16), torch.randn(16, 4)
product = 2 * 8 * 16 * 4


def charged(work, model=None):
    meter = Meter()
    if model is not None:
        meter.attach(model)
    try:
        with meter.watching_other_work():
            work()
    finally:
        meter.detach()
    return meter.flops


print("products of x @ b (8x16 @ 16x4) charged:")
for name, work in {"plain": lambda: a @ b,
                   "jvp, tangent on x": lambda: torch.func.jvp(lambda x: x @ b, (a,), (a,)),
                   "jvp, tangents on both": lambda: torch.func.jvp(lambda x, y: x @ y, (a, b), (a, b)),
                   "jacfwd (128 inputs)": lambda: torch.func.jacfwd(lambda x: x @ b)(a),
                   "jacrev (32 outputs)": lambda: torch.func.jacrev(lambda x: x @ b)(a)}.items():
    print(f"  {name:24s} {charged(work) / product:g}")

lm = load_model("random:tiny", device="cpu")
lm.model.config._attn_implementation = "eager"   # the CPU's fused attention has no forward-mode rule
ids = torch.randint(0, 10, (1, 50))
with torch.no_grad():
    forward = charged(lambda: lm.model(input_ids=ids), lm.model)
weights = {k: v.detach() for k, v in lm.model.named_parameters()}
directions = {k: torch.randn_like(v) for k, v in weights.items()}
embeds = lm.model.get_input_embeddings()(ids).detach()
print("random:tiny, 50 tokens, charged in forwards:")
print("  jvp against the weights  ", round(charged(lambda: torch.func.jvp(
    lambda w: torch.func.functional_call(lm.model, w, (ids,)).logits, (weights,), (directions,)), lm.model) / forward, 3))
print("  jvp along the embeddings ", round(charged(lambda: torch.func.jvp(
    lambda e: lm.model(inputs_embeds=e).logits, (embeds,), (torch.randn_like(embeds),)), lm.model) / forward, 3))
print("other work, FLOPs charged:")
print("  stft, 4,096 samples, n_fft 256, hop 64:", charged(lambda: torch.stft(torch.randn(4096), 256, hop_length=64,
                                                                               window=torch.hann_window(256), return_complex=True)))
print("  cholesky_solve, 128 x 128 factor, 16 columns:", charged(lambda: torch.cholesky_solve(torch.randn(128, 16), torch.eye(128))))
