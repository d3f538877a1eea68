"""Gradient features for LESS-style data selection (Xia et al. 2024), built once and cached.

The recipe, in the order the code runs:

1. warm-up   -- a LoRA adapter (paper: r=128, alpha=512 on q/k/v/o) is trained with AdamW on a
                random 5% of the pool for 4 epochs; after every epoch its weights, the optimiser's
                moments and the epoch's mean learning rate are saved (a *checkpoint*);
2. features  -- for every pool example and every checkpoint, the LoRA gradient of its loss (batch
                size 1), Adam-preconditioned with that checkpoint's moments as after one more
                update (LESS's code: ``m' / sqrt(v' + eps)`` with ``m' = b1 m + (1-b1) g`` and
                ``v' = b2 v + (1-b2) g^2``, no bias correction), randomly projected to `proj_dim`
                dimensions and L2-normalised;
3. targets   -- (per task, by the method) plain SGD gradients of the task's own leave-one-out
                demonstrations through the same checkpoints and projection;
4. score     -- sum over checkpoints of (mean learning rate) x cosine, averaged over the targets.

The projection is a sparse Rademacher matrix (Achlioptas 2003 / Li et al. 2006, the matrix of scikit-learn's
`SparseRandomProjection`); `proj_density=1` gives the dense Rademacher matrix of LESS and TRAK.
The matrix is stored with the datastore, so features stay comparable whatever the library
versions of a later run.

A datastore is a directory of plain arrays (numpy ``.npy`` loaded with ``allow_pickle=False``,
safetensors, JSON -- never pickles) named by a hash of (model weights, pool, settings), under
``$TTA_CACHE/datastores`` (default ``~/.cache/tta/datastores``).  It is written into a temporary
directory and renamed, so a killed build leaves nothing half-written.  Building it is the one-off
cost of the method: a `tta.budget.Meter` counts its FLOPs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from tta.budget import Meter
from tta.training.examples import Example, leave_one_out_examples
from tta.training import step
from tta.model.encoding import Encoded
from tta.model.loading import LoadedModel, autocast
from tta.data.tasks import Task

# Part of every datastore's cache key.  2: features taken with the format's position ids (grid
# positions for the embedded model) and, on the CPU, at each checkpoint's own weights; version-1
# stores had neither and are rebuilt rather than reused.
FORMAT_VERSION = 2
ADAM_EPS = 1e-8   # LESS's constant in m / sqrt(v + eps)


@dataclass
class GradientSettings:
    """What a datastore is built with; every field is part of its cache key.  Defaults are the
    paper's scaled to the embedded 3.4M-parameter model on a CPU (paper values in `methods/less/method.py`)."""
    rank: int = 8
    alpha: int = 32
    targets: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    warmup_fraction: float = 0.05
    min_warmup_examples: int = 16
    epochs: int = 4
    lr: float = 1e-3
    warmup_ratio: float = 0.03   # share of warm-up steps with a linear ramp (LESS's scripts: 0.03)
    batch_size: int = 2
    proj_dim: int = 1024
    proj_density: float = 0.0    # 0 = 1/sqrt(n_features) (Li et al.); 1 = dense Rademacher
    seed: int = 0


# ---------------------------------------------------------------- the pool

def pool_examples(tasks: list[Task], fmt, per_task: int, max_len: int, seed: int) -> list[Example]:
    """Up to `per_task` augmented leave-one-out examples of every task (seeded per task id, so a
    task's examples do not depend on which other tasks are in the pool)."""
    examples = []
    for task in tasks:
        rng = np.random.default_rng([seed, zlib.crc32(task.id.encode())])
        examples += leave_one_out_examples(task, fmt, rng, per_task, max_len=max_len)
    return examples


def choose_pool_tasks(tasks: list[Task], max_tasks: int, seed: int) -> list[Task]:
    """A seeded random subset of `max_tasks` tasks (0 = all), in id order.  Random, not the first
    N ids: generated datasets are sorted by family name, so the first N would be a few families."""
    tasks = sorted(tasks, key=lambda t: t.id)
    if max_tasks <= 0 or max_tasks >= len(tasks):
        return tasks
    keep = np.random.default_rng(seed).choice(len(tasks), size=max_tasks, replace=False)
    return [tasks[i] for i in sorted(keep)]


# ---------------------------------------------------------------- pure pieces (tested by hand)

def adam_direction(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                   beta1: float = 0.9, beta2: float = 0.999, eps: float = ADAM_EPS) -> torch.Tensor:
    """The update direction Adam would take for `grad` after one more step from the moments
    (m, v): ``m' / sqrt(v' + eps)``, without bias correction, as LESS computes it."""
    m = beta1 * exp_avg + (1 - beta1) * grad
    v = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    return m / torch.sqrt(v + eps)


class Projection:
    """``x -> P x`` with P a (dim x n_features) sparse Rademacher matrix: entries
    ``+-1/sqrt(density * dim)``, each entry nonzero with probability `density` and then +- with
    equal odds (the matrix of scikit-learn's `SparseRandomProjection`, Li et al. 2006), seeded;
    kept as CSR arrays so it can be saved and reloaded exactly."""

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, n_features: int):
        import scipy.sparse as sp
        self.matrix = sp.csr_matrix((data.astype(np.float32), indices, indptr),
                                    shape=(len(indptr) - 1, n_features))

    @classmethod
    def random(cls, n_features: int, dim: int, density: float = 0.0, seed: int = 0) -> "Projection":
        """density 0 means 1/sqrt(n_features), scikit-learn's "auto".  Drawn with `scipy.sparse.random`
        (the nonzero positions uniformly over the matrix) rather than `SparseRandomProjection.fit`,
        which draws row by row in Python: for the embedded model's 65,536 adapter parameters at
        LESS's 8,192 dimensions, 13.2 s there against 0.5 s here on this 2-core CPU."""
        import scipy.sparse as sp

        density = density if density > 0 else 1 / np.sqrt(n_features)
        rng = np.random.default_rng(seed)
        scale = 1 / np.sqrt(density * dim)
        signs = lambda k: np.where(rng.random(k) < 0.5, -scale, scale)   # noqa: E731
        m = sp.random(dim, n_features, density=density, format="csr", random_state=rng,
                      data_rvs=signs, dtype=np.float32)
        return cls(m.indptr, m.indices, m.data, n_features)

    @property
    def dim(self) -> int:
        return self.matrix.shape[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Rows of `x` (n x n_features) projected (n x dim)."""
        return np.asarray((self.matrix @ np.asarray(x, dtype=np.float32).T).T, dtype=np.float32)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"indptr": self.matrix.indptr.astype(np.int64), "indices": self.matrix.indices.astype(np.int32),
                "data": self.matrix.data.astype(np.float32)}


def normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


# ---------------------------------------------------------------- gradients through an adapter

def lora_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable parameters, in a fixed order: the coordinates of every gradient vector."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@contextlib.contextmanager
def gradient_adapter(lm: LoadedModel, settings: GradientSettings):
    """Attach the datastore's LoRA configuration for the duration; yields its ordered parameters."""
    from tta.training.finetune import attach_lora, detach_lora

    adapter = attach_lora(lm, settings.rank, settings.alpha, list(settings.targets), seed=settings.seed)
    try:
        yield lora_parameters(lm.model)
    finally:
        detach_lora(lm, adapter)


def batch_loss(lm: LoadedModel, batch: list[Encoded]) -> torch.Tensor:
    """The mean loss of `batch` (right-padded) in one forward, numbered exactly as training numbers
    it (`tta.training.finetune.train`): the format's position ids from `pad_batch` -- grid positions for
    the embedded model, whose loss on ARC-style examples is 7-20x higher under plain 0, 1, 2, ...
    -- and the attention mask, without which transformers would read the jumps in grid positions
    as the starts of packed sequences.  Every forward in this module goes through here."""
    return step.batch_loss(lm.model, *step.padded(lm, batch, multiple=1))


def example_gradient(lm: LoadedModel, params: list, example: Encoded) -> torch.Tensor:
    """The flattened LoRA gradient (float32, on the CPU) of one example's loss (batch size 1).
    A training-mode forward with gradients: an attached meter charges forward and backward."""
    model = lm.model
    for _, p in params:
        p.grad = None
    was_training = model.training
    model.train()
    with torch.enable_grad():
        loss = batch_loss(lm, [example])
    loss.backward()
    model.train(was_training)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                      for _, p in params]).cpu()
    for _, p in params:
        p.grad = None
    return flat


def load_weights(params: list, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in params:
            p.copy_(weights[name].to(p.device, p.dtype))


# ---------------------------------------------------------------- the datastore

def default_root() -> Path:
    return Path(os.environ.get("TTA_CACHE", Path.home() / ".cache" / "tta")) / "datastores"


def model_fingerprint(model) -> str:
    """A hash of the model's weights (names, shapes, dtypes, values): a datastore belongs to them."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def pool_fingerprint(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.task_id, list(e.held_out), e.augmentation]).encode())
        h.update(np.asarray(e.encoded.input_ids, dtype=np.int32).tobytes())
        h.update(np.asarray(e.encoded.labels, dtype=np.int32).tobytes())
    return h.hexdigest()[:16]


def datastore_key(model_hash: str, pool_hash: str, settings: GradientSettings) -> str:
    blob = json.dumps({"version": FORMAT_VERSION, "model": model_hash, "pool": pool_hash,
                       "settings": asdict(settings)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class Datastore:
    """A built datastore, read back from its directory."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        load = lambda name: np.load(self.path / f"{name}.npy", allow_pickle=False)
        self.features = np.load(self.path / "features.npy", allow_pickle=False, mmap_mode="r")  # (C, N, dim) float16
        self._tokens, self._labels, self._offsets = load("tokens"), load("labels"), load("offsets")
        self.projection = Projection(load("proj_indptr"), load("proj_indices"), load("proj_data"),
                                     self.meta["n_features"])
        self.settings = GradientSettings(**self.meta["settings"])
        self.lrs = [float(x) for x in self.meta["lrs"]]
        self.examples = self.meta["examples"]   # [{task_id, held_out, augmentation, length}]

    def __len__(self) -> int:
        return len(self.examples)

    def encoded(self, i: int) -> Encoded:
        a, b = int(self._offsets[i]), int(self._offsets[i + 1])
        return Encoded(self._tokens[a:b].tolist(), self._labels[a:b].tolist())

    def checkpoint(self, c: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """LoRA weights by name, and the flattened Adam moments (exp_avg, exp_avg_sq)."""
        from safetensors.torch import load_file
        tensors = load_file(self.path / f"checkpoint_{c}.safetensors")
        m, v = tensors.pop("adam.exp_avg"), tensors.pop("adam.exp_avg_sq")
        return tensors, m, v

    def target_features(self, lm: LoadedModel, targets: list[Encoded], afford=None) -> np.ndarray:
        """Projected, normalised SGD gradients of `targets` at every checkpoint: (C', n, dim), where
        C' < C when `afford(example)` said no before a checkpoint was complete (budget)."""
        out = []
        with gradient_adapter(lm, self.settings) as params:
            self._check_layout(params)
            for c in range(len(self.lrs)):
                weights, _, _ = self.checkpoint(c)
                load_weights(params, weights)
                rows = []
                for e in targets:
                    if afford is not None and not afford(e):
                        return np.stack(out) if out else np.zeros((0, len(targets), self.projection.dim), np.float32)
                    rows.append(example_gradient(lm, params, e).numpy())
                out.append(normalise(self.projection(np.stack(rows))))
        return np.stack(out)

    def _check_layout(self, params) -> None:
        names = [n for n, _ in params]
        if names != self.meta["param_names"]:
            raise ValueError(f"{self.path}: the adapter's parameters differ from the datastore's "
                             f"({len(names)} vs {len(self.meta['param_names'])}); rebuild it")


def score(store_features: np.ndarray, lrs: list[float], targets: np.ndarray,
          groups: list | None = None, aggregate: str = "mean") -> np.ndarray:
    """Per pool example: sum over checkpoints c of lrs[c] x cosine(pool, target), averaged over the
    targets (`mean`), or averaged within each group of targets and maximised over groups (`max`,
    LESS's max over subtasks).  Features are unit vectors, so a cosine is a dot product.
    `store_features` (C, N, dim), `targets` (C', n, dim) with C' <= C (checkpoints not reached
    are left out of the sum)."""
    if aggregate not in ("mean", "max"):
        raise ValueError(f"aggregate must be 'mean' or 'max', not {aggregate!r}")
    groups = list(range(targets.shape[1])) if groups is None else groups
    labels = sorted(set(groups)) if aggregate == "max" else [None]
    per_group = np.zeros((len(labels), store_features.shape[1]), dtype=np.float64)
    for c in range(targets.shape[0]):
        pool = np.asarray(store_features[c], dtype=np.float32)
        for gi, g in enumerate(labels):
            rows = [i for i, x in enumerate(groups) if g is None or x == g]
            per_group[gi] += lrs[c] * (pool @ targets[c, rows].mean(axis=0))
    return per_group.max(axis=0)


def build(lm: LoadedModel, examples: list[Example], settings: GradientSettings, path: Path,
          progress: bool = True, extra_meta: dict | None = None) -> Datastore:
    """Warm up, checkpoint, and write the features of every example into `path` (atomically)."""
    from tqdm import tqdm
    from transformers import get_linear_schedule_with_warmup
    from safetensors.torch import save_file

    from tta.training.finetune import batches

    if not examples:
        raise ValueError("the LESS pool is empty (no example fits the length limit?)")
    started = time.perf_counter()
    meter = Meter()
    meter.attach(lm.model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
    try:
        rng = np.random.default_rng(settings.seed)
        n_warm = min(len(examples), max(settings.min_warmup_examples, math.ceil(settings.warmup_fraction * len(examples))))
        warm = [examples[i].encoded for i in sorted(rng.choice(len(examples), n_warm, replace=False))]
        plan = batches(warm, settings.batch_size, settings.epochs, settings.seed)
        steps_per_epoch = math.ceil(len(warm) / settings.batch_size)
        total = len(plan) + settings.epochs * len(examples)
        bar = tqdm(total=total, disable=not progress, desc="LESS datastore", unit="step", dynamic_ncols=True)
        with gradient_adapter(lm, settings) as params:
            names = [n for n, _ in params]
            n_features = sum(p.numel() for _, p in params)
            projection = Projection.random(n_features, settings.proj_dim, settings.proj_density, settings.seed)
            optimizer = torch.optim.AdamW([p for _, p in params], lr=settings.lr, weight_decay=0.0)
            schedule = get_linear_schedule_with_warmup(optimizer, math.ceil(settings.warmup_ratio * len(plan)), len(plan))
            lrs, losses, checkpoints = [], [], []
            model = lm.model
            # 1. warm-up, one checkpoint per epoch
            for epoch in range(settings.epochs):
                model.train()
                epoch_lrs = []
                for batch in plan[epoch * steps_per_epoch:(epoch + 1) * steps_per_epoch]:
                    epoch_lrs.append(optimizer.param_groups[0]["lr"])
                    loss = step.training_step(model, optimizer, step.padded(lm, batch, multiple=1), schedule)
                    losses.append(float(loss))
                    bar.update(1)
                model.eval()
                state = [optimizer.state[p] for _, p in params]
                m = torch.cat([s["exp_avg"].reshape(-1).float().cpu() for s in state])
                v = torch.cat([s["exp_avg_sq"].reshape(-1).float().cpu() for s in state])
                # A copy: on the CPU `.float().cpu()` of a float32 parameter is the parameter itself,
                # which the next epoch trains on in place.
                weights = {n: p.detach().float().cpu().clone() for n, p in params}
                save_file({**weights, "adam.exp_avg": m, "adam.exp_avg_sq": v}, tmp / f"checkpoint_{epoch}.safetensors")
                checkpoints.append((weights, m, v))
                lrs.append(float(np.mean(epoch_lrs)))
            if not all(math.isfinite(x) for x in losses):
                raise ValueError("LESS warm-up loss became non-finite; lower gradient_lr")
            beta1, beta2 = optimizer.param_groups[0]["betas"]
            # 2. Adam-preconditioned, projected, normalised gradient of every pool example
            features = np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=np.float16,
                                                 shape=(settings.epochs, len(examples), projection.dim))
            chunk = 64
            for c, (weights, m, v) in enumerate(checkpoints):
                load_weights(params, weights)
                bar.set_postfix(checkpoint=f"{c + 1}/{settings.epochs}")
                for start in range(0, len(examples), chunk):
                    rows = []
                    for e in examples[start:start + chunk]:
                        g = example_gradient(lm, params, e.encoded)
                        rows.append(adam_direction(g, m, v, beta1, beta2).numpy())
                        bar.update(1)
                    features[c, start:start + len(rows)] = normalise(projection(np.stack(rows)))
            features.flush()
            del features
        bar.close()
        # 3. the pool's sequences and the projection, as plain arrays
        offsets = np.cumsum([0] + [len(e.encoded) for e in examples]).astype(np.int64)
        np.save(tmp / "tokens.npy", np.concatenate([e.encoded.input_ids for e in examples]).astype(np.int32))
        np.save(tmp / "labels.npy", np.concatenate([e.encoded.labels for e in examples]).astype(np.int32))
        np.save(tmp / "offsets.npy", offsets)
        for name, array in projection.arrays().items():
            np.save(tmp / f"proj_{name}.npy", array)
        meta = {
            "version": FORMAT_VERSION, "settings": asdict(settings), "lrs": lrs, "betas": [beta1, beta2],
            "adam_eps": ADAM_EPS, "param_names": names, "n_features": n_features, "proj_dim": projection.dim,
            "warmup": {"examples": n_warm, "steps": len(plan), "first_loss": losses[0] if losses else None,
                       "last_loss": losses[-1] if losses else None},
            "examples": [{"task_id": e.task_id, "held_out": list(e.held_out), "augmentation": e.augmentation,
                          "length": len(e.encoded)} for e in examples],
            "build": {"flops": meter.flops, "seconds": round(time.perf_counter() - started, 3),
                      "gradients": settings.epochs * len(examples)},
            **(extra_meta or {}),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path / "meta.json").exists():
                raise
            shutil.rmtree(tmp)   # a concurrent build of the same key finished first: keep theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        meter.detach()
    return Datastore(path)


def load_or_build(lm: LoadedModel, examples: list[Example], settings: GradientSettings,
                  root: Path | None = None, progress: bool = True,
                  extra_meta: dict | None = None) -> tuple[Datastore, bool]:
    """The cached datastore for (model, pool, settings), built first if missing; and whether it was built now."""
    key = datastore_key(model_fingerprint(lm.model), pool_fingerprint(examples), settings)
    path = Path(root or default_root()) / key
    if (path / "meta.json").exists():
        return Datastore(path), False
    return build(lm, examples, settings, path, progress, extra_meta), True
