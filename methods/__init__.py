"""Built-in methods: every module in this package is imported, which registers its method by name
(see tta.method.register).  A new method is a new file here, or `@register` in the user's own module."""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
