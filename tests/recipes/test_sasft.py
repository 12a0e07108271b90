"""SASFT (report §7): language features, thresholds, the L_reduce penalty, the trainers, code-switch ratio."""

from __future__ import annotations

import json

import pytest
import torch
from qscope_testing import make_sae_tensors, tiny_qwen3, tiny_saes

from qscope_plugin.backends import as_backend
from qscope_plugin.models import DEMO_MODEL_DIR
from qscope_plugin.recipes.code_switch import (
    CodeSwitchError,
    ablation_check,
    code_switch_ratio,
    script_detector,
)
from qscope_plugin.recipes.sasft import (
    IGNORE,
    Example,
    LanguageFeatures,
    SASFTError,
    SASFTPenalty,
    collate,
    encode_examples,
    language_features,
    mean_pre_activations,
    sasft_loss,
)
from qscope_plugin.sae import QScopeSAEConfig, QwenScopeSAE

demo = pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").is_file(), reason="demo assets not built")


def _features(saes, features=None, alpha=(0.5, -0.25)) -> LanguageFeatures:
    """Hand-made S_L: features 3, 7 on every layer; language 0 = "zh" (the target), 1 = "en"."""
    features = features or {n: [3, 7] for n in saes}
    return LanguageFeatures(target="zh", languages=("zh", "en"), features=features,
                            scores={n: [1.0] * len(f) for n, f in features.items()},
                            thresholds={"zh": {n: [9.0, 9.0] for n in features},
                                        "en": {n: list(alpha) for n in features}})


def _batch(vocab: int = 1000, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    labels = ids.clone()
    labels[:, :3] = IGNORE  # prompts
    labels[mask == 0] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "language": torch.tensor([1, 0, 1])}


@pytest.fixture(scope="module")
def tiny():
    model = tiny_qwen3(n_layers=3, vocab_size=1000)
    return model, tiny_saes(model, d_sae=32, k=4)


def _brute_force(model, saes, feats, batch, layers, zero=False, normalize="all_response_tokens") -> float:
    """R30 from full SAE pre-activations of each hidden state, token by token, in float64 loops, over either
    denominator: |S| x every response token + 1 (the official script's) or |S| x the penalised tokens."""
    hidden = as_backend(model).capture(batch["input_ids"], batch["attention_mask"], layers=layers)
    n_response = n_penalised = 0
    for b in range(batch["input_ids"].shape[0]):
        for t in range(batch["input_ids"].shape[1]):
            if batch["labels"][b, t] != IGNORE:
                n_response += 1
                n_penalised += feats.languages[int(batch["language"][b])] != feats.target
    total = 0.0
    for n in layers:
        chosen = feats.features[n]
        term = 0.0
        for b in range(batch["input_ids"].shape[0]):
            j = feats.languages[int(batch["language"][b])]
            if j == feats.target:
                continue
            for t in range(batch["input_ids"].shape[1]):
                if batch["labels"][b, t] == IGNORE:
                    continue
                pre = saes[n].pre_acts(hidden[n][b, t]).double()
                for i, s in enumerate(chosen):
                    alpha = 0.0 if zero else feats.thresholds[j][n][i]
                    term += max(float(pre[s]) - alpha, 0.0)
        if normalize == "all_response_tokens":
            total += term / (n_response * len(chosen) + 1)
        else:
            total += term / (n_penalised * len(chosen))
    return total


@pytest.mark.parametrize("normalize", ["all_response_tokens", "penalised_tokens"])
@pytest.mark.parametrize("variant", ["mean", "zero"])
def test_penalty_equals_a_hand_computation(tiny, variant, normalize):
    """On a mixed batch (en, zh, en; zh penalised) each denominator gives its own hand-computed value."""
    model, saes = tiny
    feats, batch = _features(saes), _batch()
    penalty = SASFTPenalty(model, feats, saes, variant=variant, normalize=normalize)
    assert penalty.layers == [1, 2]  # the last two by default
    with torch.no_grad(), penalty.track(batch["labels"], batch["language"]) as reduce:
        as_backend(model).forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    expected = _brute_force(model, saes, feats, batch, [1, 2], zero=variant == "zero", normalize=normalize)
    assert expected > 0
    assert float(reduce()) == pytest.approx(expected, rel=1e-5)


def test_the_two_denominators_differ_by_the_penalised_share(tiny):
    """Same numerator; per layer all_response_tokens divides by |S| x 10 response tokens + 1, penalised_tokens by
    |S| x 6 (the zh example's 4 response tokens are in the batch but not penalised)."""
    model, saes = tiny
    feats, batch = _features(saes, alpha=(-1e3, -1e3)), _batch()
    assert int((batch["labels"] != IGNORE).sum()) == 4 + 4 + 2 and int((batch["labels"][[0, 2]] != IGNORE).sum()) == 6
    official = float(sasft_loss(SASFTPenalty(model, feats, saes), batch).reduce.detach())
    mean = float(sasft_loss(SASFTPenalty(model, feats, saes, normalize="penalised_tokens"), batch).reduce.detach())
    assert mean == pytest.approx(official * (2 * 10 + 1) / (2 * 6), rel=1e-5)
    with pytest.raises(SASFTError, match="normalize="):
        SASFTPenalty(model, feats, saes, normalize="tokens")


def test_penalty_is_zero_below_thresholds_and_ignores_masked_tokens_and_same_language(tiny):
    model, saes = tiny
    batch = _batch()
    high = SASFTPenalty(model, _features(saes, alpha=(1e6, 1e6)), saes)
    assert float(sasft_loss(high, batch).reduce) == 0.0
    penalty = SASFTPenalty(model, _features(saes, alpha=(-1e3, -1e3)), saes)  # every token over threshold
    everyone = float(sasft_loss(penalty, batch).reduce)
    assert everyone > 0
    same = {**batch, "language": torch.zeros(3, dtype=torch.long)}  # all examples in the target language
    assert float(sasft_loss(penalty, same).reduce) == 0.0
    # an extra masked token changes nothing but the count's denominator stays that of response tokens
    masked = {**batch, "labels": batch["labels"].clone()}
    masked["labels"][1, :] = IGNORE  # example 1 is a target-language one: only the denominator moves
    n_before, n_after = int((batch["labels"] != IGNORE).sum()), int((masked["labels"] != IGNORE).sum())
    assert float(sasft_loss(penalty, masked).reduce) == pytest.approx(everyone * (2 * n_before + 1) / (2 * n_after + 1),
                                                                      rel=1e-5)
    only_target = SASFTPenalty(model, _features(saes, alpha=(-1e3, -1e3)), saes, normalize="penalised_tokens")
    assert float(sasft_loss(only_target, same).reduce) == 0.0  # no penalised token: 0, not 0 / 0


def test_gradients_reach_the_model_not_the_sae(tiny):
    model, saes = tiny
    model.zero_grad()
    penalty = SASFTPenalty(model, _features(saes, alpha=(-1e3, -1e3)), saes, lam=1.0)
    out = sasft_loss(penalty, _batch())
    out.reduce.backward()
    grads = [p.grad for p in model.model.layers[1].parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(getattr(saes[n], key).grad is None for n in saes for key in ("W_enc", "b_enc"))
    assert model.model.layers[2].mlp.down_proj.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_gradients_reach_lora_weights(tiny):
    peft = pytest.importorskip("peft")
    model = tiny_qwen3(n_layers=3, vocab_size=1000, seed=1)
    saes = tiny_saes(model, d_sae=32, k=4)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    penalty = SASFTPenalty(lora, _features(saes, alpha=(-1e3, -1e3)), saes, lam=1.0)
    sasft_loss(penalty, _batch()).reduce.backward()
    lora_b = [p for name, p in lora.named_parameters() if "lora_B" in name and ".1." in name]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    assert all(not p.requires_grad for name, p in lora.named_parameters() if "lora" not in name)


def test_loss_is_ce_plus_lambda_reduce(tiny):
    model, saes = tiny
    batch = _batch()
    out = sasft_loss(SASFTPenalty(model, _features(saes, alpha=(-1.0, -1.0)), saes, lam=0.25), batch)
    ce = as_backend(model).forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   labels=batch["labels"]).loss
    assert float(out.ce) == pytest.approx(float(ce), rel=1e-6)
    assert float(out.loss) == pytest.approx(float(ce) + 0.25 * float(out.reduce), rel=1e-6)


def test_bad_inputs_get_one_clear_error(tiny):
    model, saes = tiny
    batch = _batch()
    penalty = SASFTPenalty(model, _features(saes), saes)
    with pytest.raises(SASFTError, match="every label in the batch is -100"):
        sasft_loss(penalty, {**batch, "labels": torch.full_like(batch["labels"], IGNORE)})
    with pytest.raises(SASFTError, match="S_L is empty"):
        SASFTPenalty(model, _features(saes, features={0: [1], 1: [], 2: [3]}), saes)
    wide = {n: QwenScopeSAE(make_sae_tensors(48, 32), QScopeSAEConfig(48, 32, 4, n)) for n in saes}
    with pytest.raises(SASFTError, match="d_model=48 .* width 64"):
        SASFTPenalty(model, _features(saes), wide)
    swapped = {1: saes[2], 2: saes[1]}
    with pytest.raises(SASFTError, match="is the SAE of layer 2"):
        SASFTPenalty(model, _features(saes), swapped)
    with pytest.raises(SASFTError, match="has no text"):
        language_features(model, None, {"zh": ["x"], "en": [" "]}, saes, target="zh")
    with pytest.raises(SASFTError, match="target language 'ko' has no data"):
        language_features(model, None, {"zh": ["x"], "en": ["y"]}, saes, target="ko")
    with pytest.raises(CodeSwitchError, match="does not know language 'xx'"):
        script_detector("text", "xx")


def test_script_detector():
    assert script_detector("hello 世界", "zh") and not script_detector("hello", "zh")
    assert script_detector("привет", "ru") and script_detector("안녕", "ko") and script_detector("ひらがな", "ja")
    assert script_detector("abc", "en") and not script_detector("123 世界。", "en")


def test_trainer_compute_loss_equals_the_plain_function(tiny, tmp_path):
    pytest.importorskip("trl")
    from transformers import TrainingArguments

    from qscope_plugin.adapters.trl import SASFTTrainer

    model, saes = tiny
    penalty = SASFTPenalty(model, _features(saes, alpha=(-1.0, -1.0)), saes, lam=0.5)
    trainer = SASFTTrainer(model=model, args=TrainingArguments(str(tmp_path), report_to="none"), penalty=penalty)
    batch = _batch()
    assert float(trainer.compute_loss(model, batch)) == pytest.approx(float(sasft_loss(penalty, batch).loss),
                                                                       rel=1e-6)
    assert trainer._sae_reduce and trainer._sae_reduce[0] == pytest.approx(float(sasft_loss(penalty, batch).reduce))


def _one_sgd_step(tiny, tmp_path, batch_size: int, accumulation: int) -> torch.Tensor:
    """Parameters of the tiny model after one SGD step of SASFTTrainer on the same two examples."""
    import copy

    from datasets import Dataset
    from transformers import TrainingArguments

    from qscope_plugin.adapters.trl import SASFTTrainer

    model, saes = tiny
    model = copy.deepcopy(model)
    batch = {**_batch(), "language": torch.tensor([1, 1, 1])}  # both penalised (en)
    rows = Dataset.from_list([{k: v[i].tolist() for k, v in batch.items()} for i in (0, 1)])  # same length, no pads
    args = TrainingArguments(str(tmp_path / f"{batch_size}x{accumulation}"), report_to="none", use_cpu=True,
                             max_steps=1, per_device_train_batch_size=batch_size, learning_rate=1.0, optim="sgd",
                             gradient_accumulation_steps=accumulation, lr_scheduler_type="constant",
                             save_strategy="no", remove_unused_columns=False)
    penalty = SASFTPenalty(model, _features(saes, alpha=(-1.0, -1.0)), saes, lam=5.0, normalize="penalised_tokens")
    trainer = SASFTTrainer(model=model, args=args, train_dataset=rows, penalty=penalty,
                           data_collator=lambda rows: {k: torch.tensor([r[k] for r in rows]) for k in rows[0]})
    trainer.train()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_gradient_accumulation_does_not_scale_the_penalty(tiny, tmp_path):
    """Two micro-batches of one example take the same step as one batch of two (the CE alone already did).

    Exact for a mean over equally many penalised tokens per micro-batch; the default denominator's +1 is added per
    micro-batch (as in the official script), so there the two differ by design, by about 1 / (|S| x tokens)."""
    pytest.importorskip("trl")
    before = torch.cat([p.detach().flatten() for p in tiny[0].parameters()])
    whole = _one_sgd_step(tiny, tmp_path, batch_size=2, accumulation=1)
    accumulated = _one_sgd_step(tiny, tmp_path, batch_size=1, accumulation=2)
    assert not torch.allclose(whole, before)
    torch.testing.assert_close(accumulated, whole, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def demo_setup():
    from qscope_plugin import load_sae
    from qscope_plugin.models import default_model, default_release, load_model

    model, tok = load_model(default_model())
    saes = {n: load_sae(default_release(), n) for n in range(4)}
    lines = json.loads((DEMO_MODEL_DIR.parents[1] / "eval_sentences.json").read_text(encoding="utf-8"))
    return model, tok, saes, lines


@demo
def test_language_features_and_thresholds_match_brute_force(demo_setup, tmp_path):
    model, tok, saes, lines = demo_setup
    texts = {"zh": lines["zh"][:8], "en": lines["en"][:8]}
    feats = language_features(model, tok, texts, saes, target="zh")
    assert all(len(f) == 2 for f in feats.features.values()) and all(s[0] > 0 for s in feats.scores.values())
    backend = as_backend(model)
    means, pres = {}, {}
    for j, group in texts.items():  # brute force: one text at a time, full encode
        acts, pre_rows = [], []
        for text in group:
            ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            h = backend.capture(ids, layers=[3])[3][0, 1:]
            acts.append(saes[3].encode(h))
            pre_rows.append(saes[3].pre_acts(h)[:, feats.features[3]])
        means[j], pres[j] = torch.cat(acts).mean(0), torch.cat(pre_rows).mean(0)
    nu = means["zh"] - means["en"]
    assert feats.features[3] == nu.topk(2).indices.tolist()
    for j in texts:
        assert feats.thresholds[j][3] == pytest.approx(pres[j].tolist(), rel=1e-4, abs=1e-4)
    assert mean_pre_activations(model, tok, texts["en"], saes, {3: feats.features[3]})[3] == pytest.approx(
        feats.thresholds["en"][3])
    path = tmp_path / "zh.json"
    feats.save(path)
    assert LanguageFeatures.load(path, saes) == feats
    other = {3: QwenScopeSAE(make_sae_tensors(128, 64), QScopeSAEConfig(128, 64, 8, 3))}
    with pytest.raises(SASFTError, match="was computed with SAE"):
        LanguageFeatures.load(path, other)


@demo
def test_sft_trainer_steps_on_the_demo_model(demo_setup, tmp_path):
    pytest.importorskip("trl")
    import copy

    from datasets import Dataset

    from qscope_plugin.adapters.trl import SASFTSFTTrainer, sasft_collator, sft_config

    model, tok, saes, lines = demo_setup
    model = copy.deepcopy(model)
    feats = language_features(model, tok, {"zh": lines["zh"][:6], "en": lines["en"][:6]}, saes, target="zh")
    examples = [Example(z, " " + e, "en") for z, e in zip(lines["zh"][:4], lines["en"][:4], strict=True)]
    rows = Dataset.from_list(encode_examples(tok, examples, feats))
    before = model.model.layers[3].mlp.down_proj.weight.detach().clone()
    trainer = SASFTSFTTrainer(model=model, args=sft_config(str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                                           logging_steps=1, learning_rate=1e-3, use_cpu=True),
                              train_dataset=rows, data_collator=sasft_collator(tok), processing_class=tok,
                              penalty=SASFTPenalty(model, feats, saes, normalize="penalised_tokens"))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "sae_reduce" in h]
    assert len(logged) == 2 and all(h["sae_reduce"] >= 0 for h in logged)
    assert not torch.equal(before, model.model.layers[3].mlp.down_proj.weight)
    trainer.save_model(str(tmp_path / "run"))
    saved = json.loads((tmp_path / "run" / "sasft.json").read_text())
    assert saved["normalize"] == "penalised_tokens" and saved["layers"] == [2, 3]
    assert (saved["device"], saved["autocast"], saved["weights_dtype"]) == ("cpu", None, "float32")  # fp32 on CPU


@demo
def test_cli_train_records_denominator_and_precision(demo_setup, tmp_path):
    pytest.importorskip("trl")
    from qscope_plugin.cli import main

    model, tok, saes, lines = demo_setup
    language_features(model, tok, {"zh": lines["zh"][:4], "en": lines["en"][:4]}, saes,
                      target="zh").save(tmp_path / "f.json")
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps({"prompt": z, "response": " " + e, "language": "en"})
                                                  for z, e in zip(lines["zh"][:2], lines["en"][:2], strict=True)))
    assert main(["sasft", "train", "--features", str(tmp_path / "f.json"), "--data", str(tmp_path / "sft.jsonl"),
                 "--out", str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "2",
                 "--normalize", "penalised_tokens", "--json"]) == 0
    saved = json.loads((tmp_path / "run" / "sasft.json").read_text())
    assert (saved["normalize"], saved["device"], saved["autocast"]) == ("penalised_tokens", "cpu", None)


@demo
def test_code_switch_ratio_and_ablation_on_the_demo(demo_setup):
    model, tok, saes, lines = demo_setup
    prompts = [z + " " + e.split()[0] for z, e in zip(lines["zh"][:4], lines["en"][:4], strict=True)]
    report = code_switch_ratio(model, tok, prompts, languages=["zh", "en"], max_new_tokens=8)
    for c in report.completions:
        for lang in ("zh", "en"):
            first = c.first_switch[lang]
            assert (first is not None) == script_detector(c.text, lang)
            if first is not None:
                assert script_detector(tok.decode(c.token_ids[: first + 1]), lang)
                assert not script_detector(tok.decode(c.token_ids[:first]), lang)
    assert report.ratios["zh"] == sum(c.first_switch["zh"] is not None for c in report.completions) / 4
    check = ablation_check(model, tok, prompts, saes, language="zh", feature=1, control_feature=2,
                           strength=0.0, max_new_tokens=8)
    assert check.layer == 3 and check.ablated == check.control == check.baseline == report.ratios["zh"]
    with pytest.raises(CodeSwitchError, match="does not know language 'tlh'"):
        code_switch_ratio(model, tok, prompts, languages=["tlh"])


def test_encode_and_collate_mask_prompts_and_padding():
    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    feats = LanguageFeatures("zh", ("zh", "en"), {0: [1]}, {0: [1.0]}, {"zh": {0: [0.0]}, "en": {0: [0.0]}})
    rows = encode_examples(Tok(), [Example("ab", "cd", "en"), Example("a", "b", "zh")], feats)
    batch = collate(rows, pad_id=0)
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 99, 100], [IGNORE, 98, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["language"].tolist() == [1, 0]
    with pytest.raises(SASFTError, match="language 'ko' has no thresholds"):
        encode_examples(Tok(), [Example("a", "b", "ko")], feats)


def test_cli_usage_errors_exit_2(tmp_path, capsys):
    from qscope_plugin.cli import main

    assert main(["sasft", "features", "--texts", str(tmp_path / "none.json"), "--target", "zh", "--out", "f"]) == 2
    assert "cannot read --texts file" in capsys.readouterr().err
    (tmp_path / "rows.jsonl").write_text('{"prompt": "a"}\n')
    assert main(["sasft", "train", "--features", "f", "--data", str(tmp_path / "rows.jsonl"), "--out", "o"]) == 2
    assert "prompt, response and language" in capsys.readouterr().err
