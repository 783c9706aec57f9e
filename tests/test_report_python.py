"""perf-agent report on Python profiles: the Python-first default, --native and --lines.

The profile (test_report_profiles.python_profile) is built as the in-kernel
Python walker will write one: Python frames are Functions with a .py file
and a first line, each Location's Line the sampled line; the interpreter's
frames sit between them; a C extension and the kernel under the innermost
Python frame. Every number below is worked out by hand from PYTHON_STACKS.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from typing import Dict, Tuple

import pytest

from conftest import REPO
from test_report_profiles import (
    EVAL, PYTHON_FIRST_STACKS, PYTHON_STACKS, known_profile, python_profile, random_profile,
    run_report, write_profile_file,
)

from perfagent.pprof.profile import ProfileBuilder
from perfagent.report.folded import read_folded
from perfagent.report.stacks import KIND_JIT, KIND_NATIVE, KIND_PYTHON, load_stacks, short_python_path

SVG = "{http://www.w3.org/2000/svg}"
ROW = re.compile(r"^\s*(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)  (.+)$")
TREE_ROW = re.compile(r"^\s*(\S+)\s+(\S+)\s+(\S*)\s+(\S*)  (.*)$")
FIXTURE_GO_HEAP = os.path.join(REPO, "tests", "fixtures", "pprof_go_heap.pb.gz")


@pytest.fixture
def py_path(tmp_path) -> str:
    return write_profile_file(python_profile(), str(tmp_path / "py.pb.gz"))


def top_table(text: str) -> Dict[str, Tuple[int, int]]:
    """{name: (flat, cum)} of a --sample-index samples table."""
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["flat", "flat%", "sum%", "cum", "cum%"])
    rows = {}
    for line in lines[header + 1:]:
        flat, _, _, cum, _, name = ROW.match(line).groups()
        rows[name] = (int(flat), int(cum))
    return rows


def native_stacks() -> Dict[Tuple[str, ...], int]:
    out: Dict[Tuple[str, ...], int] = {}
    for stack, count in PYTHON_STACKS:
        key = tuple(frame.partition("@")[0] + ("_[k]" if frame == "clear_page_erms" else "") for frame in stack)
        out[key] = out.get(key, 0) + count
    return out


# ------------------------------------------------------------------ the top table


def test_default_top_is_python_first(py_path, capsys):
    code, out, err = run_report([py_path, "--sample-index", "samples", "--top", "0"], capsys)
    assert code == 0, err
    assert out.splitlines()[1].startswith("View: Python first")
    rows = top_table(out)
    flat = {name: value[0] for name, value in rows.items() if value[0]}
    # Native leaves under a Python function are its own time: the eval loop
    # under handle (7), _json and the kernel under JSONEncoder.encode (5),
    # the eval loop under render (3); the native thread keeps its memcpy.
    assert flat == {"handle": 7, "JSONEncoder.encode": 5, "memcpy": 4, "render": 3, "<module>": 1}
    assert rows["main"] == rows["Py_RunMain"] == rows["PyEval_EvalCode"] == (0, 16)  # rootward frames stay
    assert rows["<module>"] == (1, 16) and rows["handle"] == (7, 15) and rows["dumps"] == (0, 5)
    assert not {EVAL, "PyObject_Vectorcall", "encoder_listencode_obj", "clear_page_erms"} & set(rows)
    assert "Showing nodes accounting for 20, 100% of 20 total" in out


def test_native_shows_every_frame(py_path, capsys):
    code, out, err = run_report([py_path, "--sample-index", "samples", "--top", "0", "--native"], capsys)
    assert code == 0, err
    assert "View:" not in out
    rows = top_table(out)
    flat = {name: value[0] for name, value in rows.items() if value[0]}
    assert flat == {EVAL: 10, "clear_page_erms": 5, "memcpy": 4, "<module>": 1}
    assert rows[EVAL] == (10, 15)  # recursive: once per sample
    assert rows["handle"] == (0, 15) and rows["encoder_listencode_obj"] == (0, 5)


def test_lines_split_python_functions_by_line(py_path, capsys):
    code, out, err = run_report([py_path, "--sample-index", "samples", "--top", "0", "--lines"], capsys)
    assert code == 0, err
    rows = top_table(out)
    assert rows["handle (/srv/app.py:12)"] == (7, 7)
    assert rows["handle (/srv/app.py:14)"] == (0, 8)
    assert rows["<module> (/srv/app.py:40)"] == (1, 16)
    # Installed code is shown by module path, as py-spy shows it.
    assert rows["JSONEncoder.encode (json/encoder.py:200)"] == (5, 5)
    assert rows["dumps (json/__init__.py:231)"] == (0, 5)
    assert rows["render (jinja2/environment.py:1295)"] == (3, 3)
    assert rows["main"] == (0, 16)  # no line recorded: the plain name


def test_lines_with_native(py_path, capsys):
    code, out, err = run_report([py_path, "--sample-index", "samples", "--top", "0", "--lines", "--native"], capsys)
    assert code == 0, err
    rows = top_table(out)
    assert rows[EVAL] == (10, 15)
    assert rows["handle (/srv/app.py:12)"] == (0, 7)


def test_focus_sees_native_frames_before_the_python_cut(py_path, capsys):
    # The C encoder is cut from the view, yet --focus finds the Python code that spends time in it.
    code, out, err = run_report([py_path, "--sample-index", "samples", "--focus", "encoder_listencode"], capsys)
    assert code == 0, err
    rows = top_table(out)
    assert {name: value for name, value in rows.items() if value[0]} == {"JSONEncoder.encode": (5, 5)}


# ------------------------------------------------------------------ tree and folded


def test_tree_is_python_first(py_path, capsys):
    code, out, err = run_report([py_path, "--sample-index", "samples", "--tree", "--min-percent", "0"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[1].startswith("View: Python first")
    header = next(i for i, line in enumerate(lines) if line.endswith("call path"))
    rows = [TREE_ROW.match(line).groups() for line in lines[header + 1:]]
    assert [(row[0], row[2], row[4]) for row in rows] == [
        ("16", "0", "main"),
        ("16", "0", "  Py_RunMain"),
        ("16", "0", "    PyEval_EvalCode"),
        ("16", "1", "      <module>"),
        ("15", "7", "        handle"),
        ("5", "0", "          dumps"),
        ("5", "5", "            JSONEncoder.encode"),
        ("3", "3", "          render"),
        ("4", "0", "start_thread"),
        ("4", "0", "  worker_loop"),
        ("4", "4", "    memcpy"),
    ]


def test_tree_native_keeps_the_interpreter(py_path, capsys):
    code, out, err = run_report([py_path, "--sample-index", "samples", "--tree", "--min-percent", "0",
                                 "--native"], capsys)
    assert code == 0, err
    paths = [line[39:] for line in out.splitlines()[3:]]
    assert paths[:6] == ["main", "  Py_RunMain", "    PyEval_EvalCode", "      <module>", "        " + EVAL,
                         "          handle"]


@pytest.mark.parametrize("flags, expected", [
    ([], {tuple(stack): count for stack, count in PYTHON_FIRST_STACKS.items()}),
    (["--native"], None),
])
def test_folded_views(py_path, capsys, flags, expected):
    code, out, err = run_report([py_path, "--sample-index", "samples", "--folded"] + flags, capsys)
    assert code == 0, err
    assert read_folded(out.splitlines()) == (expected if expected is not None else native_stacks())


def test_folded_with_lines(py_path, capsys):
    code, out, err = run_report([py_path, "--sample-index", "samples", "--folded", "--lines"], capsys)
    assert code == 0, err
    assert set(out.splitlines()) == {
        "main;Py_RunMain;PyEval_EvalCode;<module> (/srv/app.py:40);handle (/srv/app.py:12) 7",
        "main;Py_RunMain;PyEval_EvalCode;<module> (/srv/app.py:40);handle (/srv/app.py:14);"
        "dumps (json/__init__.py:231);JSONEncoder.encode (json/encoder.py:200) 5",
        "main;Py_RunMain;PyEval_EvalCode;<module> (/srv/app.py:40);handle (/srv/app.py:14);"
        "render (jinja2/environment.py:1295) 3",
        "main;Py_RunMain;PyEval_EvalCode;<module> (/srv/app.py:40) 1",
        "start_thread;worker_loop;memcpy 4",
    }


# ------------------------------------------------------------------ SVG


def svg_frames(path: str) -> Dict[str, Tuple[str, str]]:
    """{frame name: (title, fill)} (names are unique in the Python profile's graphs but for EVAL)."""
    out = {}
    for group in ET.parse(path).getroot().iter(SVG + "g"):
        if group.get("class") != "f":
            continue
        title = group.find(SVG + "title").text
        name = title.split("\n")[0].rsplit(" (", 1)[0]
        out[name] = (title, group.find(SVG + "rect").get("fill"))
    return out


def test_svg_is_python_first_with_file_and_first_line_on_hover(py_path, tmp_path, capsys):
    target = str(tmp_path / "py.svg")
    code, _, err = run_report([py_path, "--svg", target], capsys)
    assert code == 0, err
    frames = svg_frames(target)
    assert set(frames) == {"all", "main", "Py_RunMain", "PyEval_EvalCode", "<module>", "handle", "dumps", "JSONEncoder.encode",
                           "render", "start_thread", "worker_loop", "memcpy"}
    # The tooltip's second line: the file and the function's first line.
    assert frames["handle"][0] == "handle (15ms, 75.00%)\n/srv/app.py:10"
    assert frames["JSONEncoder.encode"][0] == "JSONEncoder.encode (5ms, 25.00%)\n/usr/lib/python3.13/json/encoder.py:183"
    assert frames["main"][0] == "main (16ms, 80.00%)"  # native frames: no file line


def test_svg_lines_show_the_sampled_line(py_path, tmp_path, capsys):
    target = str(tmp_path / "py.svg")
    code, _, err = run_report([py_path, "--svg", target, "--lines"], capsys)
    assert code == 0, err
    frames = svg_frames(target)
    assert frames["handle (/srv/app.py:12)"][0] == "handle (/srv/app.py:12) (7ms, 35.00%)\n/srv/app.py:12"
    assert frames["render (jinja2/environment.py:1295)"][0].endswith(
        "\n/venv/lib/python3.13/site-packages/jinja2/environment.py:1295")


def test_svg_native(py_path, tmp_path, capsys):
    target = str(tmp_path / "py.svg")
    code, _, err = run_report([py_path, "--svg", target, "--native"], capsys)
    assert code == 0, err
    frames = svg_frames(target)
    assert {EVAL, "encoder_listencode_obj", "clear_page_erms", "PyObject_Vectorcall"} <= set(frames)
    red, green, blue = (int(c) for c in re.findall(r"\d+", frames["handle"][1]))
    assert green > red and green > blue  # Python frames are green


# ------------------------------------------------------------------ profiles without Python


@pytest.mark.parametrize("flags", [[], ["--tree", "--min-percent", "0"], ["--folded"], ["--cum"]])
def test_profiles_without_python_frames_read_the_same(tmp_path, capsys, flags):
    for path in (FIXTURE_GO_HEAP, write_profile_file(random_profile(300), str(tmp_path / "r.pb.gz"))):
        _, default, _ = run_report([path] + flags, capsys)
        _, native, _ = run_report([path, "--native"] + flags, capsys)
        assert default == native and "View:" not in default


# ------------------------------------------------------------------ what a Python frame is


def test_python_frames_by_file_or_trampoline_symbol():
    builder = ProfileBuilder([("samples", "count")])
    jit = builder.add_mapping(0x7f0000000000, 0x7f0000100000, 0, "[jit]")
    exe = builder.add_mapping(0x400000, 0x500000, 0, "/usr/bin/python3.13")
    trampoline = builder.function_id("Handler.do_GET", "py::Handler.do_GET:/srv/app.py", "/srv/app.py")
    frozen = builder.function_id("_find_and_load", "py::_find_and_load:<frozen importlib._bootstrap>",
                                 "<frozen importlib._bootstrap>")
    c_file = builder.function_id("PyObject_Call", "PyObject_Call", "Objects/call.c")
    other_jit = builder.function_id("jitted")
    # As the interpreter-memory reader names them: no perf-map symbol.
    walked = builder.function_id("_call_with_frames_removed", "", "<frozen importlib._bootstrap>", 480)
    go_wrapper = builder.function_id("main.(*T).String", "", "<autogenerated>", 1)
    ids = [builder.location_id(jit, 0x7f0000000100, ((trampoline, 0),)),
           builder.location_id(jit, 0x7f0000000200, ((frozen, 0),)),
           builder.location_id(exe, 0x400100, ((c_file, 0),)),
           builder.location_id(jit, 0x7f0000000300, ((other_jit, 0),)),
           builder.location_id(0, 0, ((walked, 488),)),
           builder.location_id(exe, 0x400200, ((go_wrapper, 1),))]
    builder.add_sample(ids, (1,))
    stacks = load_stacks(builder.to_profile(), 0)
    kinds = {frame.name: frame.kind for frame in stacks.frames}
    assert kinds == {"Handler.do_GET": KIND_PYTHON, "_find_and_load": KIND_PYTHON,
                     "PyObject_Call": KIND_NATIVE, "jitted": KIND_JIT,
                     "_call_with_frames_removed": KIND_PYTHON, "main.(*T).String": KIND_NATIVE}


def test_known_profile_python_frame_keeps_its_callers(tmp_path, capsys):
    path = write_profile_file(known_profile(), str(tmp_path / "k.pb.gz"))
    code, out, _ = run_report([path, "--folded", "--sample-index", "samples"], capsys)
    assert code == 0
    assert "py_handler 5" in out.splitlines()  # leaf_b (native, under it) is its time


@pytest.mark.parametrize("path, shown", [
    ("/venv/lib/python3.13/site-packages/flask/app.py", "flask/app.py"),
    ("/usr/lib/python3/dist-packages/requests/api.py", "requests/api.py"),
    ("/usr/lib/python3.13/json/encoder.py", "json/encoder.py"),
    ("/root/.pyenv/versions/3.11.7/lib/python3.11/threading.py", "threading.py"),
    ("/usr/local/lib/python3.13t/asyncio/events.py", "asyncio/events.py"),
    ("/srv/app.py", "/srv/app.py"),
    ("app.py", "app.py"),
    ("/weird/site-packages/", "/weird/site-packages/"),
])
def test_short_python_path(path, shown):
    assert short_python_path(path) == shown


_NODE_ACTIONS = r"""
const handle = root.getElementsByTagName("g").filter(function (g) {
  const t = g.getElementsByTagName("title");
  return t.length && t[0].textContent.indexOf("handle (") === 0;
})[0];
handle.listeners.mouseover.forEach(function (f) { f(); });
const details = document.getElementById("details").textContent;
window.flamegraph.search("^handle$");
process.stdout.write(JSON.stringify({details: details, matched: document.getElementById("matched").textContent}));
"""


def test_svg_viewer_shows_file_and_line_under_node(py_path, tmp_path, capsys):
    import json
    import shutil
    import subprocess

    from test_report_svg import _NODE_HARNESS, _element_spec

    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node not installed")
    target = str(tmp_path / "py.svg")
    assert run_report([py_path, "--svg", target], capsys)[0] == 0
    root = ET.parse(target).getroot()
    payload = json.dumps({"svg": _element_spec(root), "script": root.find(SVG + "script").text})
    harness = _NODE_HARNESS.split("const out = {};")[0] + _NODE_ACTIONS
    result = subprocess.run([node, "-e", harness], input=payload, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=60)
    assert result.returncode == 0, result.stderr
    state = json.loads(result.stdout)
    assert state["details"] == "handle (15ms, 75.00%)  at /srv/app.py:10"
    # The name searched is the frame's name alone (the tooltip's first line, without the value).
    assert state["matched"].startswith("Matched: 75.00% of all (1 frames)")
