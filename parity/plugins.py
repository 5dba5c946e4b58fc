"""Loads a user's loss function from ``module:function`` or ``file.py:function``."""

import importlib
import importlib.util
import os
import sys

__all__ = ["PluginError", "load_spec"]


class PluginError(ValueError):
    """A plug-in spec that cannot be loaded, with the spec in the message."""


def load_spec(spec, *, argument="--torch-loss"):
    """Imports and returns the callable named by `spec`.

    Args:
        spec: ``package.module:function`` or ``path/to/file.py:function``.
        argument: the option name, for messages.

    Returns:
        The callable.

    Raises:
        PluginError: if the spec is malformed, does not import, or does not
            name a callable.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise PluginError(
            f"{argument} must be 'module:function' or 'path/to/file.py:function'. "
            f"Received: {argument}={spec!r}"
        )
    target, name = spec.rsplit(":", 1)
    if not target or not name:
        raise PluginError(
            f"{argument} must name a module and a function. "
            f"Received: {argument}={spec!r}"
        )
    try:
        if target.endswith(".py"):
            if not os.path.isfile(target):
                raise PluginError(
                    f"{argument} file does not exist. Received: {argument}={spec!r}"
                )
            module_name = f"_parity_plugin_{abs(hash(os.path.abspath(target)))}"
            loader_spec = importlib.util.spec_from_file_location(module_name, target)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except PluginError:
        raise
    except Exception as e:  # a plug-in may fail to import in any way
        raise PluginError(
            f"{argument} does not import ({type(e).__name__}: {e}). "
            f"Received: {argument}={spec!r}"
        ) from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise PluginError(
            f"{argument} names no callable {name!r} in {target!r}. "
            f"Received: {argument}={spec!r}"
        )
    return fn
