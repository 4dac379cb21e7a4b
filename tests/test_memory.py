"""The memory plan: weight bytes against the published FLUX.1-dev sizes; estimated transformer
peak (weights + activations) against the measured peak RSS of CPU forwards (subprocesses,
/proc VmHWM reset before the forward) within 20 %; MemoryPlanError and choose()."""

import subprocess
import sys
import textwrap

import pytest

from fluxcore import PRESETS
from fluxcore import memory as M
from fluxcore.errors import FluxcoreError


def test_weight_bytes_match_published_sizes():
    # 23.8 GB bf16 (HF blog), 11.9 GB fp8 file, 12.7 GB Q8_0, 6.8 GB Q4 (city96 / community figures)
    got = {
        q: M.transformer_weights(PRESETS["flux-dev"], q)["total"] / 1e9
        for q in ("bf16", "fp8", "Q8_0", "Q4_K")
    }
    for q, want in {"bf16": 23.80, "fp8": 11.97, "Q8_0": 12.71, "Q4_K": 6.79}.items():
        assert abs(got[q] - want) < 0.02, (q, got[q])
    assert abs(M.transformer_weights(PRESETS["flux-dev"])["modulation"] / 2 / 1e9 - 3.247) < 0.01


PROBE = textwrap.dedent("""
    import sys, gc, torch
    torch.set_num_threads(1)
    from fluxcore import Flux, PRESETS
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    H, hidden, B, depth, single = map(int, sys.argv[1:6])
    cfg = PRESETS["tiny-dev"].replace(hidden_size=hidden, num_heads=hidden // 64, axes_dim=(16, 24, 24),
                                      depth=depth, depth_single_blocks=single, context_in_dim=64, vec_in_dim=64)
    L = (H // 16) ** 2
    x = dict(img=torch.randn(B, L, 64), img_ids=torch.zeros(B, L, 3), txt=torch.randn(B, 512, 64),
             txt_ids=torch.zeros(B, 512, 3), timesteps=torch.full((B,), .5), y=torch.randn(B, 64),
             guidance=torch.full((B,), 3.5))
    warm = Flux(PRESETS["tiny-dev"].replace(context_in_dim=64, vec_in_dim=64)).eval()  # one-time setup outside
    with torch.no_grad():
        warm(**{k: (v[:, :8] if v.ndim == 3 else v) for k, v in x.items()})
    del warm; gc.collect()
    r0 = status("VmRSS:")
    torch.manual_seed(0)
    model = Flux(cfg).eval()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark
    with torch.no_grad():
        out = model(**x)
    print(status("VmHWM:") - r0)
""")


@pytest.mark.parametrize(
    "H,hidden,B,depth,single", [(1024, 256, 1, 1, 2), (768, 512, 1, 2, 2), (512, 256, 2, 1, 2)]
)
def test_estimate_vs_measured_cpu(H, hidden, B, depth, single):
    try:
        open("/proc/self/clear_refs", "w").close()
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    r = subprocess.run([sys.executable, "-c", PROBE, *map(str, (H, hidden, B, depth, single))],
                       capture_output=True, text=True, timeout=80)  # fmt: skip
    assert r.returncode == 0, r.stderr
    measured = int(r.stdout.split()[-1])
    cfg = PRESETS["tiny-dev"].replace(hidden_size=hidden, num_heads=hidden // 64, axes_dim=(16, 24, 24),
                                      depth=depth, depth_single_blocks=single, context_in_dim=64, vec_in_dim=64)  # fmt: skip
    p = M.plan(cfg, "fp32", H, H, B, "model", act_bytes=4, overhead=0, include=("sampling",))
    est = p.stages["sampling"].device
    print(f"H={H} hidden={hidden} B={B}: estimate {est / 1e6:.1f} MB, measured {measured / 1e6:.1f} MB")
    assert abs(est - measured) <= 0.2 * measured, (est, measured)


def test_plan_error_and_choose():
    p = M.plan("flux-dev", "bf16", 1024, 1024)
    assert set(p.stages) == {"text", "sampling", "decode"} and p.peak_device > 30e9
    with pytest.raises(M.MemoryPlanError) as e:
        M.plan("flux-dev", "bf16", 1024, 1024, max_memory="12GB")
    assert isinstance(e.value, FluxcoreError) and e.value.plan.peak_device > 12e9
    assert e.value.fits and all(b <= 12e9 for _, _, b in e.value.fits)
    assert "12.00 GB" in str(e.value)
    c24 = M.choose("24GB")
    assert (c24.quant, c24.offload) == ("fp8", "model") and c24.peak_device <= 24e9
    c12 = M.choose("12GB")
    assert c12.peak_device <= 12e9
    assert M.choose("80GB").offload == "none"
    with pytest.raises(M.MemoryPlanError):
        M.choose("1GB")
    assert M.parse_bytes("12GiB") == 12 * 2**30 and M.parse_bytes("500MB") == 500_000_000


def test_choose_restricted_formats():
    c = M.choose("16GB", quants=("bf16", "fp8"))
    assert c.quant in ("bf16", "fp8") and c.peak_device <= 16e9
    c = M.choose("12GB", quants=("Q8_0",), max_host_memory="64GB")
    assert c.quant == "Q8_0" and c.peak_device <= 12e9
