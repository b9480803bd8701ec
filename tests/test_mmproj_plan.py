"""Which mmproj files get which correction (vhr_edge.mmproj), the corrected copy, and the LLaVA-1.6
packing arithmetic (vhr_edge.preprocess) on hand-built cases; no torch needed."""

from __future__ import annotations

import os

import numpy as np
import pytest

from vhr_edge.errors import ModelError
from vhr_edge.mmproj import corrected_path, plan, prepare
from vhr_edge.preprocess import anyres_tiles, expand2square, pack_anyres, select_best_resolution, unpad


def _mmproj(path, projector="mlp", cls=True, feature_layer=None, blocks=3, alignment=None, pinpoints=None):
    import gguf

    w = gguf.GGUFWriter(str(path), "clip")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_string("clip.projector_type", projector)
    w.add_bool("clip.has_llava_projector", True)
    w.add_uint32("clip.vision.block_count", blocks)
    w.add_uint32("clip.vision.image_size", 336)
    w.add_uint32("clip.vision.patch_size", 14)
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    if feature_layer is not None:
        w.add_array("clip.vision.feature_layer", [feature_layer])
    if pinpoints:
        w.add_array("clip.vision.image_grid_pinpoints", [x for p in pinpoints for x in p])
    if cls:
        w.add_tensor("v.class_embd", np.arange(8, dtype=np.float32))
    w.add_tensor("v.blk.0.attn_q.weight", np.arange(64, dtype=np.float16).reshape(8, 8))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("kw, cls_fix, depth_fix", [
    ({}, True, 3),                                         # the legacy converter's LLaVA files
    ({"feature_layer": 2}, True, None),                    # a feature layer named: depth is right
    ({"cls": False}, False, 3),                            # no class token (SigLIP-like): depth only
    ({"cls": False, "feature_layer": 3}, False, None),     # the testbed / vhr-edge exports
    ({"projector": "mlp_norm"}, True, 3),
    ({"projector": "qwen2vl_merger"}, False, None),        # not llama.cpp's LLaVA graph
])
def test_which_files_get_which_correction(tmp_path, kw, cls_fix, depth_fix):
    p = plan(_mmproj(tmp_path / "m.gguf", **kw))
    assert (p.class_token_first, p.feature_layer) == (cls_fix, depth_fix)
    assert p.needs_correction == (cls_fix or depth_fix is not None)
    if p.needs_correction:
        assert "correcting llama.cpp's LLaVA vision graph" in p.describe()
        q = plan(tmp_path / "m.gguf", as_is=True)
        assert not q.applied and "without correcting" in q.describe()
    else:
        assert p.describe() == "" and p.corrections() == []


def test_pinpoints_make_it_anyres(tmp_path):
    p = plan(_mmproj(tmp_path / "m.gguf", pinpoints=[[336, 672], [672, 336]]))
    assert p.anyres and p.pinpoints == [[336, 672], [672, 336]]


def test_corrected_copy_adds_one_key_and_keeps_every_byte(tmp_path, monkeypatch):
    import gguf

    monkeypatch.setenv("VHR_EDGE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "user").mkdir()
    src = _mmproj(tmp_path / "user" / "m.gguf", alignment=64)
    before = sorted(os.listdir(tmp_path / "user"))
    notes = []
    load, p = prepare(src, notice=notes.append)
    assert load == str(corrected_path(p)) and load.startswith(str(tmp_path / "cache" / "mmproj"))
    assert sorted(os.listdir(tmp_path / "user")) == before  # nothing written beside the user's file
    assert len(notes) == 1 and "writing a corrected copy" in notes[0]
    a, b = gguf.GGUFReader(str(src)), gguf.GGUFReader(load)
    assert b.fields["clip.vision.feature_layer"].contents() == [3]
    assert b.fields["clip.vision.feature_layer"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert b.alignment == 64 and set(b.fields) - set(a.fields) == {"clip.vision.feature_layer"}
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert ta.name == tb.name and ta.tensor_type == tb.tensor_type and np.array_equal(ta.data, tb.data)
    assert plan(load).feature_layer is None and plan(load).class_token_first  # the copy needs the graph fix only
    notes.clear()
    assert prepare(src, notice=notes.append)[0] == load and notes == []  # written once
    os.utime(src, ns=(1, 1))  # a changed original gets a new copy
    assert str(corrected_path(plan(src))) != load
    assert prepare(src, as_is=True)[0] == str(src)  # --mmproj-as-is: the user's file itself


def test_unwritable_cache_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("VHR_EDGE_CACHE", "/proc/no-such-cache")
    with pytest.raises(ModelError, match="cannot write the corrected mmproj .*VHR_EDGE_CACHE.*--mmproj-as-is"):
        prepare(_mmproj(tmp_path / "m.gguf"))


def test_truncated_mmproj_is_one_clear_error(tmp_path):
    src = _mmproj(tmp_path / "m.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(src.read_bytes()[:40])
    with pytest.raises(ModelError, match="cannot read mmproj .*truncated"):
        plan(bad)


# ---- preprocessing arithmetic, by hand

def test_expand2square_centres_on_the_fill():
    img = np.full((2, 5, 3), 7, np.uint8)
    sq = expand2square(img, (1, 2, 3))
    assert sq.shape == (5, 5, 3)
    assert (sq[1:3] == 7).all() and (sq[0] == [1, 2, 3]).all() and (sq[3:] == [1, 2, 3]).all()  # offset (5-2)//2 = 1


def test_select_best_resolution_and_tiles():
    pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert select_best_resolution(300, 600, pins) == (336, 672)
    assert select_best_resolution(700, 260, pins) == (1008, 336)
    assert select_best_resolution(500, 400, pins) == (672, 672)
    tiles, grid = anyres_tiles(np.zeros((700, 260, 3), np.uint8), 336, pins)
    assert grid == (3, 1) and len(tiles) == 4 and all(t.shape == (336, 336, 3) for t in tiles)


def test_pack_anyres_order_unpad_and_newline():
    n, d = 2, 3  # 2x2 patches per tile
    # a 1x2 grid; each row tags (tile, y, x) so the packing order can be read back
    rows = [np.full((n * n, d), -1.0)]  # the base tile
    for tile in range(2):
        rows.append(np.array([[tile, y, x] for y in range(n) for x in range(n)], float))
    rows = np.concatenate(rows).astype(np.float32)
    nl = np.array([9, 9, 9], np.float32)
    out = pack_anyres(rows, (1, 2), image_hw=(100, 200), n_side=n, newline=nl)  # 1:2, no padding to remove
    assert (out[:4] == -1).all()
    body = out[4:].reshape(n, 2 * n + 1, d)
    assert (body[:, -1] == nl).all()
    assert body[0, :4, 0].tolist() == [0, 0, 1, 1] and body[0, :4, 2].tolist() == [0, 1, 0, 1]
    assert body[1, :, 1][:4].tolist() == [1, 1, 1, 1]
    # HF unpad_image: a 4x4 map of a 100x400 picture keeps int(round(100 * 4/400)) = 1 row, padded
    # by (4 - 1) // 2 = 1 on each side -> rows 1..2; of a 400x200 picture, columns 1..2
    fmap = np.arange(4 * 4).reshape(4, 4, 1)
    assert np.array_equal(unpad(fmap, 100, 400), fmap[1:3])
    assert np.array_equal(unpad(fmap, 400, 200), fmap[:, 1:3])
