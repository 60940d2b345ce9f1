"""Views: circuitsvis attention / token views, image overlays and plots, all offline.

- ``attention_heads``, ``attention_patterns``, ``colored_tokens``: circuitsvis views of a run,
  token labels ``<img 0:r3,c5>`` for image tokens and ``<vid 0:f2-3,1-1.5s,r3,c5>`` for video
  tokens (frames, seconds), query-row choice and vision-token collapse for long sequences;
  ``HTMLView`` objects whose HTML embeds circuitsvis's local bundle.
- ``attention_overlay``, ``overlay_grid``, ``token_overlay``: values per vision token painted
  on the original image through the ``VisionLayout`` boxes (PIL images); with ``video=v`` a
  strip of frame-span tiles (``video_overlays``).
- ``head_heatmap`` / ``ram_heatmap``, ``ablation_curves``, ``patching_heatmap``,
  ``faithfulness_curves``: matplotlib figures.
- ``feature_overlay``, ``feature_attribution``, ``feature_patches_html``: SAE features on the
  image (activation overlays, activation x gradient per vision token, a page of each feature's
  top-activating patches); ``feature_activations``, ``top_patches`` give the numbers.
- ``page`` / ``save_page``: one self-contained HTML page of views, images and figures;
  ``image_html`` / ``figure_html`` / ``save_png`` for single pictures.

Example:
    ```python
    import tempfile
    from pathlib import Path
    from corelens import views, zoo
    from corelens.scores.ram import score_all

    model = zoo.load("toy-llava")
    examples = zoo.examples("toy-llava", 16, seed=0)
    batch = model.prepare_examples(examples[:1])
    heads = views.attention_heads(model, batch, layer=0, collapse="row")  # circuitsvis
    overlay = views.attention_overlay(model, batch, layer=0, head=2)  # a PIL image
    heatmap = views.head_heatmap(score_all(model, examples, progress=False)["ram"])  # a figure
    with tempfile.TemporaryDirectory() as tmp:
        views.save_page([heads, overlay, heatmap], Path(tmp) / "views.html")  # one offline page
    ```
"""

from corelens.views.attention import (
    attention_heads,
    attention_patterns,
    colored_tokens,
    query_patterns,
    token_values,
)
from corelens.views.features import (
    Patch,
    feature_activations,
    feature_attribution,
    feature_overlay,
    feature_patches_html,
    top_patches,
)
from corelens.views.html import (
    HTMLView,
    as_view,
    figure_html,
    image_html,
    page,
    png_bytes,
    save_page,
    save_png,
)
from corelens.views.overlay import (
    attention_overlay,
    grid,
    heat_map,
    overlay_grid,
    paint,
    token_overlay,
    video_overlays,
)
from corelens.views.plots import (
    ablation_curves,
    faithfulness_curves,
    head_heatmap,
    patching_heatmap,
    ram_heatmap,
)
from corelens.views.tokens import TokenGroup, token_groups, token_labels

__all__ = [
    "HTMLView",
    "Patch",
    "TokenGroup",
    "ablation_curves",
    "as_view",
    "attention_heads",
    "attention_overlay",
    "attention_patterns",
    "colored_tokens",
    "faithfulness_curves",
    "feature_activations",
    "feature_attribution",
    "feature_overlay",
    "feature_patches_html",
    "figure_html",
    "grid",
    "head_heatmap",
    "heat_map",
    "image_html",
    "overlay_grid",
    "page",
    "paint",
    "patching_heatmap",
    "png_bytes",
    "query_patterns",
    "ram_heatmap",
    "save_page",
    "save_png",
    "token_groups",
    "token_labels",
    "token_overlay",
    "token_values",
    "top_patches",
    "video_overlays",
]
