"""The snippets in README.md and docs/ run, so the docs cannot rot.

Python blocks run in order, one namespace per file, all in one scratch directory (later
pages use the model directory the API page writes). Shell blocks run their `normexport`
lines through ``cli.main``. Blocks for other frameworks (torch, tensorflow, sklearn) are
shown to users but not run here: those frameworks are not test dependencies.
"""

from __future__ import annotations

import pytest
from conftest import MXNET_SKIP

pytestmark = pytest.mark.mxnet  # every test here needs the MXNet adapter
pytest.importorskip("mxnet", reason=MXNET_SKIP)

import re
import shlex
from pathlib import Path

import numpy as np
from conftest import INPUTS, TARGETS, smooth_problem

from normexport import tables
from normexport.cli import main

ROOT = Path(__file__).resolve().parent.parent
# Order matters: api.md writes model_dir, which the next pages read.
PAGES = [
    "docs/api.md",
    "docs/model-directory.md",
    "docs/onnx-interface.md",
    "docs/post-training.md",
    "docs/quickstart.md",
    "docs/bake.md",
    "docs/transforms.md",
    "README.md",
]
FOREIGN = ("torch", "tensorflow", "tf2onnx", "keras", "sklearn", "skl2onnx", "lightgbm", "xgboost")
BLOCK = re.compile(r"```(python|sh)\n(.*?)```", re.S)


def blocks(page: str) -> list[tuple[str, str]]:
    text = (ROOT / page).read_text()
    return [
        (lang, code)
        for lang, code in BLOCK.findall(text)
        if not any(word in code for word in FOREIGN)
    ]


def shell_commands(code: str) -> list[list[str]]:
    joined = code.replace("\\\n", " ")
    return [
        shlex.split(line, comments=True)[1:]
        for line in joined.splitlines()
        if line.strip().startswith("normexport ")
    ]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    X, Y = smooth_problem(300)
    tables.write_table(root / "data.csv", INPUTS + TARGETS, np.column_stack([X, Y]))
    tables.write_table(root / "new_rows.csv", INPUTS, X[:10])
    np.savetxt(
        root / "factors.txt", [[0.01, -2.5], [100.0, 0.0], [1.0, 0.0], [100.0, 0.0], [40.0, 0.0]]
    )
    write_foreign_model(root / "their_model.onnx")
    return root


def write_foreign_model(path: Path) -> None:
    """A 3 → 2 regression model as another framework might export it (Gemm, Relu, Gemm)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(3, 8)).astype(np.float32), "w0"),
        numpy_helper.from_array(np.zeros(8, np.float32), "b0"),
        numpy_helper.from_array(rng.normal(size=(8, 2)).astype(np.float32), "w1"),
        numpy_helper.from_array(np.zeros(2, np.float32), "b1"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w0", "b0"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w1", "b1"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "theirs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("page", PAGES)
def test_snippets_run(page, scratch, monkeypatch, capsys):
    if not (ROOT / page).is_file():
        pytest.fail(f"{page} is missing")
    monkeypatch.chdir(scratch)
    namespace = {"__name__": "__docs__"}
    for lang, code in blocks(page):
        if lang == "python":
            exec(compile(code, f"{page} snippet", "exec"), namespace)
        else:
            for argv in shell_commands(code):
                if argv[:1] == ["train"]:
                    argv += ["--epochs", "5"]  # the docs' defaults train for minutes
                code_ = main(argv)
                out, err = capsys.readouterr()
                assert code_ == 0, (page, argv, err)
