"""Self-contained HTML: circuitsvis components with its LOCAL bundle, PNGs as data URIs.

circuitsvis's own ``RenderedHTML`` loads its script from a CDN (``str()``, ``cdn_src``) and
probes the network in ``_repr_html_``; nothing here does either. The bundle (``iife.js``,
~1.3 MB) is embedded once per page (``page``) or once per view (``HTMLView.html``) and
defines ``window.CircuitsVis`` only if no earlier view on the page has.
"""

from __future__ import annotations

import base64
import html as _html
import io
import json
import math
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

_STYLE = ("<style>body{font-family:system-ui,sans-serif;margin:16px;}"
          ".corelens-view{margin:12px 0 24px 0;} .corelens-view h3{margin:4px 0;font-size:15px;}"
          ".corelens-view .caption{color:#555;font-size:12px;margin:2px 0 6px 0;}"
          ".corelens-view img{max-width:100%;image-rendering:pixelated;}</style>")


@lru_cache(maxsize=1)
def circuitsvis_bundle() -> str:
    """circuitsvis's local JS bundle wrapped so that it defines ``window.CircuitsVis`` once."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    js = path.read_text(encoding="utf-8")
    js = "\n".join(line for line in js.splitlines() if not line.startswith("//# sourceMappingURL"))
    js = js.replace("</script", "<\\/script")
    return ("<script>window.CircuitsVis = window.CircuitsVis || (function () {\n"
            f"{js}\nreturn CircuitsVis;\n}})();</script>")


def _js_literal(props: dict[str, Any]) -> str:
    """JSON props safe inside a <script> element (no '</', no '<!--'; NaN -> null)."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    text = json.dumps({k: clean(v) for k, v in props.items() if v is not None})
    return text.replace("</", "<\\/").replace("<!--", "<\\!--")


def component(name: str, props: dict[str, Any], height: str | None = None) -> str:
    """A ``<div>`` and the script that renders circuitsvis component ``name`` into it."""
    div_id = "circuits-vis-" + uuid.uuid4().hex[:12]
    style = f' style="min-height:{height}"' if height else ""
    return (f'<div id="{div_id}"{style}></div>\n<script>window.CircuitsVis.render('
            f'"{div_id}", window.CircuitsVis.{name}, {_js_literal(props)});</script>')


@dataclass
class HTMLView:
    """One view: an HTML fragment, self-contained through ``.html`` / ``.save``.

    ``_repr_html_`` shows it in a notebook (same HTML as ``.html``: the local bundle, no CDN,
    no network probe). Combine several into one page with ``page``.
    """

    body: str
    title: str = ""
    caption: str = ""
    uses_circuitsvis: bool = False
    data: dict[str, Any] = field(default_factory=dict, repr=False)  # what was drawn

    def fragment(self) -> str:
        """The view without the circuitsvis bundle (``page`` adds it once)."""
        head = f"<h3>{_html.escape(self.title)}</h3>" if self.title else ""
        cap = f'<div class="caption">{_html.escape(self.caption)}</div>' if self.caption else ""
        return f'<div class="corelens-view">{head}{cap}\n{self.body}\n</div>'

    @property
    def html(self) -> str:
        """Self-contained fragment: the bundle (if needed) then the view."""
        return (circuitsvis_bundle() + "\n" if self.uses_circuitsvis else "") + self.fragment()

    def _repr_html_(self) -> str:
        return self.html

    def __html__(self) -> str:
        return self.html

    def save(self, path: str | Path) -> Path:
        """Write a complete, self-contained HTML page with this view."""
        return save_page([self], path, title=self.title)


Viewable = HTMLView | Image.Image | Any  # PIL image, matplotlib Figure, or raw HTML str


def as_view(item: Viewable, title: str = "") -> HTMLView:
    """An ``HTMLView`` from a view, a PIL image, a matplotlib figure or an HTML string."""
    if isinstance(item, HTMLView):
        return item
    if isinstance(item, Image.Image):
        return HTMLView(image_html(item), title=title)
    if hasattr(item, "savefig"):
        return HTMLView(figure_html(item), title=title)
    if isinstance(item, str):
        return HTMLView(item, title=title)
    raise TypeError(f"cannot show a {type(item).__name__}: pass an HTMLView, a PIL image, a "
                    "matplotlib figure or an HTML string")


def page(items: Iterable[Viewable], title: str = "corelens") -> str:
    """One self-contained HTML document; the circuitsvis bundle appears at most once."""
    views = [as_view(x) for x in items]
    bundle = circuitsvis_bundle() if any(v.uses_circuitsvis for v in views) else ""
    body = "\n".join(v.fragment() for v in views)
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{_html.escape(title)}</title>{_STYLE}\n{bundle}\n</head>\n"
            f"<body>\n{body}\n</body></html>\n")


def save_page(items: Iterable[Viewable], path: str | Path, title: str = "corelens") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page(items, title=title or "corelens"), encoding="utf-8")
    return path


# --- images ---------------------------------------------------------------------------------
def png_bytes(item: Image.Image | Any, dpi: int = 100) -> bytes:
    """PNG bytes of a PIL image or a matplotlib figure."""
    buf = io.BytesIO()
    if isinstance(item, Image.Image):
        item.save(buf, format="PNG")
    else:
        item.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_html(img: Image.Image, alt: str = "", width: int | None = None) -> str:
    """``<img src="data:image/png;base64,...">`` of a PIL image."""
    w = f' width="{width}"' if width else ""
    return (f'<img class="corelens-image" alt="{_html.escape(alt)}"{w} '
            f'src="{data_uri(png_bytes(img))}">')


def figure_html(fig: Any, alt: str = "", dpi: int = 100) -> str:
    """``<img src="data:image/png;base64,...">`` of a matplotlib figure."""
    return (f'<img class="corelens-figure" alt="{_html.escape(alt)}" '
            f'src="{data_uri(png_bytes(fig, dpi=dpi))}">')


def save_png(item: Image.Image | Any, path: str | Path, dpi: int = 100) -> Path:
    """Write a PIL image or a matplotlib figure as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(item, dpi=dpi))
    return path
