"""The toy-model recipe: a tiny MLLM trained from scratch on CPU on synthetic scenes.

``Recipe.family`` names the corelens family whose HF model is built. ``Llava.name``:
``LlavaForConditionalGeneration`` with a 1-layer CLIP tower read at
``vision_feature_layer=-2`` (the patch embeddings: each vision token sees only its own 8x8
pixels, so a region is its tokens), a 2-layer MLP projector and a small Llama decoder.
``Qwen2_5_VL.name``: ``Qwen2_5_VLForConditionalGeneration`` with a ``vision_layers``-block
tower whose attention output projections are zeroed and frozen (``patch_local``, as
``corelens.zoo.tiny.build_tiny(..., patch_local=True)``: each LM token depends only on its own
2x2 merged patches), the merger, and a small Qwen2 decoder (GQA with ``kv_heads``).
Data: ``corelens.zoo.scenes`` ("what color is the <shape>"), run through the saved processor
(``corelens.core.prepare``) exactly as ``HookedMLLM.prepare_examples`` does, so the shipped folder
is what was trained. Loss: teacher-forced cross-entropy on the answer tokens only.

Levers (see ``docs/zoo.md``): patch-local vision features, a content query whose key word is
the last prompt token, a curriculum on the number of objects (1-2 first), and optionally a
head-sparsity pressure: ``sparsity * mean over layers of the Hoyer ratio`` of the per-head
output norms at the answer-predicting positions (L1/L2 of the vector of head norms, rescaled to
[0, 1]; scale-invariant, and it does not choose which heads).

Retrieval away from layer 0 (``toy-llava-deep``): ``late_retrieval = K`` keeps text rows (every
non-image position) from reading the image in decoder layers < K during training — by a
penalty on their attention mass there (``late_mode = "penalty"``, eager attention, the shipped
model runs with plain attention and has learned to keep that mass at ~0), or by masking it out
(``"knockout"``, until ``late_release``, then the penalty). ``init_from`` starts the model from
a shipped one, its decoder layers moved up by ``init_offset`` (``init_from_shipped``).

Every run is reproducible from its seed: the model init, and example ``i`` of step ``s`` is
drawn from a seed derived from ``(seed, s, i)``. Checkpoints (``ckpt.pt``) are written every
``ckpt_every`` steps and a rerun with the same ``out`` resumes from the last one.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from corelens import compat
from corelens.core.prepare import prepare
from corelens.errors import InputError
from corelens.families import family_for_config
from corelens.families.llava import Llava
from corelens.families.qwen_vl import Qwen2_5_VL
from corelens.zoo import path as zoo_path
from corelens.zoo.scenes import (
    TRAIN_SEEDS_END,
    TRAIN_SEEDS_START,
    SceneTask,
    make_example,
    make_examples,
)
from corelens.zoo.tiny.qwen_vl import token_ids
from corelens.zoo.tokenizer import build_tokenizer

# a minimal chat template: the prompt is "<image> question" and the answer follows it, so the
# query word is the last prompt token (no role words after it)
TOY_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{% endfor %}"
)

# the same for Qwen-VL: its processor expands <|image_pad|> between the vision start/end markers
QWEN_TOY_CHAT_TEMPLATE = TOY_CHAT_TEMPLATE.replace(
    "<image> ", "<|vision_start|><|image_pad|><|vision_end|> ")



@dataclass
class Recipe:
    task: SceneTask = field(default_factory=lambda: SceneTask(n_objects=(2, 4)))
    family: str = Llava.name  # the corelens family whose HF model is built (or Qwen2_5_VL.name)
    patch_size: int = 8
    vision_hidden: int = 64
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 256
    kv_heads: int | None = None  # key/value heads (None: as many as heads; fewer: GQA)
    merge: int = 2  # Qwen-VL: merge x merge patches per LM token
    patch_local: bool = True  # Qwen-VL: zero and freeze the vision blocks' attention output
    vision_feature_layer: int = -2  # -2 of a 1-layer tower: the patch embeddings (patch-local)
    vision_layers: int = 1
    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    sparsity: float = 0.0  # weight of the Hoyer head-sparsity pressure (0 = off)
    sparsity_start: int = 1000  # the pressure ramps up linearly from this step ...
    sparsity_ramp: int = 1000  # ... over this many steps (it slows learning if on from the start)
    late_retrieval: int = 0  # K > 0: text -> image attention penalised in decoder layers < K
    late_weight: float = 2.0  # weight of that penalty (mean text -> image attention mass)
    late_mode: str = "penalty"  # or "knockout": text -> image attention masked out in training
    late_release: int = 0  # knockout: from this step on, plain attention + the penalty
    init_from: str = ""  # a shipped toy model whose weights start this one (same task, widths)
    init_offset: int = 0  # ... its decoder layers become layers offset.. ; the ones below start
    # as the identity (attention and MLP output projections zero)
    curriculum_steps: int = 400  # steps per curriculum stage (max objects 2, 3, ... final)
    one_hop_steps: int = 0  # the first steps ask only the task's first question type
    pairs_step: int = 0  # relation scenes have no distractor pairs before this step
    eval_every: int = 250
    eval_examples: int = 256  # held-out examples per evaluation (twice as many at the end)
    ckpt_every: int = 250
    threads: int = 1  # one is faster than two on a 2-core machine with anything else running

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["task"] = self.task.to_dict()
        return d


RECIPES: dict[str, Recipe] = {
    # the demo model: sparsity pressure concentrates retrieval in few heads
    "toy-llava": Recipe(sparsity=0.05),
    # the same without pressure: retrieval spread over redundant heads
    "toy-llava-dense": Recipe(sparsity=0.0),
    # Qwen2.5-VL: 128 px images -> 16x16 8-px patches -> 8x8 = 64 LM tokens after the 2x2
    # merge; each object (24 px in a 32 px cell) spans 2x2 LM tokens; Qwen2 decoder with GQA
    "toy-qwen-vl": Recipe(task=SceneTask(image_size=128, n_objects=(2, 4)),
                          family=Qwen2_5_VL.name, kv_heads=2, sparsity=0.05, steps=2000,
                          sparsity_ramp=500),
    # toy-llava's decoder moved to layers 4-7 under 4 new layers, trained on with text rows'
    # attention to the image penalised in layers 0-3 (``late_retrieval``): retrieval mid-depth
    "toy-llava-deep": Recipe(layers=8, heads=4, intermediate=256, init_from="toy-llava",
                             init_offset=4, late_retrieval=4, late_mode="penalty", steps=1000,
                             lr=5e-4, warmup=50, curriculum_steps=0, sparsity=0.05,
                             sparsity_start=0, sparsity_ramp=1),
    # two hops, no depth lever, from scratch: "what color is left of the <shape>" (the target
    # precedes the anchor in raster order, so under causal masking the anchor's image token can
    # read it). One token per cell (patch 16 on 64 px), two layers. The curriculum: one-hop
    # ``shape`` questions only for ``one_hop_steps``, then half shape questions throughout,
    # distractor pairs (other objects with a left neighbour) from ``pairs_step``. The run sits
    # on the shortcut plateau (~0.6: the colour left of any object) until ~7,000 steps, then
    # climbs; ~25 minutes on one thread (docs/zoo.md)
    "toy-llava-2hop": Recipe(task=SceneTask(n_objects=(2, 4), question_types=("shape", "relation"),
                                            question_weights=(1, 1), relations=("left",),
                                            distractor_pairs=1),
                             patch_size=16, layers=2, steps=12000, one_hop_steps=1500,
                             pairs_step=3000),
}


def build(folder: str | Path, recipe: Recipe, seed: int) -> tuple[Any, Any]:
    """Build the untrained model and its offline processor, saved to ``folder``."""
    try:
        make = _BUILDERS[recipe.family]
    except KeyError:
        raise ValueError(f"no toy recipe for family {recipe.family!r}; "
                         f"choose {' or '.join(_BUILDERS)}") from None
    return make(folder, recipe, seed)


def _build_llava(folder: str | Path, recipe: Recipe, seed: int) -> tuple[Any, Any]:
    """LLaVA: a ``vision_layers``-layer CLIP tower read at ``vision_feature_layer``, the MLP
    projector and a Llama decoder; the processor resizes and centre-crops every image to
    ``image_size``."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    folder = Path(folder)
    task = recipe.task
    tok = build_tokenizer(folder, words=task.words())
    size = task.image_size
    vc = CLIPVisionConfig(hidden_size=recipe.vision_hidden,
                          intermediate_size=2 * recipe.vision_hidden,
                          num_hidden_layers=recipe.vision_layers,
                          num_attention_heads=2, image_size=size, patch_size=recipe.patch_size)
    tc = LlamaConfig(hidden_size=recipe.hidden, intermediate_size=recipe.intermediate,
                     num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
                     num_key_value_heads=recipe.heads, head_dim=recipe.hidden // recipe.heads,
                     vocab_size=len(tok), max_position_embeddings=1024,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vc, text_config=tc,
                      image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=recipe.vision_feature_layer,
                      vision_feature_select_strategy="default",
                      projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    ip = LlavaImageProcessorPil(size={"shortest_edge": size},
                                crop_size={"height": size, "width": size})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=recipe.patch_size,
                          vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=TOY_CHAT_TEMPLATE)
    proc.save_pretrained(folder)
    task.save(folder / "task.json")
    return model, proc


def _build_qwen2_5_vl(folder: str | Path, recipe: Recipe, seed: int) -> tuple[Any, Any]:
    """Qwen2.5-VL: ``vision_layers`` blocks (attention zeroed if ``patch_local``), the merger,
    and a Qwen2 decoder; the processor keeps every image at ``image_size`` pixels."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    folder = Path(folder)
    task = recipe.task
    tok = build_tokenizer(folder, words=task.words())
    size, patch, merge = task.image_size, recipe.patch_size, recipe.merge
    if size % (patch * merge):
        raise ValueError(f"image_size {size} is not a multiple of patch * merge = "
                         f"{patch * merge}")
    head_dim = recipe.hidden // recipe.heads
    q = head_dim // 2  # M-RoPE sections (temporal, height, width) sum to head_dim / 2
    section = [q - 2 * (q * 3 // 8), q * 3 // 8, q * 3 // 8]
    vision = dict(depth=recipe.vision_layers, hidden_size=recipe.vision_hidden,
                  intermediate_size=2 * recipe.vision_hidden, num_heads=2, patch_size=patch,
                  spatial_merge_size=merge, temporal_patch_size=2, out_hidden_size=recipe.hidden,
                  window_size=2 * patch * merge,
                  fullatt_block_indexes=[recipe.vision_layers - 1])
    text = dict(hidden_size=recipe.hidden, intermediate_size=recipe.intermediate,
                num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
                num_key_value_heads=recipe.kv_heads or recipe.heads,
                max_position_embeddings=1024, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": section},
                vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)
    cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=text,
                           tie_word_embeddings=False, **token_ids(tok))
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    if recipe.patch_local:
        with torch.no_grad():
            for blk in model.model.visual.blocks:
                for prm in blk.attn.proj.parameters():
                    prm.zero_()
                    prm.requires_grad_(False)  # stays zero in training
    pixels = size * size  # min = max: the processor keeps the image at image_size
    ip = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=merge, temporal_patch_size=2,
                                  min_pixels=pixels, max_pixels=pixels)
    vp = Qwen2VLVideoProcessor(patch_size=patch, merge_size=merge, temporal_patch_size=2,
                               min_pixels=pixels, max_pixels=pixels)
    proc = Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
                               chat_template=QWEN_TOY_CHAT_TEMPLATE)
    proc.save_pretrained(folder)
    task.save(folder / "task.json")
    return model, proc


# the families a toy recipe can build, by family name
_BUILDERS = {Llava.name: _build_llava, Qwen2_5_VL.name: _build_qwen2_5_vl}


@torch.no_grad()
def init_from_shipped(model: Any, recipe: Recipe) -> None:
    """Copy shipped model ``recipe.init_from`` into ``model`` (LLaVA): vision tower, projector,
    embeddings, final norm and LM head as they are; its decoder layer ``i`` into layer
    ``i + init_offset``; the layers below the offset keep their random init but with zero
    ``o_proj`` and ``down_proj``, so at step 0 the model computes exactly what the shipped one
    does (they add nothing to the residual stream until training moves them)."""
    from transformers import LlavaForConditionalGeneration

    src = LlavaForConditionalGeneration.from_pretrained(zoo_path(recipe.init_from))
    sm, dm = src.model, model.model
    for name in ("vision_tower", "multi_modal_projector"):
        getattr(dm, name).load_state_dict(getattr(sm, name).state_dict())
    dm.language_model.embed_tokens.load_state_dict(sm.language_model.embed_tokens.state_dict())
    dm.language_model.norm.load_state_dict(sm.language_model.norm.state_dict())
    model.lm_head.load_state_dict(src.lm_head.state_dict())
    layers, off = dm.language_model.layers, recipe.init_offset
    if off + len(sm.language_model.layers) != len(layers):
        raise ValueError(f"init_from {recipe.init_from!r}: {len(sm.language_model.layers)} "
                         f"layers + offset {off} != {len(layers)} layers")
    for i, layer in enumerate(sm.language_model.layers):
        layers[i + off].load_state_dict(layer.state_dict())
    for layer in layers[:off]:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def curriculum(recipe: Recipe, step: int) -> SceneTask:
    lo, hi = recipe.task.n_objects
    cur_hi = min(hi, 2 + step // max(1, recipe.curriculum_steps))
    t = SceneTask.from_dict(recipe.task.to_dict())
    t.n_objects = (min(lo, 1) if cur_hi < hi else lo, cur_hi)
    if step < recipe.one_hop_steps:
        t.question_types, t.question_weights = t.question_types[:1], None
    if step < recipe.pairs_step and t.distractor_pairs:
        t.distractor_pairs = 0
    return t


def step_seeds(recipe: Recipe, seed: int, step: int) -> range:
    """The example seeds of training step ``step``: inside the range reserved for training
    streams, which the held-out generators (``make_examples``) refuse."""
    base = TRAIN_SEEDS_START + (seed * 100_003 + step) * recipe.batch_size
    seeds = range(base, base + recipe.batch_size)
    if seeds.stop > TRAIN_SEEDS_END:
        raise InputError(f"training seed {seed} at step {step} leaves the range reserved for "
                         f"training streams (< {TRAIN_SEEDS_END:,}): use a smaller seed")
    return seeds


def step_examples(recipe: Recipe, seed: int, step: int) -> list:
    task = curriculum(recipe, step)
    return [make_example(task, s) for s in step_seeds(recipe, seed, step)]


def encode(hf_model: Any, processor: Any, examples: list) -> Any:
    """Examples -> ``MultimodalBatch`` through the processor (as ``prepare_examples`` does)."""
    return prepare(family_for_config(hf_model.config), hf_model, processor,
                   [e.images for e in examples], [e.question for e in examples],
                   [e.answer for e in examples], [e.boxes for e in examples],
                   distractors=[e.distractors for e in examples],
                   ids=[e.id for e in examples])


def forward_answers(hf_model: Any, batch: Any, capture: list | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits at the query positions [n, vocab], answer tokens [n]) over all answer tokens."""
    out = hf_model(input_ids=batch.input_ids, **batch.model_kwargs())
    rows = torch.cat([torch.full((len(q),), e) for e, q in enumerate(batch.query_positions)])
    cols = torch.cat(batch.query_positions)
    return out.logits[rows, cols], torch.cat(batch.answer_tokens)


def text_to_image_mass(weights: list[torch.Tensor], batch: Any) -> torch.Tensor:
    """Mean attention mass from text rows (valid, non-vision positions) onto the image-feature
    tokens, over the given layers' attention probabilities ``[b, heads, T, T]`` and their heads
    (0 = no text token reads the image in these layers)."""
    vision = batch.layout.vision_mask().to(weights[0].device)  # [b, T]
    rows = batch.attention_mask.bool().to(vision.device) & ~vision
    vals = []
    for a in weights:
        mass = (a * vision[:, None, None, :].to(a.dtype)).sum(-1)  # [b, H, T]
        vals.append(mass.mean(1)[rows].mean())
    return torch.stack(vals).mean()


_KNOCKOUT: dict[str, Any] = {}  # the batch's [b, T] text-row and vision-key masks, layers < K


def _knockout_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                        **kw: Any) -> Any:
    """Eager attention, with text rows' attention to image-feature keys masked out in decoder
    layers < ``_KNOCKOUT['k']`` (training only)."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    neg = torch.finfo(query.dtype).min
    t, n = key.shape[2], query.shape[2]
    if attention_mask is None:  # this interface is not given a mask: build the causal one
        attention_mask = torch.zeros(1, 1, n, t, dtype=query.dtype).masked_fill(
            torch.arange(t)[None, :] > torch.arange(t - n, t)[:, None], neg)
    else:
        attention_mask = attention_mask[..., :t]
    if _KNOCKOUT and getattr(module, "layer_idx", 1 << 30) < _KNOCKOUT["k"]:
        block = _KNOCKOUT["rows"][:, None, :, None] & _KNOCKOUT["vision"][:, None, None, :]
        attention_mask = attention_mask.masked_fill(block, neg)
    return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout,
                                   **kw)


def _knockout(batch: Any, k: int) -> None:
    """Mask text rows' attention to the batch's image tokens in layers < k (k = 0: none)."""
    _KNOCKOUT.clear()
    if k > 0:
        vis = batch.layout.vision_mask().bool()
        _KNOCKOUT.update(k=k, vision=vis, rows=batch.attention_mask.bool() & ~vis)


def hoyer_penalty(acts: list[torch.Tensor], batch: Any, heads: int) -> torch.Tensor:
    """Mean over layers of the rescaled Hoyer ratio (L1/L2 - 1) / (sqrt(H) - 1) of the per-head
    output norms at the query positions (1 = all heads alike, 0 = one head)."""
    rows = torch.cat([torch.full((len(q),), e) for e, q in enumerate(batch.query_positions)])
    cols = torch.cat(batch.query_positions)
    vals = []
    for a in acts:  # [b, t, H*d], the o_proj input
        z = a[rows, cols].view(len(rows), heads, -1)
        n = z.norm(dim=-1)  # [n, H]
        ratio = n.sum(-1) / (n.norm(dim=-1) + 1e-6)
        vals.append(((ratio - 1) / (math.sqrt(heads) - 1)).mean())
    return torch.stack(vals).mean()


@torch.no_grad()
def accuracy(hf_model: Any, processor: Any, task: SceneTask, n: int = 256, seed: int = 12345,
             batch_size: int = 64, knockout: int = 0,
             by_type: dict[str, list[int]] | None = None) -> float:
    """Held-out accuracy; ``by_type`` (if given) collects [right, asked] per question type."""
    hf_model.eval()
    exs = make_examples(task, n, seed=seed)
    good = 0
    for i in range(0, n, batch_size):
        b = encode(hf_model, processor, exs[i:i + batch_size])
        _knockout(b, knockout)
        logits, ans = forward_answers(hf_model, b)
        _KNOCKOUT.clear()
        hit = (logits.argmax(-1) == ans)
        # an example is right when all its answer tokens are
        k = 0
        for ex, q in zip(exs[i:i + batch_size], b.query_positions):
            right = int(hit[k:k + len(q)].all())
            good += right
            k += len(q)
            if by_type is not None:
                counts = by_type.setdefault(ex.metadata["qtype"], [0, 0])
                counts[0] += right
                counts[1] += 1
    return good / n


def train(name: str, out: str | Path, seed: int = 0, steps: int | None = None,
          recipe: Recipe | None = None, progress: bool = True) -> dict[str, Any]:
    """Train ``name``'s recipe into ``out`` (resuming from ``out/ckpt.pt``); returns the log."""
    from tqdm import tqdm

    recipe = copy.deepcopy(recipe or RECIPES[name])
    if steps is not None:
        recipe.steps = steps
    torch.set_num_threads(recipe.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, proc = build(out, recipe, seed)
    if recipe.init_from:
        init_from_shipped(model, recipe)
    trainable = [p for p in model.parameters() if p.requires_grad]  # patch_local: proj frozen
    opt = torch.optim.AdamW(trainable, lr=recipe.lr, weight_decay=recipe.weight_decay,
                            betas=(0.9, 0.98))

    def lr_at(s: int) -> float:
        if s < recipe.warmup:
            return (s + 1) / recipe.warmup
        p = (s - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    log: dict[str, Any] = {"name": name, "seed": seed, "recipe": recipe.to_dict(), "evals": [],
                           "seconds": 0.0}
    start = 0
    ckpt = out / "ckpt.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, log = state["step"], state["log"]
        log["name"], log["recipe"] = name, recipe.to_dict()
        print(f"resuming {name} from step {start}")

    heads = recipe.heads
    acts: list[torch.Tensor] = []
    hooks = []
    if recipe.sparsity > 0:
        for layer in model.model.language_model.layers:
            hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(
                lambda mod, args: acts.append(args[0])))

    probs: list[torch.Tensor] = []
    late_k = recipe.late_retrieval
    knock = late_k > 0 and recipe.late_mode == "knockout"

    def knocking(step: int) -> bool:  # text -> image attention masked out at this step
        return knock and step < recipe.late_release

    def plain_phase() -> None:  # eager attention, the penalty reads its probabilities
        model.set_attn_implementation("eager")
        for layer in model.model.language_model.layers[:late_k]:
            hooks.append(layer.self_attn.register_forward_hook(
                lambda mod, args, out: probs.append(out[1])))

    if knocking(start):
        from transformers import AttentionInterface

        AttentionInterface.register("corelens_knockout", _knockout_attention)
        model.model.language_model.set_attn_implementation("corelens_knockout")
    elif late_k > 0:
        plain_phase()

    t0 = time.time() - log["seconds"]
    bar = tqdm(range(start, recipe.steps), initial=start, total=recipe.steps, desc=name,
               disable=not progress)
    ema = None
    for step in bar:
        model.train()
        batch = encode(model, proc, step_examples(recipe, seed, step))
        acts.clear()
        probs.clear()
        if knock and step == recipe.late_release and step > start:
            plain_phase()  # the knockout ends: plain attention from here on
        _knockout(batch, late_k if knocking(step) else 0)
        logits, ans = forward_answers(model, batch)
        _KNOCKOUT.clear()
        loss = torch.nn.functional.cross_entropy(logits, ans)
        total = loss
        pen = None
        weight = recipe.sparsity * min(1.0, max(0.0, (step - recipe.sparsity_start + 1)
                                                 / max(1, recipe.sparsity_ramp)))
        if recipe.sparsity > 0:
            pen = hoyer_penalty(acts, batch, heads)
            total = loss + weight * pen
        late = None
        if late_k > 0 and not knocking(step):
            late = text_to_image_mass(probs, batch)
            total = total + recipe.late_weight * late
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        lv = float(loss.detach())
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        post = {"loss": f"{ema:.3f}", "objs": curriculum(recipe, step).n_objects[1]}
        if pen is not None:
            post["hoyer"] = f"{float(pen.detach()):.2f}"
        if late is not None:
            post["t2i"] = f"{float(late.detach()):.3f}"
        bar.set_postfix(post)
        done = step + 1
        if done % recipe.eval_every == 0 or done == recipe.steps:
            types: dict[str, list[int]] = {}
            acc = accuracy(model, proc, recipe.task, n=recipe.eval_examples,
                           knockout=late_k if knocking(step) else 0, by_type=types)
            entry = {"step": done, "accuracy": acc, "loss": ema,
                     "seconds": round(time.time() - t0, 1)}
            if len(types) > 1:  # a mixture: each type's accuracy too
                entry["by_type"] = {t: r / a for t, (r, a) in sorted(types.items())}
            log["evals"].append(entry)
            bar.write(f"step {done}: held-out accuracy {acc:.3f} (loss {ema:.3f})"
                      + "".join(f", {t} {v:.3f}" for t, v in entry.get("by_type", {}).items()))
        if done % recipe.ckpt_every == 0 or done == recipe.steps:
            log["seconds"] = round(time.time() - t0, 1)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "step": done, "log": log}, ckpt)
    for h in hooks:
        h.remove()
    if recipe.late_retrieval > 0:
        model.set_attn_implementation("sdpa")  # the shipped model runs with plain attention
    log["seconds"] = round(time.time() - t0, 1)
    log["final_accuracy"] = accuracy(model, proc, recipe.task, n=2 * recipe.eval_examples,
                                     seed=777)
    # bitwise reproduction holds only within one torch / transformers: record them
    log["versions"] = compat.versions()
    model.eval()
    model.save_pretrained(out)
    (out / "train_log.json").write_text(json.dumps(log, indent=2))
    return log


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
