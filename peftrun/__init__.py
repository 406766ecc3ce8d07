"""peftrun: declarative parameter-efficient fine-tuning on our own adapter core."""

__version__ = "0.1.0"

# The Python API (peftrun/api.py), imported on first use so that `import peftrun` stays light.
# (No submodule may share these names: importing it would replace the function on the package.)
_API = ("load", "generate", "combine", "wrap", "train")


def __getattr__(name: str):
    if name in _API:
        from peftrun import api

        return getattr(api, name)
    raise AttributeError(f"module 'peftrun' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
