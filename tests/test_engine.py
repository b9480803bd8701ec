"""The engine end to end on tiny GGUF models the tests write themselves."""

from __future__ import annotations

import numpy as np
import pytest

from vhr_edge import Session, fixtures
from vhr_edge.engine import load

from conftest import GQA_SPEC, SPEC

N = 24  # tokens generated per caption in these tests


def caption(session, image, **kw):
    kw.setdefault("n_predict", N)
    kw.setdefault("ignore_eos", True)
    return session.caption(image, keep_logits=True, **kw)


def test_alpha_one_equals_baseline(session, image_a):
    plain = caption(session, image_a, vhr=False)
    one = caption(session, image_a, alpha=1.0)
    assert one.tokens == plain.tokens
    np.testing.assert_allclose(one.first_logits, plain.first_logits, atol=1e-4)
    # alpha 1 still scores the layers (VHD of the unreinforced pass)
    assert np.all(one.vhr.vhd[[1, 4, 5, 6, 7]] > 0)
    # ... and alpha 2 is not a no-op on this model (the check above can fail)
    two = caption(session, image_a)
    assert np.abs(two.first_logits - plain.first_logits).max() > 1e-2


@pytest.mark.parametrize("spec", [SPEC, GQA_SPEC], ids=["mha", "gqa"])
def test_scaling_is_exact_against_scaled_attn_output(tmp_path, spec, image_a):
    """alpha * head output == alpha * the matching input columns of attn_output (W_o)."""
    forced = {1: [0, 2], 5: [1, 3], 7: [3]}
    alpha = 2.0
    text, mmproj = fixtures.write_tiny_llava(tmp_path, spec, name="m")
    scaled = fixtures.write_text_model(
        tmp_path / "m-scaled.gguf", spec, attn_output_scale={l: (h, alpha) for l, h in forced.items()}
    )
    with Session(text, mmproj, n_threads=2) as s:
        vhr = caption(s, image_a, alpha=alpha, layers=sorted(forced), forced_heads=forced, n_predict=32)
    with Session(scaled, mmproj, n_threads=2) as s:
        ref = caption(s, image_a, vhr=False, n_predict=32)
    assert vhr.vhr.selected_heads == forced
    np.testing.assert_allclose(vhr.first_logits, ref.first_logits, atol=2e-4)
    assert vhr.tokens == ref.tokens  # decoding steps are scaled the same way


def test_layerwise_order(session, image_a):
    """Layer l is scored after lower layers were reinforced, in the same pass."""
    full = caption(session, image_a, layers=[1, 5])
    h1 = full.vhr.selected_heads[1]
    assert h1  # something was reinforced at layer 1
    # the same pass with layer 1 forced to its own selection reproduces layer 5's scores
    forced = caption(session, image_a, layers=[1, 5], forced_heads={1: h1})
    np.testing.assert_allclose(forced.vhr.vhd[5], full.vhr.vhd[5], rtol=1e-6)
    # scoring on the unreinforced pass (alpha 1, or layer 5 alone) gives other layer-5 scores
    unreinforced = caption(session, image_a, layers=[1, 5], alpha=1.0)
    alone = caption(session, image_a, layers=[5])
    np.testing.assert_allclose(unreinforced.vhr.vhd[1], full.vhr.vhd[1], rtol=1e-6)  # layer 1 sees nothing below
    np.testing.assert_allclose(alone.vhr.vhd[5], unreinforced.vhr.vhd[5], rtol=1e-6)
    assert np.abs(unreinforced.vhr.vhd[5] - full.vhr.vhd[5]).max() > 1e-3 * full.vhr.vhd[5].max()
    # layers outside the set are never scored
    assert np.all(full.vhr.vhd[[0, 2, 3, 4, 6, 7]] == 0)


def test_reference_cached_per_prompt_and_prefill_is_plain(tiny, image_a, image_b):
    """VHR_SPEC 1: the text-only reference is its own pass, once per (prompt, layer set); the
    image prefill then holds exactly the rows of a plain caption."""
    with Session(*tiny, n_threads=2, reference_cache_size=2) as s:
        plain = caption(s, image_a, vhr=False)
        first = caption(s, image_a)
        second = caption(s, image_b)
        assert first.vhr.reference == "released"
        assert not first.vhr.reference_cached and first.timings.reference_ms > 0
        assert second.vhr.reference_cached and second.timings.reference_ms == 0
        assert first.timings.n_prompt_rows == second.timings.n_prompt_rows == plain.timings.n_prompt_rows
        assert s.reference_cache_entries == 1
        # a cached reference is the same reference: identical scores after the cache is cleared
        s.clear_reference_cache()
        again = caption(s, image_b)
        assert not again.vhr.reference_cached
        np.testing.assert_array_equal(again.vhr.vhd, second.vhr.vhd)
        assert again.tokens == second.tokens
        # another prompt or another layer set needs its own; the least recently used goes first
        other = caption(s, image_b, prompt="Is there a dog?")
        assert not other.vhr.reference_cached and s.reference_cache_entries == 2
        assert np.abs(other.vhr.vhd - second.vhr.vhd).max() > 1e-3
        assert not caption(s, image_b, layers=[1, 5]).vhr.reference_cached
        assert s.reference_cache_entries == 2  # bounded
        assert caption(s, image_b, layers=[1, 5]).vhr.reference_cached
        assert not caption(s, image_b).vhr.reference_cached  # evicted


def test_joint_variant_is_opt_in_and_differs(session, image_a):
    """The earlier variant (text-only prompt in the same batch, scaled too) stays available
    by name for ablations; it scores higher layers against a reinforced text branch."""
    released = caption(session, image_a)
    joint = caption(session, image_a, reference="joint")
    assert joint.vhr.reference == "joint" and not joint.vhr.reference_cached
    assert joint.timings.n_prompt_rows > released.timings.n_prompt_rows  # both sequences in one batch
    # layer 1 has nothing reinforced below it: the same scores either way
    np.testing.assert_allclose(joint.vhr.vhd[1], released.vhr.vhd[1], rtol=1e-3)  # batch-shape rounding
    # above it the text branch differs (scaled in joint, never in released)
    assert np.abs(joint.vhr.vhd[4:] - released.vhr.vhd[4:]).max() > 1e-3 * released.vhr.vhd.max()
    with pytest.raises(Exception, match="released.*joint"):
        caption(session, image_a, reference="both")


def test_no_state_leaks_between_images(tiny, session, image_a, image_b):
    a1 = caption(session, image_a)
    b = caption(session, image_b, vhr=False)
    b2 = caption(session, image_b)
    a2 = caption(session, image_a)
    assert a1.tokens == a2.tokens
    np.testing.assert_array_equal(a1.first_logits, a2.first_logits)
    np.testing.assert_array_equal(a1.vhr.vhd, a2.vhr.vhd)
    assert a1.vhr.selected_heads == a2.vhr.selected_heads
    assert a1.tokens != b.tokens or a1.vhr.selected_heads != b2.vhr.selected_heads  # B is a different input
    with Session(*tiny, n_threads=2) as fresh:
        a3 = caption(fresh, image_a)
    assert a3.tokens == a1.tokens
    np.testing.assert_allclose(a3.first_logits, a1.first_logits, atol=1e-6)


def test_separate_decode_and_batch_threads(tiny, session, image_a):
    # llama.cpp's -t / -tb: one decode thread, two for the prefill and the image encoder.
    # Every dot product runs on one thread, so the split does not change a single logit.
    assert (session.info.n_threads, session.info.n_threads_batch) == (2, 2)
    ref = caption(session, image_a)
    with Session(*tiny, n_threads=1, n_threads_batch=2) as s:
        assert (s.info.n_threads, s.info.n_threads_batch) == (1, 2)
        r = caption(s, image_a)
    assert r.tokens == ref.tokens
    np.testing.assert_array_equal(r.first_logits, ref.first_logits)
    assert r.vhr.selected_heads == ref.vhr.selected_heads


def test_result_contents(session, image_a):
    r = session.caption(image_a, n_predict=8)
    assert r.vhr.layers == [1, 4, 5, 6, 7]
    assert set(r.vhr.selected_heads) == {1, 4, 5, 6, 7}
    for l, heads in r.vhr.selected_heads.items():
        assert heads == sorted(heads) and all(0 <= h < 4 for h in heads)
        assert 1 <= len(heads) <= 2  # above the median of 4 heads
    assert r.vhr.vhd.shape == r.vhr.ta.shape == (8, 4)
    assert r.timings.n_image_tokens == 64
    assert r.timings.prefill_ms > 0 and r.timings.image_encode_ms > 0
    assert 1 <= r.n_tokens <= 8
    j = r.to_json()
    assert j["n_tokens"] == r.n_tokens and j["vhr"]["layers"] == [1, 4, 5, 6, 7]
    assert set(j["vhr"]["selected_heads"]) == {"1", "4", "5", "6", "7"}
    assert len(j["vhr"]["vhd"]) == 8 and len(j["vhr"]["vhd"][0]) == 4


def test_ignore_eos_and_length(session, image_a):
    r = caption(session, image_a, n_predict=17)
    assert r.n_tokens == 17 and r.stop_reason == "length" and r.timings.n_decoded == 16


def test_random_heads_control(session, image_a):
    vhd = caption(session, image_a)
    rnd = [caption(session, image_a, head_mode="random", random_seed=s) for s in range(6)]
    for r in rnd:  # same layers, same number of heads per layer
        assert {l: len(h) for l, h in r.vhr.selected_heads.items()} == {
            l: len(h) for l, h in vhd.vhr.selected_heads.items()
        }
    assert any(r.vhr.selected_heads != vhd.vhr.selected_heads for r in rnd)
    again = caption(session, image_a, head_mode="random", random_seed=3)
    assert again.vhr.selected_heads == rnd[3].vhr.selected_heads  # seeded


def test_sampling_is_seeded(session, image_a):
    a = caption(session, image_a, temp=1.0, seed=7)
    b = caption(session, image_a, temp=1.0, seed=7)
    c = caption(session, image_a, temp=1.0, seed=8, top_k=0, top_p=1.0)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_folded_decode_equals_callback(session, image_a):
    # Decoding with the selected heads folded into W_o (F32 here) gives the callback's tokens, and
    # the caption restores W_o bit for bit: a plain prefill afterwards reads every W_o.
    before = caption(session, image_a, vhr=False)
    folded = session.caption(image_a, n_predict=32, ignore_eos=True)
    called = session.caption(image_a, n_predict=32, ignore_eos=True, fold_weights=False)
    assert (folded.vhr.decode_scaling, folded.vhr.fold_note) == ("weights", "")
    assert (called.vhr.decode_scaling, called.vhr.fold_note) == ("callback", "folding turned off")
    assert folded.tokens == called.tokens
    assert folded.tokens != session.caption(image_a, vhr=False, n_predict=32, ignore_eos=True).tokens
    after = caption(session, image_a, vhr=False)
    assert after.tokens == before.tokens and after.vhr.decode_scaling == ""
    np.testing.assert_array_equal(after.first_logits, before.first_logits)
    r3 = session.caption(image_a, n_predict=32, ignore_eos=True, alpha=3.0)
    assert (r3.vhr.decode_scaling, r3.vhr.fold_note) == ("callback", "alpha is not a power of two above 1")
    assert r3.tokens == session.caption(image_a, n_predict=32, ignore_eos=True, alpha=3.0, fold_weights=False).tokens


def test_fold_needs_whole_quant_blocks_per_head(tmp_path_factory, tiny, image_a):
    # head_dim 16 splits a 32-wide Q8_0 block between two heads: the callback scales instead
    q = fixtures.quantize(tiny[0], tmp_path_factory.mktemp("q8fold") / "tiny-q8.gguf", "Q8_0")
    with Session(q, tiny[1], n_threads=2) as s:
        r = s.caption(image_a, n_predict=16, ignore_eos=True)
    assert r.vhr.decode_scaling == "callback"
    assert r.vhr.fold_note == "layer 1: head_dim is not a multiple of the quantization block"


@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_0"])
def test_quantized_models_run(tmp_path_factory, tiny, ftype, image_a):
    text, mmproj = tiny
    q = fixtures.quantize(text, tmp_path_factory.mktemp(ftype) / f"tiny-{ftype}.gguf", ftype)
    with Session(q, mmproj, n_threads=2) as s:
        assert s.n_layer == 8 and s.n_head == 4
        r = caption(s, image_a)
        plain = caption(s, image_a, vhr=False)
        one = caption(s, image_a, alpha=1.0)
    assert len(r.tokens) == N and np.all(r.vhr.vhd[[1, 4, 5, 6, 7]] > 0)
    assert one.tokens == plain.tokens
    with Session(text, mmproj, n_threads=2) as s:
        f32 = caption(s, image_a, vhr=False)
    # quantization perturbs but keeps the logits strongly correlated with F32
    assert np.corrcoef(plain.first_logits, f32.first_logits)[0, 1] > 0.9
    assert np.abs(plain.first_logits - f32.first_logits).max() > 0  # it is a different model


def test_gqa_model(tiny_gqa, image_a):
    with Session(*tiny_gqa, n_threads=2) as s:
        assert s.info.n_head == 4 and s.info.n_head_kv == 2
        r = caption(s, image_a)
        plain = caption(s, image_a, vhr=False)
        one = caption(s, image_a, alpha=1.0)
    assert r.vhr.vhd.shape == (8, 4)  # query heads
    assert one.tokens == plain.tokens


def test_prompt_template_and_prompt(session, image_a):
    a = caption(session, image_a, n_predict=4)
    b = session.caption(image_a, "Is there a dog in the image?", n_predict=4, keep_logits=True, ignore_eos=True)
    assert np.abs(a.first_logits - b.first_logits).max() > 0
    e = session._runner.embed_image(image_a, "Is there a dog?", session.prompt_template)
    assert e["prefix"][0] == 1  # BOS
    assert e["image"].shape == (64, 64)


def test_token_embedding_rows_match_gguf_dequantize(tmp_path, tiny):
    """The prefill's text rows equal gguf-py's dequantization of token_embd.weight."""
    import gguf

    E = load()
    text, _ = tiny
    ids = [0, 1, 2, 77, 300, 511]
    for ftype in ("F16", "Q8_0", "Q4_0"):
        path = fixtures.quantize(text, tmp_path / f"{ftype}.gguf", ftype) if ftype != "F32" else text
        rows, type_name = E.token_embedding_rows(str(path), ids)
        t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "token_embd.weight")
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1, rows.shape[1])[ids]
        assert type_name.upper() == t.tensor_type.name
        np.testing.assert_allclose(rows, ref, rtol=1e-6, atol=1e-6)
    rows, type_name = E.token_embedding_rows(str(text), ids)
    assert type_name == "f32"
    with pytest.raises(Exception, match="outside the vocabulary"):
        E.token_embedding_rows(str(text), [512])


def test_bad_parameters(session, image_a):
    from vhr_edge.errors import ConfigError

    for kw, msg in [
        ({"alpha": 0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"layers": "1,8"}, "outside the model"),
        ({"forced_heads": {1: [4]}}, "outside the model"),
        ({"n_predict": 0}, "at least 1"),
        ({"head_mode": "best"}, "head_mode"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            session.caption(image_a, **kw)
    r = session.caption(image_a, n_predict=2)  # still usable afterwards
    assert r.n_tokens >= 1


def test_prompt_longer_than_context(tiny, image_a):
    from vhr_edge.errors import VhrEdgeError

    with Session(*tiny, n_threads=2, n_ctx=256) as s:
        with pytest.raises(VhrEdgeError, match="context holds 256"):
            s.caption(image_a, "describe " * 200)
        # the text-only reference is its own pass: the image prefill needs only its own
        # positions (the joint batch needed the instruction twice and does not fit)
        assert s.caption(image_a, "describe " * 100, n_predict=2).n_tokens >= 1
        with pytest.raises(VhrEdgeError, match="context holds 256"):
            s.caption(image_a, "describe " * 100, reference="joint")
        assert s.caption(image_a, "Hi", n_predict=2).n_tokens >= 1


def test_trace_does_not_change_the_caption(session, image_a):
    for vhr in (True, False):
        plain = caption(session, image_a, vhr=vhr)
        traced = session.caption(image_a, vhr=vhr, trace=True, keep_logits=True, n_predict=N, ignore_eos=True)
        assert traced.tokens == plain.tokens
        np.testing.assert_allclose(traced.first_logits, plain.first_logits, atol=1e-4)
        assert traced.trace.shape == (N, 8, 4)
        assert np.all(traced.trace > 0)  # every layer, every step
        if vhr:  # step 0 of the trace is the selection's VHD on the scored layers: the trace's
            # text-only sequence (unscaled, in the same batch) matches the cached reference up to
            # the rounding of another batch shape
            assert traced.vhr.selected_heads == plain.vhr.selected_heads
            for l in traced.vhr.layers:
                np.testing.assert_allclose(traced.trace[0, l], traced.vhr.vhd[l], rtol=1e-3)


def test_forced_tokens(session, image_a):
    free = caption(session, image_a, n_predict=10)
    forced = session.caption(image_a, forced_tokens=free.tokens[:6], n_predict=50)
    assert forced.tokens == free.tokens[:6] and forced.stop_reason == "length"
    other = [5, 6, 7, 8]
    assert session.caption(image_a, forced_tokens=other).tokens == other
    from vhr_edge.errors import VhrEdgeError

    with pytest.raises(VhrEdgeError, match="outside the vocabulary"):
        session.caption(image_a, forced_tokens=[10**6])


def test_head_count_top_k_per_layer(session, image_a):
    """head_count=k: the k heads of largest D per layer (after the outlier rule), checked
    against the D and TA the same caption reports (vhd = sqrt(D))."""
    for k in (1, 2, 3):
        r = session.caption(image_a, n_predict=4, head_count=k)
        d = r.vhr.vhd.astype(np.float64) ** 2
        for l, heads in r.vhr.selected_heads.items():
            dl, tl = d[l].copy(), r.vhr.ta[l].astype(np.float64)
            if dl.std(ddof=1) > 1:
                dl[(dl > dl.mean() + dl.std(ddof=1)) & (tl > tl.mean() + tl.std(ddof=1))] = 0.0
            want = sorted(np.argsort(-dl, kind="stable")[:k].tolist())
            assert heads == want, (k, l)
    rnd = session.caption(image_a, n_predict=4, head_count=3, head_mode="random", random_seed=1)
    assert all(len(h) == 3 for h in rnd.vhr.selected_heads.values())
    from vhr_edge.errors import ConfigError

    for bad in (5, -1, True):
        with pytest.raises(ConfigError, match="head_count"):
            session.caption(image_a, n_predict=2, head_count=bad)
