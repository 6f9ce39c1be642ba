"""Where an export goes: one writer per directory, links followed, '.' and '..' refused."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MXNET_SKIP

pytestmark = pytest.mark.mxnet  # every test here exports with MXNet
pytest.importorskip("mxnet", reason=MXNET_SKIP)

from conftest import INPUTS, TARGETS, random_net

import normexport as nx
from normexport import files
from normexport.cli import main
from normexport.errors import NormexportError


@pytest.fixture
def exported(tmp_path, scalers):
    in_sc, out_sc = scalers
    out = tmp_path / "model"
    nx.export(random_net("tanh", "float32"), in_sc, out_sc, out)
    return out


def test_an_export_into_a_locked_directory_is_one_line_naming_the_holder(exported, capsys):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from normexport import files\n"
            "with files.target_lock(sys.argv[1], what='export'):\n"
            "    print('locked', flush=True); time.sleep(60)\n",
            str(exported),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        before = sorted(p.name for p in exported.iterdir())
        code = main(["export", str(exported)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert f"another export into {exported} is running (pid {holder.pid})" in err
        assert sorted(p.name for p in exported.iterdir()) == before
    finally:
        holder.kill()
        holder.wait()
    assert main(["export", str(exported)]) == 0  # the lock dies with its holder


def test_a_live_stage_of_another_process_is_left_alone(exported, tmp_path):
    from normexport.modeldir import repair

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = exported.parent / f".{exported.name}.staging-{sleeper.pid}"
        live.mkdir()
        dead = exported.parent / f".{exported.name}.staging-{2**22 + 12345}"
        dead.mkdir()
        repair(exported)
        assert live.is_dir() and not dead.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_an_export_through_a_symlink_replaces_the_directory_it_names(exported, tmp_path):
    link = tmp_path / "current"
    link.symlink_to(exported)
    assert main(["export", str(link), "--mode", "fold"]) == 0
    assert link.is_symlink() and Path(os.readlink(link)) == exported
    assert files.read_json(exported / "manifest.json")["mode"] == "fold"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.parametrize("name", [".", ".."])
def test_dot_and_dot_dot_are_refused_up_front(exported, name, capsys, monkeypatch):
    """Either names the model directory: '.' from inside it, '..' from a folder in it."""
    (exported / "sub").mkdir()
    monkeypatch.chdir(exported if name == "." else exported / "sub")
    started = time.perf_counter()
    code = main(["export", name])
    err = capsys.readouterr().err
    assert code == 2 and "name the model directory itself" in err, err
    assert time.perf_counter() - started < 5  # before any work, not after the whole run


def test_the_api_refuses_dot_too(exported, scalers, monkeypatch):
    monkeypatch.chdir(exported.parent)
    with pytest.raises(NormexportError, match="not '.' or '..'"):
        nx.export(random_net("tanh", "float32"), *scalers, ".")


def test_columns_of_the_fixture_are_what_the_scalers_say(exported):
    doc = files.read_json(exported / "scalers.json")
    assert doc["inputs"]["columns"] == INPUTS and doc["outputs"]["columns"] == TARGETS
