"""Built-in methods; importing this package registers them by name (see tta.method)."""
from methods import icl, ttt_lora  # noqa: F401
