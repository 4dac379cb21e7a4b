"""The `fluxcore` command: a PNG with its settings in text chunks; misuse exits 2 with one line."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from fluxcore import cli

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tiny_snapshot import write_tiny_snapshot  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_snapshot(tmp_path_factory.mktemp("cli") / "tiny", variant="dev")


def test_generate_writes_png_with_settings(model, tmp_path, capsys):
    out = tmp_path / "sub" / "img.png"

    def argv(path):
        return [
            "generate",
            "a cat on mars",
            "--model",
            str(model),
            "--steps",
            "2",
            "--guidance",
            "4",
            "--seed",
            "9",
            "--width",
            "48",
            "--height",
            "32",
            "--sampler",
            "heun",
            "--out",
            str(path),
            "--max-sequence-length",
            "16",
        ]

    rc = cli.main(argv(out))
    assert rc == 0 and f"wrote {out}" in capsys.readouterr().out
    img = Image.open(out)
    assert img.format == "PNG" and img.size == (48, 32)
    text = img.text
    assert text["prompt"] == "a cat on mars"
    for key, value in dict(
        seed="9",
        steps="2",
        guidance="4.0",
        width="48",
        height="32",
        sampler="heun",
        max_sequence_length="16",
        model=str(model),
    ).items():
        assert text[key] == value, key
    assert json.loads(text["fluxcore"])["seed"] == 9
    a1111 = text["parameters"].splitlines()
    assert a1111[0] == "a cat on mars" and "Steps: 2, Sampler: heun, Schedule type: simple" in a1111[1]
    assert "Seed: 9, Size: 48x32" in a1111[1]
    # same settings → the same pixels; an existing file is not overwritten but numbered
    cli.main(argv(out))
    again = out.with_name("img-1.png")
    assert Image.open(again).tobytes() == img.tobytes()
    assert cli.main(argv(out) + ["--overwrite", "--seed", "10"]) == 0
    assert Image.open(out).text["seed"] == "10" and not out.with_name("img-2.png").exists()


@pytest.mark.parametrize(
    "argv,match",
    [
        ([], "required"),
        (["generate"], "required: prompt"),
        (["generate", "x", "--prompts", "p.txt"], "give a PROMPT or --prompts FILE, not both"),
        (["generate", "--prompts", "/no/such.txt"], "--prompts /no/such.txt: no such file"),
        (["generate", "x", "--out-dir", "o"], "--out-dir goes with --prompts"),
        (
            ["generate", "x", "--lora", "/no/such.safetensors:0.5"],
            "--lora /no/such.safetensors: no such file",
        ),
        (["generate", "x", "--controlnet", "."], "--controlnet needs --control-image"),
        (["generate", "x", "--canny"], "--control-mode/--canny need --control-image"),
        (
            ["generate", "x", "--control-image", "a.png", "--control-start", "0.8", "--control-end", "0.5"],
            "--control-start < --control-end",
        ),
        (
            ["generate", "x", "--ip-image", "a.png"],
            "--ip-adapter, --ip-image and --image-encoder go together",
        ),
        (["generate", "x", "--redux-image", "a.png"], "--redux-image and --redux-model"),
        (["generate", "x", "--max-memory", "lots"], "--max-memory: cannot read a memory size"),
        (["generate", "x", "--max-memory", "12GB", "--offload"], "drop --offload"),
        (["generate", "x", "--ulysses", "2"], "need several processes"),
        (["generate", "x", "--ring", "0"], "must be positive"),
        (["generate", "x", "--sampler", "nope"], "invalid choice: 'nope'"),
        (["generate", "x", "--steps", "0"], "must be positive"),
        (["generate", "x", "--steps", "two"], "expected a int"),
        (["generate", "x", "--seed", "-4"], "must be >= 0"),
        (["generate", "x", "--width", "-64"], "must be positive"),
        (["generate", "x", "--model", "/no/such/folder"], "no such folder"),
        (["generate", "x", "--out", "img.jpg", "--model", "."], "--out must name a .png"),
        (["generate", "x", "--negative-prompt", "dog", "--model", "."], "needs --true-cfg"),
        (["info", "/no/such/file.safetensors"], "no such file"),
        (["frobnicate"], "invalid choice"),
        (["generate", "x", "--scheduler", "nope"], "invalid choice: 'nope'"),
        (["generate", "x", "--num-images", "0"], "must be positive"),
        (["generate", "x", "--strength", "1.5"], "must be in (0, 1]"),
        (["generate", "x", "--strength", "0.5"], "--strength needs --image"),
        (["generate", "x", "--mask", "m.png"], "--mask needs --image"),
        (["generate", "x", "--image", "/no/such.png"], "--image /no/such.png: no such file"),
        (["generate", "x", "--width", "20000"], "width must be in [16, 8192]"),
        (["generate", "x", "--max-sequence-length", "4000"], "must be <= 512"),
        (["generate", "x", "--out", "DIR.png"], "is a folder"),
        (["generate", "x", "--out", "/dev/null/x.png"], "cannot be created"),
        (["generate", "x", "--cache", "warp:0.1"], "--cache"),
    ],
)
def test_misuse_exits_2_with_one_line(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a cat\n")
    (tmp_path / "DIR.png").mkdir()
    argv = [str(tmp_path / a) if a == "DIR.png" else a for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1, err


def test_bad_values_from_the_library_exit_2(model, capsys, tmp_path):
    assert cli.main(["generate", "x", "--model", str(model), "--width", "100000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fluxcore: error: width must be in") and len(err.splitlines()) == 1
    # known only once the model is loaded: a control image for a text-to-image model without ControlNets
    (tmp_path / "m.png").write_bytes(_png(32, 32))
    args = ["generate", "x", "--model", str(model), "--control-image", str(tmp_path / "m.png"),
            "--out", str(tmp_path / "o.png"), "--width", "32", "--height", "32"]  # fmt: skip
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "control_image is for Canny/Depth" in err and len(err.splitlines()) == 1


def _png(w, h, seed=0):
    import io

    import numpy as np

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_version_and_demo_defaults(capsys, tmp_path):
    import fluxcore

    assert (
        cli.main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"fluxcore {fluxcore.__version__}"
    )
    # --model naming the shipped demo gets the demo's defaults (64x64), as no --model does
    out = tmp_path / "demo.png"
    assert (
        cli.main(
            [
                "generate",
                "a red circle",
                "--model",
                str(cli.DEMO_MODEL),
                "--steps",
                "1",
                "--seed",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert Image.open(out).size == (64, 64)
    assert "loading" in printed and "decoding" in printed and "decoded in" in printed  # progress lines


def test_num_images_are_the_single_seed_images(model, tmp_path):
    base = ["generate", "a cat", "--model", str(model), "--steps", "2", "--width", "32", "--height", "32",
            "--max-sequence-length", "16", "--sampler", "euler_ancestral"]  # fmt: skip
    assert cli.main(base + ["--seed", "5", "--num-images", "2", "--out", str(tmp_path / "b.png")]) == 0
    assert cli.main(base + ["--seed", "6", "--out", str(tmp_path / "one.png")]) == 0
    second = Image.open(tmp_path / "b-1.png")
    assert second.text["seed"] == "6" and second.tobytes() == Image.open(tmp_path / "one.png").tobytes()


def test_missing_demo_model_exits_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "DEMO_MODEL", tmp_path / "absent")
    assert cli.main(["generate", "x"]) == 2
    assert "demo model" in capsys.readouterr().err


def test_info(model, capsys):
    assert cli.main(["info", str(model)]) == 0
    out = capsys.readouterr().out
    assert "flux-transformer" in out and "tiny-dev" in out


def _lora_file(path):
    """A diffusers/PEFT-layout LoRA on the tiny transformer's first double block."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    pre = "transformer.transformer_blocks.0.attn."
    sd = {}
    for t in ("to_q", "to_v"):
        sd[f"{pre}{t}.lora_A.weight"] = torch.randn(4, 64, generator=g)
        sd[f"{pre}{t}.lora_B.weight"] = torch.randn(64, 4, generator=g)
    save_file(sd, str(path))
    return path


def test_lora_is_applied_and_recorded(model, tmp_path, capsys):
    lora = _lora_file(tmp_path / "style.safetensors")
    common = ["generate", "a cat", "--model", str(model), "--steps", "2", "--seed", "1", "--width", "32",
              "--height", "32", "--max-sequence-length", "16"]  # fmt: skip
    assert cli.main([*common, "--out", str(tmp_path / "plain.png")]) == 0
    assert cli.main([*common, "--out", str(tmp_path / "lora.png"), "--lora", f"{lora}:0.7"]) == 0
    img = Image.open(tmp_path / "lora.png")
    assert img.text["lora"] == f"{lora}:0.7" and f"Lora: {lora}:0.7" in img.text["parameters"]
    assert json.loads(img.text["fluxcore"])["lora"] == f"{lora}:0.7"
    assert img.tobytes() != Image.open(tmp_path / "plain.png").tobytes()
    capsys.readouterr()
    assert cli.main(["info", str(lora)]) == 0
    out = capsys.readouterr().out
    assert "LoRA" in out and "diffusers/peft: 4 tensors, rank 4, for transformer" in out


def test_max_memory_prints_the_plan(model, tmp_path, capsys):
    args = ["generate", "a cat", "--model", str(model), "--steps", "1", "--seed", "1", "--width", "32",
            "--height", "32", "--max-sequence-length", "16", "--out", str(tmp_path / "m.png")]  # fmt: skip
    assert cli.main([*args, "--max-memory", "40GB"]) == 0
    out = capsys.readouterr().out
    assert "memory plan for --max-memory 40GB" in out and "bf16, offload=none" in out and "peak" in out
    assert cli.main([*args, "--max-memory", "1GB"]) == 2
    err = capsys.readouterr().err.strip()
    assert "nothing fits max_memory" in err and len(err.splitlines()) == 1


def test_prompts_file_writes_every_item_and_a_manifest(model, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        '{"prompt": "a cat", "name": "cat"}\n{"prompt": "a dog", "seed": 5}\n{"prompt": "a red house"}\n'
    )
    args = ["generate", "--prompts", str(prompts), "--out-dir", str(tmp_path / "out"), "--model", str(model),
            "--steps", "1", "--width", "32", "--height", "32", "--max-sequence-length", "16"]  # fmt: skip
    assert cli.main(args) == 0
    assert "3 generated here, 0 already there" in capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert names == ["000001.png", "000002.png", "cat.png"]
    lines = [json.loads(x) for x in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in lines] == ["a cat", "a dog", "a red house"] and lines[1]["seed"] == 5
    assert Image.open(tmp_path / "out" / "cat.png").size == (32, 32)
    assert cli.main(args) == 0  # a rerun skips what is there
    assert "0 generated here, 3 already there" in capsys.readouterr().out


def test_console_script_has_no_traceback():
    p = subprocess.run(
        [sys.executable, "-m", "fluxcore.cli", "generate", "x", "--steps", "-1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


# --- subprocesses: every mode, atomic writes ---------------------------------------------------


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fluxcore.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.mark.parametrize("variant", ["dev", "fill", "canny", "kontext"])
def test_every_mode_in_a_subprocess(variant, model, tmp_path):
    folder = model if variant == "dev" else write_tiny_snapshot(tmp_path / variant, variant=variant, seed=2)
    pic = tmp_path / "in.png"
    pic.write_bytes(_png(48, 32))
    mask = tmp_path / "mask.png"
    mask.write_bytes(_png(48, 32, seed=1))
    extra = {
        "dev": ["--image", pic, "--strength", "0.7"],
        "fill": ["--image", pic, "--mask", mask],
        "canny": ["--control-image", pic],
        "kontext": ["--image", pic, "--no-kontext-resize"],
    }[variant]
    out = tmp_path / "out.png"
    p = run_cli("generate", "a cat", "--model", folder, "--steps", "2", "--seed", "3", "--out", out,
                "--max-sequence-length", "16", "--width", "48", "--height", "32", *extra)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and f"wrote {out}" in p.stdout
    img = Image.open(out)
    assert img.size == (48, 32) and img.text["seed"] == "3"
    if variant == "dev":
        assert img.text["strength"] == "0.7" and "Denoising strength: 0.7" in img.text["parameters"]


def test_a_process_killed_mid_write_leaves_the_old_file(tmp_path):
    import signal

    target = tmp_path / "keep.png"
    target.write_bytes(_png(8, 8))
    old = target.read_bytes()
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from PIL.PngImagePlugin import PngInfo\n"
        "from fluxcore import cli\n"
        "class Slow:\n"
        "    def save(self, f, format, pnginfo):\n"
        "        f.write(b'\\x89PNG half of it'); f.flush(); print('writing', flush=True); time.sleep(120)\n"
        "cli.write_atomically(Slow(), Path(sys.argv[1]), PngInfo())\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        p.kill()
    assert target.read_bytes() == old  # the old file, whole
    assert [q.name for q in tmp_path.iterdir() if q.name != "keep.png"][0].startswith(
        ".keep.png."
    )  # only a temp file


def test_cache_flag_reports_and_records_the_cache(model, tmp_path, capsys):
    out = tmp_path / "c.png"
    argv = ["generate", "a cat", "--model", str(model), "--steps", "6", "--seed", "1", "--width", "32"]
    argv += ["--height", "32", "--max-sequence-length", "16", "--cache", "taylorseer:3", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "cache taylorseer:" in printed and "skipped" in printed
    assert Image.open(out).text["cache"] == "taylorseer:3"


def test_train_lora_is_a_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train-lora", "--help"])
    assert e.value.code == 0 and "train-lora" in capsys.readouterr().out
