"""Early exit: run the embedded model's first layers by hand (self-speculative decoding does)."""
import torch
from tta.method import Method, register


@register("layers")
class Layers(Method):
    spends = "layers by hand"

    def predict(self, task, budget, seed):
        model = self.lm.model
        ids = torch.ones(1, 64, dtype=torch.long)
        calls = 0
        with torch.no_grad():
            hidden = model.model.embed_tokens(ids)
            pos = torch.arange(64)[None]
            emb = model.model.rotary_emb(hidden, pos)
            for _ in range(2000):
                out = model.model.layers[0](hidden, position_embeddings=emb)
                calls += 1
        return [[p.input, None] for p in task.test], {"calls": calls}
