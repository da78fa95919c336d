"""nograd: train neural networks with forward passes only."""

__version__ = "0.1.0"

_ZO_EXPORTS = ("MeZO", "ZOSign", "ZOMomentum", "ZOAdam", "HiZOO", "ForwardGradient")


def __getattr__(name: str):  # lazy, so `import nograd` stays light
    if name == "zo" or name in _ZO_EXPORTS:
        import importlib

        zo = importlib.import_module("nograd.zo")
        return zo if name == "zo" else getattr(zo, name)
    raise AttributeError(f"module 'nograd' has no attribute {name!r}")
