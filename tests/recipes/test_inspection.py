"""Feature cards against a brute-force computation: each text run alone, dense SAE codes, numpy on top."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qscope_plugin.demo.run import SENTENCES
from qscope_plugin.errors import FeatureOutOfRangeError, LayerOutOfRangeError
from qscope_plugin.hooks import capture_residual
from qscope_plugin.models import DEMO_MODEL_DIR, load_model
from qscope_plugin.recipes import FeatureCard, feature_cards
from qscope_plugin.recipes._harvest import EmptyInputError, HarvestError
from qscope_plugin.store import DEMO_SAE_DIR, load_sae
from qscope_plugin.tokens import lone_token_texts, token_texts

pytestmark = pytest.mark.skipif(not DEMO_MODEL_DIR.is_dir(), reason="demo assets not built")

LAYER, N_CONTEXTS, WINDOW, N_BINS = 2, 6, 4, 12
TEXTS = SENTENCES["zh"][:20] + SENTENCES["en"][:20] + ["", "ok"]  # an empty and a one-token text among them


@pytest.fixture(scope="module")
def demo():
    model, tok = load_model(str(DEMO_MODEL_DIR))
    return model, tok, load_sae(DEMO_SAE_DIR, LAYER)


@pytest.fixture(scope="module", params=[True, False], ids=["first-token-excluded", "every-token"])
def exclude(request):
    return request.param


@pytest.fixture(scope="module")
def dense(demo, exclude):
    """Per text, its token ids and dense codes ``(T, d_sae)``, each text alone through the model; with
    ``exclude`` its position 0 zeroed (the brute force of leaving it out: it never fires)."""
    model, tok, sae = demo
    out = []
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if ids.shape[1] == 0:
            out.append((ids[0], torch.zeros(0, sae.cfg.d_sae)))
            continue
        with torch.no_grad(), capture_residual(model, [LAYER]) as acts:
            model(ids)
        codes = sae.encode(acts[LAYER][0]).float()
        if exclude:
            codes[0] = 0
        out.append((ids[0], codes))
    return out


def counted_tokens(dense, exclude):
    return sum(len(ids) - (exclude and len(ids) > 0) for ids, _ in dense)


@pytest.fixture(scope="module")
def cards(demo, exclude):
    """70 cards: co-firing runs in two chunks of 64."""
    model, tok, sae = demo
    return feature_cards(model, tok, TEXTS, sae, top=70, layer=LAYER, exclude_first_token=exclude,
                         n_contexts=N_CONTEXTS, window=WINDOW,
                         n_bins=N_BINS, n_cofiring=5, explanations={0: "unused"}, batch_size=7, progress=False)


def test_top_picks_the_densest_features(cards, dense, exclude):
    z = torch.cat([codes for _, codes in dense])
    n_tokens = counted_tokens(dense, exclude)
    assert n_tokens == len(z) - exclude * sum(1 for ids, _ in dense if len(ids))
    density = (z > 0).float().sum(0) / n_tokens
    assert [c.feature for c in cards] == torch.sort(density, descending=True, stable=True).indices[:70].tolist()
    for card in cards:
        column = z[:, card.feature]
        assert card.n_tokens == n_tokens and card.n_firing == int((column > 0).sum())
        assert card.density == pytest.approx(float(density[card.feature]))
        assert card.max_activation == pytest.approx(float(column.max()), rel=1e-4)
        assert card.mean_activation == pytest.approx(float(column[column > 0].mean()), rel=1e-4)
        counts, edges = np.histogram(column[column > 0].numpy(), bins=N_BINS)
        assert card.histogram.counts == counts.tolist()
        assert np.allclose(card.histogram.edges, edges, rtol=1e-4)
        assert card.explanation is None


def test_contexts_are_each_texts_peak_with_its_window(cards, dense, demo):
    _, tok, _ = demo
    for card in cards:
        peaks = [(float(codes[:, card.feature].max()), t, int(codes[:, card.feature].argmax()))
                 for t, (_, codes) in enumerate(dense) if len(codes) and codes[:, card.feature].max() > 0]
        peaks = sorted(peaks, key=lambda p: (-p[0], p[1]))[:N_CONTEXTS]
        assert [c.text for c in card.contexts] == [t for _, t, _ in peaks]
        for context, (value, t, position) in zip(card.contexts, peaks, strict=True):
            ids, codes = dense[t]
            lo, hi = max(0, position - WINDOW), min(len(ids), position + WINDOW + 1)
            assert (context.start, context.peak) == (lo, position - lo)
            assert context.tokens == token_texts(tok, ids[lo:hi].tolist())  # the window as its own sequence
            assert np.allclose(context.activations, codes[lo:hi, card.feature].numpy(), rtol=1e-4, atol=1e-4)
            assert context.activations[context.peak] == pytest.approx(value, rel=1e-4)


def test_cofiring_counts_and_jaccard(cards, dense):
    fires = torch.cat([codes for _, codes in dense]) > 0
    for card in cards:
        both = (fires & fires[:, [card.feature]]).sum(0)
        either = (fires | fires[:, [card.feature]]).sum(0)
        jaccard = both / either.clamp(min=1)
        jaccard[card.feature] = -1
        expected = [g for g in torch.sort(jaccard, descending=True, stable=True).indices[:5].tolist() if both[g]]
        assert [c.feature for c in card.cofiring] == expected
        for c in card.cofiring:
            assert c.count == int(both[c.feature]) and c.jaccard == pytest.approx(float(jaccard[c.feature]))


def test_logit_effects_are_the_unembedded_normed_decoder_direction(demo):
    model, tok, sae = demo
    (card,) = feature_cards(model, tok, TEXTS[:3], sae, [17], layer=LAYER, n_logits=7, progress=False)
    d = sae.W_dec[:, 17].float()
    normed = d * torch.rsqrt(d.pow(2).mean() + model.config.rms_norm_eps) * model.model.norm.weight
    logits = model.lm_head.weight @ normed  # W_U · RMSNorm(d_f), by hand
    up, down = logits.topk(7), (-logits).topk(7)
    assert [e.token_id for e in card.logit_effects.promoted] == up.indices.tolist()
    assert [e.token_id for e in card.logit_effects.suppressed] == down.indices.tolist()
    assert np.allclose([e.value for e in card.logit_effects.promoted], up.values.detach(), atol=1e-4)
    assert np.allclose([e.value for e in card.logit_effects.suppressed], -down.values.detach(), atol=1e-4)
    assert [e.token for e in card.logit_effects.promoted] == lone_token_texts(tok, up.indices.tolist())


def test_asked_features_keep_their_order_and_explanations_and_survive_json(demo):
    model, tok, sae = demo
    cards = feature_cards(model, tok, TEXTS, sae, [900, 3, 900, 1535], layer=LAYER, explanations={3: "three"},
                          n_contexts=0, progress=False)
    assert [c.feature for c in cards] == [900, 3, 1535]
    assert [c.explanation for c in cards] == [None, "three", None]
    assert all(c.contexts == [] for c in cards)
    for card in cards:
        assert FeatureCard.from_json(json.loads(json.dumps(card.to_json()))) == card


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"features": [1], "top": 3}, HarvestError, "either features"),
    ({}, HarvestError, "either features"),
    ({"features": []}, HarvestError, "features is empty"),
    ({"top": 0}, HarvestError, "top=0"),
    ({"top": 3, "window": -1}, HarvestError, "window=-1; expected an integer >= 0"),
    ({"top": 3, "n_bins": 0}, HarvestError, "n_bins=0; expected an integer >= 1"),
    ({"features": [1536]}, FeatureOutOfRangeError, r"1536 features: 0\.\.1535"),
    ({"features": [1], "layer": 4}, LayerOutOfRangeError, "layer 4 is out of range"),
])
def test_bad_options_are_refused_before_the_harvest(demo, kwargs, error, message):
    model, tok, sae = demo
    with pytest.raises(error, match=message):
        feature_cards(model, tok, TEXTS, sae, **{"layer": LAYER, **kwargs})


def test_no_text_is_one_error(demo):
    model, tok, sae = demo
    with pytest.raises(EmptyInputError, match="no texts given"):
        feature_cards(model, tok, ["", " "], sae, top=3, layer=LAYER)
