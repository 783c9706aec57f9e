"""perf-agent report --svg: the self-contained interactive flame graph."""

from __future__ import annotations

import re
import time
import xml.etree.ElementTree as ET
from typing import List

import pytest

from test_report_profiles import KNOWN_TOTAL, MS, known_profile, random_profile, run_report, write_profile_file

from perfagent.report.flamegraph import (
    DEFAULT_MIN_FRACTION,
    DEFAULT_WIDTH,
    PAD_X,
    frame_color,
    layout_frames,
    render_svg,
)
from perfagent.report.stacks import KIND_JIT, KIND_KERNEL, KIND_PYTHON, load_stacks

SVG = "{http://www.w3.org/2000/svg}"


def frame_groups(root: ET.Element) -> List[ET.Element]:
    return [g for g in root.iter(SVG + "g") if g.get("class") == "f"]


def frame_record(group: ET.Element) -> dict:
    rect = group.find(SVG + "rect")
    return {
        "title": group.find(SVG + "title").text,
        "start": int(group.get("data-s")),
        "value": int(group.get("data-v")),
        "depth": int(group.get("data-d")),
        "x": float(rect.get("x")),
        "width": float(rect.get("width")),
        "y": float(rect.get("y")),
        "fill": rect.get("fill"),
    }


@pytest.fixture
def known_svg(tmp_path, capsys) -> str:
    path = write_profile_file(known_profile(), str(tmp_path / "known.pb.gz"))
    target = tmp_path / "flame.svg"
    # --native: these tests check the drawing against the stacks as recorded
    # (the Python-first view is tested in test_report_python.py).
    code, out, err = run_report([path, "--svg", str(target), "--native"], capsys)
    assert code == 0, err
    assert out == ""
    return target.read_text()


def test_svg_parses_with_one_element_per_frame(known_svg):
    root = ET.fromstring(known_svg)
    frames = frame_groups(root)
    layout, total = layout_frames(load_stacks(known_profile(), 1))
    assert len(frames) == len(layout)
    assert total == KNOWN_TOTAL * MS
    # Distinct call paths of the known profile, plus "all".
    names = sorted(frame_record(g)["title"].rsplit(" (", 1)[0] for g in frames)
    assert names == sorted(["all", "main", "compute", "leaf_a", "leaf_b", "sys_write", "leaf_a", "recurse",
                            "recurse", "recurse", "jitted", "0x1234", "py_handler", "leaf_b"])


def test_widths_are_proportional_to_values(known_svg):
    frames = [frame_record(g) for g in frame_groups(ET.fromstring(known_svg))]
    pixels_per_unit = (DEFAULT_WIDTH - 2 * PAD_X) / (KNOWN_TOTAL * MS)
    for frame in frames:
        assert frame["width"] == pytest.approx(frame["value"] * pixels_per_unit, abs=0.006), frame
        assert frame["x"] == pytest.approx(PAD_X + frame["start"] * pixels_per_unit, abs=0.006), frame
    root = next(f for f in frames if f["depth"] == 0)
    assert root["width"] == pytest.approx(DEFAULT_WIDTH - 2 * PAD_X)


def test_children_sit_inside_their_parent_one_row_up(known_svg):
    frames = [frame_record(g) for g in frame_groups(ET.fromstring(known_svg))]
    for frame in frames:
        if frame["depth"] == 0:
            continue
        parents = [p for p in frames if p["depth"] == frame["depth"] - 1
                   and p["start"] <= frame["start"] and frame["start"] + frame["value"] <= p["start"] + p["value"]]
        assert len(parents) == 1, frame
        assert frame["y"] < parents[0]["y"]  # callees above callers


def test_titles_carry_value_and_percentage(known_svg):
    titles = [frame_record(g)["title"] for g in frame_groups(ET.fromstring(known_svg))]
    assert "all (32ms, 100%)" in titles
    assert "compute (17ms, 53.12%)" in titles
    assert "sys_write (2ms, 6.25%)" in titles


def test_svg_is_self_contained_and_interactive(known_svg):
    assert "<script" in known_svg and "<style>" in known_svg
    for needle in ("function zoom", "function search", "new RegExp", "Matched: ", "Reset Zoom", "function reset",
                   "addEventListener(\"click\""):
        assert needle in known_svg, needle
    # No external script, stylesheet, font or image: the only URL is the SVG namespace.
    assert re.findall(r"https?://[^\s\"']+", known_svg) == ["http://www.w3.org/2000/svg"]
    assert "href" not in known_svg and "@import" not in known_svg and "url(" not in known_svg


def test_colors_are_deterministic_and_differ_by_kind(known_svg):
    fills = {frame_record(g)["title"].rsplit(" (", 1)[0]: frame_record(g)["fill"]
             for g in frame_groups(ET.fromstring(known_svg))}
    assert fills["sys_write"] == frame_color("sys_write", KIND_KERNEL)
    assert fills["jitted"] == frame_color("jitted", KIND_JIT)
    assert fills["py_handler"] == frame_color("py_handler", KIND_PYTHON)

    def channels(fill: str) -> List[int]:
        return [int(c) for c in re.findall(r"\d+", fill)]

    # Native frames are warm (red high, blue low); kernel ones blue; python ones green.
    red, green, blue = channels(fills["compute"])
    assert red > blue
    red, green, blue = channels(fills["sys_write"])
    assert blue > red
    red, green, blue = channels(fills["py_handler"])
    assert green > red and green > blue
    assert render_svg(load_stacks(known_profile(), 1)) == render_svg(load_stacks(known_profile(), 1))


def test_title_is_escaped(tmp_path, capsys):
    path = write_profile_file(known_profile(), str(tmp_path / "p.pb.gz"))
    target = tmp_path / "f.svg"
    assert run_report([path, "--svg", str(target), "--title", "<a & b>"], capsys)[0] == 0
    root = ET.fromstring(target.read_text())
    assert root.find(SVG + "text").text == "<a & b>"


def test_filters_apply_to_the_svg(tmp_path, capsys):
    path = write_profile_file(known_profile(), str(tmp_path / "p.pb.gz"))
    target = tmp_path / "f.svg"
    assert run_report([path, "--svg", str(target), "--focus", "recurse"], capsys)[0] == 0
    frames = [frame_record(g) for g in frame_groups(ET.fromstring(target.read_text()))]
    assert [f["title"].rsplit(" (", 1)[0] for f in sorted(frames, key=lambda f: f["depth"])] == \
        ["all", "main", "recurse", "recurse", "recurse"]


def test_narrow_frames_merge_into_their_parent():
    stacks = load_stacks(random_profile(2000, seed=3), 1)
    frames, total = layout_frames(stacks, min_fraction=0.01)
    assert all(frame.value >= total * 0.01 for frame in frames)
    everything, _ = layout_frames(stacks, min_fraction=0)
    assert len(frames) < len(everything)


def test_hundred_thousand_stacks_stay_bounded_and_fast():
    profile = random_profile(100000)
    assert len(profile.samples) == 100000
    started = time.monotonic()
    stacks = load_stacks(profile, 1)
    svg = render_svg(stacks)
    elapsed = time.monotonic() - started
    root = ET.fromstring(svg)
    frames = frame_groups(root)
    depth = max(int(g.get("data-d")) for g in frames)
    # Frames at one depth are disjoint and each >= 0.1% of the total.
    assert len(frames) <= (depth + 1) / DEFAULT_MIN_FRACTION
    assert len(frames) < 5000
    assert len(svg) < 2000000
    assert elapsed < 60, "rendering 100k stacks took %.1fs" % elapsed
    total = sum(v for v in stacks.merged_stacks().values())
    assert int(frames[0].get("data-v")) == total


def test_empty_profile_renders(tmp_path, capsys):
    path = write_profile_file(known_profile(), str(tmp_path / "p.pb.gz"))
    target = tmp_path / "f.svg"
    assert run_report([path, "--svg", str(target), "--pid", "999"], capsys)[0] == 0
    frames = frame_groups(ET.fromstring(target.read_text()))
    assert len(frames) == 1 and frames[0].get("data-v") == "0"


# ------------------------------------------------------------------ the script, run under node

_NODE_HARNESS = r"""
const input = JSON.parse(require("fs").readFileSync(0, "utf8"));
function El(spec) {
  this.tagName = spec.tag; this.attrs = spec.attrs; this.textContent = spec.text || "";
  this.children = spec.children.map(function (c) { return new El(c); });
  this.listeners = {};
}
El.prototype.getAttribute = function (n) { return n in this.attrs ? this.attrs[n] : null; };
El.prototype.setAttribute = function (n, v) { this.attrs[n] = String(v); };
El.prototype.addEventListener = function (t, f) { (this.listeners[t] = this.listeners[t] || []).push(f); };
El.prototype.all = function (out) {
  this.children.forEach(function (c) { out.push(c); c.all(out); }); return out;
};
El.prototype.getElementsByTagName = function (t) {
  return this.all([]).filter(function (e) { return e.tagName === t; });
};
const root = new El(input.svg);
global.document = {
  documentElement: root, readyState: "complete",
  getElementsByTagName: function (t) { return root.getElementsByTagName(t); },
  getElementById: function (id) { return root.all([]).filter(function (e) { return e.attrs.id === id; })[0]; },
};
global.window = { addEventListener: function () {}, prompt: function () { return null; } };
eval(input.script);
function state() {
  return {
    matched: document.getElementById("matched").textContent,
    reset: document.getElementById("reset").getAttribute("class"),
    frames: root.getElementsByTagName("g").filter(function (g) { return g.attrs["data-d"] !== undefined; })
      .map(function (g) {
        const rect = g.getElementsByTagName("rect")[0], text = g.getElementsByTagName("text")[0];
        return { cls: g.attrs["class"], title: g.getElementsByTagName("title")[0].textContent,
                 x: +rect.attrs.x, width: +rect.attrs.width, fill: rect.attrs.fill, label: text.textContent };
      }),
  };
}
const out = {};
window.flamegraph.search("leaf_"); out.leaf = state();
window.flamegraph.search("recurse"); out.recurse = state();
window.flamegraph.clearSearch(); out.cleared = state();
const target = root.getElementsByTagName("g").filter(function (g) {
  return g.getElementsByTagName("title").length && g.getElementsByTagName("title")[0].textContent.indexOf("compute (") === 0;
})[0];
target.listeners.click.forEach(function (f) { f(); }); out.zoomed = state();
document.getElementById("reset").listeners.click.forEach(function (f) { f(); }); out.reset = state();
process.stdout.write(JSON.stringify(out));
"""


def _element_spec(element: ET.Element) -> dict:
    return {"tag": element.tag.replace(SVG, ""), "attrs": dict(element.attrib), "text": element.text or "",
            "children": [_element_spec(child) for child in element]}


def test_script_searches_and_zooms_under_node(known_svg):
    import json
    import shutil
    import subprocess

    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node not installed: the viewer script is only checked structurally")
    root = ET.fromstring(known_svg)
    script = root.find(SVG + "script").text
    payload = json.dumps({"svg": _element_spec(root), "script": script})
    result = subprocess.run([node, "-e", _NODE_HARNESS], input=payload, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert result.returncode == 0, result.stderr
    states = json.loads(result.stdout)

    assert states["leaf"]["matched"].startswith("Matched: 71.88% of all")  # leaf_a 13 + leaf_b 10 of 32
    highlighted = {f["title"].split(" (")[0] for f in states["leaf"]["frames"] if f["fill"] == "rgb(230,0,230)"}
    assert highlighted == {"leaf_a", "leaf_b"}
    # Nested recursive matches are counted once: 4 of 32.
    assert states["recurse"]["matched"].startswith("Matched: 12.50% of all (3 frames)")
    assert states["cleared"]["matched"] == ""

    zoomed = {f["title"].split(" (")[0] + "@" + str(i): f for i, f in enumerate(states["zoomed"]["frames"])}
    by_title = {f["title"].split(" (")[0]: f for f in states["zoomed"]["frames"] if f["cls"] != "f hidden"}
    plot_width = DEFAULT_WIDTH - 2 * PAD_X
    assert set(by_title) == {"all", "main", "compute", "leaf_a", "leaf_b", "sys_write"}
    assert by_title["all"]["cls"] == by_title["main"]["cls"] == "f anc"
    assert by_title["compute"]["width"] == pytest.approx(plot_width)
    assert by_title["leaf_a"]["width"] == pytest.approx(plot_width * 10 / 17, abs=0.01)
    assert by_title["leaf_a"]["label"] == "leaf_a"
    assert states["zoomed"]["reset"] == "btn"
    assert len(zoomed) == len(states["reset"]["frames"])
    assert all(f["cls"] == "f" for f in states["reset"]["frames"])
    assert states["reset"]["reset"] == "btn hidden"
