"""Views: overlays put the heat where the attention is, HTML is self-contained, plots draw,
and a page of views renders offline in a real headless Chromium."""

from __future__ import annotations

import io
import re
import socket
import urllib.request
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from conftest import FAMILY_NAMES, flat_image, noise_image
from PIL import Image

from corelens import HeadScores, views
from corelens.errors import InputError
from corelens.interventions.ablation import AblationCurve
from corelens.views.plots import is_blank
from corelens.zoo.tiny import tiny_image_sizes

# --- helpers ----------------------------------------------------------------------------------


class _Refs(HTMLParser):
    """Every src/href of every tag (script bodies are not parsed as tags)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for k, v in attrs:
            if k in ("src", "href", "srcset", "data") and v is not None:
                self.refs.append((tag, k, v))


def external_refs(html: str) -> list[str]:
    """Sources that would load from the network: tag src/href, ES module imports, CSS url()."""
    p = _Refs()
    p.feed(html)
    bad = [f"<{t} {k}={v[:80]}>" for t, k, v in p.refs
           if re.match(r"\s*(https?:)?//", v, re.I)]
    bad += re.findall(r"""\bimport\s*(?:[^;'"]*?\bfrom\s*)?\(?\s*["'](?:https?:)?//[^"']*""",
                      html)
    bad += re.findall(r"""url\(\s*["']?(?:https?:)?//[^)]*\)""", html)
    return bad


def _png(img_or_fig) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(views.png_bytes(img_or_fig))).convert("RGB"))


def _hot_mask(png: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels that changed from ``base`` and those that changed the most."""
    diff = np.abs(png.astype(int) - base.astype(int)).sum(-1)
    return diff > 0, diff == diff.max()


@pytest.fixture(scope="module")
def llava(tiny_model):
    return tiny_model("llava")


@pytest.fixture(scope="module")
def batch(llava):
    """Two examples: the first with two images (evidence on the second), the second with one
    image, an evidence box and a distractor."""
    (w0, h0), (w1, h1) = tiny_image_sizes("llava")[:2]
    imgs = [[noise_image(w0, h0, 0), noise_image(w1, h1, 1)], [noise_image(w0, h0, 2)]]
    return llava.prepare(imgs, ["compare <image> with <image> ?", "what is the color ?"],
                         answers=["red", "blue green"],
                         boxes=[{1: (0, 0, w1 // 2, h1 // 2)}, (0, 0, w0 // 2, h0 // 2)],
                         distractors=[None, (w0 // 2, h0 // 2, w0, h0)])


# --- overlays ---------------------------------------------------------------------------------


def test_heat_map_fractional_boxes_and_overlapping_views():
    # view 0: a 3x2 grid with fractional edges over a 30x20 image; view 1: one coarse token
    xs, ys = [0.0, 10.5, 20.25, 30.0], [0.0, 9.5, 20.0]
    boxes = [(xs[c], ys[r], xs[c + 1], ys[r + 1]) for r in range(2) for c in range(3)]
    boxes.append((0.0, 0.0, 30.0, 20.0))
    views_of = [0] * 6 + [1]
    vals = [0, 0, 0, 0, 1.0, 0, 0.25]  # token (r1, c1) hot; the coarse base view lukewarm
    heat = views.heat_map((30, 20), torch.tensor(boxes), vals, views_of, combine="max")
    assert heat.shape == (20, 30)
    assert heat[12:20, 11:20].min() == pytest.approx(1.0)  # wholly inside (r1, c1)
    assert heat[10, 10] == pytest.approx(0.5)  # pixel x=10 is half c0 (0), half c1 (1)
    assert heat[0, 0] == pytest.approx(0.25)  # max over views: the base view wins
    mean = views.heat_map((30, 20), torch.tensor(boxes), vals, views_of, combine="mean")
    assert mean[15, 15] == pytest.approx((1.0 + 0.25) / 2) and mean[0, 0] == pytest.approx(0.125)
    # a region no token covers stays unpainted
    part = views.heat_map((30, 20), torch.tensor(boxes[:3]), [1, 1, 1])
    assert np.isnan(part[15, 15]) and part[5, 5] == 1


def test_overlay_puts_the_hottest_cell_where_the_attention_is(llava, batch):
    """A known attention pattern (all of one head's mass on one vision token) is painted
    back: the hottest pixels of the PNG lie in that token's box and nothing else changes."""
    e, i, layer, head = 1, 0, 1, 2
    img = batch.layout.images[e][i]
    j = 37  # some vision token of the image
    target = int(img.vision_positions[j])
    x0, y0, x1, y1 = img.boxes[j].tolist()

    def plant(pattern, hook):
        pattern = pattern.clone()
        pattern[:, head] = 0.0
        pattern[:, head, :, target] = 1.0
        return pattern

    flat = flat_image(*img.size)  # a flat image: the change from it grows with the heat
    base = np.asarray(flat)
    with llava.hooks(fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", plant)]):
        out = views.attention_overlay(llava, batch, layer, head, example=e, image=i,
                                      scale=1, draw_boxes=False, image_obj=flat)
    png = _png(out)
    assert png.shape == base.shape
    changed, hottest = _hot_mask(png, base)
    ys_, xs_ = np.nonzero(hottest)
    assert len(xs_) > 0
    assert xs_.min() >= np.floor(x0) and xs_.max() < np.ceil(x1)
    assert ys_.min() >= np.floor(y0) and ys_.max() < np.ceil(y1)
    # every changed pixel touches the token's box (edge pixels are partly covered)
    ys_c, xs_c = np.nonzero(changed)
    assert xs_c.min() >= np.floor(x0) and xs_c.max() < np.ceil(x1)
    assert ys_c.min() >= np.floor(y0) and ys_c.max() < np.ceil(y1)
    # pixels wholly inside the box are all among the hottest
    inner = hottest[int(np.ceil(y0)):int(np.floor(y1)), int(np.ceil(x0)):int(np.floor(x1))]
    assert inner.size and inner.all()


def test_token_overlay_values_scale_and_boxes(batch):
    e = 1
    img = batch.layout.images[e][0]
    vis = batch.layout.vision_positions(e)
    vals = torch.zeros(len(vis))
    vals[5] = 2.0  # per vision token of the example (patch_vision_tokens' order)
    flat = flat_image(*img.size)
    out = views.token_overlay(batch, vals, example=e, scale=3, draw_boxes=False, image_obj=flat)
    base = np.asarray(flat_image(img.size[0] * 3, img.size[1] * 3))
    _, hottest = _hot_mask(_png(out), base)
    ys_, xs_ = np.nonzero(hottest)
    x0, y0, x1, y1 = (3 * v for v in img.boxes[5].tolist())
    assert xs_.min() >= np.floor(x0) and xs_.max() < np.ceil(x1)
    assert ys_.min() >= np.floor(y0) and ys_.max() < np.ceil(y1)
    # a full-sequence vector gives the same picture; the wrong length is a clear error
    seq = torch.zeros(batch.seq_len)
    seq[vis[5]] = 2.0
    same = views.token_overlay(batch, seq, example=e, scale=3, draw_boxes=False, image_obj=flat)
    assert np.array_equal(_png(same), _png(out))
    with pytest.raises(InputError, match="values"):
        views.token_overlay(batch, torch.zeros(7), example=e)
    # signed values (patching effects) use a diverging map; the boxes are drawn
    vals[9] = -1.0
    boxed = _png(views.token_overlay(batch, vals, example=e, scale=1))
    x0, y0, x1, y1 = batch.boxes[e][0][1]
    assert tuple(boxed[int(y0), int(x0) + 3]) == views.overlay.EVIDENCE_COLOR


def test_overlay_grid_and_html(llava, batch):
    heads = [(0, 1), (1, 0), (1, 3)]
    g = views.overlay_grid(llava, batch, heads, example=0, image=1, cols=2, cell=96)
    assert g.size[0] > 2 * 50 and g.size[1] > 2 * 96 and not is_blank(views.png_bytes(g))
    html = views.image_html(g)
    assert html.startswith('<img') and 'src="data:image/png;base64,' in html
    assert external_refs(html) == []


# --- circuitsvis views --------------------------------------------------------------------------


def test_attention_views_on_tiny_llava(llava, batch):
    T = batch.seq_len
    full = views.attention_heads(llava, batch, layer=1, example=0)
    att, labels = full.data["attention"], full.data["tokens"]
    n_valid = int(batch.attention_mask[0].sum())
    assert att.shape == (llava.cfg.n_heads, n_valid, n_valid) and len(labels) == n_valid
    assert torch.allclose(att.sum(-1), torch.ones(att.shape[:2]), atol=1e-4)
    assert "<img 0:r3,c5>" in labels and "<img 1:r0,c0>" in labels and "assistant" in labels
    # chosen query rows, vision tokens collapsed per row: keys summed, other rows zero
    rows = views.attention_heads(llava, batch, 1, heads=[0, 2], example=1,
                                 query_positions="query", collapse="row")
    att, labels = rows.data["attention"], rows.data["tokens"]
    grid_rows = batch.layout.images[1][0].views[0].rows
    assert sum(lab.startswith("<img 0:r") for lab in labels) == grid_rows
    assert att.shape[0] == 2 and att.shape[1] == len(labels) < T
    q = batch.query_positions[1].tolist()
    shown = [k for k, g in enumerate(views.token_groups(llava, batch, 1, "row"))
             if set(g.positions) & set(q)]
    assert torch.allclose(att[:, shown].sum(-1), torch.ones(2, len(shown)), atol=1e-4)
    others = [k for k in range(len(labels)) if k not in shown]
    assert att[:, others].abs().max() == 0
    # per region: evidence / distractor / other
    reg = views.attention_patterns(llava, batch, 0, example=1, collapse="region")
    labels = reg.data["tokens"]
    assert any(lab.startswith("<evidence x") for lab in labels)
    assert any(lab.startswith("<distractor 0 x") for lab in labels)
    assert any(lab.startswith("<other vision x") for lab in labels)
    att = reg.data["attention"]
    assert torch.allclose(att.sum(-1), torch.ones(att.shape[:2]), atol=1e-4)
    with pytest.raises(InputError, match="heads"):
        views.attention_heads(llava, batch, 0, heads=[99])


def test_colored_tokens_any_hook(llava, batch):
    v = views.colored_tokens(llava, batch, "blocks.0.attn.hook_z", head=1, example=1)
    vals = v.data["values"]
    n_valid = int(batch.attention_mask[1].sum())
    assert vals.shape == (n_valid,) and (vals >= 0).all()
    _, cache = llava.run_with_cache(batch, names_filter="blocks.0.attn.hook_z")
    valid = batch.attention_mask[1].bool()
    ref = cache["blocks.0.attn.hook_z"][1, :, 1].norm(dim=-1)[valid]
    assert torch.allclose(vals, ref, atol=1e-5)
    r = views.colored_tokens(llava, batch, "blocks.1.hook_resid_post", example=0,
                             collapse="row", reduce="mean")
    assert "<img 1:r0 x" in " ".join(r.data["tokens"])
    with pytest.raises(InputError, match="attention pattern"):
        views.colored_tokens(llava, batch, "blocks.0.attn.hook_pattern")


def test_views_html_is_self_contained(llava, batch, monkeypatch, tmp_path):
    made = [views.attention_heads(llava, batch, 1, example=0),
            views.attention_patterns(llava, batch, 0, example=1, query_positions="query"),
            views.colored_tokens(llava, batch, "blocks.0.hook_resid_post", example=0)]

    def offline(*a, **k):
        raise AssertionError("a view tried to reach the network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(socket.socket, "connect", offline)
    for v in made:
        html = v._repr_html_()
        assert html == v.html
        assert external_refs(html) == [], external_refs(html)[:3]
        assert "unpkg.com" not in html and "CircuitsVis" in html  # the local bundle
        assert html.count("window.CircuitsVis = window.CircuitsVis ||") == 1
    assert "&lt;img 0:r3,c5&gt;" in made[0].html or "<img 0:r3,c5>" in made[0].html
    assert '"assistant"' in made[0].html and '"<img 1:r0,c0>"' in made[0].html
    assert '"<img 0:r7,c7>"' in made[1].html and '"<img 0:r7,c7>"' in made[2].html
    out = made[0].save(tmp_path / "v.html")
    doc = views.page(made + [views.figure_html(views.head_heatmap(torch.rand(2, 4)))])
    assert external_refs(doc) == [] and doc.count("window.CircuitsVis = window.Circ") == 1
    assert out.read_text().startswith("<!DOCTYPE html>")


def test_external_refs_detector():
    assert external_refs('<script src="https://unpkg.com/x.js"></script>')
    assert external_refs('<link rel="stylesheet" href="//cdn.x/y.css">')
    assert external_refs('<script type="module">import { a } from "https://x/y.js";</script>')
    assert not external_refs('<script>var s = "see https://reactjs.org/docs";</script>')


# --- plots ------------------------------------------------------------------------------------

ABLATION = {"fracs": [0.02, 0.05, 0.1], "none": 0.9, "top": [0.6, 0.4, 0.3],
            "random_mean": [0.88, 0.86, 0.8], "random_lo": [0.85, 0.8, 0.7],
            "random_hi": [0.9, 0.9, 0.88], "bottom": [0.9, 0.89, 0.9], "metric": "accuracy"}


def test_plots_are_non_blank_pngs(tmp_path):
    hs = HeadScores(torch.rand(3, 4), "ram", n_examples=5)
    curve = AblationCurve([0.05, 0.1], [1, 2], "zero", "ram", 4,
                          {"accuracy": {"none": 0.9, "top": [0.5, 0.3], "bottom": [0.9, 0.88],
                                        "random_seeds": [[0.8, 0.85, 0.9], [0.7, 0.8, 0.9]]}})
    figs = [views.head_heatmap(hs), views.ram_heatmap(torch.rand(2, 3)),
            views.ablation_curves(ABLATION), views.ablation_curves(curve),
            views.ablation_curves({"fracs": [0.05], "top": [0.2]}),
            views.patching_heatmap(torch.randn(3, 4)),
            views.patching_heatmap(torch.randn(3, 5), labels=list("abcde"), kind="position"),
            views.patching_heatmap(torch.randn(3, 4, 2), labels=["evidence", "other vision"])]
    for i, fig in enumerate(figs):
        png = views.png_bytes(fig)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and not is_blank(png), i
        arr = _png(fig)
        assert arr.shape[0] > 100 and arr.shape[1] > 100
        assert views.figure_html(fig).startswith('<img class="corelens-figure"')
    path = views.save_png(figs[2], tmp_path / "curve.png")
    assert Image.open(path).size[0] > 100
    with pytest.raises(InputError, match="fracs"):
        views.ablation_curves({"top": [1]})
    with pytest.raises(InputError, match="'top' has"):
        views.ablation_curves({"fracs": [0.1, 0.2], "top": [1]})


# --- a page in a real browser -----------------------------------------------------------------


@pytest.mark.slow
def test_page_renders_offline_in_headless_chromium(llava, batch, tmp_path):
    import chromium

    if not chromium.available():
        pytest.skip(chromium.INSTALL_HINT)
    grid = views.overlay_grid(llava, batch, [(0, 0), (1, 2)], example=1)
    over = views.attention_overlay(llava, batch, 1, 0, example=0, image=1)
    items = [views.attention_heads(llava, batch, 1, example=1, query_positions="query",
                                   collapse="row"),
             views.attention_patterns(llava, batch, 0, example=1, collapse="region"),
             views.colored_tokens(llava, batch, "blocks.1.hook_resid_post", example=0),
             views.as_view(over, title="L1H0 overlay"), views.as_view(grid, title="grid"),
             views.head_heatmap(torch.rand(2, 4)), views.ablation_curves(ABLATION)]
    path = views.save_page(items, tmp_path / "page.html", title="views")
    res = chromium.render(path)
    assert res.requests == [], f"the page asked the network for {res.requests}"
    assert res.console_errors == [] and res.exceptions == [], (res.console_errors,
                                                                 res.exceptions)
    assert res.dom["external"] == []
    assert res.dom["circuitsvis"] == 3 and res.dom["circuitsvis_rendered"] == 3
    assert res.dom["images"] == 4 and res.dom["images_loaded"] == 4
    assert all(w > 50 and h > 50 for w, h in res.dom["image_sizes"])
    assert "Head Selector" in res.dom["text"] or "Head selector" in res.dom["text"]
    assert not is_blank(res.screenshot)
    shot = np.asarray(Image.open(io.BytesIO(res.screenshot)).convert("RGB"))
    assert (shot.std(axis=(0, 1)) > 5).any()  # more than a flat page
    # the harness itself sees a request and a console error when there is one
    bad = tmp_path / "bad.html"
    bad.write_text('<p>x</p><img src="https://example.com/x.png">'
                   '<script>console.error("boom")</script>')
    res = chromium.render(bad, timeout=30)
    assert res.requests == ["https://example.com/x.png"] and "boom" in res.console_errors


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_views_on_every_family(name, tiny_model):
    """Row collapse and overlays follow each family's layout (anyres views, newlines, merged
    tokens): every vision token falls in a labelled group and every view is painted."""
    model = tiny_model(name)
    (w, h) = tiny_image_sizes(name)[0]
    batch = model.prepare([noise_image(w, h, 0)], ["what is the color ?"], answers=["red"],
                          boxes=[(0, 0, w // 2, h // 2)])
    groups = views.token_groups(model, batch, 0, "row")
    vision = set(batch.layout.vision_positions(0).tolist())
    in_rows = {p for g in groups if g.label.startswith("<img 0:") for p in g.positions}
    assert vision <= in_rows
    v = views.attention_heads(model, batch, 0, example=0, query_positions="query",
                              collapse="row")
    assert v.data["attention"].shape[1] == len(groups)
    img = batch.layout.images[0][0]
    vals = torch.zeros(len(img.vision_positions))
    vals[len(vals) // 2] = 1.0
    heat = views.heat_map(img.size, img.boxes, vals, img.rows.view[img.vision_mask])
    assert np.nanmax(heat) == pytest.approx(1.0)
    out = views.attention_overlay(model, batch, 0, 0, scale=1)
    assert out.size == img.size


# --- video --------------------------------------------------------------------------------------
# Qwen2-VL, a 6-frame 80x50 video at 2 fps: resized to 80x48, 3x5 tokens of 16 x 16.67 original
# px per temporal slot of 2 frames; slots (frames [0, 2), [2, 4), [4, 6)) at vision-token
# offsets 0, 15, 30; frame f shown at f / 2 seconds.


def _frames(n, w, h):
    """Flat frames, each its own grey, so a tile shows which frame it was painted on."""
    return [flat_image(w, h, (40 + 30 * k,) * 3) for k in range(n)]


@pytest.fixture(scope="module")
def qwen_video(tiny_model):
    from corelens import GroundedExample
    from corelens.data.examples import Evidence, Video

    model = tiny_model("qwen2_vl")
    ex = [GroundedExample([], "what is it ?", "red", id="v", videos=[
              Video(_frames(6, 80, 50), fps=2.0)],
              boxes=[Evidence.in_frames(0, (2, 4), (0, 0, 32, 20))]),
          GroundedExample([], "and here ?", "blue", [Evidence.in_frame(0, 0, (0, 0, 80, 50))],
                          id="w", videos=[Video(_frames(4, 80, 50))])]
    return model, model.prepare_examples(ex)


def test_video_token_labels_name_frames_and_seconds(qwen_video, tiny_model):
    model, batch = qwen_video
    vis = batch.layout.video(0, 0).vision_positions.tolist()
    assert len(vis) == 45
    toks = model.to_str_tokens(batch, 0)
    assert toks[vis[0]] == "<vid 0:f0-1,0-0.5s,r0,c0>"
    assert toks[vis[15 + 5 + 2]] == "<vid 0:f2-3,1-1.5s,r1,c2>"
    assert toks[vis[44]] == "<vid 0:f4-5,2-2.5s,r2,c4>"
    for p in vis:  # the layout's own label says the same
        assert batch.layout.token_info(0, p).label() == toks[p]
    # no fps: frames only (example 1 is left-padded: labels of the real tokens)
    toks1 = model.to_str_tokens(batch, 1)
    off = int((batch.attention_mask[1] == 0).sum())
    v1 = batch.layout.video(1, 0).vision_positions.tolist()
    assert toks1[v1[16] - off] == "<vid 0:f2-3,r0,c1>"
    # the views: labels as is, row groups per frame span
    labels = views.token_labels(model, batch, 0)
    assert labels[vis[22]] == "<vid 0:f2-3,1-1.5s,r1,c2>"
    groups = views.token_groups(model, batch, 0, "row")
    rows = [g for g in groups if g.label.startswith("<vid 0:")]
    assert [g.label for g in rows[3:6]] == [f"<vid 0:f2-3,1-1.5s,r{r} x5>" for r in range(3)]
    assert rows[4].positions == vis[20:25]
    # LLaVA-OneVision: one frame per token, the newline after the frames is <vid 0:nl>
    ov = tiny_model("llava_onevision")
    from corelens.data.examples import Video

    w, h = tiny_image_sizes("llava_onevision")[0]
    b = ov.prepare(None, ["what is it ?"], videos=[[Video(_frames(3, w, h), fps=1.0)]])
    lay = b.layout.video(0, 0)
    t = ov.to_str_tokens(b, 0)
    assert t[int(lay.vision_positions[-1])].startswith("<vid 0:f2,2s,r")
    assert t[int(lay.positions[-1])] == "<vid 0:nl>"


def _changed(tile, frame):
    diff = np.abs(np.asarray(tile, dtype=int) - np.asarray(frame, dtype=int)).sum(-1)
    return diff


def test_video_overlay_paints_the_right_frames_and_cells(qwen_video):
    """A value on token (slot 1, r1, c2) and half of it on (slot 2, r0, c0): each lands in its
    cell of its span's tile, on that span's first frame; slot 0's tile is the frame untouched;
    one colour scale across tiles (the half value paints weaker)."""
    _, batch = qwen_video
    lay = batch.layout.video(0, 0)
    vals = torch.zeros(len(lay.vision_positions))
    vals[22], vals[30] = 1.0, 0.5
    frames = batch.videos[0][0].frames
    tiles = views.video_overlays(batch, vals, 0, 0, scale=1, draw_boxes=False)
    assert [t for t, _ in tiles] == ["f0-1,0-0.5s  sum 0", "f2-3,1-1.5s  sum 1",
                                     "f4-5,2-2.5s  sum 0.5"]
    d0, d1, d2 = (_changed(tile, frames[f]) for (_, tile), f in zip(tiles, (0, 2, 4)))
    assert d0.max() == 0  # nothing in slot 0; painted on frame 0
    for d, j in ((d1, 22), (d2, 30)):
        x0, y0, x1, y1 = lay.boxes[j].tolist()
        ys_, xs_ = np.nonzero(d)
        assert xs_.min() >= np.floor(x0) and xs_.max() < np.ceil(x1)
        assert ys_.min() >= np.floor(y0) and ys_.max() < np.ceil(y1)
        inner = d[int(np.ceil(y0)):int(np.floor(y1)), int(np.ceil(x0)):int(np.floor(x1))]
        assert inner.size and (inner == d.max()).all()
    assert (x0, x1) == (0.0, 16.0)  # slot 2's token: row 0, col 0
    assert d2.max() < d1.max()  # shared scale: 0.5 paints weaker than 1.0
    # per frame: frames 2 and 3 each carry slot 1's cell; the strip is those tiles in a row
    per = views.video_overlays(batch, vals, 0, 0, per="frame", frames=(2, 4), scale=1,
                               draw_boxes=False)
    assert [t for t, _ in per] == ["f2,1s  sum 1", "f3,1.5s  sum 1"]
    for (_, tile), f in zip(per, (2, 3)):
        assert np.array_equal(_changed(tile, frames[f]) > 0, d1 > 0)
    strip = views.token_overlay(batch, vals, 0, video=0, scale=1, draw_boxes=False, cell=80)
    ref = views.grid([t for _, t in tiles], [t for t, _ in tiles], cols=3, cell=80)
    assert np.array_equal(np.asarray(strip), np.asarray(ref))
    # the evidence (frames [2, 4)) is drawn on slot 1's tile only
    boxed = views.video_overlays(batch, vals, 0, 0, scale=1)
    assert tuple(np.asarray(boxed[1][1])[0, 5]) == views.overlay.EVIDENCE_COLOR
    assert tuple(np.asarray(boxed[0][1])[0, 5]) != views.overlay.EVIDENCE_COLOR
    with pytest.raises(InputError, match="outside the video's 6"):
        views.video_overlays(batch, vals, 0, 0, frames=(4, 9))


def test_video_attention_overlay_is_the_planted_token(qwen_video):
    """All of one head's attention on one video token: the strip equals ``token_overlay`` of a
    one-hot on that token, and ``overlay_grid`` puts one row of frame spans per head."""
    model, batch = qwen_video
    layer, head = 1, 0
    target = int(batch.layout.video(0, 0).vision_positions[37])

    def plant(pattern, hook):
        pattern = pattern.clone()
        pattern[:, head] = 0.0
        pattern[:, head, :, target] = 1.0
        return pattern

    with model.hooks(fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", plant)]):
        got = views.attention_overlay(model, batch, layer, head, video=0, scale=1)
    onehot = torch.zeros(batch.seq_len)
    onehot[target] = 1.0
    ref = views.token_overlay(batch, onehot, 0, video=0, scale=1)
    assert np.array_equal(np.asarray(got), np.asarray(ref))
    g = views.overlay_grid(model, batch, [(0, 0), (1, 1)], video=0, cell=64)
    assert not is_blank(views.png_bytes(g)) and g.size[1] > 2 * 64 and g.size[0] > 3 * 64
    # an example with a video and no image paints its video by default
    same = views.overlay_grid(model, batch, [(0, 0), (1, 1)], cell=64)
    assert np.array_equal(np.asarray(same), np.asarray(g))


def test_labels_of_a_multi_view_image_name_the_view_and_the_newline_rows(tiny_model):
    # LLaVA-NeXT: a base view and the anyres view, newline rows after each anyres row
    model = tiny_model("llava_next")
    (w, h) = tiny_image_sizes(model.family)[0]
    batch = model.prepare([noise_image(w, h, 0)], ["what is it ?"])
    toks = model.to_str_tokens(batch)
    img = batch.layout.images[0][0]
    assert [v.name for v in img.views] == ["base", "anyres"]
    pos = img.positions.tolist()
    assert toks[pos[0]] == "<img 0:r0,c0,base>" and toks[pos[-1]] == "<img 0:nl>"
    anyres = [toks[p] for p in pos if toks[p].endswith(",anyres>")]
    assert anyres and anyres[0] == "<img 0:r0,c0,anyres>"
    for p in pos:  # the layout's TokenInfo gives the same label
        assert batch.layout.token_info(0, p).label() == toks[p]
