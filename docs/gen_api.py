"""Write docs/api.md: every public name of corelens with its signature and docstring.

    python docs/gen_api.py            # rewrite docs/api.md
    python docs/gen_api.py --check    # exit 1 if docs/api.md is stale (the tests run this)
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

MODULES = ["corelens", "corelens.scores.ram", "corelens.scores.registry",
           "corelens.interventions.patching", "corelens.interventions.attribution",
           "corelens.interventions.ablation", "corelens.views", "corelens.zoo",
           "corelens.data.loaders", "corelens.runner", "corelens.accel", "corelens.report",
           "corelens.zoo.tiny", "corelens.saes"]
OUT = Path(__file__).with_name("api.md")


def _public(mod) -> list[str]:
    names = getattr(mod, "__all__", None)
    if names is None:
        names = [n for n, v in vars(mod).items() if not n.startswith("_")
                 and (inspect.isfunction(v) or inspect.isclass(v))
                 and getattr(v, "__module__", "").startswith(mod.__name__)]
    return sorted(names, key=str.lower)


def _sig(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""


def _doc(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip()


def _constant(obj) -> str:
    """A stable description (no object addresses, sets sorted)."""
    if isinstance(obj, dict):
        return f"A mapping of {len(obj)}: keys `{', '.join(map(str, obj))}`."
    if isinstance(obj, (set, frozenset)):
        return f"A set: `{', '.join(sorted(map(str, obj)))}`."
    if isinstance(obj, (tuple, list)):
        return f"A sequence: `{', '.join(map(str, obj))}`."
    if isinstance(obj, Path):  # machine-specific: name the place inside the package
        parts = obj.parts
        inside = parts[parts.index("corelens"):] if "corelens" in parts else (obj.name,)
        return f"A path: `{'/'.join(inside)}` (inside the installed package)."
    return f"A constant: `{obj!r}`"


def render() -> str:
    lines = ["# API reference", "",
             "Generated from the docstrings by `python docs/gen_api.py` (a test checks it is "
             "current). The public API is `corelens/__init__.py`; the submodules below are "
             "public too.", ""]
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        lines += [f"## `{name}`", ""]
        first = (_doc(mod).split("\n\n") or [""])[0]
        if first:
            lines += [first, ""]
        for attr in _public(mod):
            obj = getattr(mod, attr)
            if inspect.ismodule(obj):
                lines += [f"- `{name}.{attr}` — see its section.", ""]
                continue
            if not (inspect.isclass(obj) or callable(obj)):
                lines += [f"### `{name}.{attr}`", "", _constant(obj), ""]
                continue
            kind = "class" if inspect.isclass(obj) else "def"
            lines += [f"### `{name}.{attr}`", "", f"```python\n{kind} {attr}{_sig(obj)}\n```",
                      ""]
            if _doc(obj):
                lines += [_doc(obj), ""]
            if inspect.isclass(obj):
                for m, member in sorted(vars(obj).items()):
                    if m.startswith("_") or not (inspect.isfunction(member)
                                                 or isinstance(member, (property, classmethod,
                                                                        staticmethod))):
                        continue
                    fn = member.fget if isinstance(member, property) else getattr(obj, m)
                    sig = "" if isinstance(member, property) else _sig(fn)
                    summary = (_doc(fn).split("\n\n") or [""])[0].replace("\n", " ")
                    lines.append(f"- `{attr}.{m}{sig}`" + (f" — {summary}" if summary else ""))
                lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text() != text:
            print("docs/api.md is stale: run python docs/gen_api.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
