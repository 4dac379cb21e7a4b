"""The `fluxcore` command: a PNG with its settings in text chunks; misuse exits 2 with one line."""

import json
import subprocess
import sys

import pytest
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
    assert json.loads(text["parameters"])["seed"] == 9
    # same settings → the same pixels
    out2 = tmp_path / "again.png"
    cli.main(argv(out2))
    assert Image.open(out2).tobytes() == img.tobytes()


@pytest.mark.parametrize(
    "argv,match",
    [
        ([], "required"),
        (["generate"], "required: prompt"),
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
    ],
)
def test_misuse_exits_2_with_one_line(argv, match, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1, err


def test_bad_values_from_the_library_exit_2(model, capsys):
    assert cli.main(["generate", "x", "--model", str(model), "--width", "100000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fluxcore: error: width must be in") and len(err.splitlines()) == 1


def test_missing_demo_model_exits_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "DEMO_MODEL", tmp_path / "absent")
    assert cli.main(["generate", "x"]) == 2
    assert "demo model" in capsys.readouterr().err


def test_info(model, capsys):
    assert cli.main(["info", str(model)]) == 0
    out = capsys.readouterr().out
    assert "flux-transformer" in out and "tiny-dev" in out


def test_console_script_has_no_traceback():
    p = subprocess.run(
        [sys.executable, "-m", "fluxcore.cli", "generate", "x", "--steps", "-1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
