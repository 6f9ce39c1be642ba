"""Where output goes, and what untrusted JSON may cost: streams, links, depth and digits.

Core tests (no MXNet): the model is `tests/data/mxnet_model`, exported in the MXNet
profile.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import run_cli as run

from normexport import files
from normexport.errors import FormatError

DATA = Path(__file__).parent / "data"
MODEL = DATA / "mxnet_model"
ROWS = DATA / "rows.csv"


def test_predict_into_dev_null_writes_to_it_and_leaves_it_a_device(capsys):
    code, _, err = run(capsys, "predict", MODEL, ROWS, "--out", "/dev/null")
    assert code == 0, err
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_predict_into_a_fifo_streams_into_it(tmp_path, capsys):
    fifo = tmp_path / "out.csv"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    code, _, err = run(capsys, "predict", MODEL, ROWS, "--out", fifo)
    reader.join(timeout=30)
    assert code == 0, err
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # still a FIFO, not replaced by a file
    lines = received[0].decode().splitlines()
    assert lines[0] == "load,offset" and len(lines) == 51


def test_predict_through_a_symlink_replaces_the_file_it_names(tmp_path, capsys):
    real = tmp_path / "real.csv"
    real.write_text("old\n")
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    code, _, err = run(capsys, "predict", MODEL, ROWS, "--out", link)
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text().startswith("load,offset\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.csv", "real.csv"]


def test_atomic_path_leaves_the_target_alone_on_error(tmp_path):
    target = tmp_path / "t.bin"
    target.write_bytes(b"keep")
    with pytest.raises(RuntimeError), files.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"keep"
    assert [p.name for p in tmp_path.iterdir()] == ["t.bin"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "JSON nested 100000 deep"),
        ('{"n": ' + "9" * 5000 + "}", "an integer of 5000 digits"),
        ('{"x": NaN}', "NaN is not allowed"),
        ('{"s": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}', None),
    ],
    ids=["deep", "digits", "nan", "brackets-in-a-string"],
)
def test_json_from_files_has_bounded_cost(text, message):
    if message is None:
        assert files.parse_json(text, "doc")["s"].startswith("[[[")
        return
    with pytest.raises(FormatError, match=message):
        files.parse_json(text, "doc")


@pytest.mark.parametrize("verb", ["verify", "inspect", "predict"])
def test_deeply_nested_scalers_json_is_one_line_exit_2(tmp_path, capsys, verb):
    model = tmp_path / "m"
    shutil.copytree(MODEL, model)
    (model / "scalers.json").write_text('{"format": ' + "[" * 50_000 + "]" * 50_000 + "}")
    argv = {"verify": [model], "inspect": [model], "predict": [model, ROWS]}[verb]
    code, _, err = run(capsys, verb, *argv)
    assert code == 2, err
    assert err.count("\n") == 1 and "nested 50001 deep" in err and "scalers.json" in err


def test_deeply_nested_metadata_in_an_onnx_file(tmp_path, capsys):
    import onnx

    model = onnx.load(str(MODEL / "model.onnx"))
    for prop in model.metadata_props:
        if prop.key == "normexport.scalers":
            prop.value = "[" * 50_000 + "]" * 50_000
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    code, _, err = run(capsys, "predict", path, ROWS)
    assert code == 2 and err.count("\n") == 1 and "nested 50000 deep" in err, err
    code, out, err = run(capsys, "inspect", path, "--json")
    assert code == 0, err
    assert "nested 50000 deep" in json.loads(out)["onnx"]["metadata"]["normexport.scalers"]


def test_the_cli_takes_over_ctrl_c_before_its_imports():
    """Installed on import of the CLI module, before pyarrow, onnx or numpy load."""
    code = (
        "import signal, sys\n"
        "from normexport import cli\n"
        "assert signal.getsignal(signal.SIGINT) is cli._interrupted_early\n"
        "assert 'numpy' not in sys.modules and 'pyarrow' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("library", ["pyarrow", "onnxruntime"])
def test_ctrl_c_while_working_is_one_line_and_leaves_nothing(tmp_path, library):
    """Ctrl-C once the command is loading (``library`` mapped) or running: exit 130 with
    one line, or (if the work finished first) 0; never a traceback, never a stray file."""
    argv = [str(Path(sys.executable).parent / "normexport"), "predict", str(MODEL), str(ROWS)]
    child = subprocess.Popen(
        [*argv, "--out", str(tmp_path / "p.csv")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    maps = Path(f"/proc/{child.pid}/maps")
    deadline = time.monotonic() + 30
    while child.poll() is None and time.monotonic() < deadline:
        try:
            if library in maps.read_text():
                break
        except OSError:
            break
        time.sleep(0.002)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert "Traceback" not in err
    assert child.returncode in (0, 130), err
    if child.returncode == 130:
        assert err.strip() == "normexport: interrupted"
    assert not list(tmp_path.glob(".*.tmp"))  # no half-written output left behind


def test_a_value_beyond_float32_is_refused_not_turned_into_inf(tmp_path, capsys):
    rows = tmp_path / "rows.csv"
    rows.write_text("temp_k,strain,frac\n300,0.005,0.5\n300,1e300,0.5\n")
    code, out, err = run(capsys, "predict", MODEL, rows, "--out", tmp_path / "p.csv")
    assert code == 2 and not (tmp_path / "p.csv").exists()
    assert err.strip() == (
        f"normexport: error: {rows}: row 1, column 'strain': 1e+300 is beyond the range "
        "of the model's float32"
    )


def test_a_full_disk_names_the_output_and_leaves_nothing(tmp_path):
    """RLIMIT_FSIZE makes writes fail as a full disk does (EFBIG instead of ENOSPC)."""
    import resource

    rows = tmp_path / "rows.csv"
    rows.write_text("temp_k,strain,frac\n" + "300,0.005,0.5\n" * 5000)

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))

    out = tmp_path / "p.csv"
    argv = [str(Path(sys.executable).parent / "normexport"), "predict", str(MODEL), str(rows)]
    done = subprocess.run(
        [*argv, "--out", str(out)], preexec_fn=small_files, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.startswith(f"normexport: error: {out}: cannot write (")
    assert done.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv"]
