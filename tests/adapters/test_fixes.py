"""Each upstream defect, reproduced without its fix (in a fresh process: the fixes patch classes process-wide)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qscope_plugin.adapters import _fixes

TESTS = Path(__file__).resolve().parents[1]


def run_fresh(code: str) -> str:
    prelude = (
        "import os, sys, warnings, logging\nos.environ['HF_HUB_OFFLINE'] = '1'\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "warnings.filterwarnings('ignore'); logging.disable(logging.WARNING)\nimport torch\n"
    )
    out = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


BOOT_UNPATCHED = """
from transformer_lens.model_bridge import TransformerBridge
from qscope_testing import qwen3_tokenizer, tiny_model
tok = qwen3_tokenizer()
ids = tok("The quick brown fox jumps over", return_tensors="pt")["input_ids"]
import copy
hf = tiny_model({family!r})
hf.config.architectures = [type(hf).__name__]
reference = copy.deepcopy(hf)  # the bridge wraps the modules of the model it is given
{patch}
br = TransformerBridge.boot_transformers("tiny", hf_model=hf, tokenizer=tok)
"""


@pytest.mark.parametrize("patched", [False, True])
def test_kv_cache_kwarg(patched):
    code = BOOT_UNPATCHED.format(family="qwen3", patch="from qscope_plugin.adapters._fixes import "
                                 "fix_tl_bridge_kv_cache_kwarg as f; assert f()" if patched else "") + """
ref = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         pad_token_id=0)
out = br.generate(ids, max_new_tokens=12, do_sample=False, use_past_kv_cache=True, return_type="tokens",
                  verbose=False, stop_at_eos=False)
print(torch.equal(ref, out))
"""
    assert run_fresh(code) == str(patched)  # without the fix, cached generation silently diverges from HF


@pytest.mark.parametrize("patched", [False, True])
def test_gated_delta_net_functions(patched):
    code = BOOT_UNPATCHED.format(family="qwen3_5", patch="from qscope_plugin.adapters._fixes import "
                                 "fix_tl_gated_delta_net_functions as f; assert f()" if patched else "") + """
try:
    ok = torch.allclose(br(ids), reference(ids).logits, atol=1e-5)
except AttributeError as e:
    ok = "causal_conv1d_fn" in str(e) and "crash"
print(ok)
"""
    assert run_fresh(code) == ("True" if patched else "crash")


@pytest.mark.parametrize("patched", [False, True])
def test_saelens_bridge_hook_aliases(patched):
    code = """
from sae_lens.analysis.sae_transformer_bridge import SAETransformerBridge
from qscope_testing import qwen3_tokenizer, tiny_model
tok = qwen3_tokenizer()
hf = tiny_model("qwen3")
hf.config.architectures = [type(hf).__name__]
""" + ("from qscope_plugin.adapters._fixes import fix_saelens_bridge_hook_aliases as f; assert f()\n" if patched
       else "") + """
br = SAETransformerBridge.boot_transformers("tiny", hf_model=hf, tokenizer=tok)
calls = []
br.run_with_hooks(torch.tensor([[1, 2, 3]]), fwd_hooks=[("blocks.1.hook_resid_post", lambda a, hook: calls.append(1))])
print(len(calls))
"""
    assert run_fresh(code) == ("1" if patched else "0")  # unpatched: the hook silently never runs


@pytest.mark.parametrize("patched", [False, True])
def test_saelens_save_model_non_contiguous(patched, tmp_path):
    # the plugin's SAELens registration applies the fix (importing qscope_plugin registers when SAELens loads)
    code = ("import qscope_plugin.adapters.sae_lens\n" if patched else "") + f"""
from sae_lens import TopKSAE, TopKSAEConfig
sae = TopKSAE(TopKSAEConfig(d_in=4, d_sae=8, k=2, device="cpu"))
state = {{key: torch.randn_like(value) for key, value in sae.state_dict().items()}}
state["W_dec"] = torch.randn(4, 8).T  # a view, as the plugin's zero-copy loads give
sae.load_state_dict(state, assign=True)
try:
    sae.save_model({str(tmp_path)!r})
except ValueError as e:
    print("non contiguous" in str(e) and "refused")
else:
    back = TopKSAE.load_from_disk({str(tmp_path)!r})
    x = torch.randn(3, 4)
    print(torch.equal(back(x), sae(x)) and not sae.W_dec.is_contiguous())  # copies made for the file only
"""
    assert run_fresh(code) == ("True" if patched else "refused")


def test_fixes_are_idempotent_and_gated():
    _fixes.apply_all()
    assert _fixes.apply_all() == dict.fromkeys(
        ["fix_tl_bridge_kv_cache_kwarg", "fix_tl_gated_delta_net_functions", "fix_saelens_bridge_hook_aliases",
         "fix_saelens_save_model_non_contiguous"], False)
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    # with the fix in place the probe sees the cache used: the defect detector reports it absent
    assert not _fixes._kv_cache_kwarg_ignored(AttentionBridge._update_kv_cache)


def test_fixes_apply_in_a_type_checked_process():
    """TransformerLens' own test option ``--jaxtyping-packages=transformer_lens,beartype.beartype`` checks every
    annotated call at runtime: the fixes' probes must pass real values, and every family must boot and generate."""
    code = """
from jaxtyping import TypeCheckError, install_import_hook
install_import_hook(["transformer_lens"], "beartype.beartype")  # before anything imports transformer_lens
import copy
from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
from qscope_plugin.adapters._fixes import apply_all
from qscope_plugin.adapters.transformer_lens import boot
from qscope_testing import FAMILIES, qwen3_tokenizer, tiny_model
try:  # checking is really on: the call that aborted the KV-cache probe is rejected
    AttentionBridge._update_kv_cache(None, None, None)
    raise SystemExit("transformer_lens is not type-checked")
except TypeCheckError:
    pass
apply_all()  # aborted with TypeCheckError; the generations below fail if a fix is missing
tok = qwen3_tokenizer()
ids = tok("The quick brown fox jumps over", return_tensors="pt")["input_ids"]
for family in FAMILIES:
    hf = tiny_model(family)
    reference = copy.deepcopy(hf)
    bridge = boot(hf, saes=True, tokenizer=tok)
    out = bridge.generate(ids, max_new_tokens=4, do_sample=False, use_past_kv_cache=True, return_type="tokens",
                          verbose=False, stop_at_eos=False)
    ref = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             pad_token_id=0)
    assert torch.equal(out, ref), family
print("ok")
"""
    assert run_fresh(code) == "ok"
