"""The guard every patch of a framework's internals goes through before it touches anything.

A patch names the private attributes it relies on as :class:`Target` values and passes them to
:func:`require` first. A framework that is not installed at all leaves the patch a no-op (uvicorn
without daphne, say). A framework that is installed but has moved or reshaped one of those
attributes stops the process with :class:`PatchTargetMissing`, which names the package, its
installed version and the attribute: the limits these patches add (a client's send buffer, the
inbound queue) must not silently switch off after an upgrade.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
from dataclasses import dataclass
from typing import Any, Literal

from django.core.exceptions import ImproperlyConfigured


class PatchTargetMissing(ImproperlyConfigured):
    """A framework attribute a relay patch relies on is gone or has changed shape."""


@dataclass(frozen=True)
class Target:
    """One attribute a patch relies on: ``path`` looked up, dot by dot, in module ``module``.

    A class's attribute must be defined by that class itself, not inherited: a patch wraps the
    method of that class, and an inherited one of the same name does something else.
    """

    distribution: str
    module: str
    path: str
    kind: Literal["callable", "class", "value"] = "callable"
    #: The callable's first parameter names, in order (``self`` included for methods).
    params: tuple[str, ...] = ()
    #: Attribute names the callable's own code must still read or write; how a patch checks an
    #: attribute that exists only on instances (``self.application_queue``).
    uses: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.module}.{self.path}"


@dataclass(frozen=True)
class Patch:
    """A patch's name, what it is for, the package it needs and the targets it relies on."""

    name: str
    purpose: str
    #: Import name whose absence makes the patch a no-op.
    framework: str
    targets: tuple[Target, ...]


def require(patch: Patch) -> bool:
    """True when the patch may be installed, False when its framework is not installed at all.

    Raises PatchTargetMissing when the framework is there but a target is not as expected.
    """
    if importlib.util.find_spec(patch.framework) is None:
        return False
    for target in patch.targets:
        problem = _problem(target)
        if problem is not None:
            raise PatchTargetMissing(
                f"relay.server.{patch.name}: {target.distribution} {_version(target.distribution)} {problem}. "
                f"The relay patches this private API to {patch.purpose} and refuses to start rather than run "
                f"with it switched off: install the {target.distribution} version pinned in requirements.txt, "
                f"or update relay/server/{patch.name}.py for this one."
            )
    return True


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def _problem(target: Target) -> str | None:
    """What is wrong with ``target`` in the installed package, or None."""
    try:
        obj: Any = importlib.import_module(target.module)
    except ImportError as exc:
        return f"has no module {target.module} ({exc})"
    for name in target.path.split("."):
        found = name in vars(obj) if isinstance(obj, type) else hasattr(obj, name)
        if not found:
            return f"has no {target} (attribute {name!r} missing)"
        obj = getattr(obj, name)
    if target.kind == "callable" and not callable(obj):
        return f"has {target} but it is not callable"
    if target.kind == "class" and not isinstance(obj, type):
        return f"has {target} but it is not a class"
    if target.params:
        try:
            names = tuple(inspect.signature(obj).parameters)
        except (TypeError, ValueError):
            names = ()
        if names[: len(target.params)] != target.params:
            return f"has {target} with parameters ({', '.join(names)}), expected ({', '.join(target.params)}, ...)"
    if target.uses:
        code = getattr(inspect.unwrap(obj), "__code__", None)
        used = set(code.co_names) if code is not None else set()
        missing = [name for name in target.uses if name not in used]
        if missing:
            return f"has {target} but its code no longer uses {', '.join(missing)}"
    return None
