"""Video for the families that take it: HF parity, layout (painted frames), frame / time ranges,
frame-range evidence and RAM on video batches."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import FAMILY_NAMES, assert_matches_hf, hf_reference, noise_image

from corelens import GroundedExample
from corelens.data.examples import Evidence, Video
from corelens.data.layout import box_overlap_fraction
from corelens.errors import InputError, LayoutError
from corelens.families import FAMILIES
from corelens.scores.ram import RamMetric, RamParams, masses
from corelens.zoo.tiny import tiny_image_sizes

VIDEO = [n for n in FAMILY_NAMES if FAMILIES[n].supports_video]
PROMPTS = ["what happens in the video ?", "what color is the moving square ?"]
ANSWERS = ["red", "blue green"]


def test_the_four_video_families_are_covered():
    assert VIDEO == ["llava_onevision", "qwen2_5_vl", "qwen2_vl", "qwen3_vl"]


def noise_video(w, h, n, seed, **kw):
    rng = np.random.RandomState(seed)
    return Video(rng.randint(0, 256, (n, h, w, 3), dtype=np.uint8), **kw)


def flat_video(w, h, n, color=(128, 128, 128)):
    return np.broadcast_to(np.array(color, dtype=np.uint8), (n, h, w, 3)).copy()


def _videos(name, blank=False):
    """Two videos of different sizes (and, where the family allows, frame counts); the first
    with a known fps and sparse frame indices, the second without."""
    (w0, h0), (w1, h1) = tiny_image_sizes(name)[:2]
    n1 = 5 if name == "llava_onevision" else 4  # OneVision stacks a batch's videos
    if blank:
        return [Video(flat_video(w0, h0, 5), fps=10.0, frame_indices=[0, 10, 20, 30, 40]),
                Video(flat_video(w1, h1, n1))]
    return [noise_video(w0, h0, 5, 0, fps=10.0, frame_indices=[0, 10, 20, 30, 40],
                        total_frames=50),
            noise_video(w1, h1, n1, 1)]


@pytest.mark.parametrize("name", VIDEO)
def test_video_parity_with_hf_batched_padded(name, tiny_folder, tiny_model):
    model = tiny_model(name)
    ref = hf_reference(name, tiny_folder(name))
    batch = model.prepare(None, PROMPTS, answers=ANSWERS, videos=[[v] for v in _videos(name)])
    assert batch.attention_mask.min() == 0, "the batch must be padded to test padding"
    assert "pixel_values_videos" in batch.inputs and "pixel_values" not in batch.inputs
    expected = assert_matches_hf(model, ref, batch)
    with torch.no_grad():
        blank = model(model.prepare(None, PROMPTS, answers=ANSWERS,
                                    videos=[[v] for v in _videos(name, blank=True)]))
    # a dropped video cannot pass: the frames move the logits far beyond the tolerance
    idx, last = torch.arange(len(batch)), batch.last_prompt_positions
    assert (blank[idx, last] - expected[idx, last]).abs().max() > 1e-2


@pytest.mark.parametrize("name", VIDEO)
def test_video_tokens_fill_exactly_the_video_slots(name, tiny_model):
    model = tiny_model(name)
    videos = _videos(name)
    batch = model.prepare(None, PROMPTS, videos=[[v] for v in videos])
    tid = model.family.video_token_id(model.hf_model.config, model.processor)
    for e, video in enumerate(videos):
        lay = batch.layout.video(e, 0)
        assert lay.is_video and lay.n_frames == len(video) and lay.size == video.size
        slots = (batch.input_ids[e] == tid).nonzero().flatten().cpu()
        assert torch.equal(slots, lay.positions.sort().values)
        spans = lay.frame_ranges
        # every frame is seen, spans are ordered and within the video
        assert spans[0, 0] == 0 and spans[-1, 1] == len(video)
        assert (spans[1:, 0] >= spans[:-1, 0]).all() and (spans[:, 1] > spans[:, 0]).all()
        width = 1 if name == "llava_onevision" else 2  # Qwen: temporal patch of 2 frames
        assert int((spans[:, 1] - spans[:, 0]).max()) == width
        covered = torch.zeros(len(video), dtype=torch.bool)
        for a, b in spans.tolist():
            covered[a:b] = True
        assert covered.all()
    # times: known for the video with an fps (frame i shown at frame_indices[i] / fps)
    times = batch.layout.video(0, 0).time_ranges
    spans = batch.layout.video(0, 0).frame_ranges
    shown = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    assert torch.equal(times[:, 0], shown[spans[:, 0]])
    assert torch.equal(times[:, 1], shown[spans[:, 1] - 1])
    assert torch.isnan(batch.layout.video(1, 0).time_ranges).all()


def test_qwen3_vl_timestamps_text_matches_token_times(tiny_model):
    """Qwen3-VL writes ``<t seconds>`` before each temporal slot: the mean time of its frames,
    which must be the midpoint of the layout's time range for that slot's tokens."""
    model = tiny_model("qwen3_vl")
    video = _videos("qwen3_vl")[0]
    batch = model.prepare(None, PROMPTS[:1], videos=[[video]])
    hf_times = model.processor._calculate_timestamps(list(video.frame_indices), video.fps, 2)
    lay = batch.layout.video(0, 0)
    mids = [(v.times[0] + v.times[1]) / 2 for v in lay.views]
    assert mids == pytest.approx(hf_times)
    # and each slot is its own <|vision_start|> ... <|vision_end|> run, text in between
    tok = model.processor.tokenizer
    start, end = (tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>"))
    ids = batch.input_ids[0].cpu()
    for v in range(len(lay.views)):
        pos = lay.positions[lay.rows.view == v]
        assert int(ids[pos.min() - 1]) == start and int(ids[pos.max() + 1]) == end
        assert torch.equal(pos, torch.arange(int(pos.min()), int(pos.max()) + 1))


def test_qwen2_5_vl_mrope_temporal_ids_follow_token_times(tiny_model):
    """Qwen2.5-VL's temporal M-RoPE id of slot t is t * second_per_grid_ts * tokens_per_second;
    with evenly spaced frames that is (the slot's first time - the first slot's) * tps."""
    model = tiny_model("qwen2_5_vl")
    video = _videos("qwen2_5_vl")[0]  # frames at 0, 1, 2, 3, 4 s
    batch = model.prepare(None, PROMPTS[:1], videos=[[video]])
    assert batch.inputs["second_per_grid_ts"].tolist() == [2.0]  # 2 frames / (1 frame / s)
    tps = model.hf_model.config.vision_config.tokens_per_second
    lay = batch.layout.video(0, 0)
    temporal = batch.inputs["position_ids"][0, 0, lay.vision_positions.to(model.device)].cpu()
    times = lay.time_ranges[:, 0]
    assert torch.equal(temporal - temporal[0], ((times - times[0]) * tps).long())
    assert len(set(temporal.tolist())) == 3  # three temporal slots


@pytest.mark.parametrize("total", [None, 1000])
def test_qwen2_5_vl_temporal_ids_follow_sparse_frames_from_a_segment(total, tiny_model):
    """Frames every 10th source frame from a segment of a longer video (VidSTG-style): the
    temporal ids still follow the frames' own times (HF would take 5 / total * fps as the
    sampling rate; corelens hands it the frames' own)."""
    model = tiny_model("qwen2_5_vl")
    rng = np.random.RandomState(0)
    video = Video(rng.randint(0, 256, (5, 48, 64, 3), dtype=np.uint8), fps=10.0,
                  frame_indices=[100, 110, 120, 130, 140], total_frames=total)
    batch = model.prepare(None, PROMPTS[:1], videos=[[video]])
    assert batch.inputs["second_per_grid_ts"].tolist() == [2.0]  # 2 frames, one per second
    tps = model.hf_model.config.vision_config.tokens_per_second
    lay = batch.layout.video(0, 0)
    temporal = batch.inputs["position_ids"][0, 0, lay.vision_positions.to(model.device)].cpu()
    times = lay.time_ranges[:, 0]
    assert times[0] == 10.0
    assert torch.equal(temporal - temporal[0], ((times - times[0]) * tps).long())


@pytest.mark.parametrize("name", VIDEO)
def test_image_and_videos_in_one_example(name, tiny_folder, tiny_model):
    """An image and a video in one example, two videos in another: layouts in prompt order,
    images first in ``layout.images``, logits equal to HF's."""
    model = tiny_model(name)
    ref = hf_reference(name, tiny_folder(name))
    (w0, h0), (w1, h1) = tiny_image_sizes(name)[:2]
    n = 4
    v0, v1, v2 = (noise_video(w, h, n, s) for s, (w, h) in enumerate([(w1, h1), (w0, h0),
                                                                        (w1, h1)]))
    batch = model.prepare([[noise_image(w0, h0, 5)], []],
                          ["compare <image> with <video> ?", "is <video> like <video> ?"],
                          answers=["red", "blue"], videos=[[v0], [v1, v2]],
                          boxes=[[Evidence.in_frames(0, (1, 3), (0, 0, w1 // 2, h1 // 2))],
                                 [Evidence.in_frame(1, 0, (0, 0, w1, h1))]])
    img, vid = batch.layout.images[0]
    assert not img.is_video and vid.is_video and batch.layout.image(0, 0) is img
    assert img.positions.max() < vid.positions.min()
    a, b = batch.layout.video(1, 0), batch.layout.video(1, 1)
    assert a.positions.max() < b.positions.min() and b.size == (w1, h1)
    ev0 = set(batch.evidence_positions(0).tolist())
    assert ev0 and ev0 <= set(vid.vision_positions.tolist())
    ev1 = set(batch.evidence_positions(1).tolist())
    in_frame0 = b.vision_positions[b.frame_ranges[:, 0] == 0]
    assert ev1 == set(in_frame0.tolist())  # the whole frame, frame 0 only
    with torch.no_grad():
        expected = ref(**batch.inputs).logits
        got = model(batch)
    real = batch.attention_mask.bool()
    assert (got - expected)[real].abs().max() < 1e-4


def _lm_video_inputs(model, video):
    batch = model.prepare(None, ["describe the video"], videos=[[video]])
    _, cache = model.run_with_cache(batch, names_filter="blocks.0.hook_resid_pre")
    pos = batch.layout.vision_positions(0)
    return batch, cache["blocks.0.hook_resid_pre"][0, pos.to(model.device)]


@pytest.mark.parametrize("name", VIDEO)
def test_painted_box_in_frames_changes_exactly_its_tokens(name, tiny_model):
    """Paint a 2x2-token box in frames [1, 3) only: the tokens that see one of those frames
    AND whose box covers the paint move; every token of other frames, and every token away from
    the box, stays put. The moved set is what ``positions_in_box(video=, frames=)`` maps."""
    model = tiny_model(name, patch_local=True)
    frames = (1, 3)
    for w, h in tiny_image_sizes(name)[:2]:
        base = flat_video(w, h, 6)
        batch, before = _lm_video_inputs(model, Video(base))
        lay = batch.layout.video(0, 0)
        boxes, spans = lay.boxes, lay.frame_ranges
        widths = boxes[:, 2] - boxes[:, 0]
        mids = (boxes[:, :2] + boxes[:, 2:]) / 2
        t = int((mids - torch.tensor([w / 2, h / 2])).norm(dim=1).argmin())
        x0, y0, x1, y1 = boxes[t].tolist()
        tw, th = x1 - x0, y1 - y0
        region = torch.tensor([round(x0), round(y0), round(min(x1 + tw, w)),
                               round(min(y1 + th, h))], dtype=torch.float)
        painted = base.copy()
        r = [int(v) for v in region.tolist()]
        painted[frames[0]:frames[1], r[1]:r[3], r[0]:r[2]] = (250, 20, 20)
        _, after = _lm_video_inputs(model, Video(painted))
        change = (after - before).norm(dim=-1).cpu()
        change = change / change.max()
        sees = (spans[:, 0] < frames[1]) & (spans[:, 1] > frames[0])
        frac = box_overlap_fraction(boxes, region)
        margin = 0.5 * float(widths.median())
        far = box_overlap_fraction(boxes, region + torch.tensor([-margin, -margin, margin,
                                                                 margin])) == 0
        hit = sees & (frac >= 0.5)
        assert hit.sum() >= 2, (name, (w, h))
        assert (change[hit] > 0.3).all(), (name, (w, h), change[hit])
        assert (change[~sees | far] < 0.05).all(), (name, (w, h), change[~sees | far].max())
        # other frames: exactly zero (no mixing across temporal slots / frames)
        assert change[~sees].max() == 0
        mapped = batch.layout.positions_in_box(0, region.tolist(), video=0, frames=frames)
        assert set(mapped.tolist()) == set(lay.vision_positions[hit].tolist())


def _video_examples(name):
    (w0, h0), (w1, h1) = tiny_image_sizes(name)[:2]
    return [
        GroundedExample([], "what moves in the video ?", "red", id="v0",
                        videos=[noise_video(w0, h0, 6, 0, fps=2.0)],
                        boxes=[Evidence.in_frames(0, (2, 4), (0, 0, w0 // 2, h0 // 2))],
                        distractors=[Evidence.in_frames(0, (0, 2), (w0 // 2, h0 // 2, w0, h0))]),
        GroundedExample([noise_image(w1, h1, 3)], "is <image> in <video> ? yes or no ?",
                        "blue green", id="v1", videos=[noise_video(w1, h1, 6, 1)],
                        boxes=[Evidence.in_frame(0, 5, (0, 0, w1, h1 // 2)),
                               Evidence.in_image(0, (0, 0, w1 // 2, h1))]),
    ]


@pytest.mark.parametrize("name", VIDEO)
def test_fast_ram_equals_hook_pattern_ram_on_videos(name, tiny_model):
    model = tiny_model(name)
    batch = model.prepare_examples(_video_examples(name))
    assert batch.attention_mask.min() == 0
    metric = RamMetric(model)
    with metric.attach(batch):
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n.endswith("hook_pattern"))
    for e, reg in enumerate(metric.regions):
        assert set(reg.evidence.tolist()) == set(batch.evidence_positions(e).tolist())
        for layer in range(model.cfg.n_layers):
            pattern = cache[f"blocks.{layer}.attn.hook_pattern"][e][:, reg.queries]
            ref = masses(pattern, reg)
            for k in ("ram", "visual_mass", "sink_mass", "spatial_entropy"):
                assert torch.allclose(metric.token_level[e][k][layer], ref[k].cpu(),
                                      atol=1e-5), (k, layer)
    # V_e of the mixed example holds the image's and the video's tokens
    v1 = set(metric.regions[1].vision.tolist())
    assert v1 == set(batch.layout.images[1][0].vision_positions.tolist()) | set(
        batch.layout.video(1, 0).vision_positions.tolist())


def test_frame_range_evidence_by_hand(tiny_model):
    """Qwen2-VL, a 6-frame 80x50 video: resized to 80x48, 3x5 tokens of 16x16 resized px
    (16 x 16.67 original px) per temporal slot of 2 frames, slots at vision-token offsets
    0, 15, 30. Box (0, 0, 32, 20) covers cols 0-1 of row 0 wholly and 3.33 / 16.67 = 0.2 of row
    1; frames [2, 4) are slot 1 only: R_e = offsets 15, 16. Frames [1, 3) touch slots 0 and 1:
    offsets 0, 1, 15, 16. One frame, 5, is slot 2: offsets 30, 31."""
    model = tiny_model("qwen2_vl")
    ex = GroundedExample([], "what is it ?", "red", videos=[noise_video(80, 50, 6, 0)],
                         boxes=[Evidence.in_frames(0, (2, 4), (0, 0, 32, 20))])
    batch = model.prepare_examples([ex])
    vis = batch.layout.video(0, 0).vision_positions
    assert len(vis) == 45
    assert batch.evidence_positions(0).tolist() == vis[[15, 16]].tolist()
    lay = batch.layout
    assert lay.positions_in_box(0, (0, 0, 32, 20), video=0, frames=(1, 3)).tolist() == \
        vis[[0, 1, 15, 16]].tolist()
    assert lay.positions_in_box(0, (0, 0, 32, 20), video=0, frames=(5, 6)).tolist() == \
        vis[[30, 31]].tolist()
    assert lay.positions_in_frames(0, 0, (2, 3)).tolist() == vis[15:30].tolist()
    metric = RamMetric(model, RamParams())
    with metric.attach(batch), torch.no_grad():
        model(batch)
    assert metric.regions[0].evidence.tolist() == vis[[15, 16]].tolist()
    # a track: frame 1 (slot 0) box (0, 0, 32, 20) -> offsets 0, 1; frame 4 (slot 2) box
    # (48, 30, 80, 50): cols 3-4, row 2 wholly (row 1 only 0.2) -> offsets 30 + 10 + 3, 4
    track = Evidence.in_track(0, {1: (0, 0, 32, 20), 4: (48, 30, 80, 50)})
    assert track.frames == (1, 5) and track.box == (0, 0, 80, 50)
    ex.boxes = [track]
    batch = model.prepare_examples([ex])
    assert batch.evidence_positions(0).tolist() == vis[[0, 1, 43, 44]].tolist()


def test_video_evidence_errors(tiny_model):
    model = tiny_model("qwen2_vl")
    vid = noise_video(80, 50, 6, 0)
    img = noise_image(40, 30, 1)

    def ex(box, **kw):
        return GroundedExample([img], "q ?", "a", [box], id="x", videos=[vid], **kw)

    with pytest.raises(InputError, match=r"'x'.*frame range \[4, 8\) lies outside video 0.*6 fr"):
        ex(Evidence.in_frames(0, (4, 8), (0, 0, 10, 10))).validate()
    with pytest.raises(InputError, match=r"'x'.*frame range \[3, 3\)"):
        ex(Evidence.in_frames(0, (3, 3), (0, 0, 10, 10))).validate()
    with pytest.raises(InputError, match=r"'x'.*refers to video 1.*1 video"):
        ex(Evidence.in_frames(1, (0, 1), (0, 0, 10, 10))).validate()
    with pytest.raises(InputError, match=r"'x'.*outside the frames of video 0 of size 80x50"):
        ex(Evidence.in_frame(0, 2, (0, 0, 81, 10))).validate()
    with pytest.raises(InputError, match=r"'x'.*outside page 0 of size 40x30"):
        ex(Evidence.on_page(0, (0, 0, 50, 10))).validate()
    with pytest.raises(InputError, match=r"'x'.*refers to page 2, but the example has 1 image"):
        ex(Evidence.on_page(2, (0, 0, 5, 5))).validate()
    with pytest.raises(InputError, match=r"'x'.*frame range \[6, 7\) lies outside video 0"):
        ex(Evidence.in_track(0, {2: (0, 0, 5, 5), 6: (0, 0, 5, 5)})).validate()
    with pytest.raises(InputError, match=r"'x'.*\(0.0, 0.0, 5.0, 60.0\) lies outside the frames"):
        ex(Evidence.in_track(0, {2: (0, 0, 5, 5), 3: (0, 0, 5, 60)})).validate()
    with pytest.raises(InputError, match="no image or video"):
        GroundedExample([], "q ?", "a", [(0, 0, 1, 1)]).validate()
    with pytest.raises(InputError, match="one size"):
        Video([noise_image(8, 8, 0), noise_image(8, 9, 0)])
    # prepare checks the same, and the layout's own maps do too
    with pytest.raises(InputError, match=r"example 0: evidence frame range \[5, 7\) lies outside"):
        model.prepare(None, ["q ?"], boxes=[[Evidence.in_frames(0, (5, 7), (0, 0, 5, 5))]],
                      videos=[[vid]])
    with pytest.raises(InputError, match="example 0: evidence box .* outside the frames "
                                         "of video 0 "):
        model.prepare(None, ["q ?"], boxes=[[Evidence.in_frames(0, (0, 2), (0, 0, 90, 5))]],
                      videos=[[vid]])
    batch = model.prepare([[img]], ["<image> <video> ?"], videos=[[vid]])
    with pytest.raises(LayoutError, match=r"video 0: frame range \[0, 9\) lies outside .* 6 "):
        batch.layout.positions_in_box(0, (0, 0, 5, 5), video=0, frames=(0, 9))
    with pytest.raises(LayoutError, match=r"video 0: frame range \[3, 3\) is empty"):
        batch.layout.positions_in_box(0, (0, 0, 5, 5), video=0, frames=(3, 3))
    with pytest.raises(LayoutError, match="needs a video"):
        batch.layout.positions_in_box(0, (0, 0, 5, 5), image=0, frames=(0, 1))
    with pytest.raises(LayoutError, match="has 1 video"):
        batch.layout.video(0, 1)
    with pytest.raises(InputError, match="marks 0 video"):
        model.prepare([[img]], ["<image> only ?"], videos=[[vid]])
    # a verbatim prompt needs the family's own video token once per video
    raw = "<|vision_start|><|video_pad|><|vision_end|> q ?"
    verbatim = model.prepare(None, [raw], videos=[[vid]], chat_template=False)
    assert len(verbatim.layout.video(0, 0).vision_positions) == 45
    with pytest.raises(InputError, match="has no video placeholder but 1 video"):
        model.prepare(None, ["q ?"], videos=[[vid]], chat_template=False)


def test_families_without_video_and_onevision_frame_counts(tiny_model):
    with pytest.raises(InputError, match="llava family does not take videos"):
        tiny_model("llava").prepare(None, ["q ?"], videos=[[noise_video(32, 32, 2, 0)]])
    with pytest.raises(InputError, match=r"same number of frames; got \[4, 5\]"):
        tiny_model("llava_onevision").prepare(
            None, ["q ?", "q ?"], videos=[[noise_video(32, 32, 4, 0)], [noise_video(32, 32, 5, 0)]])


def test_evidence_is_an_image_box_pair_and_round_trips():
    ev = Evidence.in_image(1, (0, 0, 4, 4))
    assert ev == (1, (0.0, 0.0, 4.0, 4.0)) and ev.kind == "image"
    i, box = Evidence.in_frames(2, (3, 5), (1, 2, 3, 4))
    assert i is None and box == (1.0, 2.0, 3.0, 4.0)
    # equality sees the frames / video / kind, not just the (image, box) pair
    assert Evidence.in_frames(2, (3, 5), box) != Evidence.in_frames(2, (3, 6), box)
    assert Evidence.in_frames(2, (3, 5), box) != (None, box)
    assert Evidence.on_page(1, box) != Evidence.in_image(1, box)
    assert Evidence.in_image(1, box) == (1, box) and len({ev, Evidence.in_image(1, box)}) == 2
    for e in (ev, Evidence.on_page(3, (0, 0, 2, 2)), Evidence.in_frames(2, (3, 5), (1, 2, 3, 4)),
              Evidence.in_image(0, (1, 1, 2, 2)),
              Evidence.in_track(1, {3: (0, 0, 2, 2), 7: (1, 1, 3, 3.5)})):
        back = Evidence.from_json(json.loads(json.dumps(e.to_json())))
        assert back == e and back.kind == e.kind and back.frames == e.frames
        assert back.video == e.video and back.track == e.track
    assert Evidence.from_json({"video": 0, "frame": 4, "box": [0, 0, 1, 1]}).frames == (4, 5)
    import pickle

    p = pickle.loads(pickle.dumps(Evidence.in_frames(1, (0, 2), (0, 0, 1, 1))))
    assert p.video == 1 and p.frames == (0, 2)


def ramp_video(w: int, h: int, n: int) -> Video:
    """Red / green: ramps of the original x / y; blue: 40 x the frame index."""
    f = np.zeros((n, h, w, 3), dtype=np.uint8)
    f[..., 0] = np.round((np.arange(w) + 0.5) / w * 255)[None, None, :]
    f[..., 1] = np.round((np.arange(h) + 0.5) / h * 255)[None, :, None]
    f[..., 2] = (np.arange(n) * 40)[:, None, None]
    return Video(f)


def _token_pixels(name, cfg, proc, inputs):
    """Per video feature row of video 0 in the batch, the mean raw (r, g, b) of the pixels the
    model folds into it, computed from the processor's own output (NaN for the newline)."""
    vp = proc.video_processor
    mean = torch.tensor(vp.image_mean, dtype=torch.float64)
    std = torch.tensor(vp.image_std, dtype=torch.float64)
    pv = inputs["pixel_values_videos"].double()
    if name == "llava_onevision":  # [videos, frames, 3, H, W] -> SigLIP patches -> apply_pooling
        import torch.nn.functional as F

        vc = cfg.vision_config
        raw = (pv[0] * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)) * 255
        cells = F.avg_pool2d(raw, vc.patch_size)  # [frames, 3, side, side]
        side = cells.shape[-1]
        pooled = F.interpolate(cells, size=[-(-side // 2)] * 2, mode="bilinear")
        rows = pooled.permute(0, 2, 3, 1).reshape(-1, 3)
        return torch.cat([rows, torch.full((1, 3), float("nan"), dtype=torch.float64)])
    # Qwen: [patches, C * tp * p * p], patches in (t, block row, block col, mh, mw) order
    t, gh, gw = inputs["video_grid_thw"][0].tolist()
    p, tp, m = vp.patch_size, vp.temporal_patch_size, vp.merge_size
    patches = pv[: t * gh * gw].view(-1, 3, tp, p, p)
    raw = (patches * std.view(1, 3, 1, 1, 1) + mean.view(1, 3, 1, 1, 1)) * 255
    per_patch = raw.mean(dim=(2, 3, 4))  # [patches, 3]
    return per_patch.view(-1, m * m, 3).mean(1)  # one LM token per merge block


@pytest.mark.parametrize("size", [(80, 50), (40, 90), (31, 57), (130, 40)])
@pytest.mark.parametrize("name", VIDEO)
def test_video_geometry_against_processor_pixels(name, size, tiny_folder):
    """A ramp video through the real processor: every token's pixels must have their centre at
    the centre of its box, and their frame (blue / 40) at the mean of its frame range."""
    from transformers import AutoConfig, AutoProcessor

    folder = tiny_folder(name)
    cfg = AutoConfig.from_pretrained(folder)
    proc = AutoProcessor.from_pretrained(folder)
    w, h = size
    video = ramp_video(w, h, 5)
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "q"}]}],
        add_generation_prompt=True, tokenize=False)
    inputs = proc(text=[text], videos=[video.array()], video_metadata=[video.metadata()],
                  do_sample_frames=False, return_tensors="pt")
    rows = FAMILIES[name].video_feature_rows(cfg, proc, inputs, 0, size, 5, None)
    pix = _token_pixels(name, cfg, proc, inputs)
    assert len(rows) == len(pix)
    vision = rows.kind == 0
    assert torch.isnan(pix[~vision]).all() and not torch.isnan(pix[vision]).any()
    boxes = rows.boxes().double()[vision]
    x, y, frame = pix[vision, 0] * w / 255, pix[vision, 1] * h / 255, pix[vision, 2] / 40
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    err_x = ((x - (boxes[:, 0] + boxes[:, 2]) / 2).abs() / bw).max()
    err_y = ((y - (boxes[:, 1] + boxes[:, 3]) / 2).abs() / bh).max()
    assert err_x < 0.12 and err_y < 0.12, (float(err_x), float(err_y))
    spans = torch.tensor([list(rows.views[v].frames) for v in rows.view[vision].tolist()])
    # a Qwen slot past the last frame repeats it: the mean of the frames it actually holds
    assert torch.allclose(frame, (spans[:, 0] + spans[:, 1] - 1).double() / 2, atol=0.02)


@pytest.mark.parametrize("name", VIDEO)
def test_repeated_video_batch_gives_the_same_logits(name, tiny_model):
    """``repeat_batch`` (what batched patching sweeps run) stacks videos and their extras
    (``video_grid_thw``, ``second_per_grid_ts``, M-RoPE ids) in example order."""
    from corelens.data.batch import repeat_batch

    model = tiny_model(name)
    batch = model.prepare(None, PROMPTS, answers=ANSWERS, videos=[[v] for v in _videos(name)])
    twice = repeat_batch(batch, 2)
    assert len(twice.videos) == 4 and twice.layout.video(3, 0).n_frames == len(batch.videos[1][0])
    with torch.no_grad():
        one, two = model(batch), model(twice)
    real = batch.attention_mask.bool()
    for k in range(2):
        assert (two[2 * k: 2 * k + 2] - one)[real].abs().max() < 1e-4
    assert torch.equal(twice.layout.vision_positions(2),
                       batch.layout.vision_positions(0))


def _real_settings(name):
    """Config + video processor of the real checkpoints (defaults of the HF classes: OneVision
    384 px SigLIP with 14-px patches -> 27 per side, pooled to 14, an odd side; Qwen 14-px
    (Qwen3-VL: 16-px) patches, 2x2 merge, real pixel budgets). No weights."""
    from types import SimpleNamespace

    import transformers as tf
    from transformers.models.llava_onevision.video_processing_llava_onevision import (
        LlavaOnevisionVideoProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    if name == "llava_onevision":
        cfg = tf.LlavaOnevisionConfig(vision_feature_select_strategy="full",
                                      vision_config={"model_type": "siglip_vision_model",
                                                     "image_size": 384, "patch_size": 14})
        vp = LlavaOnevisionVideoProcessor()
    elif name == "qwen3_vl":
        cfg, vp = tf.Qwen3VLConfig(), Qwen3VLVideoProcessor()
    else:
        cfg = (tf.Qwen2VLConfig if name == "qwen2_vl" else tf.Qwen2_5_VLConfig)()
        vp = Qwen2VLVideoProcessor(cap_pixels_per_frame=True)
    return cfg, SimpleNamespace(video_processor=vp)


@pytest.mark.parametrize("name", VIDEO)
def test_video_geometry_at_real_settings(name):
    """The ramp-video oracle with the real processors' sizes (no model, no weights)."""
    cfg, proc = _real_settings(name)
    for size in [(320, 180), (150, 260)]:
        w, h = size
        video = ramp_video(w, h, 4)
        inputs = proc.video_processor(videos=[video.array()], video_metadata=[video.metadata()],
                                      do_sample_frames=False, return_tensors="pt")
        rows = FAMILIES[name].video_feature_rows(cfg, proc, inputs, 0, size, 4, None)
        pix = _token_pixels(name, cfg, proc, inputs)
        assert len(rows) == len(pix), (name, size)
        vision = rows.kind == 0
        boxes = rows.boxes().double()[vision]
        x, y = pix[vision, 0] * w / 255, pix[vision, 1] * h / 255
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        err_x = ((x - (boxes[:, 0] + boxes[:, 2]) / 2).abs() / bw).max()
        err_y = ((y - (boxes[:, 1] + boxes[:, 3]) / 2).abs() / bh).max()
        assert err_x < 0.12 and err_y < 0.12, (name, size, float(err_x), float(err_y))


@pytest.mark.parametrize("name", VIDEO)
def test_greedy_generation_on_video_equals_hf(name, tiny_folder, tiny_model):
    model = tiny_model(name)
    ref = hf_reference(name, tiny_folder(name))
    batch = model.prepare(None, PROMPTS, videos=[[v] for v in _videos(name)])
    got = model.generate(batch, max_new_tokens=4, skip_special_tokens=False)
    inputs = {k: v for k, v in batch.inputs.items() if k != "position_ids"}
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=4, do_sample=False,
                           pad_token_id=model.tokenizer.pad_token_id)
    expected = model.tokenizer.batch_decode(out[:, batch.seq_len:], skip_special_tokens=False)
    assert got == expected


@pytest.mark.parametrize("name", VIDEO)
def test_hybrid_attention_on_video_equals_masked_reference(name, tiny_model):
    """CoRe-guided hybrid attention on a padded batch of two videos (an image beside a video in
    a third example): the logits equal those of the model run with the per-head key mask
    ``allowed`` (streaming heads: sinks + window + text, the video tokens counting as vision),
    and that mask changes the logits. LLaVA-OneVision also decodes with the hybrid KV cache."""
    from test_accel import TOL, _hybrid_prefill, _masked, _random_heads

    from corelens.accel import HybridAttention

    model = tiny_model(name)
    (w0, h0), _ = tiny_image_sizes(name)[:2]
    videos = _videos(name)
    batch = model.prepare([[], [], [noise_image(w0, h0, 7)]],
                          PROMPTS + ["is <image> in <video> ?"], answers=ANSWERS + ["blue"],
                          videos=[[v] for v in videos] + [[videos[0]]])
    assert batch.attention_mask.min() == 0 and "pixel_values_videos" in batch.inputs
    vision = batch.layout.vision_mask()
    for e in range(3):  # every video token is a vision token of the plan
        assert vision[e, batch.layout.video(e, 0).vision_positions].all()
    valid = batch.attention_mask.bool()
    for seed, n in ((0, 1), (1, 3)):
        hybrid = HybridAttention(model, _random_heads(model, n, seed), n_sink=2, window=5)
        got, ref, plain = _hybrid_prefill(model, batch, hybrid)
        assert (got - ref)[valid].abs().max() < TOL, (name, seed)
        assert (plain - ref)[valid].abs().max() > 1e-3  # the restriction did something
    if name != "llava_onevision":
        return
    one = model.prepare(None, PROMPTS[:1], videos=[[videos[0]]])
    n = 3
    hybrid = HybridAttention(model, _random_heads(model, 2, 1), n_sink=2, window=5)
    toks, logits = hybrid.generate(one, max_new_tokens=n, return_logits=True)
    ids = torch.cat([one.input_ids, toks[:, :-1]], 1)
    t = one.seq_len
    kw = {k: v for k, v in one.model_kwargs().items()
          if k not in ("attention_mask", "position_ids")}
    with torch.no_grad(), _masked(model, hybrid.allowed(one, seq_len=t + n - 1)):
        ref = model.hf_model(input_ids=ids, **kw, use_cache=False).logits
    assert (logits - ref[:, t - 1:]).abs().max() < TOL


def test_kang_entropy_of_a_video_weighs_frame_spans_by_mass(tiny_model):
    """Qwen2-VL, a 6-frame 80x50 video: 3 frame spans of 3x5 tokens, each its own grid. Row 0:
    nothing on span 0, 0.5 on one cell of span 1 (one blob: entropy 0), 0.125 on each of two
    far-apart cells of span 2 (two blobs: ln 2), the rest on the sink: the mass-weighted mean is
    (0.5 * 0 + 0.25 * ln 2) / 0.75 = ln 2 / 3 (the first span alone would say 0: nothing there).
    Row 1: two blobs in span 0 only: ln 2. An example with an image (and a video) keeps the
    image's first view as the one grid."""
    from corelens.scores.ram import example_regions

    model = tiny_model("qwen2_vl")
    ex = GroundedExample([], "what is it ?", "red", videos=[noise_video(80, 50, 6, 0)],
                         boxes=[Evidence.in_frames(0, (2, 4), (0, 0, 32, 20))])
    batch = model.prepare_examples([ex])
    reg = example_regions(batch, RamParams(kang_entropy=True))[0]
    vis = batch.layout.video(0, 0).vision_positions
    assert len(reg.grids) == 3
    for k, (pos, rr, cc, n_r, n_c) in enumerate(reg.grids):
        assert pos.tolist() == vis[15 * k:15 * (k + 1)].tolist() and (n_r, n_c) == (3, 5)
        assert rr.tolist() == [r for r in range(3) for _ in range(5)]
        assert cc.tolist() == list(range(5)) * 3
    rows = torch.zeros(1, 2, batch.seq_len)
    rows[0, 0, reg.sink] = 0.25
    rows[0, 0, vis[15 + 7]] = 0.5  # span 1, r1 c2
    rows[0, 0, vis[30]] = rows[0, 0, vis[44]] = 0.125  # span 2, r0 c0 and r2 c4
    rows[0, 1, vis[0]] = rows[0, 1, vis[14]] = 0.5  # span 0, r0 c0 and r2 c4
    got = masses(rows, reg)["kang_spatial_entropy"][0]
    assert got.tolist() == pytest.approx([math.log(2) / 3, math.log(2)])
    mixed = model.prepare_examples(_video_examples("qwen2_vl")[1:])
    (grid,) = example_regions(mixed, RamParams(kang_entropy=True))[0].grids
    img = mixed.layout.image(0, 0)
    assert grid[0].tolist() == img.positions[(img.rows.kind == 0) & (img.rows.view == 0)].tolist()


def test_report_on_video_examples(tiny_model, tmp_path):
    """The whole study (scores, ablation, overlays of the CoRe heads on the first example --
    here a video) runs on video examples and writes its page."""
    from corelens.report import run_study

    model = tiny_model("qwen2_vl")
    summary = run_study(model, _video_examples("qwen2_vl"), tmp_path, fracs=(0.05,),
                        seeds=(0,), batch_size=2)
    assert summary["scoring"]["n"] == summary["evaluation"]["n"] == 1  # a seeded split
    html = (tmp_path / "report.html").read_text()
    assert html.count('class="corelens-image"') >= 1


@pytest.mark.parametrize("name", VIDEO)
def test_batched_patching_of_an_image_and_a_video_equals_one_patch_per_forward(name, tiny_model):
    """The batched sweeps reuse image features only for image-only batches (HF takes encoder
    outputs in place of ALL pixel inputs): with an image and a video in one example the head
    sweep and the stacked attribution copies still run, equal to one head per forward."""
    from corelens.interventions.attribution import atp_star
    from corelens.interventions.patching import answer_logprob, patch_heads

    model = tiny_model(name)
    (w0, h0), (w1, h1) = tiny_image_sizes(name)[:2]

    def pair(seed):
        return model.prepare([[noise_image(w0, h0, seed)]], ["compare <image> with <video> ?"],
                             answers=["red"], videos=[[noise_video(w1, h1, 4, seed)]])
    clean, corrupt = pair(0), pair(1)
    batched = patch_heads(model, clean, corrupt, answer_logprob, heads_per_forward=3)
    loop = patch_heads(model, clean, corrupt, answer_logprob, heads_per_forward=1)
    assert torch.allclose(batched, loop, atol=1e-5)
    assert (batched - batched.mean()).abs().max() > 1e-4  # the heads differ
    star = atp_star(model, clean, corrupt, answer_logprob, copies_per_forward=2)
    assert star.shape == batched.shape and torch.isfinite(star).all()


def test_qwen3_vl_refuses_a_one_frame_video_clearly(tiny_model):
    model = tiny_model("qwen3_vl")
    one = noise_video(40, 40, 1, 0, fps=1.0)
    with pytest.raises(InputError, match="at least 2 frames"):
        model.prepare(None, ["a ?"], videos=[[one]])


def test_generate_wants_at_least_one_new_token(tiny_model):
    from corelens.accel import FastV, HybridAttention

    model = tiny_model("llava")
    w, h = tiny_image_sizes("llava")[0]
    batch = model.prepare([noise_image(w, h, 0)], ["what is it ?"])
    for accel in (HybridAttention(model, [(0, 0)]), FastV(model, k=1)):
        with pytest.raises(InputError, match="max_new_tokens must be >= 1"):
            accel.generate(batch, max_new_tokens=0)
