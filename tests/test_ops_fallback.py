"""Without the compiled extension `import openr1_mega.ops` works, warns once, and every public
op falls back to the pure-torch references (run in a subprocess with the extension disabled).
"""

from __future__ import annotations

import os
import subprocess
import sys


def test_fallback_without_extension():
    """With the extension disabled, import works, warns once, and the references serve."""
    script = """
import warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from openr1_mega import ops
    assert not ops.kernels_available()
    x = torch.randn(3, 17, requires_grad=True); t = torch.tensor([1, 16, 0])
    logp, ent = ops.token_logprob_entropy(x, t, 0.5)
    (logp.sum() + ent.sum()).backward()
    ref = torch.log_softmax(x.detach() / 0.5, -1).gather(-1, t[:, None]).squeeze(-1)
    assert torch.allclose(logp, ref, atol=1e-6)
    adv = ops.grpo_advantage(torch.tensor([1.0, 0.0, 1.0, 1.0]), group_size=2)
    assert torch.allclose(adv, torch.tensor([0.7071063, -0.7071063, 0.0, 0.0]))
    lp = ops.fused_linear_token_logprob(torch.randn(5, 4), torch.randn(9, 4), torch.arange(5))
    assert lp.shape == (5,)
ours = [w for w in caught if "openr1_mega._C is not available" in str(w.message)]
assert len(ours) == 1, [str(w.message) for w in caught]
print("ok")
"""
    env = dict(os.environ, OPENR1_MEGA_DISABLE_EXTENSION="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
