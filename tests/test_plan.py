"""``qscope plan``: memory per device from configs alone, on the seven Qwen-Scope backbones' real configs."""

from __future__ import annotations

import json

import pytest
from real_size import CONFIGS, meta_model

from qscope_plugin.catalogue import releases
from qscope_plugin.cli import main
from qscope_plugin.plan import PlanError, SAEDims, make_plan, meta_parameters, parse_bytes

GIB = 1 << 30


def _release(model_id: str):
    return next(r for r in releases() if r.model_id == model_id)


@pytest.mark.parametrize("model_id", sorted(CONFIGS))
def test_backbone_shares_add_up_to_the_models_parameters(model_id):
    rel = _release(model_id)
    dims = SAEDims(rel.d_model, rel.d_sae, rel.n_layers)
    plan = make_plan(CONFIGS[model_id], dims, layers=range(rel.n_layers), devices=["cuda:0", "cuda:1"],
                     memory=[1 << 50] * 2, dtype="bfloat16", model=model_id)
    text_model = meta_model(model_id, text_only=True)
    counted = {id(p): p.numel() for p in text_model.parameters()}  # tied embeddings count once
    assert sum(d.backbone_bytes for d in plan.devices) == 2 * sum(counted.values())
    assert [n for d in plan.devices for n in d.layers] == list(range(rel.n_layers))  # every block once, in order
    assert all(d.layers for d in plan.devices)
    assert plan.devices[0].sae_bytes_per_layer == rel.bytes_per_layer // 2  # bf16: half the float32 file
    assert plan.fits and plan.layers_per_pass == rel.n_layers and plan.passes == 1


def test_a_small_device_gets_layer_passes_and_a_too_small_one_is_refused_naming_the_option():
    model_id = "Qwen/Qwen3-1.7B-Base"
    rel = _release(model_id)
    dims = SAEDims(rel.d_model, rel.d_sae, rel.n_layers)
    embed, blocks, head = meta_parameters(CONFIGS[model_id])
    backbone = 2 * (embed + sum(blocks) + head)
    roomy = make_plan(CONFIGS[model_id], dims, layers=range(28), devices=["cuda:0"], memory=[80 * GIB],
                      dtype="bfloat16")
    assert roomy.fits and roomy.passes == 1 and roomy.devices[0].peak_bytes <= 0.9 * 80 * GIB
    memory = int((backbone + 4 * rel.bytes_per_layer / 2 + GIB) / 0.9)  # room for about 8 layers' SAEs, not 28
    tight = make_plan(CONFIGS[model_id], dims, layers=range(28), devices=["cuda:0"], memory=[memory],
                      dtype="bfloat16")
    assert tight.fits and 1 < tight.passes < 28 and tight.devices[0].peak_bytes <= 0.9 * memory
    assert tight.devices[0].sae_bytes_held == tight.layers_per_pass * rel.bytes_per_layer // 2
    with pytest.raises(PlanError, match="--device"):
        make_plan(CONFIGS[model_id], dims, layers=[14], devices=["cuda:0"], memory=[GIB], dtype="bfloat16").check()
    big_batch = make_plan(CONFIGS[model_id], dims, layers=[14], devices=["cuda:0"], memory=[8 * GIB],
                          dtype="bfloat16", batch_size=100_000)
    assert not big_batch.fits and "--batch-size" in big_batch.advice


def test_memory_sizes_parse_and_bad_ones_are_refused():
    assert parse_bytes("80GiB") == 80 * GIB and parse_bytes("1.5 GB") == 1_500_000_000 and parse_bytes("512") == 512
    for bad in ("eighty", "80XB", ""):
        with pytest.raises(PlanError, match="memory size"):
            parse_bytes(bad)


def test_cli_prints_json_per_device_and_exits_2_when_it_cannot_fit(tmp_path, capsys):
    folder = tmp_path / "qwen3-1.7b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIGS["Qwen/Qwen3-1.7B-Base"]))
    args = ["plan", "--model", str(folder), "--release", "qwen-scope-3-1.7b-base-w32k-l50", "--device",
            "cuda:0,cuda:1"]
    assert main([*args, "--memory", "24GiB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [d["device"] for d in plan["devices"]] == ["cuda:0", "cuda:1"] and plan["fits"]
    assert plan["dtype"] == "bfloat16" and plan["batch_size"] >= 1
    assert main([*args, "--memory", "2GiB"]) == 2
    assert "does not fit" in capsys.readouterr().out


def test_a_command_refuses_a_cuda_run_that_cannot_fit_before_loading(tmp_path, monkeypatch):
    import argparse

    from qscope_plugin import plan
    from qscope_plugin.cli._options import UsageError, plan_defaults

    folder = tmp_path / "qwen3-8b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIGS["Qwen/Qwen3-8B-Base"]))
    import torch

    from qscope_plugin import models

    monkeypatch.setattr(plan, "device_memory", lambda device: 16 * GIB)  # a 16 GiB GPU, whatever this machine has
    monkeypatch.setattr(models, "check_device", lambda device: torch.device(device) if device else None)
    args = argparse.Namespace(model=str(folder), release="qwen-scope-3-8b-base-w64k-l50", layers="all",
                              device="cuda:0", sae_device=None, batch_size=None)
    with pytest.raises(UsageError, match="--device"):  # 8B in bf16 alone takes 15+ GiB
        plan_defaults(args)
    args.device = "cpu"
    plan_defaults(args)  # host runs are not refused


def _fake_gpu(monkeypatch, memory: int) -> None:
    """A CUDA device of ``memory`` bytes to the planner, whatever this machine has (no CUDA call is made)."""
    import torch

    from qscope_plugin import models, plan

    monkeypatch.setattr(plan, "device_memory", lambda device: memory)
    monkeypatch.setattr(models, "check_device", lambda device: torch.device(device) if device else None)


def _parsed(tmp_path, *argv: str):
    from qscope_plugin.cli import build_parser

    folder = tmp_path / "qwen3-1.7b"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIGS["Qwen/Qwen3-1.7B-Base"]))
    data = ["x.jsonl"] if argv[0] == "footprints" else ["--data", "x.jsonl"]
    return build_parser().parse_args([*argv, *data, "--model", str(folder), "--release",
                                      "qwen-scope-3-1.7b-base-w32k-l50"])


@pytest.mark.parametrize(("command", "default"), [(["evaluate", "all", "--out", "r"], 8),
                                                  (["footprints", "--out", "f.pt"], 16),
                                                  (["dashboard", "--layer", "3", "--out", "d.html"], 16)])
def test_host_runs_keep_each_commands_default_batch_size_and_one_pass(tmp_path, command, default):
    from qscope_plugin.cli._options import plan_defaults

    args = _parsed(tmp_path, *command)
    assert args.batch_size is None  # left for the plan
    plan_defaults(args)
    assert args.batch_size == default and getattr(args, "layers_per_pass", None) is None
    given = _parsed(tmp_path, *command, "--batch-size", "3")
    plan_defaults(given)
    assert given.batch_size == 3


def test_a_cuda_run_takes_the_plans_batch_size_capped_by_the_default(tmp_path, monkeypatch):
    from qscope_plugin.cli._options import plan_defaults

    rel = _release("Qwen/Qwen3-1.7B-Base")
    dims = SAEDims(rel.d_model, rel.d_sae, rel.n_layers)
    embed, blocks, head = meta_parameters(CONFIGS["Qwen/Qwen3-1.7B-Base"])
    backbone = 2 * (embed + sum(blocks) + head)
    # room for the backbone, one layer's bf16 SAE and a few rows of 512-token activations: a batch of 2-15
    memory = int((backbone + rel.bytes_per_layer / 2 + GIB / 4) / 0.9)
    expected = make_plan(CONFIGS["Qwen/Qwen3-1.7B-Base"], dims, layers=[3], devices=["cuda:0"], memory=[memory])
    assert expected.fits and 1 < expected.batch_size < 16  # the case worth testing: the plan, not the cap, decides
    _fake_gpu(monkeypatch, memory)
    args = _parsed(tmp_path, "dashboard", "--layer", "3", "--out", "d.html", "--device", "cuda:0")
    plan_defaults(args)
    assert args.batch_size == expected.batch_size
    _fake_gpu(monkeypatch, 80 * GIB)  # roomy: the plan allows far more than 16, the command's default caps it
    args = _parsed(tmp_path, "dashboard", "--layer", "3", "--out", "d.html", "--device", "cuda:0")
    plan_defaults(args)
    assert args.batch_size == 16


def test_a_cuda_evaluate_whose_saes_do_not_all_fit_runs_the_plans_layer_passes(tmp_path, monkeypatch):
    from qscope_plugin.cli._options import plan_defaults

    rel = _release("Qwen/Qwen3-1.7B-Base")
    dims = SAEDims(rel.d_model, rel.d_sae, rel.n_layers)
    embed, blocks, head = meta_parameters(CONFIGS["Qwen/Qwen3-1.7B-Base"])
    memory = int((2 * (embed + sum(blocks) + head) + 4 * rel.bytes_per_layer / 2 + GIB) / 0.9)
    expected = make_plan(CONFIGS["Qwen/Qwen3-1.7B-Base"], dims, layers=range(28), devices=["cuda:0"],
                         memory=[memory])
    assert expected.fits and expected.passes > 1
    _fake_gpu(monkeypatch, memory)
    args = _parsed(tmp_path, "evaluate", "all", "--out", "r", "--device", "cuda:0")
    plan_defaults(args)
    assert args.layers_per_pass == expected.layers_per_pass and args.batch_size == min(expected.batch_size, 8)
    given = _parsed(tmp_path, "evaluate", "all", "--out", "r", "--device", "cuda:0", "--layers-per-pass", "2")
    plan_defaults(given)
    assert given.layers_per_pass == 2  # an explicit value is the plan's input, not replaced
