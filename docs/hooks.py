"""mkdocs hooks (mkdocs.yml ``hooks:``): the executed notebooks, and a site that needs no network.

- ``on_files``: adds ``notebooks/NAME.ipynb`` pages from the EXECUTED copies in
  ``build/notebooks/`` (``docs/run_notebooks.py``; ``tests/test_notebooks.py`` leaves them
  there), executing the notebooks whose copy is missing or stale first. mkdocs-jupyter then only
  converts them (``execute: false``), so a notebook is not executed twice, and one that fails
  fails the build.
- ``on_post_page``: nbconvert's page header loads MathJax and mermaid from a CDN (the notebooks
  use neither); both loaders are cut out. Then every page is checked: a ``<script>``, ``<link>``,
  ``<img>``, ``<iframe>``, ``<source>`` or ``<object>`` that loads from another host, a CSS
  ``@import`` / ``url(http...)`` or a JS ``import("http...")`` fails the build.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.corelens")
_HERE = Path(__file__).resolve().parent


def _run_notebooks():
    spec = importlib.util.spec_from_file_location("corelens_docs_run_notebooks",
                                                  _HERE / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@event_priority(100)  # before mkdocs-jupyter's on_files turns .ipynb files into pages
def on_files(files, config):
    runner = _run_notebooks()
    # a build inside the tests (tests/test_docs_site.py) tags the copies it makes with the test
    # session, so that tests/test_notebooks.py reuses them instead of executing them again
    run = os.environ.get("CORELENS_TEST_RUN") or None
    # first the notebooks nobody else is executing, then wait for the others (the tests' other
    # xdist worker may be executing one: then its copy is reused, not made a second time)
    pending = list(runner.NOTEBOOKS)
    for wait in (False, True):
        for path in list(pending):
            try:
                nb, executed = runner.execute_if_stale(path, run=run, wait=wait)
            except Exception as exc:  # a failing notebook fails the build
                raise PluginError(f"notebook {path.name} failed: {exc}") from exc
            if nb is None:
                continue
            pending.remove(path)
            took = nb.metadata["corelens"].get("seconds")
            log.info(f"{path.name}: " + (f"executed in {took} s" if executed
                                         else "executed copy is current"))
    # a File whose source folder is build/ (mkdocs-jupyter's wrapper cannot read the source of
    # a File.generated one): build/notebooks/NAME.ipynb becomes the page notebooks/NAME.html
    for path in runner.NOTEBOOKS:
        files.append(File(f"notebooks/{path.name}", src_dir=str(runner.OUT.parent),
                          dest_dir=config.site_dir, use_directory_urls=config.use_directory_urls))
    return files


# nbconvert's loaders of MathJax (a <script src> to a CDN) and mermaid (an import() of a CDN
# module when a page has a diagram): no notebook here has math or diagrams
_MATHJAX = re.compile(r"<!-- Load mathjax -->\s*<script[^>]*\bsrc=[^>]*>\s*</script>", re.I)
_MERMAID = re.compile(r"<script type=\"module\">(?:(?!</script>).)*?mermaid(?:(?!</script>).)*"
                      r"</script>", re.S)
_TAGS = re.compile(r"<(script|link|img|iframe|source|object|embed|video|audio)\b[^>]*?"
                   r"\b(src|href|data)\s*=\s*[\"']?\s*((?:https?:)?//[^\s\"'>]+)", re.I)
_CSS = re.compile(r"(@import\s+(?:url\()?|url\()\s*[\"']?((?:https?:)?//[^\s\"')]+)", re.I)
_IMPORT = re.compile(r"\bimport\(\s*[\"']((?:https?:)?//[^\"']+)", re.I)


def external_references(html: str) -> list[str]:
    """What a page would load from another host (anchors to other sites are fine)."""
    found = [m.group(3) for m in _TAGS.finditer(html)
             if not (m.group(1).lower() == "link" and _is_plain_link(html, m))]
    found += [m.group(2) for m in _CSS.finditer(html)]
    found += [m.group(1) for m in _IMPORT.finditer(html)]
    return found


def _is_plain_link(html: str, m: re.Match) -> bool:
    """A <link rel=canonical/alternate/...> names a URL but loads nothing."""
    tag = html[m.start():html.find(">", m.start()) + 1]
    rel = re.search(r"\brel\s*=\s*[\"']?([^\"'>]+)", tag, re.I)
    loads = ("stylesheet", "preload", "modulepreload", "prefetch", "icon", "manifest",
             "preconnect", "dns-prefetch")
    return bool(rel) and not any(word in rel.group(1).lower() for word in loads)


def on_post_page(output, page, config):
    output = _MERMAID.sub("", _MATHJAX.sub("", output))
    found = external_references(output)
    if found:
        raise PluginError(f"{page.file.src_uri} loads from the network: {sorted(set(found))}")
    return output
