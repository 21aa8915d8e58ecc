"""Load the WSGI callable named by APP: "module:callable" or "path/file.py:callable".

`module` alone means `module:application`; `callable()` calls a factory with
no arguments. Errors become AppError with one line naming APP and the cause.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback


# The last line `python -m ipserve.worker --check` prints: what importing APP cost.
CHECK_REPORT = "ipserve-check: "


class AppError(Exception):
    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail   # the original traceback, for the worker's log


def split(spec: str) -> tuple[str, str]:
    target, sep, attr = spec.rpartition(":")
    if not sep:
        return spec, "application"
    if not target or not attr:
        raise AppError(f"APP {spec!r} is not of the form module:callable or file.py:callable")
    return target, attr


def _import(target: str, base_dir: str):
    if target.endswith(".py"):
        path = os.path.abspath(os.path.join(base_dir, target))
        if not os.path.isfile(path):
            raise AppError(f"file {path} does not exist")
        sys.path.insert(0, os.path.dirname(path))
        name = os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    sys.path.insert(0, base_dir)
    return importlib.import_module(target)


def _where(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        return f"{exc.msg} ({exc.filename}, line {exc.lineno})"
    frames = traceback.extract_tb(exc.__traceback__)
    place = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{place}"


def load(spec: str, chdir: str | None = None):
    target, attr = split(spec)
    base_dir = os.path.abspath(chdir or os.getcwd())
    try:
        module = _import(target, base_dir)
    except AppError as exc:
        raise AppError(f"cannot load APP {spec!r}: {exc}") from None
    except ModuleNotFoundError as exc:
        if exc.name and target.startswith(exc.name):
            raise AppError(f"cannot import APP {spec!r}: no module named {exc.name!r} "
                           f"(looked in {base_dir} and sys.path)") from None
        raise AppError(f"cannot import APP {spec!r}: {_where(exc)}", traceback.format_exc()) from None
    except BaseException as exc:  # an app may raise anything while importing
        raise AppError(f"cannot import APP {spec!r}: {_where(exc)}", traceback.format_exc()) from None
    call = attr.endswith("()")
    name = attr[:-2] if call else attr
    if not name.isidentifier():
        raise AppError(f"APP {spec!r}: {attr!r} is not a name")
    try:
        obj = getattr(module, name)
    except AttributeError:
        raise AppError(f"APP {spec!r}: module {target!r} has no attribute {name!r}") from None
    if call:
        try:
            obj = obj()
        except BaseException as exc:
            raise AppError(f"APP {spec!r}: calling {name}() failed: {_where(exc)}",
                           traceback.format_exc()) from None
    if not callable(obj):
        raise AppError(f"APP {spec!r}: {name!r} is not callable")
    return obj
