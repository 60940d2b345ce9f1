"""JSONL and RefCOCO loaders, on fixtures built here (tiny PNGs, a RefCOCO-layout folder)."""

from __future__ import annotations

import json
import pickle
import warnings
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from corelens import GroundedExample, InputError, load_jsonl, load_refcoco, save_jsonl


def _png(path, size=(16, 12), colour=(200, 30, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode == "RGB" else 128).save(path)
    return path


def _write(path, records):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def _good(i, image="img/a.png"):
    return {"id": f"q{i}", "image": image, "question": f"what is {i}?", "answer": "red",
            "boxes": [[0, 0, 4, 4]]}


@pytest.fixture
def data(tmp_path):
    _png(tmp_path / "img" / "a.png", (16, 12))
    _png(tmp_path / "img" / "b.png", (10, 20), (0, 0, 255))
    return tmp_path


# ------------------------------------------------------------------------------------ JSONL


def test_relative_paths_and_forms(data, tmp_path):
    f = _write(data / "data.jsonl", [
        {"id": "q1", "images": ["img/a.png"], "question": "Q?", "answer": "A",
         "boxes": [[1, 2, 5, 6]], "distractors": [[8, 0, 16, 12]], "metadata": {"k": 1}},
        {"id": "q2", "image": str(data / "img" / "b.png"), "question": "Q2?", "answer": "B",
         "boxes": [{"image": 0, "box": [0, 0, 10, 20]}]},
    ])
    _png(tmp_path / "elsewhere" / "dummy.png")  # loading must not depend on the cwd
    exs = load_jsonl(f)
    assert [e.id for e in exs] == ["q1", "q2"]
    e1, e2 = exs
    assert e1.images[0].size == (16, 12) and e1.images[0].mode == "RGB"
    assert e1.boxes == [(0, (1.0, 2.0, 5.0, 6.0))]
    assert e1.distractors == [(0, (8.0, 0.0, 16.0, 12.0))]
    assert e1.metadata == {"k": 1} and e2.metadata == {}
    assert e2.images[0].size == (10, 20) and e2.boxes == [(0, (0.0, 0.0, 10.0, 20.0))]


def test_multi_image_per_image_boxes(data):
    f = _write(data / "multi.jsonl", [
        {"id": "m", "images": ["img/a.png", "img/b.png"], "question": "which?", "answer": "b",
         "boxes": [{"image": 1, "box": [0, 10, 10, 20]}, [0, 0, 16, 12]],
         "distractors": [{"image": 1, "box": [0, 0, 10, 10]}]},
    ])
    (ex,) = load_jsonl(f)
    assert [im.size for im in ex.images] == [(16, 12), (10, 20)]
    assert ex.boxes == [(1, (0.0, 10.0, 10.0, 20.0)), (0, (0.0, 0.0, 16.0, 12.0))]
    assert ex.distractors == [(1, (0.0, 0.0, 10.0, 10.0))]
    # a box that fits image 1 (10x20) but not image 0 (16x12) must be checked against image 1
    bad = _write(data / "bad.jsonl", [
        {"id": "m2", "images": ["img/a.png", "img/b.png"], "question": "q", "answer": "a",
         "boxes": [{"image": 0, "box": [0, 0, 10, 20]}]}])
    with pytest.raises(InputError, match=r"line 1 \(id 'm2'\).*outside image 0"):
        load_jsonl(bad)


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
    b = Image.fromarray(rng.integers(0, 255, (20, 10, 3), dtype=np.uint8))
    exs = [
        GroundedExample([a], "q1?", "x", [(0, (1, 2, 3.5, 4))], [(0, (5, 5, 9, 9))], id="one",
                        metadata={"src": "t", "n": [1, 2]}),
        GroundedExample([a, b], "q2?", "y", [(1, (0, 0, 10, 20))], id="two"),
        GroundedExample([b], "q3?", "z", [(0, (0, 0, 2, 2))]),  # no id
    ]
    out = tmp_path / "sub" / "set.jsonl"
    save_jsonl(exs, out)
    pngs = sorted(p.name for p in (tmp_path / "sub" / "set_images").iterdir())
    assert len(pngs) == 2  # each distinct image written once
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(not p.startswith("/") for r in records for p in r["images"])  # relative paths
    back = load_jsonl(out)
    assert len(back) == 3
    for e, r in zip(exs, back):
        assert (r.id, r.question, r.answer, r.boxes, r.distractors, r.metadata) == (
            e.id, e.question, e.answer, e.boxes, e.distractors, e.metadata)
        for im_e, im_r in zip(e.images, r.images):
            assert np.array_equal(np.asarray(im_e), np.asarray(im_r))
    # custom image_dir elsewhere still loads (paths are relative to the JSONL's folder)
    save_jsonl(exs, tmp_path / "x.jsonl", image_dir=tmp_path / "pics" / "deep")
    assert [e.id for e in load_jsonl(tmp_path / "x.jsonl")] == ["one", "two", None]


def test_save_rejects_invalid(tmp_path):
    ex = GroundedExample([Image.new("RGB", (4, 4))], "q", "a", [(0, (0, 0, 8, 8))], id="big")
    with pytest.raises(InputError, match="example 0 \\(id 'big'\\).*outside"):
        save_jsonl([ex], tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()


BAD_LINES = {
    "missing image": ({**_good(0), "image": "img/missing.png"},
                      r"image 'img/missing.png' not found"),
    "box outside": ({**_good(0), "boxes": [[0, 0, 17, 4]]}, r"outside image 0 of size 16x12"),
    "empty answer": ({**_good(0), "answer": "  "}, r"answer is empty"),
    "no answer": ({k: v for k, v in _good(0).items() if k != "answer"}, r"missing field 'answer'"),
    "no boxes": ({k: v for k, v in _good(0).items() if k != "boxes"}, r"missing field 'boxes'"),
    "no image": ({k: v for k, v in _good(0).items() if k != "image"}, r"missing field 'images'"),
    "empty box": ({**_good(0), "boxes": [[3, 3, 3, 5]]}, r"is empty"),
    "bad box": ({**_good(0), "boxes": [[1, 2, 3]]}, r"must be \[x0, y0, x1, y1\]"),
    "bad image index": ({**_good(0), "boxes": [{"image": 2, "box": [0, 0, 1, 1]}]},
                        r"refers to image 2"),
    "distractor outside": ({**_good(0), "distractors": [[0, 0, 4, 40]]}, r"distractor box"),
    "unknown field": ({**_good(0), "box": [[0, 0, 1, 1]]}, r"unknown field\(s\) \['box'\]"),
    "bad json": ('{"id": "q0", "image": "img/a.png", "question": ', r"not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_each_error_names_line_and_id(data, case):
    record, pattern = BAD_LINES[case]
    f = _write(data / "data.jsonl", [_good(1), _good(2), record])
    with pytest.raises(InputError, match=r"data\.jsonl line 3 \(id 'q0'\): .*" + pattern):
        load_jsonl(f)


def test_not_an_image_and_duplicate_id(data):
    (data / "img" / "fake.png").write_text("not a png")
    f = _write(data / "data.jsonl", [_good(1, "img/fake.png")])
    with pytest.raises(InputError, match=r"line 1 \(id 'q1'\): image 'img/fake.png' could not"):
        load_jsonl(f)
    f = _write(data / "data.jsonl", [_good(1), "", _good(1)])  # blank lines still count
    with pytest.raises(InputError, match=r"line 3 \(id 'q1'\): duplicate id"):
        load_jsonl(f)


def test_skip_invalid_keeps_every_valid_line(data):
    f = _write(data / "data.jsonl", [
        _good(1), {**_good(2), "image": "img/missing.png"}, _good(3),
        '{"id": "q4", "broken', _good(5, "img/b.png"),
    ])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exs = load_jsonl(f, skip_invalid=True)
    assert [e.id for e in exs] == ["q1", "q3", "q5"]
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 2
    assert "line 2 (id 'q2')" in msgs[0] and "line 4 (id 'q4')" in msgs[1]
    # valid lines that name the same file share one image
    assert exs[0].images[0] is exs[1].images[0]


def test_lazy_images_still_validate(data):
    f = _write(data / "data.jsonl", [_good(1, "img/b.png")])
    (ex,) = load_jsonl(f, load_images=False)
    assert ex.images[0].size == (10, 20)
    assert np.asarray(ex.images[0].convert("RGB"))[0, 0].tolist() == [0, 0, 255]
    bad = _write(data / "bad.jsonl", [{**_good(1, "img/b.png"), "boxes": [[0, 0, 11, 4]]}])
    with pytest.raises(InputError, match="outside"):
        load_jsonl(bad, load_images=False)


def test_grey_images_come_back_rgb(data):
    _png(data / "img" / "g.png", mode="L")
    (ex,) = load_jsonl(_write(data / "data.jsonl", [_good(1, "img/g.png")]))
    assert ex.images[0].mode == "RGB"


# ---------------------------------------------------------------------------------- RefCOCO


def _refcoco(root, *, with_missing=False):
    """A tiny RefCOCOg-layout folder: refcocog/refs(umd).p, refcocog/instances.json, images/."""
    images = [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 40,
               "height": 30},
              {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "width": 20,
               "height": 20}]
    if with_missing:
        images.append({"id": 3, "file_name": "COCO_train2014_000000000003.jpg", "width": 8,
                       "height": 8})
    for im in images[:2]:
        root.joinpath("images").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (im["width"], im["height"]), (9, 9, 9)).save(root / "images" /
                                                                      im["file_name"])
    anns = [  # image 1: dog (10), cat (11), dog (12), person (13), dog (14)
        {"id": 10, "image_id": 1, "bbox": [1, 2, 10, 5], "category_id": 18},
        {"id": 11, "image_id": 1, "bbox": [20, 0, 5, 5], "category_id": 17},
        {"id": 12, "image_id": 1, "bbox": [0, 10, 4, 4.5], "category_id": 18},
        {"id": 13, "image_id": 1, "bbox": [30, 20, 10, 10], "category_id": 1},
        {"id": 14, "image_id": 1, "bbox": [12, 12, 3, 3], "category_id": 18},
        {"id": 20, "image_id": 2, "bbox": [0, 0, 20, 20], "category_id": 1},
        {"id": 30, "image_id": 3, "bbox": [0, 0, 2, 2], "category_id": 1},
    ]
    cats = [{"id": 1, "name": "person", "supercategory": "person"},
            {"id": 17, "name": "cat", "supercategory": "animal"},
            {"id": 18, "name": "dog", "supercategory": "animal"}]

    def ref(ref_id, ann_id, image_id, split, sents, cat):
        return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split,
                "category_id": cat, "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
                "sentences": [{"sent": s, "raw": s, "sent_id": 100 * ref_id + i,
                               "tokens": s.split()} for i, s in enumerate(sents)]}

    refs = [ref(0, 10, 1, "val", ["the big dog on the left.", "brown dog"], 18),
            ref(1, 20, 2, "train", ["a person"], 1),
            ref(2, 13, 1, "val", ["person at the bottom right", "man", "someone"], 1)]
    if with_missing:
        refs.insert(1, ref(3, 30, 3, "val", ["tiny person", "small man"], 1))
    folder = root / "refcocog"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "refs(umd).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    (folder / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": cats}))
    return root


def test_refcoco_examples(tmp_path):
    root = _refcoco(tmp_path)
    exs = load_refcoco(root)  # refcocog, umd, val
    assert [e.id for e in exs] == ["0:0", "0:1", "2:0", "2:1", "2:2"]  # one per sentence
    e = exs[0]
    assert e.boxes == [(0, (1.0, 2.0, 11.0, 7.0))]  # [x, y, w, h] -> (x0, y0, x1, y1)
    assert e.answer == "dog"
    assert '"the big dog on the left"' in e.question
    assert e.images[0].size == (40, 30) and e.images[0] is exs[2].images[0]
    # distractors: same category (dog 12, dog 14) first, then the rest (cat 11, person 13)
    assert e.metadata["distractor_ann_ids"] == [12, 14, 11, 13]
    assert e.distractors == [(0, (0.0, 10.0, 4.0, 14.5)), (0, (12.0, 12.0, 15.0, 15.0)),
                             (0, (20.0, 0.0, 25.0, 5.0)), (0, (30.0, 20.0, 40.0, 30.0))]
    assert exs[2].metadata["distractor_ann_ids"] == [10, 11, 12, 14]
    assert exs[2].boxes == [(0, (30.0, 20.0, 40.0, 30.0))]
    assert e.metadata["ref_id"] == 0 and [x.metadata["sent_id"] for x in exs[:2]] == [0, 1]


def test_refcoco_split_limit_and_options(tmp_path):
    root = _refcoco(tmp_path)
    train = load_refcoco(root, split="train")
    assert [e.id for e in train] == ["1:0"] and train[0].distractors == []
    assert len(load_refcoco(root, split=None)) == 6
    assert [e.id for e in load_refcoco(root, limit=3)] == ["0:0", "0:1", "2:0"]
    exs = load_refcoco(root, max_distractors=1, template="Find: {sentence}",
                       answer_fn=lambda ctx: f"{ctx['supercategory']}/{ctx['category']}")
    assert exs[0].question == "Find: the big dog on the left"
    assert exs[0].answer == "animal/dog" and len(exs[0].distractors) == 1
    with pytest.raises(InputError, match="no refs in split 'testA'.*'train', 'val'"):
        load_refcoco(root, split="testA")
    with pytest.raises(InputError, match=r"refs\(google\)\.p not found.*refs\(umd\)\.p"):
        load_refcoco(root, split_by="google")
    with pytest.raises(InputError, match="unknown field"):
        load_refcoco(root, template="{nope}")


def test_refcoco_missing_image_and_skip(tmp_path):
    root = _refcoco(tmp_path, with_missing=True)
    with pytest.raises(InputError, match=r"ref 3 \(ids 3:0\.\.1\): image "
                                         r"'COCO_train2014_000000000003.jpg' not found"):
        load_refcoco(root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exs = load_refcoco(root, skip_invalid=True)
    assert [e.id for e in exs] == ["0:0", "0:1", "2:0", "2:1", "2:2"]
    ours = [w for w in caught if issubclass(w.category, UserWarning)
            and "ref " in str(w.message)]  # other libraries may warn in the same process
    assert len(ours) == 1 and "ref 3" in str(ours[0].message)


def test_refcoco_box_outside_and_images_dir(tmp_path):
    root = _refcoco(tmp_path)
    inst = json.loads((root / "refcocog" / "instances.json").read_text())
    inst["annotations"][3]["bbox"] = [30, 20, 10.5, 10]  # overshoots by < 1 px: clipped
    (root / "refcocog" / "instances.json").write_text(json.dumps(inst))
    assert load_refcoco(root)[2].boxes == [(0, (30.0, 20.0, 40.0, 30.0))]
    inst["annotations"][0]["bbox"] = [35, 2, 10, 5]  # x1 = 45 > 40
    (root / "refcocog" / "instances.json").write_text(json.dumps(inst))
    with pytest.raises(InputError, match=r"ref 0 \(ids 0:0\.\.1\): annotation 10: .*outside"):
        load_refcoco(root)
    # images from root/train2014 when root/images does not exist
    (root / "images").rename(root / "train2014")
    assert len(load_refcoco(root, split="train")) == 1
    with pytest.raises(InputError, match="images folder"):
        load_refcoco(root, images_dir=root / "nowhere")


def test_refcoco_python2_pickle(tmp_path):
    """The public refs files are Python 2 pickles: their byte strings are UTF-8 text."""
    from corelens.data.loaders.refcoco import _load_refs

    p = tmp_path / "refs(umd).p"  # [{'sent': 'café'}] as Python 2 pickles it (SHORT_BINSTRING)
    p.write_bytes(b"\x80\x02]q\x00}q\x01U\x04sentq\x02U\x05caf\xc3\xa9q\x03sa.")
    assert _load_refs(p) == [{"sent": "café"}]


# ------------------------------------------------------------- VidSTG / MLVU / MMDocIR


def _frames(folder, n, size, name="{:06d}.png", start=0):
    """``n`` numbered frame files (``start``-based numbering), frame k filled with k * 10."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        Image.new("RGB", size, (k * 10, 0, 0)).save(folder / name.format(k + start))
    return folder


def _vidstg(tmp_path):
    """A VidSTG record + its VidOR annotation (64x48) + 20 frames extracted at 32x24, numbered
    from 1 as ffmpeg does."""
    rec = {"vid": "123", "fps": 10, "frame_count": 20,
           "used_segment": {"begin_fid": 2, "end_fid": 17}, "width": 64, "height": 48,
           "subject/objects": [{"tid": 0, "category": "ball/sports_ball"},
                               {"tid": 1, "category": "adult"},
                               {"tid": 2, "category": "ball/sports_ball"}],
           "used_relation": {"subject_tid": 1, "object_tid": 0, "predicate": "throw",
                             "begin_fid": 6, "end_fid": 12},
           "temporal_gt": {"begin_fid": 6, "end_fid": 12},
           "captions": [{"description": "an adult throws a ball.", "type": "person",
                         "target_id": 1}],
           "questions": [{"description": "what is thrown by the adult?", "type": "object",
                          "target_id": 0}]}
    late = {**rec, "temporal_gt": {"begin_fid": 2, "end_fid": 6}, "captions": [],
            "questions": [{"description": "what is on the floor?", "type": "object",
                           "target_id": 2}]}
    traj = []
    for f in range(20):
        boxes = [{"tid": 0, "bbox": {"xmin": 2 * f, "ymin": 4, "xmax": 2 * f + 10, "ymax": 20},
                  "generated": 0},
                 {"tid": 1, "bbox": {"xmin": 40, "ymin": 10, "xmax": 60, "ymax": 46},
                  "generated": 1}]
        if f >= 10:
            boxes.append({"tid": 2, "bbox": {"xmin": 0, "ymin": 30, "xmax": 8, "ymax": 40},
                          "generated": 0})
        traj.append(boxes)
    vidor = {"video_id": "123", "frame_count": 20, "fps": 10, "width": 64, "height": 48,
             "subject/objects": rec["subject/objects"], "trajectories": traj,
             "relation_instances": []}
    (tmp_path / "vidor" / "training" / "0000").mkdir(parents=True)
    (tmp_path / "vidor" / "training" / "0000" / "123.json").write_text(json.dumps(vidor))
    (tmp_path / "val_annotations.json").write_text(json.dumps([rec, late]))
    _frames(tmp_path / "frames" / "123", 20, (32, 24), start=1)
    return tmp_path / "val_annotations.json", tmp_path / "vidor", tmp_path / "frames"


def test_vidstg_tracks_frames_and_errors(tmp_path):
    from corelens.data.loaders import load_vidstg

    ann, vidor, frames = _vidstg(tmp_path)
    with pytest.warns(UserWarning, match=r"record 1 \(vid 123\) \(id '123:2:q0'\): object 2 has "
                                         r"no box in the 2 sampled frame\(s\) of temporal_gt"):
        exs = load_vidstg(ann, vidor, frames, num_frames=6, frame_offset=1,
                          kinds=("questions", "captions"), skip_invalid=True)
    assert [e.id for e in exs] == ["123:2:q0", "123:2:c0"]
    q, c = exs
    # 16 extracted frames in [2, 17]; 6 evenly: 2, 5, 8, 11, 14, 17 -- 8 and 11 in [6, 12)
    assert q.metadata["frame_indices"] == [2, 5, 8, 11, 14, 17]
    (video,) = q.videos
    assert video.frame_indices == [2, 5, 8, 11, 14, 17] and video.fps == 10.0
    assert video.timestamps == pytest.approx([0.2, 0.5, 0.8, 1.1, 1.4, 1.7])
    assert video.size == (32, 24) and np.asarray(video.frames[2])[0, 0, 0] == 80  # frame 8
    assert q.question == "what is thrown by the adult? Answer with the category of the object."
    assert q.answer == "ball" and c.answer == "adult"
    (ev,) = q.boxes
    # tid 0 at frame f: (2f, 4, 2f + 10, 20) in 64x48 -> halved in the 32x24 frames
    assert ev.kind == "track" and ev.video == 0
    assert ev.track == ((2, (8.0, 2.0, 13.0, 10.0)), (3, (11.0, 2.0, 16.0, 10.0)))
    # distractors: the other ball first (only from frame 10: sampled frame 11), then the adult
    assert [d.track for d in q.distractors] == [
        ((3, (0.0, 15.0, 4.0, 20.0)),),
        ((2, (20.0, 5.0, 30.0, 23.0)), (3, (20.0, 5.0, 30.0, 23.0)))]
    assert q.metadata["distractor_tids"] == [2, 1]
    assert c.question == 'Which object does "an adult throws a ball." describe? Answer with ' \
                         'its category.'
    assert c.boxes[0].track == ((2, (20.0, 5.0, 30.0, 23.0)), (3, (20.0, 5.0, 30.0, 23.0)))
    with pytest.raises(InputError, match=r"val_annotations\.json record 1 .*'123:2:q0'"):
        load_vidstg(ann, vidor, frames, num_frames=6, frame_offset=1)
    with pytest.raises(InputError, match="frames folder .*999 not found"):
        rec = json.loads(ann.read_text())[0]
        ann.write_text(json.dumps([{**rec, "vid": "999"}]))
        (vidor / "training" / "0000" / "999.json").write_text(
            (vidor / "training" / "0000" / "123.json").read_text())
        load_vidstg(ann, vidor, frames)


def test_vidstg_example_runs_through_a_video_model(tmp_path, tiny_model):
    from corelens.data.loaders import load_vidstg

    ann, vidor, frames = _vidstg(tmp_path)
    (ex,) = load_vidstg(ann, vidor, frames, num_frames=6, frame_offset=1, limit=1)
    model = tiny_model("qwen2_vl")
    batch = model.prepare_examples([replace(ex, answer="red")])  # the tiny vocabulary has no "ball"
    lay = batch.layout.video(0, 0)
    ev = batch.evidence_positions(0)
    spans = dict(zip(lay.vision_positions.tolist(), lay.frame_ranges.tolist()))
    assert len(ev) and all(spans[p][0] < 4 and spans[p][1] > 2 for p in ev.tolist())


def _mlvu(tmp_path):
    jd = tmp_path / "json"
    jd.mkdir()
    (jd / "1_plotQA.json").write_text(json.dumps([
        {"video": "a.mp4", "duration": 10, "question": "What color?",
         "candidates": ["red", "blue", "green"], "answer": "blue", "question_type": "plotQA"},
        {"video": "a.mp4", "duration": 10, "question": "Who runs?",
         "candidates": ["cat", "dog"], "answer": "cat", "question_type": "plotQA",
         "start": 3.0, "end": 3.4},
    ]))
    (jd / "2_needle.json").write_text(json.dumps([
        {"video": "b.mp4", "duration": 5, "question": "What number?",
         "candidates": ["1", "2", "3", "4"], "answer": "4", "question_type": "findNeedle"},
    ]))
    _frames(tmp_path / "frames" / "a", 20, (16, 12), name="frame_{:05d}.jpg")
    _frames(tmp_path / "frames" / "b", 10, (16, 12), name="frame_{:05d}.jpg")
    (tmp_path / "ev.jsonl").write_text(json.dumps(
        {"video": "b.mp4", "question": "What number?", "start": 1.0, "end": 1.5,
         "box": [0, 0, 8, 8]}) + "\n")
    return jd, tmp_path / "frames", tmp_path / "ev.jsonl"


def test_mlvu_questions_frames_and_evidence(tmp_path):
    from corelens.data.loaders import load_mlvu

    jd, frames, ev = _mlvu(tmp_path)
    exs = load_mlvu(jd, frames, num_frames=5, evidence=ev)
    assert [e.id for e in exs] == ["1_plotQA:0", "1_plotQA:1", "2_needle:0"]
    a0, a1, b0 = exs
    assert a0.question == ("Question: What color?\nOptions:\n(A) red\n(B) blue\n(C) green\n"
                           "Answer with the option's letter.")
    assert (a0.answer, a1.answer, b0.answer) == ("B", "A", "D")
    # 20 frames over 10 s: 2 fps; 5 evenly: 0, 5, 10, 14, 19; no evidence: the whole video
    assert a0.metadata["frame_indices"] == [0, 5, 10, 14, 19]
    assert a0.videos[0].timestamps == [0.0, 2.5, 5.0, 7.0, 9.5]
    assert a0.boxes[0].frames == (0, 5) and a0.boxes[0].box == (0, 0, 16, 12)
    assert a0.metadata["evidence_source"] == "whole_video"
    # 3.0-3.4 s = frames 6-6.8: none sampled, so frame 6 replaces the nearest (5)
    assert a1.metadata["frame_indices"] == [0, 6, 10, 14, 19]
    assert a1.boxes[0].frames == (1, 2) and a1.metadata["evidence_source"] == "record_bounds"
    # the evidence file: 1.0-1.5 s of b (10 frames at 2 fps: 0, 2, 4, 7, 9 -> frame 2)
    assert b0.metadata["frame_indices"] == [0, 2, 4, 7, 9]
    assert b0.boxes[0].frames == (1, 2) and b0.boxes[0].box == (0, 0, 8, 8)
    assert b0.metadata["evidence_source"] == "evidence_file"
    with pytest.raises(InputError, match=r"1_plotQA\.json record 0 \(id '1_plotQA:0'\): MLVU "
                                         "gives no evidence"):
        load_mlvu(jd, frames, missing_evidence="error")
    (one,) = load_mlvu(jd / "2_needle.json", frames, num_frames=3, fps=4.0)
    assert one.videos[0].timestamps == [0.0, 1.0, 2.25]  # frames 0, 4, 9 at 4 fps


def _mmdocir(tmp_path):
    doc = {"doc_name": "rep.pdf", "domain": "Research report", "page_indices": [100, 105],
           "layout_indices": [7, 9], "questions": [
               {"Q": "What is the total?", "A": "42", "page_id": [3], "type": "['Table']",
                "layout_mapping": [{"page": 3, "page_size": [100.0, 50.0],
                                    "bbox": [10, 5, 50, 25]}]},
               {"Q": "Who wrote it?", "A": "Ann", "page_id": [0, 5], "type": "['Text']",
                "layout_mapping": [{"page": 5, "page_size": [100.0, 50.0],
                                    "bbox": [0, 40, 100, 50.4]}]},
               {"Q": "Where?", "A": "here", "page_id": [9], "type": "['Text']",
                "layout_mapping": []}]}
    (tmp_path / "MMDocIR_annotations.jsonl").write_text(json.dumps(doc) + "\n")
    for p in range(6):
        _png(tmp_path / "pages" / "rep" / f"{p}.png", (200, 100), (p * 30, 0, 0))
    return tmp_path / "MMDocIR_annotations.jsonl", tmp_path / "pages"


def test_mmdocir_pages_and_page_boxes(tmp_path):
    from corelens.data.examples import Evidence
    from corelens.data.loaders import load_mmdocir

    ann, pages = _mmdocir(tmp_path)
    with pytest.warns(UserWarning, match=r"\(id 'rep\.pdf:2'\): evidence page\(s\) \[9\] "
                                         r"outside the document's 6 pages"):
        q0, q1 = load_mmdocir(ann, pages, skip_invalid=True)
    # q0: page 3 plus its 2 nearest pages (2 and 4); the box scaled by 2 onto image 1
    assert q0.metadata["pages"] == [2, 3, 4] and q0.id == "rep.pdf:0"
    assert [np.asarray(im)[0, 0, 0] for im in q0.images] == [60, 90, 120]
    assert q0.boxes == [Evidence.on_page(1, (20, 10, 100, 50))] and q0.boxes[0].kind == "page"
    assert (q0.question, q0.answer) == ("What is the total?", "42")
    # q1: pages 0 and 5 + nearest 1 and 4; page 5's box (0.4 px over the edge: clipped),
    # page 0 without a layout box is evidence as a whole
    assert q1.metadata["pages"] == [0, 1, 4, 5]
    assert q1.boxes == [Evidence.on_page(3, (0, 80, 200, 100)),
                        Evidence.on_page(0, (0, 0, 200, 100))]
    with pytest.raises(InputError, match=r"'rep\.pdf:1'\): 4 pages .* exceed max_pages=3"):
        load_mmdocir(ann, pages, max_pages=3, limit=2)
    (solo,) = load_mmdocir(ann, pages, extra_pages=0, limit=1,
                           page_path=lambda doc, p: pages / "rep" / f"{p}.png")
    assert solo.metadata["pages"] == [3] and solo.boxes == [Evidence.on_page(0, (20, 10, 100, 50))]


def test_mmdocir_example_runs_through_a_multi_image_model(tmp_path, tiny_model):
    from corelens.data.loaders import load_mmdocir

    ann, pages = _mmdocir(tmp_path)
    (ex,) = load_mmdocir(ann, pages, extra_pages=1, limit=1)
    model = tiny_model("qwen2_vl")
    batch = model.prepare_examples([replace(ex, answer="red")])  # nor "42"
    page = batch.layout.image(0, 1)
    ev = set(batch.evidence_positions(0).tolist())
    assert ev and ev <= set(page.vision_positions.tolist())
    assert [len(x.vision_positions) > 0 for x in batch.layout.images[0]] == [True, True]


def test_jsonl_videos_and_every_evidence_form(tmp_path):
    from corelens.data.examples import Evidence
    from corelens.data.loaders import load_vidstg

    _frames(tmp_path / "clip", 4, (16, 12), name="f{:03d}.png", start=10)  # frames 10..13
    _png(tmp_path / "page.png", (20, 30))
    f = _write(tmp_path / "v.jsonl", [
        {"id": "v1", "image": "page.png", "videos": [{"frames": "clip", "fps": 5}],
         "question": "q?", "answer": "a",
         "boxes": [{"video": 0, "frames": [1, 3], "box": [0, 0, 8, 6]},
                   {"video": 0, "frame": 3, "box": [8, 6, 16, 12]},
                   {"page": 0, "box": [0, 0, 10, 10]},
                   {"video": 0, "track": {"0": [0, 0, 4, 4], "2": [2, 2, 6, 6]}}]},
        {"id": "v2", "videos": [{"frames": ["clip/f011.png", "clip/f013.png"],
                                 "frame_indices": [11, 13]}],
         "question": "q?", "answer": "a", "boxes": [{"video": 0, "frames": [0, 2],
                                                     "box": [0, 0, 16, 12]}]},
        {"id": "v3", "videos": [{"frames": "clip"}], "question": "q?", "answer": "a",
         "boxes": [{"video": 0, "frames": [2, 5], "box": [0, 0, 4, 4]}]},
    ])
    with pytest.warns(UserWarning, match=r"line 3 \(id 'v3'\): evidence frame range \[2, 5\) "
                                         r"lies outside video 0, which has 4 frame"):
        v1, v2 = load_jsonl(f, skip_invalid=True)
    (video,) = v1.videos
    assert len(video) == 4 and video.frame_indices == [10, 11, 12, 13] and video.fps == 5
    assert np.asarray(video.frames[1])[0, 0, 0] == 10  # the second file (index 11)
    assert v1.boxes == [Evidence.in_frames(0, (1, 3), (0, 0, 8, 6)),
                        Evidence.in_frame(0, 3, (8, 6, 16, 12)),
                        Evidence.on_page(0, (0, 0, 10, 10)),
                        Evidence.in_track(0, {0: (0, 0, 4, 4), 2: (2, 2, 6, 6)})]
    assert [b.kind for b in v1.boxes] == ["frames", "frames", "page", "track"]
    assert v2.images == [] and v2.videos[0].frame_indices == [11, 13]
    # save + load: frames, fps, indices and every evidence kind come back
    ann, vidor, frames = _vidstg(tmp_path / "stg")
    exs = [v1, v2] + load_vidstg(ann, vidor, frames, num_frames=6, frame_offset=1,
                                 kinds=("questions", "captions"), limit=2)
    assert exs[2].videos[0] is exs[3].videos[0]  # two sentences of one record share the video
    back = load_jsonl(save_jsonl(exs, tmp_path / "out" / "o.jsonl"))
    assert len(list((tmp_path / "out" / "o_images").glob("*_v0_*.png"))) == 4 + 2 + 6
    for e, r in zip(exs, back):
        assert r.boxes == e.boxes and r.distractors == e.distractors
        assert [b.kind for b in r.boxes] == [b.kind for b in e.boxes]
        assert [b.track for b in r.boxes] == [b.track for b in e.boxes]
        for ve, vr in zip(e.videos, r.videos):
            assert (vr.fps, vr.frame_indices, vr.total_frames) == (
                ve.fps, ve.frame_indices, ve.total_frames)
            assert all(np.array_equal(np.asarray(a), np.asarray(b))
                       for a, b in zip(ve.frames, vr.frames))
