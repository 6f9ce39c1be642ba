"""Broken and hostile inputs, atomic output, reproducible bytes (the CLI's hardening).

Every broken input must end in exit status 2 with one line ``normexport: error: ...``
that names the file and the fault, with nothing written: a complete model directory
given as the output stays byte-for-byte what it was, with no staging leftovers beside
it. Inputs that could make a native library abort the process are run in a child
process, so a regression shows up as a failed test rather than a dead test run.
"""

from __future__ import annotations

import pytest
from conftest import MXNET_SKIP

pytestmark = pytest.mark.mxnet  # every test here needs the MXNet adapter
pytest.importorskip("mxnet", reason=MXNET_SKIP)

import contextlib
import hashlib
import io as _io
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import conftest
import numpy as np
from conftest import INPUTS, TARGETS, smooth_problem

from normexport import tables
from normexport.cli import main
from normexport.mx import exporting

PY = sys.executable
ENV = {**os.environ, "MPLBACKEND": "Agg"}


# --------------------------------------------------------------------------- workspace


@dataclass
class Workspace:
    root: Path
    data: Path  # CSV with INPUTS + TARGETS
    model: Path  # a complete model directory (splice export), never modified
    victim: Path  # a copy of it, given as --out to commands that must fail
    broken: Path  # where the broken inputs are written

    @property
    def symbol(self) -> Path:
        return self.model / "net-symbol.json"

    @property
    def params(self) -> Path:
        return self.model / "net-0000.params"

    @property
    def scalers(self) -> Path:
        return self.model / "scalers.json"

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.broken / name
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)
        return path

    def symbol_doc(self) -> dict:
        return json.loads(self.symbol.read_text())

    def scalers_doc(self) -> dict:
        return json.loads(self.scalers.read_text())


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:

    root = tmp_path_factory.mktemp("hardening")
    X, Y = smooth_problem(200)
    tables.write_table(root / "data.csv", INPUTS + TARGETS, np.column_stack([X, Y]))
    exporting.train_to_directory(
        root / "data.csv",
        INPUTS,
        TARGETS,
        root / "model",
        epochs=2,
        hidden=(8, 8),
        dtype="float32",
        progress=False,
    )
    exporting.export_directory(root / "model")
    shutil.copytree(root / "model", root / "victim")
    (root / "broken").mkdir()
    return Workspace(root, root / "data.csv", root / "model", root / "victim", root / "broken")


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` by relative path, with its bytes."""
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def leftovers(directory: Path) -> list[str]:
    """Staging, old or temporary entries an interrupted or failed run left behind."""
    beside = [
        p.name for p in directory.parent.iterdir() if p.name.startswith(f".{directory.name}.")
    ]
    inside = [p.name for p in directory.rglob("*") if p.name.endswith(".tmp")]
    return sorted(beside + inside)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_one_line_error(code: int, out: str, err: str, fragments) -> str:
    return conftest.one_line_error(code, err, *fragments, out=out)


def run_cli(capsys, argv) -> tuple[int, str, str]:
    return conftest.run_cli(capsys, *argv)


# --------------------------------------------------------------------------- the table runner


@dataclass
class Case:
    """One broken input: ``argv(ws)`` builds the command (writing the broken file), the
    error line must contain every fragment, and ``untouched(ws)`` lists the directories
    that must come out byte-for-byte unchanged (default: the victim)."""

    id: str
    argv: object
    fragments: tuple[str, ...]
    untouched: object = None
    absent: object = None  # a file the command must not create
    isolate: bool = False  # may abort the process if validation regresses
    xfail: str = ""

    def param(self):
        marks = [pytest.mark.xfail(strict=True, reason=self.xfail)] if self.xfail else []
        return pytest.param(self, id=self.id, marks=marks)


def kept(ws: Workspace, case: Case) -> list[Path]:
    return case.untouched(ws) if case.untouched else [ws.victim]


def check_case(request, ws: Workspace, case: Case) -> None:
    if case.isolate:
        (code, out, err), before = request.getfixturevalue("isolated")[id(case)]
    else:
        capsys = request.getfixturevalue("capsys")  # capturing from here on
        argv = [str(a) for a in case.argv(ws)]
        before = {d: snapshot(d) for d in kept(ws, case)}
        code, out, err = run_cli(capsys, argv)
    keep = kept(ws, case)
    assert_one_line_error(code, out, err, case.fragments)
    for d in keep:
        assert snapshot(d) == before[d], f"{d} changed"
        assert leftovers(d) == [], leftovers(d)
    if case.absent:
        assert not case.absent(ws).exists()


_CHILD = """
import contextlib, io, json, os, signal, sys
from normexport.cli import main
for argv in json.loads(sys.argv[1]):
    if argv == ["--crash-for-test"]:
        os.kill(os.getpid(), signal.SIGSEGV)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    print(json.dumps([code, out.getvalue(), err.getvalue()]), flush=True)
"""


def run_isolated(argvs: list[list[str]]) -> list[tuple[int, str, str]]:
    """Run ``main(argv)`` for each argv in one child process (one MXNet import).

    A case that kills the child (segfault, abort) gets the child's exit status and the
    last line of its native stderr; the cases after it run in a fresh child.
    """
    results: list[tuple[int, str, str]] = []
    while len(results) < len(argvs):
        todo = argvs[len(results) :]
        child = subprocess.run(
            [PY, "-c", _CHILD, json.dumps(todo)],
            capture_output=True,
            text=True,
            timeout=300,
            env=ENV,
        )
        done = [tuple(json.loads(line)) for line in child.stdout.splitlines() if line[:1] == "["]
        results += done
        if len(done) < len(todo):
            tail = (child.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            results.append((child.returncode, "", f"child died: {tail}"))
    return results


# --------------------------------------------------------------------------- CSV tables

HEADER = ",".join(INPUTS + TARGETS) + "\n"


def train_argv(name: str, text: str | bytes | None):
    def argv(ws: Workspace):
        path = ws.broken / name if text is None else ws.write(name, text)
        return [
            "train",
            path,
            "--inputs",
            ",".join(INPUTS),
            "--targets",
            ",".join(TARGETS),
            "--out",
            ws.victim,
            "--epochs",
            "1",
            "--hidden",
            "4",
        ]

    return argv


def verify_data_argv(name: str, text: str):
    return lambda ws: ["verify", ws.victim, "--data", ws.write(name, text)]


def predict_argv(name: str, text: str):
    return lambda ws: ["predict", ws.victim, ws.write(name, text), "--out", ws.root / "pred.csv"]


CSV_CASES = [
    Case("empty", train_argv("empty.csv", ""), ("empty.csv", "empty file")),
    Case("header-only", train_argv("header.csv", HEADER), ("header.csv", "no data rows")),
    Case(
        "ragged",
        train_argv("ragged.csv", HEADER + "1,2,3,4,5\n1,2,3,4\n"),
        ("ragged.csv:3", "row has 4 cells, header has 5"),
    ),
    Case(
        "non-numeric",
        train_argv("word.csv", HEADER + "1,2,3,4,5\n1,2,abc,4,5\n"),
        ("word.csv:3", "'frac'", "'abc' is not a number"),
    ),
    Case(
        "nan",
        train_argv("nan.csv", HEADER + "1,2,3,4,5\n1,2,3,nan,5\n"),
        ("nan.csv:3", "'load'", "not finite"),
    ),
    Case(
        "inf",
        train_argv("inf.csv", HEADER + "1,2,3,4,5\n1,-inf,3,4,5\n"),
        ("inf.csv:3", "'strain'", "not finite"),
    ),
    Case(
        "missing-column",
        train_argv("nofrac.csv", "temp_k,strain,load,offset\n1,2,4,5\n2,3,5,6\n"),
        ("nofrac.csv", "no column named 'frac'"),
    ),
    Case(
        "duplicate-column",
        train_argv("dup.csv", "temp_k,strain,frac,frac,load,offset\n1,2,3,3,4,5\n"),
        ("dup.csv:1", "duplicate column 'frac'"),
    ),
    Case(
        "constant-target",
        train_argv("const.csv", HEADER + "1,2,3,7,5\n2,3,4,7,6\n3,4,5,7,8\n"),
        ("const.csv", "'load' is constant"),
    ),
    Case("binary", train_argv("binary.csv", b"\xff\xfe\x00\x01garbage"), ("binary.csv", "UTF-8")),
    Case("missing-file", train_argv("absent.csv", None), ("absent.csv", "no such file")),
    Case(
        "verify-data-nan",
        verify_data_argv("vnan.csv", "temp_k,strain,frac\n1,2,3\n1,nan,3\n"),
        ("vnan.csv:3", "'strain'", "not finite"),
    ),
    Case(
        "verify-data-missing-column",
        verify_data_argv("vcol.csv", "temp_k,frac\n1,3\n"),
        ("vcol.csv", "no column named 'strain'"),
    ),
    Case(
        "predict-ragged",
        predict_argv("pragged.csv", "temp_k,strain,frac\n1,2,3\n1,2\n"),
        ("pragged.csv:3", "row has 2 cells"),
        absent=lambda ws: ws.root / "pred.csv",
    ),
    Case(
        "predict-empty",
        predict_argv("pempty.csv", ""),
        ("pempty.csv", "empty file"),
        absent=lambda ws: ws.root / "pred.csv",
    ),
]


@pytest.mark.parametrize("case", [c.param() for c in CSV_CASES])
def test_broken_csv(request, ws, case):
    check_case(request, ws, case)


# --------------------------------------------------------------------------- symbol JSON


def export_argv(symbol=None, params=None, scalers=None, factors=None):
    """``export --symbol --params (--scalers|--factors) --out victim``; each argument is a
    function of the workspace returning a path (default: the good file)."""

    def argv(ws: Workspace):
        side = (
            ["--factors", factors(ws)]
            if factors
            else ["--scalers", scalers(ws) if scalers else ws.scalers]
        )
        return [
            "export",
            "--symbol",
            symbol(ws) if symbol else ws.symbol,
            "--params",
            params(ws) if params else ws.params,
            *side,
            "--out",
            ws.victim,
        ]

    return argv


def symbol_text(name: str, text: str | bytes):
    return export_argv(symbol=lambda ws: ws.write(name, text))


def symbol_edit(name: str, edit):
    """The good symbol document, changed by ``edit(doc)`` (which may return a new one)."""

    def make(ws: Workspace):
        doc = ws.symbol_doc()
        doc = edit(doc) or doc
        return ws.write(name, json.dumps(doc))

    return export_argv(symbol=make)


# The good net-symbol.json: 0 data, 1-2 dense0 weight/bias, 3 FullyConnected,
# 4 Activation, 5-6, 7 FullyConnected, 8 Activation, 9-10, 11 FullyConnected (head).
def _set(path, value):
    def edit(doc):
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


SYMBOL_CASES = [
    Case(
        "truncated",
        lambda ws: symbol_text("trunc.json", ws.symbol.read_text()[:700])(ws),
        ("trunc.json", "not valid JSON"),
    ),
    Case(
        "not-json", symbol_text("prose.json", "this is not JSON"), ("prose.json", "not valid JSON")
    ),
    Case("empty", symbol_text("empty.json", ""), ("empty.json", "not valid JSON")),
    Case("missing", export_argv(symbol=lambda ws: ws.broken / "absent.json"), ("absent.json",)),
    Case(
        "pickle",
        symbol_text("pickled.json", pickle.dumps({"nodes": []})),
        ("pickled.json", "pickle"),
    ),
    Case("list", symbol_text("list.json", "[1, 2, 3]"), ("list.json", "no 'nodes' list")),
    Case(
        "deep",
        symbol_text("deep.json", "[" * 100_000 + "]" * 100_000),
        ("deep.json", "nested too deeply"),
    ),
    Case(
        "node-not-object",
        symbol_edit("nodeobj.json", _set(["nodes", 3], "x")),
        ("node 3", "object"),
    ),
    Case(
        "name-not-string",
        symbol_edit("name.json", _set(["nodes", 3, "name"], 5)),
        ("name.json", "node 3", "must be strings"),
    ),
    Case(
        "attr-not-string",
        symbol_edit("attrint.json", _set(["nodes", 3, "attrs", "num_hidden"], 8)),
        ("attrint.json", "'attrs' must map strings to strings"),
    ),
    Case(
        "inputs-not-list",
        symbol_edit("inputs.json", _set(["nodes", 3, "inputs"], {"a": 1})),
        ("inputs.json", "'inputs' must be a list"),
    ),
    Case(
        "reference-malformed",
        symbol_edit("refshape.json", _set(["nodes", 4, "inputs"], [[3]])),
        ("refshape.json", "node 4", "[node, output"),
    ),
    Case(
        "reference-bool",
        symbol_edit("refbool.json", _set(["nodes", 4, "inputs"], [[True, 0, 0]])),
        ("refbool.json", "[node, output"),
    ),
    Case(
        "dangling",
        symbol_edit("dangling.json", _set(["nodes", 3, "inputs", 0], [99, 0, 0])),
        ("dangling.json", "node 3", "refers to node 99"),
    ),
    Case(
        "forward-reference",
        symbol_edit("forward.json", _set(["nodes", 3, "inputs", 0], [4, 0, 0])),
        ("forward.json", "refers to node 4, which does not precede it"),
    ),
    Case(
        "self-reference",
        symbol_edit("self.json", _set(["nodes", 4, "inputs", 0], [4, 0, 0])),
        ("self.json", "refers to node 4"),
    ),
    # mx.sym.load_json trusts output indices: these two segfault / abort MXNet 1.9.1.
    Case(
        "output-index",
        symbol_edit("outidx.json", _set(["nodes", 4, "inputs", 0], [3, 5, 0])),
        ("outidx.json", "node 4", "refers to output 5 of node 3, which has 1 output"),
        isolate=True,
    ),
    Case(
        "variable-output-index",
        symbol_edit("varidx.json", _set(["nodes", 3, "inputs", 1], [1, 1, 0])),
        ("varidx.json", "refers to output 1 of node 1"),
        isolate=True,
    ),
    Case(
        "head-index",
        symbol_edit("headidx.json", _set(["heads"], [[11, 7, 0]])),
        ("headidx.json", "heads", "refers to output 7 of node 11"),
        isolate=True,
    ),
    Case(
        "no-heads", symbol_edit("noheads.json", _set(["heads"], [])), ("noheads.json", "no 'heads'")
    ),
    Case(
        "arg-nodes",
        symbol_edit("argnodes.json", _set(["arg_nodes"], [3])),
        ("argnodes.json", "'arg_nodes' must list variable nodes"),
    ),
    Case(
        "variable-with-inputs",
        symbol_edit("varin.json", _set(["nodes", 1, "inputs"], [[0, 0, 0]])),
        ("varin.json", "node 1", "cannot have inputs"),
    ),
    Case(
        "duplicate-variable",
        symbol_edit("dupvar.json", _set(["nodes", 2, "name"], "net_dense0_weight")),
        ("dupvar.json", "a second variable named 'net_dense0_weight'"),
    ),
    Case(
        "absurd-num-hidden",
        symbol_edit("wide.json", _set(["nodes", 3, "attrs", "num_hidden"], str(10**12))),
        ("wide.json", "num_hidden", "out of range"),
    ),
    Case(
        "5000-digit-num-hidden",  # beyond Python's int-from-string limit
        symbol_edit("digits.json", _set(["nodes", 3, "attrs", "num_hidden"], "9" * 5000)),
        ("digits.json", "num_hidden", "out of range"),
    ),
    Case(
        "zero-num-hidden",
        symbol_edit("zero.json", _set(["nodes", 3, "attrs", "num_hidden"], "0")),
        ("zero.json", "num_hidden", "out of range"),
    ),
    Case(
        "num-hidden-not-integer",
        symbol_edit("nhword.json", _set(["nodes", 3, "attrs", "num_hidden"], "many")),
        ("nhword.json", "num_hidden", "not an integer"),
    ),
    Case(
        "absurd-shape",
        symbol_edit(
            "shape.json", _set(["nodes", 1, "attrs", "__shape__"], "(100000, 100000, 100000)")
        ),
        ("shape.json", "__shape__", "out of range"),
    ),
    Case(
        "negative-shape",
        symbol_edit("negshape.json", _set(["nodes", 1, "attrs", "__shape__"], "(8, -3)")),
        ("negshape.json", "negative dimension"),
    ),
    Case(
        "absurd-output-count",
        symbol_edit(
            "split.json",
            lambda doc: doc["nodes"].insert(
                12,
                {
                    "op": "SliceChannel",
                    "name": "s",
                    "attrs": {"num_outputs": str(10**9)},
                    "inputs": [[11, 0, 0]],
                },
            ),
        ),
        ("split.json", "num_outputs", "out of range"),
    ),
    Case(
        "unknown-op",
        symbol_edit("unknown.json", _set(["nodes", 4, "op"], "NoSuchOp")),
        ("unknown.json", "node 4", "unknown op 'NoSuchOp'"),
    ),
    Case(
        "bad-attribute-value",
        symbol_edit("act.json", _set(["nodes", 4, "attrs", "act_type"], "nope")),
        ("act.json", "node 4", "Activation", "'nope'"),
    ),
    Case(
        "unknown-attribute",
        symbol_edit("frob.json", _set(["nodes", 3, "attrs", "frobnicate"], "1")),
        ("frob.json", "node 3", "frobnicate"),
    ),
    Case(
        "too-few-inputs",
        symbol_edit("few.json", _set(["nodes", 3, "inputs"], [[0, 0, 0]])),
        ("few.json", "node 3", "FullyConnected takes 3 inputs here, but the node lists 1"),
    ),
    Case(
        "too-many-inputs",
        symbol_edit("many.json", _set(["nodes", 4, "inputs"], [[3, 0, 0], [0, 0, 0]])),
        ("many.json", "node 4", "Activation"),
    ),
    Case(
        "control-deps",
        symbol_edit("deps.json", _set(["nodes", 4, "control_deps"], [3])),
        ("deps.json", "'control_deps' is not supported"),
    ),
    Case(
        "graph-attrs",
        symbol_edit("version.json", _set(["attrs", "mxnet_version"], ["int", "new"])),
        ("version.json", "mxnet_version"),
    ),
]


@pytest.mark.parametrize("case", [c.param() for c in SYMBOL_CASES])
def test_broken_symbol_json(request, ws, case):
    check_case(request, ws, case)


def test_symbol_validation_accepts_what_gluon_exports(tmp_path):
    """No false alarms: layers beyond Dense (BatchNorm, Dropout, PReLU, split/concat, ...)."""
    import mxnet as mx
    from mxnet import gluon

    from normexport.mx.checkpoint import load_checkpoint

    class Branches(gluon.HybridBlock):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            with self.name_scope():
                self.a, self.b = gluon.nn.Dense(4), gluon.nn.Dense(4, activation="tanh")
                self.norm, self.act = gluon.nn.BatchNorm(), gluon.nn.PReLU()
                self.out = gluon.nn.Dense(2)

        def hybrid_forward(self, F, x):
            left, right = F.split(x, num_outputs=2, axis=1)
            y = F.concat(self.a(x), self.b(x), left * 2 + 1, F.sqrt(F.abs(right)), dim=1)
            y = F.Dropout(self.act(self.norm(y)), p=0.1)
            return self.out(F.clip(y, -3, 3).reshape((0, -1)))

    net = Branches(prefix="branches_")
    net.initialize()
    net.hybridize()
    net(mx.nd.ones((2, 4)))
    net.export(str(tmp_path / "b"))
    symbol, arg_params, aux_params = load_checkpoint(
        tmp_path / "b-symbol.json", tmp_path / "b-0000.params"
    )
    assert symbol.list_outputs() == ["branches_dense2_fwd_output"]
    assert len(aux_params) == 2 and "branches_dense0_weight" in arg_params


# --------------------------------------------------------------------------- params files

V2 = 0xF993FAC9


def array_record(shape, flag=0, payload=None, magic=V2) -> bytes:
    """One array as ``mx.nd.save`` writes it (MXNet 1.x, dense, CPU context)."""
    head = struct.pack("<Iii", magic, 0, len(shape)) + struct.pack(f"<{len(shape)}q", *shape)
    if payload is None:
        payload = np.zeros(shape, np.float32).tobytes()
    return head + struct.pack("<iii", 1, 0, flag) + payload


def params_bytes(records: list[bytes], names: list[bytes], count=None) -> bytes:
    out = struct.pack("<QQQ", 0x112, 0, len(records) if count is None else count)
    out += b"".join(records)
    out += struct.pack("<Q", len(names)) + b"".join(struct.pack("<Q", len(n)) + n for n in names)
    return out


def params_file(name: str, make):
    return export_argv(params=lambda ws: ws.write(name, make(ws)))


def without(name: str):
    def make(ws: Workspace) -> bytes:
        import mxnet as mx

        loaded = mx.nd.load(str(ws.params))
        del loaded[name]
        path = ws.broken / "lacking.params"
        mx.nd.save(str(path), loaded)
        return path.read_bytes()

    return make


def reshaped(name: str, shape):
    def make(ws: Workspace) -> bytes:
        import mxnet as mx

        loaded = mx.nd.load(str(ws.params))
        loaded[name] = mx.nd.zeros(shape, dtype="float32")
        path = ws.broken / "reshaped.params"
        mx.nd.save(str(path), loaded)
        return path.read_bytes()

    return make


PARAMS_CASES = [
    Case(
        "truncated-in-record",
        params_file("cut.params", lambda ws: ws.params.read_bytes()[:30]),
        ("cut.params", "truncated"),
    ),
    Case(
        "truncated-in-data",
        params_file(
            "half.params", lambda ws: ws.params.read_bytes()[: ws.params.stat().st_size // 2]
        ),
        ("half.params", "needs more bytes than the file has left"),
    ),
    Case("empty", params_file("empty.params", lambda ws: b""), ("empty.params", "truncated")),
    Case(
        "garbage",
        params_file("noise.params", lambda ws: np.random.default_rng(0).bytes(700)),
        ("noise.params", "not an MXNet params file"),
    ),
    Case(
        "pickle",
        params_file("pickled.params", lambda ws: pickle.dumps({"arg:w": [1.0]})),
        ("pickled.params", "not an MXNet params file"),
    ),
    Case(
        "missing",
        export_argv(params=lambda ws: ws.broken / "absent.params"),
        ("absent.params", "no such file"),
    ),
    Case("directory", export_argv(params=lambda ws: ws.broken), ("broken", "is a directory")),
    Case(
        "lacks-a-weight",
        params_file("lacks.params", without("arg:net_dense1_weight")),
        ("lacks.params", "lacks 'net_dense1_weight', which the symbol names"),
    ),
    Case(
        "wrong-shape",
        params_file("shape.params", reshaped("arg:net_dense1_weight", (3, 3))),
        ("shape.params", "parameter shapes do not fit net-symbol.json", "net_dense1"),
    ),
    Case(
        "huge-declared-shape",
        params_file(
            "huge.params",
            lambda ws: params_bytes([array_record((2**40, 2**40), payload=b"")], [b"arg:w"]),
        ),
        ("huge.params", "more than", "elements"),
    ),
    Case(
        "wrapping-declared-shape",
        params_file(
            "wrap.params",
            lambda ws: params_bytes([array_record((2**62, 4), payload=b"")], [b"arg:w"]),
        ),
        ("wrap.params", "more than", "elements"),
    ),
    Case(
        "huge-declared-count",
        params_file("count.params", lambda ws: params_bytes([], [], count=2**60)),
        ("count.params", "declares", "arrays"),
    ),
    Case(
        "empty-but-wider-than-32-bits",  # MXNet's 32-bit dims: an OverflowError, exit 3
        params_file(
            "wide.params",
            lambda ws: params_bytes([array_record((2**33, 0), payload=b"")], [b"arg:w"]),
        ),
        ("wide.params", "has a dimension of more than 2147483647"),
    ),
    Case(
        "a-million-empty-arrays",  # a 31 MB file that used 1.1 GB as NDArrays
        params_file(
            "many.params",
            lambda ws: params_bytes(
                [array_record((0,), payload=b"")] * 10**6, [b"a%d" % i for i in range(10**6)]
            ),
        ),
        ("many.params", "declares 1000000 arrays", "at most 100000"),
    ),
    Case(
        "integer-elements",
        params_file(
            "ints.params",
            lambda ws: params_bytes([array_record((2,), flag=4, payload=b"\0" * 8)], [b"arg:w"]),
        ),
        ("ints.params", "element type 4"),
    ),
    Case(
        "trailing-bytes",
        params_file("trail.params", lambda ws: ws.params.read_bytes() + b"junk"),
        ("trail.params", "trailing bytes"),
    ),
    Case(
        "duplicate-names",
        params_file(
            "dupname.params",
            lambda ws: params_bytes([array_record((2,))] * 2, [b"arg:w", b"arg:w"]),
        ),
        ("dupname.params", "duplicate parameter names"),
    ),
    Case(
        "names-mismatch",
        params_file("names.params", lambda ws: params_bytes([array_record((2,))] * 2, [b"arg:w"])),
        ("names.params", "2 arrays but 1 names"),
    ),
    Case(
        "name-not-utf8",
        params_file("latin.params", lambda ws: params_bytes([array_record((2,))], [b"arg:\xff"])),
        ("latin.params", "not UTF-8"),
    ),
]


@pytest.mark.parametrize("case", [c.param() for c in PARAMS_CASES])
def test_broken_params(request, ws, case):
    check_case(request, ws, case)


# --------------------------------------------------------------------------- scalers.json


def scalers_edit(name: str, edit):
    def make(ws: Workspace):
        doc = ws.scalers_doc()
        doc = edit(doc) or doc
        return ws.write(name, json.dumps(doc))

    return export_argv(scalers=make)


def scalers_text(name: str, make_text):
    return export_argv(scalers=lambda ws: ws.write(name, make_text(ws)))


def drop_column(side: str):
    def edit(doc):
        for key, value in doc[side].items():
            if isinstance(value, list) and key != "feature_range":
                value.pop()

    return edit


def first_scale_as(token: str):
    """The scalers text with the first input scale replaced by a raw JSON token."""

    def make(ws: Workspace) -> str:
        doc = ws.scalers_doc()
        doc["inputs"]["scale"][0] = "@@"
        return json.dumps(doc).replace('"@@"', token)

    return make


SCALERS_CASES = [
    Case(
        "format-tag",
        scalers_edit("tag.json", _set(["format"], "other/1")),
        ("tag.json", "format tag is 'other/1'"),
    ),
    Case(
        "no-format-tag",
        scalers_edit("notag.json", lambda d: d.pop("format") and None),
        ("notag.json", "format tag is None"),
    ),
    Case(
        "input-width",
        scalers_edit("inwidth.json", drop_column("inputs")),
        ("inwidth.json", "3 inputs", "2"),
    ),
    Case(
        "output-width",
        scalers_edit("outwidth.json", drop_column("outputs")),
        ("outwidth.json", "2 outputs", "1"),
    ),
    Case(
        "ragged-widths",
        scalers_edit("ragged.json", lambda d: d["inputs"]["shift"].pop() and None),
        ("ragged.json", "'shift' must be a list of 3 numbers"),
    ),
    Case(
        "zero-scale",
        scalers_edit("zero.json", _set(["inputs", "scale", 1], 0.0)),
        ("zero.json", "scale 0.0", "non-zero"),
    ),
    Case("nan-scale", scalers_text("nan.json", first_scale_as("NaN")), ("nan.json", "NaN")),
    Case(
        "inf-scale", scalers_text("inf.json", first_scale_as("-Infinity")), ("inf.json", "Infinity")
    ),
    Case(
        "overflowing-scale",
        scalers_text("big.json", first_scale_as("1e999")),
        ("big.json", "non-finite"),
    ),
    Case(
        "inverse-not-inverse",
        scalers_edit("inverse.json", _set(["outputs", "inverse_scale", 0], 1.5)),
        ("inverse.json", "not the inverse"),
    ),
    Case(
        "wrong-type",
        scalers_edit("type.json", _set(["inputs", "scale"], "1,2,3")),
        ("type.json", "'scale' must be a list of 3 numbers"),
    ),
    Case(
        "boolean-number",
        scalers_edit("bool.json", _set(["inputs", "scale", 0], True)),
        ("bool.json", "'scale'"),
    ),
    Case(
        "unknown-kind",
        scalers_edit("kind.json", _set(["inputs", "kind"], "robust")),
        ("kind.json", "unknown scaler kind 'robust'"),
    ),
    Case(
        "dtype",
        scalers_edit("dtype.json", _set(["dtype"], "float64")),
        ("dtype.json", "dtype is float64", "float32"),
    ),
    Case(
        "dtype-unknown",
        scalers_edit("half.json", _set(["dtype"], "float16")),
        ("half.json", "'dtype' must be one of"),
    ),
    Case(
        "constant-target",
        scalers_edit(
            "const.json",
            lambda d: d["outputs"]["data_max"].__setitem__(0, d["outputs"]["data_min"][0]),
        ),
        ("const.json", "'load' is constant"),
    ),
    Case(
        "pickle",
        scalers_text("pickled.json", lambda ws: pickle.dumps(ws.scalers_doc())),
        ("pickled.json", "pickle"),
    ),
    Case(
        "not-json",
        scalers_text("prose.json", lambda ws: "scale=1"),
        ("prose.json", "not valid JSON"),
    ),
    Case(
        "truncated",
        scalers_text("cut.json", lambda ws: ws.scalers.read_text()[:80]),
        ("cut.json", "not valid JSON"),
    ),
    Case(
        "missing",
        export_argv(scalers=lambda ws: ws.broken / "absent.json"),
        ("absent.json", "no such file"),
    ),
]


@pytest.mark.parametrize("case", [c.param() for c in SCALERS_CASES])
def test_broken_scalers(request, ws, case):
    check_case(request, ws, case)


def model_dir_with(name: str, file: str, make):
    """``export DIR`` on a copy of the model directory whose ``file`` was broken: the
    directory is both the input and the output, and must stay as it was."""

    def argv(ws: Workspace):
        target = ws.root / f"dir-{name}"
        if not target.exists():
            shutil.copytree(ws.model, target)
            (target / file).write_bytes(make(ws))
        return ["export", target]

    return argv


def _dir(name):
    return lambda ws: [ws.root / f"dir-{name}"]


EXPORT_DIR_CASES = [
    Case(
        "scalers-tag",
        model_dir_with(
            "tag",
            "scalers.json",
            lambda ws: ws.scalers.read_bytes().replace(b"normexport.scalers/1", b"x/9"),
        ),
        ("scalers.json", "format tag is 'x/9'"),
        untouched=_dir("tag"),
    ),
    Case(
        "scalers-pickle",
        model_dir_with("pickle", "scalers.json", lambda ws: pickle.dumps(ws.scalers_doc())),
        ("scalers.json", "pickle"),
        untouched=_dir("pickle"),
    ),
    Case(
        "net-params-truncated",
        model_dir_with("params", "net-0000.params", lambda ws: ws.params.read_bytes()[:100]),
        ("net-0000.params", "truncated"),
        untouched=_dir("params"),
    ),
    Case(
        "net-symbol-hostile",
        model_dir_with(
            "symbol",
            "net-symbol.json",
            lambda ws: json.dumps({**ws.symbol_doc(), "heads": [[11, 3, 0]]}).encode(),
        ),
        ("net-symbol.json", "refers to output 3 of node 11"),
        untouched=_dir("symbol"),
        isolate=True,
    ),
    Case(
        "manifest-garbage",
        model_dir_with("manifest", "manifest.json", lambda ws: b"{not json"),
        ("manifest.json", "not valid JSON"),
        untouched=_dir("manifest"),
    ),
]


@pytest.mark.parametrize("case", [c.param() for c in EXPORT_DIR_CASES])
def test_broken_model_directory_for_export(request, ws, case):
    check_case(request, ws, case)


# --------------------------------------------------------------------------- factors files


def factors_text(name: str, make):
    return export_argv(
        factors=lambda ws: ws.write(name, make if isinstance(make, (str, bytes)) else make(ws))
    )


def factors_npy(name: str, array, **save):
    def write(ws: Workspace):
        path = ws.broken / name
        np.save(path, array, **save)
        return path

    return export_argv(factors=write)


GOOD_FACTORS = np.array([[0.01, -2.5], [100.0, 0.0], [1.0, 0.0], [100.0, 0.0], [40.0, 0.0]])


def factors_with(row, col, value):
    changed = GOOD_FACTORS.copy()
    changed[row, col] = value
    return "\n".join(" ".join(repr(float(v)) for v in r) for r in changed) + "\n"


def _npy_bytes(array) -> bytes:
    buffer = _io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


FACTORS_CASES = [
    Case(
        "too-few-rows",
        factors_text("rows.txt", "0.01 -2.5\n100 0\n1 0\n100 0\n"),
        ("rows.txt", "4 rows", "5 rows expected"),
    ),
    Case("too-many-columns", factors_text("cols.txt", "1 0 1\n" * 5), ("cols.txt", "shape (5, 3)")),
    Case(
        "zero-scale",
        factors_text("zero.txt", factors_with(1, 0, 0.0)),
        ("zero.txt", "row 2", "scale 0.0"),
    ),
    Case(
        "nan-scale",
        factors_text("nan.txt", factors_with(3, 0, np.nan)),
        ("nan.txt", "row 4", "nan"),
    ),
    Case(
        "inf-shift",
        factors_text("inf.txt", factors_with(4, 1, np.inf)),
        ("inf.txt", "row 5", "inf"),
    ),
    Case(
        "words",
        factors_text("words.txt", "scale shift\n1 0\n"),
        ("words.txt", "not a table of numbers"),
    ),
    Case(
        "ragged",
        factors_text("ragged.txt", "1 0\n1\n1 0\n"),
        ("ragged.txt", "not a table of numbers"),
    ),
    Case(
        "empty",
        factors_text("empty.txt", ""),
        ("empty.txt",),
        isolate=True,  # the warning reaches stderr only outside pytest's warning capture
    ),
    Case(
        "pickle",
        factors_text("pickled.txt", pickle.dumps(GOOD_FACTORS.tolist())),
        ("pickled.txt", "pickle"),
    ),
    Case(
        "npy-object",
        factors_npy("object.npy", np.array([{"s": 1}] * 5, dtype=object), allow_pickle=True),
        ("object.npy", "not a readable .npy"),
    ),
    Case(
        "npy-truncated",
        factors_text("cut.npy", lambda ws: _npy_bytes(GOOD_FACTORS)[:150]),
        ("cut.npy", "not a readable .npy"),
    ),
    Case(
        "npy-complex",
        factors_npy("complex.npy", GOOD_FACTORS.astype(complex)),
        ("complex.npy", "complex"),
    ),
    Case("npy-1d", factors_npy("flat.npy", GOOD_FACTORS.ravel()), ("flat.npy", "shape (10,)")),
    Case(
        "missing",
        export_argv(factors=lambda ws: ws.broken / "absent.txt"),
        ("absent.txt", "no such file"),
    ),
]


@pytest.mark.parametrize("case", [c.param() for c in FACTORS_CASES])
def test_broken_factors(request, ws, case):
    check_case(request, ws, case)


# --------------------------------------------------------------------------- ONNX files


def onnx_bytes(kind: str):
    def make(ws: Workspace) -> bytes:
        good = (ws.model / "model.onnx").read_bytes()
        return {
            "garbage": np.random.default_rng(1).bytes(500),
            "truncated": good[: len(good) // 2],
            "empty": b"",
            "pickle": pickle.dumps({"graph": 1}),
        }[kind]

    return make


def onnx_file_argv(verb: str, kind: str):
    def argv(ws: Workspace):
        path = ws.broken / f"{verb}-{kind}.onnx"
        if kind != "missing":
            path.write_bytes(onnx_bytes(kind)(ws))
        extra = [ws.data, "--out", ws.root / "pred.csv"] if verb == "predict" else []
        return [verb, path, *extra]

    return argv


def onnx_dir_argv(verb: str, kind: str):
    def argv(ws: Workspace):
        target = ws.root / f"onnx-{verb}-{kind}"
        if not target.exists():
            shutil.copytree(ws.model, target)
            if kind == "missing":
                (target / "model.onnx").unlink()
            else:
                (target / "model.onnx").write_bytes(onnx_bytes(kind)(ws))
        extra = [ws.data, "--out", ws.root / "pred.csv"] if verb == "predict" else []
        return [verb, target, *extra]

    return argv


def onnx_fault(verb: str, where: str, kind: str) -> str:
    if kind == "missing":
        return "no such file"
    # Every verb names the file's own fault (onnxkit.validate), whoever reads it first.
    return "not an ONNX model"


def onnx_metadata(name: str, edit):
    """A copy of the good model.onnx changed by ``edit(model)``, in its own directory."""

    def argv(ws: Workspace):
        import onnx

        target = ws.root / f"onnx-{name}"
        if not target.exists():
            shutil.copytree(ws.model, target)
            model = onnx.load(str(target / "model.onnx"))
            edit(model)
            onnx.save(model, str(target / "model.onnx"))
        return ["predict", target / "model.onnx", ws.data, "--out", ws.root / "pred.csv"]

    return argv


def garble_scalers_metadata(model) -> None:
    for prop in model.metadata_props:
        if prop.key == "normexport.scalers":
            prop.value = "{not json"


def reshape_output_at_run_time(model) -> None:
    """Valid to every checker, but fails when run: (rows, 2) cannot become (3, -1)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    last = graph.node[-1]
    last.output[0] = "normexport_before_reshape"
    shape = numpy_helper.from_array(np.array([3, -1], dtype=np.int64), "normexport_bad_shape")
    graph.initializer.append(shape)
    graph.node.append(
        helper.make_node(
            "Reshape", ["normexport_before_reshape", "normexport_bad_shape"], ["output"]
        )
    )


ONNX_CASES = [
    Case(
        f"{verb}-{where}-{kind}",
        (onnx_file_argv if where == "file" else onnx_dir_argv)(verb, kind),
        (
            f"{verb}-{kind}.onnx" if where == "file" else "model.onnx",
            onnx_fault(verb, where, kind),
        ),
        untouched=(lambda ws, v=verb, k=kind: [ws.root / f"onnx-{v}-{k}"])
        if where == "dir"
        else None,
        absent=lambda ws: ws.root / "pred.csv",
    )
    for verb, places in (
        ("verify", ("dir",)),
        ("predict", ("file", "dir")),
        ("inspect", ("file", "dir")),
    )
    for where in places
    for kind in ("garbage", "truncated", "empty", "pickle", "missing")
    # a directory without model.onnx is still a model directory to inspect
    if not (verb == "inspect" and where == "dir" and kind == "missing")
] + [
    Case(
        "predict-metadata-not-json",
        onnx_metadata("meta", garble_scalers_metadata),
        ("model.onnx", "normexport.scalers", "not valid JSON"),
        untouched=lambda ws: [ws.root / "onnx-meta"],
        absent=lambda ws: ws.root / "pred.csv",
    ),
    Case(
        "predict-fails-when-run",
        onnx_metadata("reshape", reshape_output_at_run_time),
        ("model.onnx", "onnxruntime"),
        untouched=lambda ws: [ws.root / "onnx-reshape"],
        absent=lambda ws: ws.root / "pred.csv",
    ),
]


@pytest.mark.parametrize("case", [c.param() for c in ONNX_CASES])
def test_broken_onnx(request, ws, case):
    check_case(request, ws, case)


# --------------------------------------------------------------------------- verify DIR


def verify_dir_with(name: str, file: str, make):
    def argv(ws: Workspace):
        target = ws.root / f"verify-{name}"
        if not target.exists():
            shutil.copytree(ws.model, target)
            if make is None:
                (target / file).unlink()
            else:
                (target / file).write_bytes(make(ws))
        return ["verify", target]

    return argv


VERIFY_DIR_CASES = [
    Case(
        "model-params-truncated",
        verify_dir_with(
            "mparams",
            "model-0000.params",
            lambda ws: (ws.model / "model-0000.params").read_bytes()[:30],
        ),
        ("model-0000.params", "truncated"),
        untouched=lambda ws: [ws.root / "verify-mparams"],
    ),
    Case(
        "model-params-missing",
        verify_dir_with("mnoparams", "model-0000.params", None),
        ("model-0000.params", "no such file"),
        untouched=lambda ws: [ws.root / "verify-mnoparams"],
    ),
    Case(
        "model-symbol-garbage",
        verify_dir_with("msymbol", "model-symbol.json", lambda ws: b"garbage"),
        ("model-symbol.json", "not valid JSON"),
        untouched=lambda ws: [ws.root / "verify-msymbol"],
    ),
    Case(
        "model-symbol-hostile",
        verify_dir_with(
            "mhostile",
            "model-symbol.json",
            lambda ws: json.dumps(
                {
                    **(doc := json.loads((ws.model / "model-symbol.json").read_text())),
                    "heads": [[len(doc["nodes"]) - 1, 3, 0]],
                }
            ).encode(),
        ),
        ("model-symbol.json", "refers to output 3"),
        untouched=lambda ws: [ws.root / "verify-mhostile"],
        isolate=True,
    ),
    Case(
        "net-symbol-garbage",
        verify_dir_with("nsymbol", "net-symbol.json", lambda ws: b"garbage"),
        ("net-symbol.json", "not valid JSON"),
        untouched=lambda ws: [ws.root / "verify-nsymbol"],
    ),
    Case(
        "scalers-garbage",
        verify_dir_with("scalers", "scalers.json", lambda ws: b"garbage"),
        ("scalers.json", "not valid JSON"),
        untouched=lambda ws: [ws.root / "verify-scalers"],
    ),
]


@pytest.mark.parametrize("case", [c.param() for c in VERIFY_DIR_CASES])
def test_broken_model_directory_for_verify(request, ws, case):
    check_case(request, ws, case)


# --------------------------------------------------------------------------- unwritable output


def export_to(make_out):
    def argv(ws: Workspace):
        return [
            "export",
            "--symbol",
            ws.symbol,
            "--params",
            ws.params,
            "--scalers",
            ws.scalers,
            "--out",
            make_out(ws),
        ]

    return argv


def a_file(ws: Workspace) -> Path:
    return ws.write("plain-file", "not a directory")


def foreign_dir(ws: Workspace) -> Path:
    path = ws.root / "foreign"
    path.mkdir(exist_ok=True)
    (path / "notes.txt").write_text("someone else's files")
    return path


OUTPUT_CASES = [
    Case(
        "parent-is-a-file",
        export_to(lambda ws: a_file(ws) / "out"),
        ("plain-file", "cannot create"),
    ),
    Case("out-is-a-file", export_to(a_file), ("plain-file", "exists and is not a directory")),
    Case(
        "out-is-someone-elses-directory",
        export_to(foreign_dir),
        ("foreign", "not a normexport model directory"),
        untouched=lambda ws: [foreign_dir(ws)],
    ),
    Case(
        "train-parent-is-a-file",
        lambda ws: [
            "train",
            ws.data,
            "--inputs",
            ",".join(INPUTS),
            "--targets",
            ",".join(TARGETS),
            "--out",
            a_file(ws) / "o",
            "--epochs",
            "1",
            "--hidden",
            "2",
        ],
        ("plain-file", "cannot create"),
    ),
    Case(
        "predict-out-under-a-file",
        lambda ws: ["predict", ws.model, ws.data, "--out", a_file(ws) / "p.csv"],
        ("plain-file", "cannot write here"),
    ),
]


@pytest.mark.parametrize("case", [c.param() for c in OUTPUT_CASES])
def test_unwritable_output(request, ws, case):
    check_case(request, ws, case)
    assert (ws.broken / "plain-file").read_text() == "not a directory"


# --------------------------------------------------------------------------- isolated cases


ALL_CASES = (
    CSV_CASES
    + SYMBOL_CASES
    + PARAMS_CASES
    + SCALERS_CASES
    + EXPORT_DIR_CASES
    + FACTORS_CASES
    + ONNX_CASES
    + VERIFY_DIR_CASES
    + OUTPUT_CASES
)


@pytest.fixture(scope="module")
def isolated(ws):
    """Results of every ``isolate=True`` case, run together in one child process."""
    cases = [c for c in ALL_CASES if c.isolate]
    argvs = [[str(a) for a in c.argv(ws)] for c in cases]
    before = [{d: snapshot(d) for d in kept(ws, c)} for c in cases]
    results = run_isolated(argvs)
    return {id(c): (r, b) for c, r, b in zip(cases, results, before, strict=True)}


def test_isolated_runner_attributes_a_crash_to_its_case():
    results = run_isolated([["--version"], ["--crash-for-test"], ["--version"]])
    assert [r[0] for r in results] == [0, -signal.SIGSEGV, 0]
    assert results[1][2].startswith("child died")


# --------------------------------------------------------------------------- special files


def run_with_deadline(argv, fifo: Path, seconds: float = 2.5):
    """Run ``main(argv)`` in a thread; if it is still running after ``seconds`` (blocked
    on the FIFO), unblock it by opening the FIFO for writing. Returns (hung, code, err)."""
    result: dict[str, object] = {}
    err = _io.StringIO()

    def target():
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(_io.StringIO()):
            result["code"] = main([str(a) for a in argv])

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    hung = thread.is_alive()
    if hung:
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(30)
    return hung, result.get("code"), err.getvalue()


FIFO_CASES = [
    pytest.param("symbol", id="symbol"),
    pytest.param("params", id="params"),
    pytest.param("scalers", id="scalers"),
    pytest.param("factors", id="factors"),
    pytest.param("csv", id="csv"),
]


@pytest.mark.parametrize("kind", FIFO_CASES)
def test_special_files_are_refused_not_read(ws, tmp_path, kind):
    """A FIFO (or a device) as an input must not block the tool or be read forever."""
    import mxnet  # noqa: F401 - imported up front so the deadline measures the read only

    fifo = tmp_path / f"input-{kind}"
    os.mkfifo(fifo)
    files = {"symbol": ws.symbol, "params": ws.params, "scalers": ws.scalers}
    if kind == "csv":
        argv = ["train", fifo, "--inputs", "a", "--targets", "b", "--out", ws.victim]
    else:
        files[kind if kind != "factors" else "scalers"] = fifo
        side = ["--factors", fifo] if kind == "factors" else ["--scalers", files["scalers"]]
        argv = [
            "export",
            "--symbol",
            files["symbol"],
            "--params",
            files["params"],
            *side,
            "--out",
            ws.victim,
        ]
    before = snapshot(ws.victim)
    hung, code, err = run_with_deadline(argv, fifo)
    assert snapshot(ws.victim) == before
    assert not hung, f"blocked reading a FIFO ({err.strip()})"
    assert_one_line_error(code, "", err, (fifo.name, "not a regular file"))


# --------------------------------------------------------------------------- limits, no execution


def test_size_limits_apply_before_reading(capsys, ws, monkeypatch):
    from normexport import files
    from normexport.mx import checkpoint

    monkeypatch.setattr(checkpoint, "MAX_SYMBOL_BYTES", 1000)
    code, out, err = run_cli(capsys, export_argv()(ws))
    assert_one_line_error(code, out, err, ("net-symbol.json", "larger than the 1000-byte limit"))
    monkeypatch.undo()
    monkeypatch.setattr(files, "MAX_JSON_BYTES", 100)
    code, out, err = run_cli(capsys, export_argv()(ws))
    assert_one_line_error(code, out, err, ("scalers.json", "larger than the 100-byte limit"))
    monkeypatch.undo()
    monkeypatch.setattr(checkpoint, "MAX_NODES", 5)
    code, out, err = run_cli(capsys, export_argv()(ws))
    assert_one_line_error(code, out, err, ("net-symbol.json", "expected 1 to 5"))
    # a net at exactly the node limit is refused up front: its spliced copy would exceed it
    monkeypatch.undo()
    nodes = len(json.loads(Path(ws.symbol).read_text())["nodes"])
    monkeypatch.setattr(checkpoint, "MAX_NODES", nodes)
    code, out, err = run_cli(capsys, export_argv()(ws))
    assert_one_line_error(
        code, out, err, ("net-symbol.json", f"{nodes} nodes", f"at most {nodes - 64}")
    )


class _Payload:
    """Unpickling this creates a marker file: proof that a file was executed."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_nothing_is_executed_from_files(capsys, ws, tmp_path):
    marker = tmp_path / "executed"
    payload = pickle.dumps(_Payload(str(marker)))
    np.save(
        tmp_path / "payload.npy",
        np.array([_Payload(str(marker))] * 5, dtype=object),
        allow_pickle=True,
    )
    attr_code = "__import__('os').mkdir(" + repr(str(marker)) + ")"
    doc = ws.symbol_doc()
    doc["nodes"][1]["attrs"]["__shape__"] = attr_code
    cases = [
        export_argv(symbol=lambda w: w.write("payload-symbol.json", payload)),
        export_argv(symbol=lambda w: w.write("eval-symbol.json", json.dumps(doc))),
        export_argv(params=lambda w: w.write("payload.params", payload)),
        export_argv(scalers=lambda w: w.write("payload-scalers.json", payload)),
        export_argv(factors=lambda w: w.write("payload-factors.txt", payload)),
        export_argv(factors=lambda w: tmp_path / "payload.npy"),
        train_argv("payload.csv", payload),
        onnx_file_argv("inspect", "pickle"),
    ]
    for argv in cases:
        code, out, err = run_cli(capsys, argv(ws))
        assert code == 2, err
        assert not marker.exists(), f"{argv(ws)} executed code from a file"
    from normexport import files

    pickled = [
        p.name
        for p in Path(files.__file__).parent.rglob("*.py")
        if any(
            word in p.read_text() for word in ("pickle.load", "allow_pickle=True", "eval(", "exec(")
        )
    ]
    assert pickled == []


# --------------------------------------------------------------------------- kill -9


def manifest_state(directory: Path, old: dict[str, bytes]) -> str:
    """'old' if ``directory`` is byte-for-byte ``old``; 'new:<mode>' if it is a complete
    export (manifest present, exactly the files it lists, every sha256 matching)."""
    assert directory.is_dir(), f"{directory} is missing"
    now = snapshot(directory)
    if now == old:
        return "old"
    assert "manifest.json" in now, f"neither the old directory nor complete: {sorted(now)}"
    manifest = json.loads(now["manifest.json"])
    listed = manifest["files"]
    assert set(now) == set(listed) | {"manifest.json"}, sorted(set(now) ^ set(listed))
    for name, entry in listed.items():
        assert sha256(now[name]) == entry["sha256"], f"{name} does not match the manifest"
    return f"new:{manifest['mode']}"


def export_command(target: Path, mode: str) -> list[str]:
    return [PY, "-m", "normexport", "export", str(target), "--mode", mode]


def staging_of(target: Path) -> list[Path]:
    return list(target.parent.glob(f".{target.name}.staging-*"))


def wait_for(condition, deadline: float, step: float = 0.002) -> bool:
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return False


def test_sigkill_during_export_leaves_old_or_new_directory(ws, tmp_path):
    """``kill -9`` at moments spread over an export: before, while and after writing."""
    target = tmp_path / "model"
    shutil.copytree(ws.model, target)

    # Measure one export: start -> staging directory appears -> its manifest -> exit.
    scratch = tmp_path / "scratch"
    shutil.copytree(ws.model, scratch)
    start = time.monotonic()
    child = subprocess.Popen(
        export_command(scratch, "fold"), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert wait_for(lambda: staging_of(scratch), start + 120)
    staged = time.monotonic() - start
    assert child.wait(120) == 0, child.stderr.read()
    total = time.monotonic() - start
    assert manifest_state(scratch, {}) == "new:fold"

    # Delays: during start-up, spread over the staged phase (writing, converting,
    # verifying), and around the end, where the manifest is written and the stage swapped
    # in (timing jitter on a busy machine spreads these over the last tens of ms).
    moments = [0.5 * staged] + [staged + f * (total - staged) for f in (0.2, 0.4, 0.6, 0.8)]
    moments += [total - 0.08, total - 0.03, total - 0.01]
    seen = []
    for delay in moments:
        old = snapshot(target)
        # Export the other mode than the directory holds, so the new one differs from the old.
        mode = "fold" if json.loads(old["manifest.json"])["mode"] == "splice" else "splice"
        child = subprocess.Popen(
            export_command(target, mode),
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(max(delay, 0.0))
        child.send_signal(signal.SIGKILL)  # a no-op if it already finished
        child.wait(60)
        state = manifest_state(target, old)
        assert state in ("old", f"new:{mode}"), state
        seen.append(state)
    # A later run repairs or replaces whatever the kills left and ends complete and clean.
    result = subprocess.run(
        export_command(target, "splice"), env=ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert manifest_state(target, {}) == "new:splice"
    assert leftovers(target) == []
    assert "old" in seen, seen  # at least the early kills must have left the old directory


_KILL_AT_SWAP = """
import os, signal, sys
target = sys.argv[1]
real = os.replace
def replace(src, dst, *args, **kwargs):
    real(src, dst, *args, **kwargs)
    if os.fspath(src) == target:  # the complete old directory was just moved aside
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
from normexport.cli import main
sys.exit(main(["export", target, "--mode", "fold"]))
"""


def kill_at_swap(target: Path) -> int:
    child = subprocess.run(
        [PY, "-c", _KILL_AT_SWAP, str(target)], env=ENV, capture_output=True, timeout=300
    )
    return child.returncode


def test_next_export_clears_stale_leftovers(capsys, ws, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(ws.model, target)
    for leftover in (".model.staging-99999", ".model.old-99999"):
        shutil.copytree(ws.model, tmp_path / leftover)
        (tmp_path / leftover / "model.onnx").write_bytes(b"half a file")
    assert run_cli(capsys, ["export", target, "--mode", "fold"])[0] == 0
    assert manifest_state(target, {}) == "new:fold"
    assert leftovers(target) == []


def test_next_export_repairs_a_directory_moved_aside(capsys, ws, tmp_path):
    """The state a kill between the two renames of a swap leaves: no DIR, the complete
    previous one at .DIR.old-PID, the new one (complete but manifest-less) staged."""
    target = tmp_path / "model"
    shutil.copytree(ws.model, tmp_path / ".model.old-99999")
    shutil.copytree(ws.model, tmp_path / ".model.staging-99999")
    (tmp_path / ".model.staging-99999" / "manifest.json").unlink()
    code, out, err = run_cli(capsys, ["export", target, "--mode", "fold"])
    assert code == 0, err
    assert manifest_state(target, {}) == "new:fold"
    assert leftovers(target) == []


def test_kill_at_the_swap_leaves_a_complete_directory(ws, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(ws.model, target)
    old = snapshot(target)
    kill_at_swap(target)
    assert manifest_state(target, old) in ("old", "new:fold")


# --------------------------------------------------------------------------- reproducible bytes

REPRODUCIBLE = (
    "model.onnx",
    "model-0000.params",
    "model-symbol.json",
    "net-0000.params",
    "net-symbol.json",
)


def test_reexport_gives_identical_bytes(ws, tmp_path):
    """Same inputs, same bytes: in another process with another hash seed, from params
    given in another order, after other Gluon blocks were built (name counters moved)."""
    import mxnet as mx

    import normexport as nx
    from normexport.modeldir import load_scalers
    from normexport.mx.checkpoint import load_checkpoint

    in_scaler, out_scaler, _ = load_scalers(ws.scalers)
    symbol, arg_params, aux_params = load_checkpoint(ws.symbol, ws.params)
    first = nx.export(
        (symbol, arg_params, aux_params), in_scaler, out_scaler, tmp_path / "a", mode="fold"
    )

    for _ in range(3):  # move MXNet's automatic name counters
        mx.gluon.nn.Dense(3).initialize()
        mx.sym.FullyConnected(mx.sym.var("x"), num_hidden=2)
    reordered = {k: arg_params[k] for k in reversed(list(arg_params))}
    second = nx.export(
        (symbol, reordered, aux_params), in_scaler, out_scaler, tmp_path / "b", mode="fold"
    )

    third = tmp_path / "c"
    shutil.copytree(ws.model, third)
    env = {**ENV, "PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        export_command(third, "fold"), env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr

    for name in REPRODUCIBLE:
        reference = (first / name).read_bytes()
        assert (second / name).read_bytes() == reference, name
        assert (third / name).read_bytes() == reference, name
    again = tmp_path / "d"
    shutil.copytree(third, again)
    result = subprocess.run(
        export_command(again, "fold"), env=ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert snapshot(again) == snapshot(third)  # re-exporting an export changes nothing at all


def test_width_mismatch_past_the_first_layer_is_one_line(capsys, ws, tmp_path):
    """A network whose first op is not FullyConnected: the input width is found only by
    shape inference, and a scalers.json of the wrong width must still give one line."""
    import mxnet as mx

    from normexport.mx.checkpoint import save_checkpoint
    from normexport.mx.graph import Checkpoint

    hidden = mx.sym.FullyConnected(
        mx.sym.relu(mx.sym.var("data"), name="act"), num_hidden=4, name="fc0"
    )
    symbol = mx.sym.FullyConnected(hidden, num_hidden=2, name="fc1")
    params = {
        "fc0_weight": mx.nd.ones((4, 5)),
        "fc0_bias": mx.nd.zeros(4),
        "fc1_weight": mx.nd.ones((2, 4)),
        "fc1_bias": mx.nd.zeros(2),
    }
    save_checkpoint(Checkpoint(symbol, params, {}), tmp_path, "relu-first")
    code, out, err = run_cli(
        capsys,
        [
            "export",
            "--symbol",
            tmp_path / "relu-first-symbol.json",
            "--params",
            tmp_path / "relu-first-0000.params",
            "--scalers",
            ws.scalers,
            "--out",
            ws.victim,
        ],
    )
    assert_one_line_error(code, out, err, ("scalers.json", "3 input columns"))


def test_a_nan_model_fails_even_when_the_numpy_reference_is_skipped(tmp_path):
    """MXNet, onnxruntime and onnx.reference all return NaN, so they agree; the NumPy
    reference, which would disagree, has no sqrt op and is skipped. The export must fail
    on the non-finite outputs for finite inputs inside the training range, and write
    nothing."""
    import mxnet as mx

    from normexport.errors import VerificationError
    from normexport.mx import exporting
    from normexport.scaling import MinMaxScaler

    rng = np.random.default_rng(0)
    in_sc = MinMaxScaler().fit(rng.uniform(size=(50, 3)), columns=["a", "b", "c"])
    out_sc = MinMaxScaler().fit(rng.uniform(size=(50, 2)), columns=["u", "v"])
    hidden = mx.sym.FullyConnected(mx.sym.var("data"), num_hidden=2, name="fc0")
    params = {
        "fc0_weight": mx.nd.zeros((2, 3), dtype="float64"),
        "fc0_bias": -mx.nd.ones(2, dtype="float64"),  # sqrt(-1) on every row
    }
    out = tmp_path / "nan-model"
    with pytest.raises(VerificationError) as caught:
        exporting.export((mx.sym.sqrt(hidden, name="root"), params, {}), in_sc, out_sc, out)
    text = str(caught.value)
    assert "skipped numpy: the NumPy reference has no sqrt op" in text
    assert "non-finite outputs for finite inputs inside the training range" in text
    assert "onnxruntime vs mxnet" in text and text.endswith("result: FAIL")
    assert not out.exists()
