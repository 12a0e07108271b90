"""SAE quality per layer: every number against a direct computation, one text at a time, with plain hooks."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from qscope_testing import qwen3_tokenizer, tiny_qwen3, tiny_saes

from qscope_plugin.backends import as_backend
from qscope_plugin.cli import main
from qscope_plugin.models import DEMO_MODEL_DIR
from qscope_plugin.recipes._harvest import EmptyInputError, pad
from qscope_plugin.recipes.quality import (
    QualityError,
    QualityReport,
    clean_ce,
    clean_forward,
    evaluate_saes,
    spliced_cost,
)
from qscope_plugin.recipes.reports import write_report

DEMO_DIR = Path(DEMO_MODEL_DIR).parents[1]
demo = pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").is_file(), reason="demo assets not built")
TEXTS = ["The cat sat on the mat.", "我妹妹昨天买了一只小白猫。", "A", "Rain again today, and the bus was late",
         "一二三四五六七八九十", "def f(x):\n    return x + 1", "Hello hello hello hello", "它很好。"]
"""Mixed lengths (one single-token text, which has no next token) so that batches pad."""


def _demo_texts() -> list[str]:
    sentences = json.loads((DEMO_DIR / "eval_sentences.json").read_text(encoding="utf-8"))
    return sentences["zh"][:12] + sentences["en"][:12]


@pytest.fixture(scope="module", params=["tiny", pytest.param("demo", marks=demo)])
def setup(request):
    """``(model, tokenizer, saes, texts)``: a random Qwen3 with random SAEs, and the demo with its own SAEs."""
    if request.param == "tiny":
        model = tiny_qwen3(n_layers=3)
        return model, qwen3_tokenizer(), tiny_saes(model, d_sae=128, k=8), TEXTS
    from qscope_plugin import load_sae
    from qscope_plugin.models import default_model, default_release, load_model

    model, tok = load_model(default_model())
    return model, tok, {n: load_sae(default_release(), n) for n in range(4)}, _demo_texts() + TEXTS


@pytest.fixture(scope="module")
def report(setup):
    model, tok, saes, texts = setup
    return evaluate_saes(model, tok, texts, saes, batch_size=4, progress=False)


def _ids(tok, texts: list[str]) -> list[torch.Tensor]:
    return [torch.tensor([ids]) for ids in tok(texts, add_special_tokens=False)["input_ids"] if ids]


@contextmanager
def _replace_block_output(model, layer: int, fn):
    """The hand-written splice: a plain forward hook on the decoder layer that swaps its hidden state."""

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        new = fn(hidden)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def _block_outputs(model, ids: list[torch.Tensor], layer: int) -> torch.Tensor:
    """Block ``layer``'s output at every token of every text, texts run one at a time, concatenated."""
    kept = []
    with _replace_block_output(model, layer, lambda h: kept.append(h[0].float()) or h):
        for row in ids:
            model(row)
    return torch.cat(kept)


@torch.no_grad()
def _direct_losses(model, ids: list[torch.Tensor], layer: int | None = None, fn=None) -> tuple[torch.Tensor, ...]:
    """Per predicted token of every text: (CE, log-probs), one text at a time, block ``layer`` replaced by ``fn``."""
    ce, logp = [], []
    for row in ids:
        if layer is None:
            logits = model(row).logits[0, :-1].float()
        else:
            with _replace_block_output(model, layer, fn):
                logits = model(row).logits[0, :-1].float()
        ce.append(F.cross_entropy(logits, row[0, 1:], reduction="none"))
        logp.append(logits.log_softmax(-1))
    return torch.cat(ce), torch.cat(logp)


def test_fvu_l0_dead_and_dense_equal_a_dense_encode_by_hand(setup, report):
    model, tok, saes, texts = setup
    ids = _ids(tok, texts)
    for n, sae in saes.items():
        x = _block_outputs(model, ids, n)
        z = sae.encode(x).float()
        x_hat = sae.decode(z).float()
        fvu = ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
        density = (z > 0).float().mean(0)
        q = report.layers[n]
        assert q.n_tokens == x.shape[0] == sum(row.shape[1] for row in ids)
        assert q.fvu == pytest.approx(fvu, rel=1e-4) and q.fvu == pytest.approx(sae.fvu(x), rel=1e-4)
        assert q.explained_variance == pytest.approx(1 - fvu, rel=1e-4)
        assert q.mean_l0 == pytest.approx((z > 0).sum(-1).float().mean().item(), rel=1e-6)
        assert q.dead_features == int((density == 0).sum())
        assert q.dense_features == int((density > 0.1).sum())
        assert q.dead_fraction == q.dead_features / sae.cfg.d_sae
        assert q.dense_fraction == q.dense_features / sae.cfg.d_sae
    assert any(q.dense_features for q in report.layers.values())  # the dense count is exercised, not always 0


def test_exclude_first_token_drops_position_0_from_fvu_l0_dead_and_dense_only(setup, report):
    model, tok, saes, texts = setup
    ids = _ids(tok, texts)
    excluded = evaluate_saes(model, tok, texts, saes, batch_size=4, exclude_first_token=True, progress=False)
    assert excluded.exclude_first_token and not report.exclude_first_token
    for n, sae in saes.items():
        x = _block_outputs(model, ids, n)
        firsts = torch.tensor([0, *torch.cumsum(torch.tensor([row.shape[1] for row in ids]), 0)[:-1].tolist()])
        keep = torch.ones(len(x), dtype=torch.bool)
        keep[firsts] = False
        x = x[keep]  # the brute force: every text's block outputs without its first token
        z = sae.encode(x).float()
        density = (z > 0).float().mean(0)
        q, every = excluded.layers[n], report.layers[n]
        assert q.n_tokens == len(x) == every.n_tokens - len(ids)
        assert q.fvu == pytest.approx(sae.fvu(x), rel=1e-4) and q.fvu != pytest.approx(every.fvu, rel=1e-6)
        assert q.mean_l0 == pytest.approx((z > 0).sum(-1).float().mean().item(), rel=1e-6)
        assert (q.dead_features, q.dense_features) == (int((density == 0).sum()), int((density > 0.1).sum()))
        for field in ("n_predicted", "ce_clean", "ce_spliced", "ce_zero", "kl_spliced", "kl_zero"):
            assert getattr(q, field) == pytest.approx(getattr(every, field), rel=1e-6), field


def test_ce_and_kl_equal_a_hand_written_splice_hook(setup, report):
    model, tok, saes, texts = setup
    ids = _ids(tok, texts)
    ce_clean, logp_clean = _direct_losses(model, ids)
    for n, sae in saes.items():
        q = report.layers[n]
        assert q.n_predicted == ce_clean.numel() == sum(row.shape[1] - 1 for row in ids)
        assert q.ce_clean == pytest.approx(ce_clean.mean().item(), rel=1e-5)
        for fn, ce_field, kl_field in ((lambda h, sae=sae: sae.reconstruct(h).to(h.dtype), "ce_spliced",
                                        "kl_spliced"), (torch.zeros_like, "ce_zero", "kl_zero")):
            ce, logp = _direct_losses(model, ids, n, fn)
            kl = (logp_clean.exp() * (logp_clean - logp)).sum(-1)
            assert getattr(q, ce_field) == pytest.approx(ce.mean().item(), rel=1e-5)
            assert getattr(q, kl_field) == pytest.approx(kl.mean().item(), rel=1e-4, abs=1e-6)
        recovered = (q.ce_zero - q.ce_spliced) / (q.ce_zero - q.ce_clean)
        assert q.ce_loss_recovered == pytest.approx(recovered, rel=1e-9)
        assert q.ce_spliced != q.ce_clean and q.kl_spliced > 0  # the splice really ran


def test_an_identity_splice_gives_the_clean_ce_exactly(setup):
    model, tok, saes, texts = setup
    backend = as_backend(model)
    ids, mask, _ = pad([row[0].tolist() for row in _ids(tok, texts[:4])], 0, "right")
    clean = clean_forward(backend, ids, mask)
    ce, kl = spliced_cost(backend, ids, mask, clean, max(saes), lambda hidden, n, kwargs: hidden)
    assert ce == clean_ce(backend, clean) and kl == 0.0
    ce_zero, kl_zero = spliced_cost(backend, ids, mask, clean, max(saes), lambda h, n, kw: torch.zeros_like(h))
    assert ce_zero != ce and kl_zero > 0


@pytest.mark.parametrize("chunk_positions", [1, 7])
def test_chunked_logits_and_layer_passes_equal_one_unchunked_pass(setup, report, chunk_positions):
    """CE / KL from one chunk of positions at a time (and layers in passes of one) equal the default run, whose
    every number is checked against full-logit forwards above, within 1e-5."""
    model, tok, saes, texts = setup
    chunked = evaluate_saes(model, tok, texts, saes, batch_size=4, progress=False, chunk_positions=chunk_positions,
                            layers_per_pass=1)
    for n, q in report.layers.items():
        for field, value in vars(chunked.layers[n]).items():
            if field != "ce_loss_recovered":
                assert value == pytest.approx(getattr(q, field), rel=1e-5, abs=1e-7), (n, field)
        conditioning = q.ce_zero / abs(q.ce_zero - q.ce_clean)  # a ratio of CE differences, as below
        assert chunked.layers[n].ce_loss_recovered == pytest.approx(q.ce_loss_recovered, abs=1e-5 * conditioning)


def test_bad_chunk_and_pass_options_are_refused(setup):
    model, tok, saes, texts = setup
    for option in ({"chunk_positions": 0}, {"layers_per_pass": 0}, {"layers_per_pass": True}):
        with pytest.raises(QualityError, match=next(iter(option))):
            evaluate_saes(model, tok, texts, saes, progress=False, **option)


def test_batch_size_and_padding_do_not_change_the_result(setup, report):
    model, tok, saes, texts = setup
    alone = evaluate_saes(model, tok, texts, saes, batch_size=1, progress=False)
    for n, q in report.layers.items():
        for field, value in vars(alone.layers[n]).items():
            if field != "ce_loss_recovered":
                assert getattr(q, field) == pytest.approx(value, rel=1e-5, abs=1e-7), (n, field)
        # a ratio of CE differences: on a random model CE zero ≈ CE clean, so its error is 1e-5 CE / |that gap|
        conditioning = q.ce_zero / abs(q.ce_zero - q.ce_clean)
        assert q.ce_loss_recovered == pytest.approx(alone.layers[n].ce_loss_recovered, abs=1e-5 * conditioning)


@demo
@pytest.mark.parametrize("framework", ["bridge", "nnsight"])
def test_every_backend_gives_the_same_report(framework):
    """Logits come from the framework's own forward and edits from the blocks underneath: the same numbers."""
    import copy

    from qscope_plugin import load_sae
    from qscope_plugin.models import default_model, default_release, load_model

    model, tok = load_model(default_model())
    if framework == "bridge":
        pytest.importorskip("transformer_lens")
        from qscope_plugin.adapters.transformer_lens import boot as wrap
    else:
        pytest.importorskip("nnsight")
        from qscope_plugin.adapters.nnsight import load as wrap
    saes = {n: load_sae(default_release(), n) for n in (1, 3)}
    texts = _demo_texts()[::4] + TEXTS
    plain = evaluate_saes(model, tok, texts, saes, batch_size=4, progress=False)
    other = evaluate_saes(wrap(copy.deepcopy(model), tokenizer=tok), tok, texts, saes, batch_size=4, progress=False)
    for n, q in plain.layers.items():
        for field, value in vars(other.layers[n]).items():
            assert getattr(q, field) == pytest.approx(value, rel=1e-5, abs=1e-7), (framework, n, field)


def test_json_round_trip_and_the_written_report(report, tmp_path):
    again = QualityReport.from_json(json.loads(json.dumps(report.to_json())))
    assert again == report
    files = write_report(report, tmp_path)
    assert [f.name for f in files] == ["report.json", "report.md", "quality.png"]
    assert QualityReport.from_json(json.loads(files[0].read_text(encoding="utf-8"))) == report
    markdown = files[1].read_text(encoding="utf-8")
    assert markdown.count("\n| ") == 1 + len(report.layers) and f"{report.layers[0].fvu:.4f}" in markdown


def _strict_loads(text: str):
    """``json.loads`` refusing ``NaN`` / ``Infinity``, as every standard JSON parser does."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_nan_survives_the_round_trip_as_null(report, tmp_path, capsys):
    import dataclasses

    layer = min(report.layers)
    broken = dataclasses.replace(report, layers={**report.layers, layer: dataclasses.replace(
        report.layers[layer], ce_loss_recovered=math.nan, fvu=math.inf)})
    again = QualityReport.from_json(_strict_loads(json.dumps(broken.to_json())))
    assert math.isnan(again.layers[layer].ce_loss_recovered) and math.isnan(again.layers[layer].fvu)
    assert again.layers[layer].mean_l0 == report.layers[layer].mean_l0
    written = _strict_loads(write_report(broken, tmp_path)[0].read_text(encoding="utf-8"))
    assert written["layers"][str(layer)]["ce_loss_recovered"] is None
    from types import SimpleNamespace

    from qscope_plugin.cli._options import emit

    emit(SimpleNamespace(json=True), broken.to_json() | {"raw": math.nan}, print)
    assert _strict_loads(capsys.readouterr().out)["raw"] is None


def test_bad_input_is_one_error(setup):
    model, tok, saes, _ = setup
    with pytest.raises(EmptyInputError):
        evaluate_saes(model, tok, [" ", ""], saes, progress=False)
    with pytest.raises(QualityError, match="two tokens"):
        evaluate_saes(model, tok, ["A"], saes, progress=False)
    for options, message in (({"dense_threshold": math.nan}, "dense_threshold"), ({"batch_size": 0}, "batch_size"),
                             ({"max_length": 1}, "max_length")):
        with pytest.raises(QualityError, match=message):
            evaluate_saes(model, tok, TEXTS, saes, progress=False, **options)
    with pytest.raises(QualityError, match="no SAEs"):
        evaluate_saes(model, tok, TEXTS, {}, progress=False)


@demo
def test_cli_writes_the_three_files(tmp_path, capsys):
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS), encoding="utf-8")
    assert main(["evaluate", "0-3", "--data", str(data), "--out", str(tmp_path / "out"), "--batch-size", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["quality.png", "report.json", "report.md"]
    written = QualityReport.from_json(json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8")))
    assert sorted(written.layers) == [0, 1, 2, 3] and written.n_texts == len(TEXTS)
    assert "| 3 | " in capsys.readouterr().out


@demo
@pytest.mark.parametrize(("layers", "content", "message"), [
    ("0-3", "", "is empty"),
    ("0-3", '{"text": " "}\n', "holds no text"),
    ("4", '{"text": "hello there"}\n', r"layer 4 is out of range .*0\.\.3"),
    ("0", '{"body": "hello there"}\n', "no column 'text'"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, layers, content, message):
    import re

    data = tmp_path / "texts.jsonl"
    data.write_text(content, encoding="utf-8")
    assert main(["evaluate", layers, "--data", str(data), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err) and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@demo
@pytest.mark.parametrize(("option", "message"), [(["--max-length", "1"], "max_length=1"),  # --batch-size 0: argparse
                                                 (["--dense-threshold", "2"], "dense_threshold=2.0")])
def test_cli_bad_options_exit_2_before_the_model_loads(tmp_path, capsys, monkeypatch, option, message):
    import qscope_plugin.models

    monkeypatch.setattr(qscope_plugin.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    data = tmp_path / "texts.jsonl"
    data.write_text(json.dumps({"text": "hello there"}) + "\n", encoding="utf-8")
    assert main(["evaluate", "0", "--data", str(data), "--out", str(tmp_path / "out"), *option]) == 2
    assert message in capsys.readouterr().err


@demo
def test_cli_first_token_flags(tmp_path, capsys):
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS), encoding="utf-8")
    for flag, expected in (([], False), (["--exclude-first-token"], True), (["--keep-first-token"], False)):
        assert main(["evaluate", "2", "--data", str(data), "--out", str(tmp_path / "out"), "--json", *flag]) == 0
        assert json.loads(capsys.readouterr().out)["exclude_first_token"] is expected


class _OneTextPerBatch:
    """The three members of an ``ActivationsStore`` that ``sae_lens.evals.run_evals`` uses: one text per batch,
    so SAELens sees exactly our tokens (its real store packs a dataset into fixed-length contexts)."""

    def __init__(self, rows: list[list[int]]) -> None:
        self.rows, self.next = rows, 0
        self.context_size, self.store_batch_size_prompts = max(map(len, rows)), 1

    def get_batch_tokens(self, n: int) -> torch.Tensor:
        self.next += 1
        return torch.tensor([self.rows[self.next - 1]])

    def reset_input_dataset(self) -> None:
        self.next = 0


@demo
def test_sae_lens_run_evals_gives_the_same_numbers_on_the_same_tokens():
    """SAELens' own evaluation on a TransformerBridge of the demo: equal FVU, L0, dead, dense and CE numbers.
    KL differs by design: SAELens also averages it over each text's last position, which has no next token."""
    pytest.importorskip("transformer_lens")
    from sae_lens import SAE
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler
    from sae_lens.util import get_special_token_ids

    from qscope_plugin import load_sae
    from qscope_plugin.adapters.transformer_lens import boot
    from qscope_plugin.models import default_model, default_release, load_model

    model, tok = load_model(default_model())
    texts = _demo_texts()[::3]
    rows = [ids for ids in tok(texts, add_special_tokens=False)["input_ids"] if ids]
    bridge = boot(model, tokenizer=tok)
    # its default exclude_special_tokens=True masks <|endoftext|> (absent here) and so flattens our ragged batches
    assert not set(get_special_token_ids(bridge.tokenizer)) & {i for row in rows for i in row}
    ids = [torch.tensor([row]) for row in rows]
    for n in range(4):
        ours = evaluate_saes(model, tok, texts, {n: load_sae(default_release(), n)}, progress=False).layers[n]
        sae = SAE.from_pretrained(default_release(), f"layer{n}")
        config = EvalConfig(batch_size_prompts=1, n_eval_reconstruction_batches=len(rows),
                            n_eval_sparsity_variance_batches=len(rows), compute_kl=True, compute_ce_loss=True,
                            compute_sparsity_metrics=True, compute_variance_metrics=True,
                            compute_featurewise_density_statistics=True)
        theirs, features = run_evals(sae, _OneTextPerBatch(rows), bridge, ActivationScaler(), config)
        density = torch.tensor(features["feature_density"])
        assert theirs["reconstruction_quality"]["explained_variance"] == pytest.approx(ours.explained_variance,
                                                                                       rel=1e-6)
        assert theirs["sparsity"]["l0"] == ours.mean_l0
        assert (int((density == 0).sum()), int((density > 0.1).sum())) == (ours.dead_features, ours.dense_features)
        perf = theirs["model_performance_preservation"]
        for field, key in (("ce_clean", "ce_loss_without_sae"), ("ce_spliced", "ce_loss_with_sae"),
                           ("ce_zero", "ce_loss_with_ablation"), ("ce_loss_recovered", "ce_loss_score")):
            assert perf[key] == pytest.approx(getattr(ours, field), rel=1e-5), field
        # KL over every position = ours over the predicted ones + the last positions, computed by hand
        behaviour = theirs["model_behavior_preservation"]
        for fn, field, key in ((lambda h, n=n: load_sae(default_release(), n).reconstruct(h).to(h.dtype), "kl_spliced",
                                "kl_div_with_sae"), (torch.zeros_like, "kl_zero", "kl_div_with_ablation")):
            kl_last = _last_position_kl(model, ids, n, fn)
            every = (getattr(ours, field) * ours.n_predicted + kl_last) / ours.n_tokens
            assert behaviour[key] == pytest.approx(every, rel=1e-4), field
            assert behaviour[key] != pytest.approx(getattr(ours, field), rel=1e-3)  # the difference is real


@torch.no_grad()
def _last_position_kl(model, ids: list[torch.Tensor], layer: int, fn) -> float:
    """Σ over texts of KL(clean ‖ edited) at the last token, block ``layer`` replaced by ``fn``."""
    total = 0.0
    for row in ids:
        clean = model(row).logits[0, -1].float().log_softmax(-1)
        with _replace_block_output(model, layer, fn):
            edited = model(row).logits[0, -1].float().log_softmax(-1)
        total += (clean.exp() * (clean - edited)).sum().item()
    return total
