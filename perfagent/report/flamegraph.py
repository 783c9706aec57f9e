"""A self-contained interactive SVG flame graph.

Layout: the root ("all") at the bottom, callers below callees, each frame
as wide as its cumulative value; siblings sorted by name so the picture is
deterministic. Everything the viewer needs (styles, the script for hover
details, click-to-zoom, reset and regex search) is inlined: no external
script, font or stylesheet, so the file can be mailed or attached as is.

Scaling: frames narrower than ``min_fraction`` of the total (default 0.1%,
about one pixel at the default width) are not drawn; their value stays in
their parent, which is then wider than its drawn children. Frames at one
depth never overlap, so each depth holds at most 1/min_fraction frames and
the file stays bounded however many distinct stacks the profile has.
"""

from __future__ import annotations

import zlib
from typing import Iterator, List, Tuple
from xml.sax.saxutils import escape, quoteattr

from perfagent.report.calltree import ROOT, build_call_tree
from perfagent.report.stacks import KIND_JIT, KIND_KERNEL, KIND_PYTHON, StackSet
from perfagent.report.text import display
from perfagent.report.units import ValueFormatter, format_percent

DEFAULT_WIDTH = 1200
DEFAULT_MIN_FRACTION = 0.001
FRAME_HEIGHT = 16
FONT_SIZE = 12
CHAR_WIDTH = FONT_SIZE * 0.59  # average glyph width of the fallback monospace
PAD_X = 10
TOP_MARGIN = 44
BOTTOM_MARGIN = 30

# (kind, base rgb, per-channel spread): hues separate kinds at a glance,
# the name hash varies the shade so neighbours stay distinguishable.
_PALETTE = {
    "native": ((205, 90, 0), (50, 140, 55)),
    KIND_PYTHON: ((60, 160, 60), (50, 60, 50)),
    KIND_KERNEL: ((70, 130, 215), (50, 50, 40)),
    KIND_JIT: ((150, 80, 210), (50, 50, 45)),
}


class FlameFrame:
    """One drawn rectangle; ``start`` and ``value`` are in sample units."""

    __slots__ = ("name", "kind", "depth", "start", "value", "file", "line")

    def __init__(self, name: str, kind: str, depth: int, start: int, value: int, file: str = "",
                 line: int = 0) -> None:
        self.name = name
        self.kind = kind
        self.depth = depth
        self.start = start
        self.value = value
        self.file = file
        self.line = line

    def where(self) -> str:
        """``file:line`` for the tooltip ("" when the frame has no file)."""
        if not self.file:
            return ""
        return "%s:%d" % (self.file, self.line) if self.line > 0 else self.file


def layout_frames(stacks: StackSet, min_fraction: float = DEFAULT_MIN_FRACTION) -> Tuple[List[FlameFrame], int]:
    """The frames to draw (the root "all" first) and the total value."""
    tree = build_call_tree(stacks.merged_stacks(), len(stacks.frames))
    total = tree.total[ROOT]
    threshold = max(total * min_fraction, 1)
    frames = [FlameFrame("all", "root", 0, 0, total)]
    names = stacks.frames
    frame_of, totals = tree.frame, tree.total
    # Iterative walk: stacks may be deeper than the recursion limit.
    pending: List[Tuple[int, int, int]] = [(ROOT, 0, 0)]
    while pending:
        node, depth, start = pending.pop()
        offset = start
        for child in tree.sorted_children(node, lambda child: names[frame_of[child]].name):
            value = totals[child]
            if value >= threshold:
                frame = names[frame_of[child]]
                frames.append(FlameFrame(frame.name, frame.kind, depth + 1, offset, value, frame.file, frame.line))
                pending.append((child, depth + 1, offset))
            offset += value
    return frames, total


def frame_color(name: str, kind: str) -> str:
    """A deterministic fill (crc32, not hash(): that is salted per process)."""
    base, spread = _PALETTE.get(kind, ((160, 160, 160), (40, 40, 40)))
    digest = zlib.crc32(name.encode("utf-8", "replace"))
    channels = []
    for index in range(3):
        variation = (digest >> (8 * index)) & 0xFF
        channels.append(base[index] + spread[index] * variation // 255)
    return "rgb(%d,%d,%d)" % tuple(channels)


def fit_label(name: str, width: float) -> str:
    """As much of ``name`` as fits in ``width`` pixels ("" below three characters)."""
    chars = int((width - 6) / CHAR_WIDTH)
    if chars < 3:
        return ""
    if len(name) <= chars:
        return name
    return name[: chars - 2] + ".."


def render_svg(stacks: StackSet, title: str = "Flame Graph", width: int = DEFAULT_WIDTH,
               min_fraction: float = DEFAULT_MIN_FRACTION) -> str:
    """The whole SVG document as a string."""
    return "".join(iter_svg(stacks, title, width, min_fraction))


def iter_svg(stacks: StackSet, title: str = "Flame Graph", width: int = DEFAULT_WIDTH,
             min_fraction: float = DEFAULT_MIN_FRACTION) -> Iterator[str]:
    """render_svg's document in pieces, for writing without one huge string."""
    frames, total = layout_frames(stacks, min_fraction)
    formatter = ValueFormatter(stacks.unit, [total] if total else [])
    max_depth = max(frame.depth for frame in frames)
    height = TOP_MARGIN + (max_depth + 1) * FRAME_HEIGHT + BOTTOM_MARGIN
    plot_width = width - 2 * PAD_X
    scale = plot_width / total if total else 0.0
    yield _header(width, height, display(title), total, plot_width, stacks)
    bottom = height - BOTTOM_MARGIN
    for frame in frames:
        yield _frame_element(frame, scale, bottom, total, formatter)
    yield "</g>\n</svg>\n"


def _frame_element(frame: FlameFrame, scale: float, bottom: int, total: int, formatter: ValueFormatter) -> str:
    x = PAD_X + frame.start * scale
    w = frame.value * scale
    y = bottom - (frame.depth + 1) * FRAME_HEIGHT
    tip = "%s (%s, %s)" % (frame.name, formatter.format(frame.value), format_percent(frame.value, total))
    where = frame.where()
    if where:
        # Second line of the tooltip: where the (Python) function is, or
        # with --lines the sampled line.
        tip += "\n" + where
    fill = "rgb(240,240,240)" if frame.kind == "root" else frame_color(frame.name, frame.kind)
    return (
        '<g class="f" data-s="%d" data-v="%d" data-d="%d"><title>%s</title>'
        '<rect x="%.2f" y="%d" width="%.2f" height="%d" fill="%s" rx="2"/>'
        '<text x="%.2f" y="%d">%s</text></g>\n'
        % (frame.start, frame.value, frame.depth, escape(tip),
           x, y, w, FRAME_HEIGHT - 1, fill, x + 3, y + FRAME_HEIGHT - 4, escape(fit_label(frame.name, w)))
    )


def _header(width: int, height: int, title: str, total: int, plot_width: int, stacks: StackSet) -> str:
    return (
        '<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n'
        '<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="%d" height="%d" '
        'viewBox="0 0 %d %d" data-total="%d" data-width="%d" data-pad="%d" data-unit=%s>\n'
        "<style>%s</style>\n"
        "<script type=\"text/ecmascript\"><![CDATA[%s]]></script>\n"
        '<rect x="0" y="0" width="%d" height="%d" fill="rgb(250,250,246)"/>\n'
        '<text id="title" x="%d" y="20" text-anchor="middle" class="big">%s</text>\n'
        '<text id="reset" x="%d" y="20" class="btn hidden">Reset Zoom</text>\n'
        '<text id="search" x="%d" y="20" text-anchor="end" class="btn">Search</text>\n'
        "%s"
        '<text id="matched" x="%d" y="%d" text-anchor="end"></text>\n'
        '<text id="details" x="%d" y="%d"> </text>\n'
        '<g id="frames">\n'
        % (width, height, width, height, total, plot_width, PAD_X, quoteattr(stacks.unit),
           _STYLE, _SCRIPT, width, height, width // 2, escape(title), PAD_X, width - PAD_X,
           _legend(width), width - PAD_X, height - 10, PAD_X, height - 10)
    )


def _legend(width: int) -> str:
    """One swatch per frame kind (its mid shade), centred under the title."""
    kinds = (("native", "native"), (KIND_PYTHON, "python"), (KIND_KERNEL, "kernel"), (KIND_JIT, "jit"))
    x = width // 2 - 2 * 80
    parts = ['<g id="legend">']
    for kind, label in kinds:
        base, spread = _PALETTE[kind]
        mid = tuple(b + s // 2 for b, s in zip(base, spread))
        parts.append('<rect x="%d" y="28" width="10" height="10" fill="rgb(%d,%d,%d)"/>' % ((x,) + mid))
        parts.append('<text x="%d" y="37" class="small">%s</text>' % (x + 14, label))
        x += 80
    parts.append("</g>\n")
    return "".join(parts)


_STYLE = """
text { font-family: monospace; font-size: %dpx; fill: rgb(0,0,0); }
text.big { font-size: 16px; }
text.small { font-size: 10px; }
.btn { cursor: pointer; fill: rgb(40,70,160); }
.hidden { display: none; }
g.f { cursor: pointer; }
g.f:hover rect { stroke: rgb(0,0,0); stroke-width: 0.5; }
g.f.anc { opacity: 0.55; }
g.f text { pointer-events: none; }
""" % FONT_SIZE

# Hand-written viewer logic. Frames carry their start, value and depth in
# sample units (data-s, data-v, data-d), so zoom recomputes geometry and
# search sums matched values exactly, without parsing pixel positions.
_SCRIPT = r"""
(function () {
  var svg = document.documentElement;
  var total = +svg.getAttribute("data-total");
  var plotWidth = +svg.getAttribute("data-width");
  var pad = +svg.getAttribute("data-pad");
  var charWidth = %(char_width)s;
  var frames = [];
  var zoomed = null;
  var pattern = null;

  function label(name, width) {
    var chars = Math.floor((width - 6) / charWidth);
    if (chars < 3) return "";
    return name.length <= chars ? name : name.substring(0, chars - 2) + "..";
  }

  function init() {
    var groups = document.getElementsByTagName("g");
    for (var i = 0; i < groups.length; i++) {
      var g = groups[i];
      if (g.getAttribute("class") !== "f") continue;
      var tip = g.getElementsByTagName("title")[0].textContent;
      var head = tip.split("\n")[0];
      var rect = g.getElementsByTagName("rect")[0];
      frames.push({
        g: g, rect: rect, text: g.getElementsByTagName("text")[0],
        name: head.substring(0, head.lastIndexOf(" (")), tip: tip.replace("\n", "  at "),
        start: +g.getAttribute("data-s"), value: +g.getAttribute("data-v"),
        depth: +g.getAttribute("data-d"), fill: rect.getAttribute("fill")
      });
    }
    frames.forEach(function (f) {
      f.g.addEventListener("click", function () { zoom(f); });
      f.g.addEventListener("mouseover", function () { setText("details", f.tip); });
      f.g.addEventListener("mouseout", function () { setText("details", " "); });
    });
    document.getElementById("reset").addEventListener("click", reset);
    document.getElementById("search").addEventListener("click", askSearch);
    window.addEventListener("keydown", function (e) {
      if ((e.ctrlKey || e.metaKey) && e.keyCode === 70) { e.preventDefault(); askSearch(); }
      if (e.keyCode === 27) reset();
    });
  }

  function setText(id, text) { document.getElementById(id).textContent = text; }

  function zoom(target) {
    zoomed = target.depth === 0 ? null : target;
    var zs = target.start, zv = target.value || 1, zd = target.depth;
    frames.forEach(function (f) {
      var inside = f.start >= zs && f.start + f.value <= zs + zv;
      var cls = "f";
      if (f.depth < zd && f.start <= zs && f.start + f.value >= zs + zv) {
        place(f, 0, plotWidth);  // an ancestor: spans the view, dimmed
        cls = "f anc";
      } else if (f.depth >= zd && inside) {
        place(f, (f.start - zs) / zv * plotWidth, f.value / zv * plotWidth);
      } else {
        cls = "f hidden";
      }
      f.g.setAttribute("class", cls);
    });
    document.getElementById("reset").setAttribute("class", zoomed ? "btn" : "btn hidden");
  }

  function place(f, x, width) {
    f.rect.setAttribute("x", (pad + x).toFixed(2));
    f.rect.setAttribute("width", width.toFixed(2));
    f.text.setAttribute("x", (pad + x + 3).toFixed(2));
    f.text.textContent = label(f.name, width);
  }

  function reset() {
    if (frames.length) zoom(frames[0]);
    clearSearch();
  }

  function askSearch() {
    if (pattern !== null) { clearSearch(); return; }
    var text = window.prompt("Search frames (regular expression):", "");
    if (text) search(text);
  }

  function clearSearch() {
    pattern = null;
    frames.forEach(function (f) { f.rect.setAttribute("fill", f.fill); });
    setText("matched", "");
    setText("search", "Search");
  }

  function search(text) {
    var re;
    try { re = new RegExp(text); } catch (err) { setText("matched", "bad regex: " + err.message); return; }
    pattern = text;
    var spans = [];
    frames.forEach(function (f) {
      var hit = f.depth > 0 && re.test(f.name);
      f.rect.setAttribute("fill", hit ? "rgb(230,0,230)" : f.fill);
      if (hit) spans.push([f.start, f.start + f.value]);
    });
    // Matched share: the union of matched intervals, so a match nested in
    // another match (recursion) is not counted twice.
    spans.sort(function (a, b) { return a[0] - b[0]; });
    var covered = 0, end = -1;
    spans.forEach(function (s) {
      if (s[0] >= end) { covered += s[1] - s[0]; end = s[1]; }
      else if (s[1] > end) { covered += s[1] - end; end = s[1]; }
    });
    var pct = total ? (100 * covered / total).toFixed(2) : "0.00";
    setText("matched", "Matched: " + pct + "%% of all (" + spans.length + " frames)");
    setText("search", "Clear search");
  }

  window.flamegraph = { zoom: zoom, reset: reset, search: search, clearSearch: clearSearch };
  if (document.readyState === "loading") {
    window.addEventListener("load", init);
  } else {
    init();
  }
})();
""" % {"char_width": CHAR_WIDTH}
