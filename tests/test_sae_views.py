"""SAE features on the image (corelens.views.features): overlays, attribution, top patches."""

from __future__ import annotations

import dataclasses
from html.parser import HTMLParser

import matplotlib
import numpy as np
import pytest
import torch
from conftest import flat_image, noise_image

from corelens import views, zoo
from corelens.errors import InputError
from corelens.interventions.patching import answer_logprob
from corelens.saes import SAE, activations, run_with_hooks_with_saes
from corelens.zoo.tiny import tiny_image_sizes

HOOK = "blocks.1.hook_resid_post"  # toy-llava: d_model 128
ACTS = HOOK + ".hook_sae_acts_post"
GREY = 128
ALPHA = 0.75  # paint's default opacity


def random_sae(d_in: int, hook_name: str, seed: int = 0) -> SAE:
    torch.manual_seed(seed)
    sae = SAE.create(d_in, 2 * d_in, hook_name)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
        sae.b_dec.normal_(0, 0.5)
    return sae


@pytest.fixture(scope="module")
def model():
    return zoo.load("toy-llava")


@pytest.fixture(scope="module")
def sae():
    return random_sae(128, HOOK)


@pytest.fixture(scope="module")
def batch(model):
    return model.prepare_examples(zoo.examples("toy-llava", 3, seed=0))


def reference_acts(model, batch, sae):
    """[batch, vision token, d_sae] from the documented cache path, and the valid mask."""
    with torch.no_grad():
        _, cache = model.run_with_cache_with_saes(batch, [sae], names_filter=[ACTS],
                                                  positions="vision", use_error_term=True)
    return cache[ACTS], cache.position_mask


def painted(value: float, vmax: float) -> np.ndarray:
    """The RGB ``paint`` gives a grey pixel under a non-negative value (inferno, 0 .. vmax)."""
    s = min(max(value / vmax, 0.0), 1.0)
    color = np.asarray(matplotlib.colormaps["inferno"](s)[:3])
    a = ALPHA * s
    return np.round((GREY / 255 * (1 - a) + color * a) * 255)


# --- activations and the overlay -------------------------------------------------------------
def test_feature_activations_are_the_spliced_saes_features_at_the_vision_tokens(
        model, batch, sae):
    ref, mask = reference_acts(model, batch, sae)
    feats = [3, 0, 17]
    many = views.feature_activations(model, batch, sae, feats)
    one = views.feature_activations(model, batch, sae, 17)
    for e in range(len(batch)):
        n = len(batch.layout.vision_positions(e))
        assert int(mask[e].sum()) == n and many[e].shape == (n, 3) and one[e].shape == (n,)
        torch.testing.assert_close(many[e], ref[e, :n][:, feats], rtol=0, atol=1e-5)
        torch.testing.assert_close(one[e], many[e][:, 2], rtol=0, atol=0)
    assert (many[0] > 0).any() and (many[0] == 0).any()
    with pytest.raises(InputError, match="d_sae=256"):
        views.feature_activations(model, batch, sae, 256)
    tower = random_sae(64, "vision_encoder.pre_layernorm.hook_out")
    with pytest.raises(InputError, match="vision-tower"):
        views.feature_overlay(model, batch, tower, 0)


def test_overlay_paints_each_pixel_with_the_activation_of_the_token_over_it(model, batch, sae):
    """toy-llava: one view of 8 x 8 tokens, each an 8 x 8 px cell of the 64 x 64 image; every
    pixel of a token's box shows that token's activation on the (flat grey) image."""
    e, f = 1, 3
    acts, _ = reference_acts(model, batch, sae)
    img = batch.layout.images[e][0]
    vals = acts[e, :len(img.vision_positions), f]
    vmax = float(vals.max())
    assert vmax > 0 and (vals == 0).any()  # hot and cold tokens
    out = views.feature_overlay(model, batch, sae, f, example=e, image_obj=flat_image(
        *img.size), draw_boxes=False, scale=1, vmax=vmax)
    pix = np.asarray(out.convert("RGB")).astype(float)
    assert out.size == img.size == (64, 64)
    for p, (x0, y0, x1, y1) in enumerate(img.boxes.tolist()):  # every token, every pixel
        cell = pix[int(y0):int(y1), int(x0):int(x1)].reshape(-1, 3)
        assert np.abs(cell - painted(float(vals[p]), vmax)).max() <= 1, p
    # the real image, with the evidence box drawn, is painted too; a list of features: a grid
    shown = views.feature_overlay(model, batch, sae, f, example=e, scale=1)
    assert not np.array_equal(np.asarray(shown), np.asarray(batch.images[e][0]))
    tiles = views.feature_overlay(model, batch, sae, [f, 0], example=e, cell=64, cols=2)
    assert tiles.size[0] > 2 * 64 and tiles.size[1] > 64


def test_overlay_paints_every_view_of_a_multi_view_image(tiny_model):
    """LLaVA-NeXT: base view + anyres tiles over one image; a pixel wholly inside one token of
    each view shows the larger of their activations (``combine="max"``), and both views win
    somewhere."""
    model = tiny_model("llava_next")
    w, h = tiny_image_sizes("llava_next")[0]
    batch = model.prepare([noise_image(w, h, 0)], ["what is the color ?"], answers=["red"])
    sae = random_sae(model.cfg.d_model, "blocks.0.hook_resid_post", seed=1)
    img = batch.layout.images[0][0]
    assert len(img.views) > 1
    acts = views.feature_activations(model, batch, sae, list(range(sae.cfg.d_sae)))[0]
    f = int((acts > 0).float().sum(0).argmax())  # a feature active on many tokens
    vals = acts[:, f]
    vmax = float(vals.max())
    out = np.asarray(views.feature_overlay(model, batch, sae, f, image_obj=flat_image(w, h),
                                           draw_boxes=False, scale=1, vmax=vmax)).astype(float)
    boxes, view_of = img.boxes, img.rows.view[img.vision_mask]
    checked, winners = 0, set()
    for y in range(0, h, 3):
        for x in range(0, w, 3):
            inside = ((boxes[:, 0] <= x) & (boxes[:, 2] >= x + 1) & (boxes[:, 1] <= y)
                      & (boxes[:, 3] >= y + 1))
            overlaps = ((boxes[:, 0] < x + 1) & (boxes[:, 2] > x) & (boxes[:, 1] < y + 1)
                        & (boxes[:, 3] > y))
            if not torch.equal(inside, overlaps) or set(view_of[inside].tolist()) != set(
                    range(len(img.views))):
                continue  # on a token edge, or a view does not cover it
            best = int(inside.nonzero()[:, 0][vals[inside].argmax()])
            if len(set(vals[inside].tolist())) == len(vals[inside]):
                winners.add(int(view_of[best]))
            assert np.abs(out[y, x] - painted(float(vals[best]), vmax)).max() <= 1, (x, y)
            checked += 1
    assert checked >= 20 and winners == set(range(len(img.views)))


# --- attribution --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unsure(model):
    """Examples teacher-forcing a wrong colour: the answer's log-prob (~ -13) is far from
    saturated, so its gradient is large enough for finite differences in fp32."""
    exs = zoo.examples("toy-llava", 3, seed=0)
    return model.prepare_examples([dataclasses.replace(
        e, answer="red" if e.answer != "red" else "blue") for e in exs])


@pytest.fixture(scope="module")
def strong(model, unsure, sae):
    """The feature whose attribution sums are furthest from zero in every example (one
    backward gives every feature's attribution)."""
    every = views.feature_attribution(model, unsure, sae, list(range(sae.cfg.d_sae)))
    sums = torch.stack([a.sum(0) for a in every])  # [example, feature]
    return int(sums.abs().min(0).values.argmax())


def _scaled_metric(model, batch, sae, f, scale):
    """answer_logprob with feature f's activation at the vision tokens scaled (``scale``:
    [batch, seq] multipliers), the SAE spliced with its error term."""
    def edit(acts, hook):
        acts = acts.clone()
        acts[..., f] = acts[..., f] * scale.to(acts.dtype)
        return acts

    with torch.no_grad():
        logits = run_with_hooks_with_saes(model, batch, [sae], fwd_hooks=[(ACTS, edit)],
                                          use_error_term=True)
    return answer_logprob(logits, batch).double()


def test_attribution_is_activation_times_gradient_of_a_hand_built_forward(model, unsure, sae,
                                                                          strong):
    """No SAE spliced: the hook point's activation x plus (alpha_p - 1) a_p W_dec[f] at each
    position; d metric / d alpha at alpha = 1 is activation x gradient."""
    f = strong
    got = views.feature_attribution(model, unsure, sae, f)
    explicit = views.feature_attribution(model, unsure, sae, f, metric=answer_logprob)
    alpha = torch.ones(unsure.shape, requires_grad=True)

    def edit(x, hook):
        a = sae.encode(x)[..., f].detach()
        return x + ((alpha - 1) * a)[..., None] * sae.W_dec[f].detach()

    with torch.enable_grad():
        logits = model.run_with_hooks(unsure, fwd_hooks=[(HOOK, edit)])
        (grad,) = torch.autograd.grad(answer_logprob(logits, unsure).sum(), [alpha])
    for e in range(len(unsure)):
        pos = unsure.layout.vision_positions(e)
        assert got[e].shape == (len(pos),)
        torch.testing.assert_close(got[e], explicit[e], rtol=0, atol=0)
        torch.testing.assert_close(got[e], grad[e, pos], rtol=1e-4, atol=1e-7)
    assert max(float(a.abs().max()) for a in got) > 1e-3  # not trivially zero
    many = views.feature_attribution(model, unsure, sae, [3, f])
    torch.testing.assert_close(many[1][:, 1], got[1], rtol=1e-5, atol=1e-8)


def test_attribution_predicts_the_metric_change_of_scaling_the_feature(model, unsure, sae,
                                                                       strong):
    """Central differences: scaling feature f by (1 +- eps) at every vision token changes each
    example's answer log-prob by eps x the sum of its attributions; at one token, by eps x
    that token's."""
    f, eps = strong, 0.05
    attr = views.feature_attribution(model, unsure, sae, f)
    vision = unsure.layout.vision_mask()

    def fd(mask):
        up = _scaled_metric(model, unsure, sae, f, 1 + eps * mask.double())
        down = _scaled_metric(model, unsure, sae, f, 1 - eps * mask.double())
        return (up - down) / (2 * eps)

    total = fd(vision)
    expected = torch.stack([a.sum() for a in attr]).double()
    torch.testing.assert_close(total, expected, rtol=1e-2, atol=1e-5)
    assert expected.abs().min() > 5e-3  # well above the fp32 noise of the differences
    e = int(expected.abs().argmax())
    p = int(attr[e].abs().argmax())
    one = torch.zeros_like(vision)
    one[e, unsure.layout.vision_positions(e)[p]] = True
    torch.testing.assert_close(fd(one)[e], attr[e][p].double(), rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(fd(~one & vision)[e], expected[e] - attr[e][p].double(),
                               rtol=1e-2, atol=1e-5)  # the rest: the other tokens' sum


# --- top-activating patches ---------------------------------------------------------------------
class _Patches(HTMLParser):
    """The ``corelens-patch`` figures of a page: their data attributes and bold caption."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: list[dict] = []
        self._bold = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure" and a.get("class") == "corelens-patch":
            self.figures.append({k[5:]: v for k, v in a.items() if k.startswith("data-")})
        elif tag == "img" and self.figures and "img" not in self.figures[-1]:
            self.figures[-1]["img"] = a.get("src", "")
        self._bold = tag == "b"

    def handle_data(self, data):
        if self._bold and self.figures:
            self.figures[-1]["shown"] = data
        self._bold = False


TOP = 5


@pytest.fixture(scope="module")
def dataset():
    return zoo.examples("toy-llava", 10, seed=3)


@pytest.fixture(scope="module")
def reference(model, dataset, sae):
    """Every vision token's features, from corelens.saes.activations (vision role)."""
    rows = activations(model, dataset, HOOK, roles=("vision",), batch_size=4)
    with torch.no_grad():
        return rows, sae.encode(rows.acts)


@pytest.fixture(scope="module")
def features(reference):
    _, feats = reference
    active = (feats > 0).sum(0)
    chosen = [int(f) for f in torch.nonzero(active >= 2 * TOP)[:, 0][[0, 5, 9]]]
    assert len(chosen) == 3
    return chosen


@pytest.fixture(scope="module")
def patch_page(model, dataset, sae, features, tmp_path_factory):
    path = tmp_path_factory.mktemp("sae-page") / "features.html"
    text = views.feature_patches_html(model, dataset, sae, features, top=TOP, batch_size=4,
                                      path=path)
    return text, path


def test_patches_page_holds_the_top_activations_in_order(model, dataset, sae, features,
                                                         reference, patch_page):
    text, path = patch_page
    assert path.read_text(encoding="utf-8") == text
    parser = _Patches()
    parser.feed(text)
    figs = parser.figures
    assert len(figs) == len(features) * TOP
    assert all(fig["img"].startswith("data:image/png;base64,") for fig in figs)
    rows, feats = reference
    for f in features:
        mine = [fig for fig in figs if int(fig["feature"]) == f]
        assert [int(fig["rank"]) for fig in mine] == list(range(TOP))
        shown = torch.tensor([float(fig["activation"]) for fig in mine], dtype=torch.float64)
        assert (shown[:-1] >= shown[1:]).all() and (shown > 0).all()  # largest first
        col = feats[:, f]
        top = torch.sort(col, descending=True, stable=True).indices[:TOP]
        torch.testing.assert_close(shown, col[top].double(), rtol=1e-6, atol=1e-6)
        assert [(int(fig["example"]), int(fig["position"])) for fig in mine] == [
            (int(rows.example[i]), int(rows.position[i])) for i in top]
        assert [fig["shown"] for fig in mine] == [f"{v:.4g}" for v in shown.tolist()]
    # the crop is the example's own image around the token: one patch, pixel for pixel
    found, stats = views.top_patches(model, dataset, sae, features[:1], 1, batch_size=4)
    (patch,) = found[features[0]]
    original = np.asarray(dataset[patch.example].images[0].convert("RGB"))
    assert stats["tokens"] == len(rows)
    assert np.array_equal(np.asarray(patch.source.convert("RGB")), original)
    x0, y0, x1, y1 = (int(v) for v in patch.box)
    crop = np.asarray(patch.crop(context=0, cell=x1 - x0).convert("RGB"))
    inner = original[y0:y1, x0:x1]
    assert np.array_equal(crop[2:-2, 2:-2], inner[2:-2, 2:-2])  # inside the drawn outline


@pytest.mark.slow
def test_patches_page_renders_offline_in_headless_chromium(features, patch_page):
    import chromium

    if not chromium.available():
        pytest.skip(chromium.INSTALL_HINT)
    _, path = patch_page
    res = chromium.render(path)
    assert res.requests == [] and res.dom["external"] == [], res.requests
    assert res.console_errors == [] and res.exceptions == [], (res.console_errors,
                                                                 res.exceptions)
    n = len(features) * TOP
    assert res.dom["images"] == n and res.dom["images_loaded"] == n
    assert all(w >= 64 and h >= 32 for w, h in res.dom["image_sizes"])
    assert all(f"feature {f}" in res.dom["text"] for f in features)
