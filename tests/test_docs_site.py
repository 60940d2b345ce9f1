"""The documentation site (mkdocs.yml, `make docs`): it builds strictly, every public name has
its reference entry, no page loads anything from another host, and the notebook pages show their
outputs -- the RAM heat map, the overlays, working circuitsvis views -- in headless Chromium with
no request leaving the machine.

The build renders the notebooks' executed copies (build/notebooks/): docs/hooks.py executes
those that are missing or stale, under a lock per notebook shared with tests/test_notebooks.py,
so in one test session each notebook runs once, whichever test reaches it first.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# the output images of the code cell that draws the RAM heat map, and of those that draw the
# overlay grids (nbconvert nests elements of class jp-Cell: each image is counted once)
HEATMAP_PROBE = r"""(() => {
  const cells = [...document.querySelectorAll('.jp-Cell')];
  const input = c => (c.querySelector('.jp-InputArea') || {innerText: ''}).innerText;
  const imgs = cs => [...new Set(cs.flatMap(c => [...c.querySelectorAll('.jp-OutputArea img')]))]
    .map(i => ({src: (i.getAttribute('src') || '').slice(0, 15), complete: i.complete,
                w: i.naturalWidth, h: i.naturalHeight,
                shown: i.getBoundingClientRect().width * i.getBoundingClientRect().height}));
  const heat = cells.filter(c => input(c).includes('views.head_heatmap('));
  const grid = cells.filter(c => input(c).includes('views.overlay_grid('));
  return JSON.stringify({heatmap: imgs(heat), overlays: imgs(grid)});
})()"""

# every circuitsvis view: its container, whether React rendered into it, what it drew
CIRCUITSVIS_PROBE = r"""(() => {
  const views = [...document.querySelectorAll('[id^="circuits-vis-"]')];
  return JSON.stringify({
    defined: typeof window.CircuitsVis === 'object' && !!window.CircuitsVis.render,
    views: views.map(v => ({children: v.childElementCount,
                            cells: v.querySelectorAll('canvas, svg, td, span, div').length,
                            height: v.getBoundingClientRect().height})),
  });
})()"""


def _hooks():
    spec = importlib.util.spec_from_file_location("corelens_docs_hooks",
                                                  ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    for name in ("mkdocs", "material", "mkdocstrings", "mkdocs_jupyter", "nbclient"):
        pytest.importorskip(name)
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
         "-d", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    log = proc.stdout + proc.stderr
    print(f"mkdocs build --strict: {time.perf_counter() - start:.1f} s")
    print("\n".join(line for line in log.splitlines() if "ipynb:" in line))
    assert proc.returncode == 0, log[-10000:]
    assert not re.search(r"^WARNING", log, re.M), log[-10000:]
    return out


def test_every_page_is_built(site):
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    for page in ["index.html", "design.html", "ram.html", "reference/corelens.html",
                 *(f"notebooks/{p.stem}.html" for p in notebooks)]:
        assert (site / page).is_file(), page
    landing = (site / "index.html").read_text()
    assert "A short tour" in landing and "make test" in landing  # the README's content


def test_reference_renders_every_public_name(site):
    """mkdocstrings gives each documented object a heading whose id is its path."""
    import corelens

    ids = set()
    for page in (site / "reference").glob("*.html"):
        ids |= set(re.findall(r'id="(corelens(?:\.\w+)*)"', page.read_text()))
    missing = [n for n in corelens.__all__ if f"corelens.{n}" not in ids]
    assert not missing, f"the built API reference lacks {missing}"


def test_no_page_or_stylesheet_loads_from_the_network(site):
    hooks = _hooks()
    found = {}
    for path in [*site.rglob("*.html"), *site.rglob("*.css")]:
        refs = hooks.external_references(path.read_text(errors="replace"))
        if refs:
            found[str(path.relative_to(site))] = refs
    assert not found, found
    # the checker itself catches what nbconvert and Material would add by default
    assert hooks.external_references(
        '<script src="https://cdnjs.cloudflare.com/x.js"></script>'
        '<link rel="stylesheet" href="https://fonts.googleapis.com/css?family=Roboto">'
        '<style>@import url("https://fonts.example/f.css");</style>'
        'await import("https://cdn.example/mermaid.mjs")') != []
    assert hooks.external_references('<a href="https://github.com">x</a>'
                                     '<link rel="canonical" href="https://x.example/">') == []


def _render_offline(page: Path, probe: str):
    """The page in headless Chromium: no request left the machine, no script failed."""
    chromium = pytest.importorskip("chromium")
    if not chromium.available():
        pytest.skip(chromium.INSTALL_HINT)
    res = chromium.render(page, probe=probe)
    assert res.requests == [], f"requests left the machine: {res.requests}"
    assert res.exceptions == [], res.exceptions  # embedded bundles ran without an error
    assert res.console_errors == [], res.console_errors
    return res


def test_core_heads_page_shows_its_figures_offline(site):
    res = _render_offline(site / "notebooks" / "02_core_heads.html", HEATMAP_PROBE)
    heat = res.probe["heatmap"]
    assert heat, "no rendered output under the views.head_heatmap cell"
    for img in heat + res.probe["overlays"]:
        assert img["src"].startswith("data:image/"), img  # embedded in the page
        assert img["complete"] and img["w"] > 0 and img["h"] > 0, img  # it decoded
        assert img["shown"] > 0, img  # and it is laid out on the page
    assert len(heat) == 1 and len(res.probe["overlays"]) == 4  # 3 examples + a shared scale
    assert len(res.screenshot) > 10_000


def test_quickstart_page_runs_its_circuitsvis_views_offline(site):
    res = _render_offline(site / "notebooks" / "01_quickstart.html", CIRCUITSVIS_PROBE)
    assert res.probe["defined"], "window.CircuitsVis was never defined"
    views = res.probe["views"]
    assert views, "no circuitsvis view on the page"
    for view in views:  # React rendered into each container, and it has a size
        assert view["children"] > 0 and view["cells"] > 0 and view["height"] > 0, view
    assert res.dom["images_loaded"] == res.dom["images"] > 0
