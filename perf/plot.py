#!/usr/bin/env python3
"""Plots of the perf results as SVG, with the Python standard library only.

  perf/plot.py fastpath FILE.json [-o OUT.svg]
      `rebindgw bench fastpath --json` output: echoes/s per path (gateway, bare relay and
      nginx, per I/O backend), one dot per round and the median as a bar, with the ratios of
      the gateway to the bare relay on the same backend and to nginx. A second panel,
      echoes per busy second of the forwarder's core, appears when the runs carry it
      (`echoes_per_forwarder_core_s`).

  perf/plot.py storm [--xscale log|linear] [--xmax S] [--title T] [-o OUT.svg]
                     [--label L] [--metric recovery|traffic] [--move-ns NS] [--clients N]
                     INPUT [[--label L] ... INPUT ...]
      Storm recovery CDF, several inputs overlaid. The per-input options come before the
      input they apply to. An INPUT is a file or a run directory:
        - a loadgen JSON report (`--report-json`, `--json`; storm.sh's report.json,
          record.sh's loadgen-storm.json): it carries recovery percentiles only (p50, p90,
          p99, p99.9, max), plotted as a step lower bound of the CDF through those points;
        - a loadgen `--rebound-log` (`CLIENT CLOCK_MONOTONIC_NS` a line): each client's
          first rebind acknowledgement at or after the move is its recovery. The move time
          comes from --move-ns, or, in a cluster-test.sh work directory, is derived from
          figures.json (storm max); otherwise the x axis starts at the first
          acknowledgement (said in the legend);
        - a directory: its rebound.log if there is one (cluster-test.sh), else its
          report.json, loadgen.json or loadgen-storm.json (storm.sh, record.sh).

  perf/plot.py selftest
      Builds both plot kinds from small fixtures in a temporary directory and checks them.

Errors in the inputs are reported in one line (exit status 2), without a traceback.
"""

import json
import math
import os
import sys
from xml.sax.saxutils import escape, quoteattr

HERE = os.path.dirname(os.path.abspath(__file__))
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"


class UserError(Exception):
    """A problem with the command line or the inputs: printed without a traceback."""


# --------------------------------------------------------------------------------------------
# SVG building blocks


class Svg:
    def __init__(self, width, height):
        self.w, self.h = width, height
        self.parts = []

    def add(self, s):
        self.parts.append(s)

    def text(self, x, y, s, size=12, anchor="start", weight=None, fill="#222", rotate=None,
             cls=None, italic=False):
        attrs = 'x="%.1f" y="%.1f" font-size="%s" text-anchor="%s" fill="%s"' % (
            x, y, size, anchor, fill)
        if weight:
            attrs += ' font-weight="%s"' % weight
        if italic:
            attrs += ' font-style="italic"'
        if rotate is not None:
            attrs += ' transform="rotate(%s %.1f %.1f)"' % (rotate, x, y)
        if cls:
            attrs += " class=%s" % quoteattr(cls)
        self.add("<text %s>%s</text>" % (attrs, escape(str(s))))

    def line(self, x1, y1, x2, y2, stroke="#000", width=1, dash=None, opacity=None):
        a = 'x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="%s"' % (
            x1, y1, x2, y2, stroke, width)
        if dash:
            a += ' stroke-dasharray="%s"' % dash
        if opacity is not None:
            a += ' stroke-opacity="%s"' % opacity
        self.add("<line %s/>" % a)

    def rect(self, x, y, w, h, fill="none", stroke=None, opacity=None, extra=""):
        a = 'x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"' % (x, y, w, h, fill)
        if stroke:
            a += ' stroke="%s"' % stroke
        if opacity is not None:
            a += ' fill-opacity="%s"' % opacity
        self.add("<rect %s%s/>" % (a, extra))

    def circle(self, x, y, r, fill="#fff", stroke="#000", width=1.5, extra=""):
        self.add('<circle cx="%.1f" cy="%.1f" r="%s" fill="%s" stroke="%s" stroke-width="%s"%s/>'
                 % (x, y, r, fill, stroke, width, extra))

    def polyline(self, pts, stroke, width=2, dash=None):
        a = 'fill="none" stroke="%s" stroke-width="%s" stroke-linejoin="round"' % (stroke, width)
        if dash:
            a += ' stroke-dasharray="%s"' % dash
        self.add('<polyline %s points="%s"/>'
                 % (a, " ".join("%.1f,%.1f" % p for p in pts)))

    def render(self):
        head = ('<?xml version="1.0" encoding="UTF-8"?>\n'
                '<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" '
                'viewBox="0 0 %d %d" font-family=%s>\n'
                '<rect x="0" y="0" width="%d" height="%d" fill="#fff"/>\n'
                % (self.w, self.h, self.w, self.h, quoteattr(FONT), self.w, self.h))
        return head + "\n".join(self.parts) + "\n</svg>\n"


def nice_step(span, n):
    """A 1/2/5 x 10^k step giving about n intervals over span."""
    if span <= 0:
        return 1.0
    raw = span / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def linear_ticks(lo, hi, n=6):
    step = nice_step(hi - lo, n)
    start = math.floor(lo / step + 1e-9) * step
    ticks, t = [], start
    while t <= hi + step * 1e-6:
        if t >= lo - step * 1e-6:
            ticks.append(round(t, 12))
        t += step
    if ticks and ticks[-1] < hi - step * 1e-6:
        # The last tick covers hi, so the data fits under the axis.
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def fmt_count(v):
    """60k, 1.25M, 950."""
    a = abs(v)
    if a >= 1e6:
        s = "%.2f" % (v / 1e6)
        return s.rstrip("0").rstrip(".") + "M"
    if a >= 1e3:
        s = "%.1f" % (v / 1e3)
        return s.rstrip("0").rstrip(".") + "k"
    return "%g" % v


def fmt_seconds(s):
    """1 µs, 20 ms, 1.5 s."""
    if s == 0:
        return "0"
    if s >= 1:
        return "%g s" % round(s, 3)
    if s >= 1e-3:
        return "%g ms" % round(s * 1e3, 3)
    return "%g µs" % round(s * 1e6, 3)


def text_width(s, size, bold=False):
    """Estimated width of a DejaVu Sans string in px (no font metrics at hand)."""
    return len(s) * size * (0.63 if bold else 0.57)


def median(vals):
    v = sorted(vals)
    n = len(v)
    if n == 0:
        return 0.0
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2.0


def write_svg(svg, out):
    d = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(d, exist_ok=True)
        tmp = out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(svg.render())
        os.replace(tmp, out)
    except OSError as e:
        raise UserError("cannot write %s: %s" % (out, e.strerror or e))


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError("%s: no such file" % path)
    except IsADirectoryError:
        raise UserError("%s: is a directory, expected a JSON file" % path)
    except OSError as e:
        raise UserError("%s: %s" % (path, e.strerror or e))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError("%s: not valid JSON (%s)" % (path, e))


# --------------------------------------------------------------------------------------------
# Fast path: echoes/s per path

FAMILY = {"gateway": (0, "gateway", "#1f5fa8"),
          "bare-relay": (1, "bare relay", "#7f7f7f"),
          "nginx": (2, "nginx", "#2e8b57")}
OTHER_COLOR = "#8a4fa3"
KNOWN_BACKENDS = ["uring", "mmsg", "xdp"]


def fastpath_groups(report, path, runs_key="saturating"):
    """The saturating runs grouped by `path`, in plot order, with labels and colours."""
    if not isinstance(report, dict):
        raise UserError("%s: not a fastpath report (expected a JSON object)" % path)
    runs = report.get(runs_key)
    if not isinstance(runs, list) or not runs:
        raise UserError("%s: no %r runs (is this `rebindgw bench fastpath --json` output?)"
                        % (path, runs_key))
    backends = [b.get("io") for b in report.get("backends") or [] if isinstance(b, dict)]
    first = backends[0] if backends else None
    by_path = {}
    for i, r in enumerate(runs):
        if not isinstance(r, dict) or not isinstance(r.get("path"), str):
            raise UserError("%s: %s[%d] has no \"path\"" % (path, runs_key, i))
        eps = r.get("echoes_per_sec")
        if not isinstance(eps, (int, float)) or isinstance(eps, bool):
            raise UserError("%s: %s[%d] (%s) has no numeric \"echoes_per_sec\""
                            % (path, runs_key, i, r["path"]))
        by_path.setdefault(r["path"], []).append(r)

    def backend_rank(b):
        if b is None:
            return (0, "")
        if b in backends:
            return (1 + backends.index(b), b)
        if b in KNOWN_BACKENDS:
            return (100 + KNOWN_BACKENDS.index(b), b)
        return (200, b)

    groups = []
    for name, rs in by_path.items():
        base, _, backend = name.partition("/")
        backend = backend or None
        rank, fam_label, color = FAMILY.get(base, (3, base, OTHER_COLOR))
        # Reports from before `backends` do not say which --io the plain names ran on.
        shown_backend = backend or first or "io not recorded"
        groups.append({
            "path": name, "base": base, "backend": backend, "color": color,
            "label": fam_label, "sublabel": shown_backend if base in FAMILY and base != "nginx"
            else (backend or ""),
            "runs": rs, "key": (rank, backend_rank(backend), name)})
    groups.sort(key=lambda g: g["key"])
    return groups


def cpu_metric(run):
    """Echoes per busy second of the forwarder's core (`echoes_per_forwarder_core_s`, written
    by `rebindgw bench fastpath` since it samples /proc/stat), if the run carries it."""
    v = run.get("echoes_per_forwarder_core_s")
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
        return float(v)
    return None


def ratio_notes(groups, metric):
    """Per gateway path: its median over the bare relay's on the same backend, and over nginx."""
    med = {}
    for g in groups:
        vals = [v for v in (metric(r) for r in g["runs"]) if v is not None]
        if vals:
            med[g["path"]] = median(vals)
    notes = {}
    nginx = med.get("nginx")
    for g in groups:
        if g["base"] != "gateway" or g["path"] not in med:
            continue
        lines = []
        relay = "bare-relay" + ("/" + g["backend"] if g["backend"] else "")
        if med.get(relay):
            lines.append("%.2f× bare relay" % (med[g["path"]] / med[relay]))
        if nginx:
            lines.append("%.2f× nginx" % (med[g["path"]] / nginx))
        if lines:
            notes[g["path"]] = lines
    return med, notes


def bar_panel(svg, x0, y0, w, h, groups, metric, ylabel, title):
    """Bars (medians) with one dot per round; ratio notes above the gateway bars."""
    med, notes = ratio_notes(groups, metric)
    shown = [g for g in groups if g["path"] in med]
    vals = [v for g in shown for v in (metric(r) for r in g["runs"]) if v is not None]
    top = max(vals) if vals and max(vals) > 0 else 1.0
    n_note_lines = max([len(v) for v in notes.values()] + [0])
    # Headroom for the ratio notes above the highest dot.
    ticks = linear_ticks(0, top * (1.06 + 0.075 * n_note_lines), 6)
    ymax = ticks[-1]
    left, bottom = x0 + 78, y0 + h - 52
    plot_top = y0 + 34
    pw, ph = x0 + w - 20 - left, bottom - plot_top
    svg.text(x0 + w / 2, y0 + 16, title, size=15, anchor="middle", weight="bold")

    def Y(v):
        return bottom - ph * v / ymax

    svg.add('<g class="grid">')
    for t in ticks:
        svg.line(left, Y(t), left + pw, Y(t), stroke="#ddd")
        svg.text(left - 8, Y(t) + 4, fmt_count(t), size=12, anchor="end", fill="#444")
    svg.add("</g>")
    svg.line(left, bottom, left + pw, bottom, stroke="#333")
    svg.line(left, plot_top, left, bottom, stroke="#333")
    svg.text(x0 + 18, plot_top + ph / 2, ylabel, size=13, anchor="middle", rotate=-90)

    n = max(len(shown), 1)
    slot = pw / n
    bw = min(slot * 0.62, 90)
    for i, g in enumerate(shown):
        cx = left + slot * (i + 0.5)
        m = med[g["path"]]
        gv = [metric(r) for r in g["runs"]]
        gv = [v for v in gv if v is not None]
        svg.add('<g class="series" data-path=%s data-median="%.1f" data-rounds="%d">'
                % (quoteattr(g["path"]), m, len(gv)))
        svg.rect(cx - bw / 2, Y(m), bw, bottom - Y(m), fill=g["color"], opacity=0.78,
                 extra=' class="bar"')
        # The median at the foot of its bar, clear of the dots near its top.
        if bottom - Y(m) > 22:
            svg.text(cx, bottom - 8, fmt_count(m), size=11.5, anchor="middle", fill="#fff",
                     weight="bold", cls="median")
        k = len(gv)
        spread = bw * 0.55
        for j, v in enumerate(gv):
            dx = 0 if k == 1 else -spread / 2 + spread * j / (k - 1)
            svg.circle(cx + dx, Y(v), 3.6, fill="#fff", stroke="#111", width=1.4,
                       extra=' class="round"')
        svg.text(cx, bottom + 18, g["label"], size=12.5, anchor="middle")
        if g["sublabel"]:
            svg.text(cx, bottom + 34, g["sublabel"], size=11.5, anchor="middle", fill="#555")
        hi = max(gv) if gv else m
        for li, line in enumerate(reversed(notes.get(g["path"], []))):
            svg.text(cx, Y(hi) - 10 - 15 * li, line, size=11.5, anchor="middle",
                     fill="#1f3f6a", weight="bold", cls="ratio")
        svg.add("</g>")


def plot_fastpath(path, out):
    report = read_json(path)
    groups = fastpath_groups(report, path)
    has_cpu = any(cpu_metric(r) is not None for g in groups for r in g["runs"])
    width = max(760, 130 * len(groups) + 140)
    panel_h = 430
    head = 82
    height = head + panel_h * (2 if has_cpu else 1) + 46
    svg = Svg(width, height)
    svg.text(width / 2, 26, "rebindgw bench fastpath: " + os.path.basename(path), size=17,
             anchor="middle", weight="bold")
    rounds = max(len(g["runs"]) for g in groups)
    svg.text(width / 2, 47, "saturating runs: bar = median, dot = one round (%d rounds, "
             "left to right in run order)" % rounds, size=12.5, anchor="middle", fill="#444")
    added = [(name, report.get(key)) for name, key in (
        ("gateway", "gateway_added_p99_us"), ("bare relay", "relay_added_p99_us"),
        ("nginx", "nginx_added_p99_us"))]
    added = ["%s %+d µs" % (n, v) for n, v in added
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if added and isinstance(report.get("half_load_rate"), (int, float)):
        svg.text(width / 2, 66, "half load %s/s: p99 RTT added vs direct: %s"
                 % (fmt_count(report["half_load_rate"]), ", ".join(added)),
                 size=12.5, anchor="middle", fill="#444")
    bar_panel(svg, 0, head, width, panel_h, groups, lambda r: float(r["echoes_per_sec"]),
              "echoes / s", "Throughput (echoes per second)")
    if has_cpu:
        bar_panel(svg, 0, head + panel_h, width, panel_h, groups, cpu_metric,
                  "echoes / forwarder CPU-s", "CPU efficiency (echoes per forwarder CPU-second)")
    notes = ["ratios: medians of the gateway over the bare relay on the same I/O backend "
             "and over nginx"]
    skipped = report.get("nginx_skipped")
    if isinstance(skipped, str) and skipped:
        notes.append("nginx skipped: " + skipped)
    svg.text(width / 2, height - 14, "; ".join(notes), size=11.5, anchor="middle",
             fill="#555", italic=True)
    write_svg(svg, out)
    return groups


# --------------------------------------------------------------------------------------------
# Storm recovery CDF

PERCENTILES = [("p50_ms", 0.50), ("p90_ms", 0.90), ("p99_ms", 0.99), ("p999_ms", 0.999),
               ("max_ms", 1.0)]
COLORS = ["#1f5fa8", "#d9541e", "#2e8b57", "#8a4fa3", "#b8860b", "#c2185b", "#00838f",
          "#555555"]
REPORT_NAMES = ["report.json", "loadgen.json", "loadgen-storm.json"]
LOG_NAMES = ["rebound.log"]


def is_loadgen_report(d):
    return isinstance(d, dict) and isinstance(d.get("rebinds"), dict)


def series_from_report(path, metric, label):
    d = read_json(path)
    if not is_loadgen_report(d):
        raise UserError("%s: not a loadgen JSON report (no \"rebinds\" object)" % path)
    key = "recovery" if metric == "recovery" else "traffic_recovery"
    p = d["rebinds"].get(key)
    if not isinstance(p, dict):
        raise UserError("%s: rebinds.%s missing" % (path, key))
    count = p.get("count", 0)
    if not count:
        raise UserError("%s: no %s samples (rebinds.%s.count is 0, %s moves; a run whose "
                        "clients a NAT moves, as cluster-test.sh's, has them in its "
                        "--rebound-log)" % (path, key, key, d["rebinds"].get("moves", "?")))
    outages = d["rebinds"].get("outages") or count
    scale = min(1.0, float(count) / outages)
    pts = []
    for k, q in PERCENTILES:
        v = p.get(k)
        if not isinstance(v, (int, float)):
            raise UserError("%s: rebinds.%s.%s missing or not a number" % (path, key, k))
        pts.append((max(v, 0.0) / 1000.0, q * scale))
    clients = (d.get("settings") or {}).get("clients")
    return {"label": label or default_label(path, clients), "kind": "percentiles",
            "points": pts, "n": count, "total": outages, "source": path,
            "note": "%s of %s outages; percentiles only (p50/p90/p99/p99.9/max): "
                    "step = lower bound" % (format(count, ","), format(outages, ","))}


def default_label(path, clients=None):
    name = os.path.basename(os.path.normpath(path))
    if name in REPORT_NAMES + LOG_NAMES:
        name = os.path.basename(os.path.dirname(os.path.abspath(path))) + "/" + name
    return ("%s clients (%s)" % (format(clients, ","), name)) if isinstance(clients, int) \
        else name


def read_rebound_log(path):
    firsts = []
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError("%s: no such file" % path)
    except OSError as e:
        raise UserError("%s: %s" % (path, e.strerror or e))
    for no, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            firsts.append((int(parts[0]), int(parts[1])))
        except ValueError:
            raise UserError("%s:%d: not a rebound-log line (`CLIENT CLOCK_MONOTONIC_NS`): %r"
                            % (path, no, line[:80].decode("utf-8", "replace")))
    if not firsts:
        raise UserError("%s: empty rebound log" % path)
    return firsts


def first_per_client(lines, t0_ns):
    first = {}
    for client, ns in lines:
        if ns >= t0_ns and (client not in first or ns < first[client]):
            first[client] = ns
    return first


def move_from_figures(lines, figures_path):
    """The storm's start on the loadgen's clock, from cluster-test.sh's figures.json: its
    storm max is the last client's first acknowledgement minus the move time."""
    try:
        fig = read_json(figures_path)
        a = fig["storm"]["all"]
        max_ms, n = float(a["max_ms"]), int(a["n"])
    except (UserError, KeyError, TypeError, ValueError):
        return None, None
    first = first_per_client(lines, 0)
    if len(first) < n or n <= 0:
        return None, None
    times = sorted(first.values())[:n]
    t0 = times[-1] - int(round(max_ms * 1e6))
    # Check against the p50 figures.json has, to 0.1 ms rounding.
    k = max(0, math.ceil(0.5 * n) - 1)
    p50 = (times[k] - t0) / 1e6
    if "p50_ms" in a and abs(p50 - float(a["p50_ms"])) > 0.25:
        return None, "figures.json p50 %.1f ms does not match the log's %.1f ms" % (
            float(a["p50_ms"]), p50)
    return t0, None


def series_from_log(path, label, move_ns=None, clients=None, sibling_dir=None):
    lines = read_rebound_log(path)
    origin = None
    if move_ns is not None:
        t0, origin = move_ns, "from the move (--move-ns)"
    elif sibling_dir and os.path.isfile(os.path.join(sibling_dir, "figures.json")):
        t0, why = move_from_figures(lines, os.path.join(sibling_dir, "figures.json"))
        if t0 is not None:
            origin = "from the move (derived from figures.json)"
        elif why:
            warn("%s: %s; x is from the first acknowledgement" % (path, why))
    if origin is None:
        t0 = min(ns for _, ns in lines)
        origin = "from the first acknowledgement: move time unknown (--move-ns)"
        if move_ns is None:
            warn("%s: no move time (pass --move-ns NS); x starts at the first acknowledgement"
                 % path)
    first = first_per_client(lines, t0)
    if not first:
        raise UserError("%s: no acknowledgement at or after --move-ns %d" % (path, t0))
    xs = sorted((ns - t0) / 1e9 for ns in first.values())
    total = clients
    if total is None and sibling_dir:
        for name in ("loadgen.json", "report.json"):
            p = os.path.join(sibling_dir, name)
            if os.path.isfile(p):
                try:
                    c = read_json(p).get("clients", {}).get("connected")
                except (UserError, AttributeError):
                    c = None
                if isinstance(c, int) and c >= len(xs):
                    total = c
                    break
    if total is None:
        total = len(xs)
    elif total < len(xs):
        raise UserError("%s: --clients %d is fewer than the %d clients that rebound"
                        % (path, total, len(xs)))
    return {"label": label or default_label(path, total), "kind": "samples",
            "xs": xs, "n": len(xs), "total": total, "source": path,
            "note": "%d of %d clients, %s" % (len(xs), total, origin)}


def series_from_input(path, label=None, metric="recovery", move_ns=None, clients=None):
    if os.path.isdir(path):
        for name in LOG_NAMES:
            p = os.path.join(path, name)
            if os.path.isfile(p) and os.path.getsize(p) > 0:
                if metric != "recovery":
                    raise UserError("%s: --metric %s needs a loadgen report, this directory "
                                    "has a rebound log" % (path, metric))
                return series_from_log(p, label, move_ns, clients, sibling_dir=path)
        for name in REPORT_NAMES:
            p = os.path.join(path, name)
            if os.path.isfile(p):
                return series_from_report(p, metric, label)
        raise UserError("%s: no %s in this directory" % (path, ", ".join(LOG_NAMES + REPORT_NAMES)))
    if not os.path.exists(path):
        raise UserError("%s: no such file or directory" % path)
    try:
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
    except OSError as e:
        raise UserError("%s: %s" % (path, e.strerror or e))
    if head.startswith(b"{"):
        return series_from_report(path, metric, label)
    return series_from_log(path, label, move_ns, clients,
                           sibling_dir=os.path.dirname(os.path.abspath(path)))


def cdf_points(s):
    """(x seconds, fraction) corners of the series' step CDF, at most ~2,000 steps."""
    if s["kind"] == "percentiles":
        return s["points"]
    xs, total = s["xs"], float(s["total"])
    n = len(xs)
    if n <= 2000:
        idx = range(n)
    else:
        idx = sorted(set(int(round(k * (n - 1) / 1999.0)) for k in range(2000)))
    return [(xs[i], (i + 1) / total) for i in idx]


def plot_storm(series, out, xscale="log", xmax=None, title=None):
    if not series:
        raise UserError("storm: no inputs")
    # Wide enough for the longest legend line.
    width = int(max([900] + [124 + max(text_width(s["label"], 12.5, bold=True),
                                       text_width(s["note"], 11.5)) + 20 for s in series]))
    height = 560
    left, right, top, bottom = 84, width - 20, 74, 440
    pw, ph = right - left, bottom - top
    allx = [x for s in series for x, _ in cdf_points(s)]
    hi = xmax if xmax else max(allx)
    if xscale == "log":
        pos = [x for x in allx if x > 0]
        lo = min(pos) if pos else 1e-3
        d0 = math.floor(math.log10(lo))
        d1 = math.ceil(math.log10(hi)) if hi > 0 else d0 + 1
        if d1 <= d0:
            d1 = d0 + 1
        xlo, xhi = 10.0 ** d0, 10.0 ** d1

        def X(x):
            # Below the axis: at its left edge; beyond --xmax: clipped off.
            x = min(max(x, xlo), xhi * 10)
            return left + pw * (math.log10(x) - d0) / (d1 - d0)
        major = [10.0 ** k for k in range(d0, d1 + 1)]
        minor = [m * 10.0 ** k for k in range(d0, d1) for m in (2, 5)]
    else:
        ticks = linear_ticks(0, hi if hi > 0 else 1, 8)
        xlo, xhi = 0.0, ticks[-1]

        def X(x):
            return left + pw * (min(max(x, xlo), xhi * 2) - xlo) / (xhi - xlo)
        major, minor = ticks, []

    def Y(f):
        return bottom - ph * f

    svg = Svg(width, height)
    svg.text(width / 2, 28, title or "Rebind storm: recovery CDF", size=17, anchor="middle",
             weight="bold")
    svg.text(width / 2, 48, "fraction of moved clients recovered by time since their move "
             "(%s x axis)" % xscale, size=12.5, anchor="middle", fill="#444")
    svg.add('<g class="grid">')
    for f in [i / 10.0 for i in range(11)]:
        svg.line(left, Y(f), right, Y(f), stroke="#e4e4e4" if f not in (0.5, 0.9) else "#c8c8c8")
        svg.text(left - 8, Y(f) + 4, "%d%%" % round(f * 100), size=12, anchor="end",
                 fill="#444")
    for x in minor:
        svg.line(X(x), top, X(x), bottom, stroke="#f0f0f0")
        svg.text(X(x), bottom + 15, fmt_seconds(x), size=9.5, anchor="middle", fill="#999")
    for x in major:
        svg.line(X(x), top, X(x), bottom, stroke="#d8d8d8")
        svg.text(X(x), bottom + 17, fmt_seconds(x), size=12, anchor="middle", fill="#444")
    svg.add("</g>")
    svg.rect(left, top, pw, ph, stroke="#333")
    svg.text((left + right) / 2, bottom + 38, "recovery time (s since the move)", size=13,
             anchor="middle")
    svg.text(24, (top + bottom) / 2, "moved clients recovered", size=13, anchor="middle",
             rotate=-90)

    svg.add('<clipPath id="plot-area"><rect x="%d" y="%d" width="%d" height="%d"/></clipPath>'
            % (left, top - 4, pw, ph + 8))
    svg.add('<g clip-path="url(#plot-area)">')
    for i, s in enumerate(series):
        color = COLORS[i % len(COLORS)]
        pts = cdf_points(s)
        dash = "7,4" if s["kind"] == "percentiles" else None
        poly = [(left, Y(0))]
        prev_f = 0.0
        for x, f in pts:
            poly.append((X(x), Y(prev_f)))
            poly.append((X(x), Y(f)))
            prev_f = f
        poly.append((max(right, X(pts[-1][0])), Y(prev_f)))
        svg.add('<g class="series" data-label=%s data-kind="%s" data-n="%d">'
                % (quoteattr(s["label"]), s["kind"], s["n"]))
        svg.polyline(poly, color, width=2.2, dash=dash)
        if s["kind"] == "percentiles":
            for x, f in pts:
                svg.circle(X(x), Y(f), 3.8, fill="#fff", stroke=color, width=1.8)
        svg.add("</g>")
    svg.add("</g>")

    # Legend below the plot.
    ly, step = bottom + 64, 36
    for i, s in enumerate(series):
        color = COLORS[i % len(COLORS)]
        y = ly + step * i
        if s["kind"] == "percentiles":
            svg.line(left, y - 4, left + 30, y - 4, stroke=color, width=2.2, dash="7,4")
            svg.circle(left + 15, y - 4, 3.8, fill="#fff", stroke=color, width=1.8)
        else:
            svg.line(left, y - 4, left + 30, y - 4, stroke=color, width=2.2)
        svg.text(left + 40, y, s["label"], size=12.5, weight="bold", cls="legend")
        svg.text(left + 40, y + 15, s["note"], size=11.5, fill="#555")
    svg.h = max(height, ly + step * len(series) + 4)
    write_svg(svg, out)


# --------------------------------------------------------------------------------------------
# Command line

def warn(msg):
    print("plot.py: warning: " + msg, file=sys.stderr)


USAGE = """usage:
  perf/plot.py fastpath FILE.json [-o OUT.svg]
  perf/plot.py storm [--xscale log|linear] [--xmax S] [--title T] -o OUT.svg
                     [--label L] [--metric recovery|traffic] [--move-ns NS] [--clients N]
                     INPUT [...]
  perf/plot.py selftest
(perf/plot.py --help for the inputs)"""


def take(args, i, opt):
    if i + 1 >= len(args):
        raise UserError("%s needs a value" % opt)
    return args[i + 1]


def number(v, opt, kind=float):
    try:
        x = kind(v)
    except ValueError:
        raise UserError("%s: not a number: %r" % (opt, v))
    if x < 0 or (kind is float and not math.isfinite(x)):
        raise UserError("%s: must be a non-negative number: %r" % (opt, v))
    return x


def cmd_fastpath(args):
    out, inputs, i = None, [], 0
    while i < len(args):
        a = args[i]
        if a in ("-o", "--out"):
            out, i = take(args, i, a), i + 2
        elif a.startswith("-") and a != "-":
            raise UserError("fastpath: unknown option %s" % a)
        else:
            inputs.append(a)
            i += 1
    if len(inputs) != 1:
        raise UserError("fastpath: give exactly one FILE.json\n" + USAGE)
    src = inputs[0]
    if out is None:
        out = os.path.join(HERE, "plots", os.path.splitext(os.path.basename(src))[0] + ".svg")
    groups = plot_fastpath(src, out)
    print("%s: %s" % (out, ", ".join("%s median %s/s" % (g["path"], fmt_count(
        median([r["echoes_per_sec"] for r in g["runs"]]))) for g in groups)))


def cmd_storm(args):
    out, xscale, xmax, title = None, "log", None, None
    pending = {}
    series = []
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-o", "--out"):
            out, i = take(args, i, a), i + 2
        elif a == "--xscale":
            xscale, i = take(args, i, a), i + 2
            if xscale not in ("log", "linear"):
                raise UserError("--xscale: log or linear, not %r" % xscale)
        elif a in ("--log", "--linear"):
            xscale, i = a[2:], i + 1
        elif a == "--xmax":
            xmax, i = number(take(args, i, a), a), i + 2
        elif a == "--title":
            title, i = take(args, i, a), i + 2
        elif a == "--label":
            pending["label"], i = take(args, i, a), i + 2
        elif a == "--metric":
            m = take(args, i, a)
            if m in ("traffic", "traffic_recovery"):
                m = "traffic"
            elif m != "recovery":
                raise UserError("--metric: recovery or traffic, not %r" % m)
            pending["metric"], i = m, i + 2
        elif a == "--move-ns":
            pending["move_ns"], i = number(take(args, i, a), a, int), i + 2
        elif a == "--clients":
            pending["clients"], i = number(take(args, i, a), a, int), i + 2
        elif a.startswith("-"):
            raise UserError("storm: unknown option %s\n%s" % (a, USAGE))
        else:
            series.append(series_from_input(a, **pending))
            pending = {}
            i += 1
    if pending:
        raise UserError("storm: %s given after the last input" % ", ".join(
            "--" + k.replace("_", "-") for k in pending))
    if not series:
        raise UserError("storm: no inputs\n" + USAGE)
    if out is None:
        raise UserError("storm: -o OUT.svg is required")
    plot_storm(series, out, xscale, xmax, title)
    for s in series:
        pts = cdf_points(s)
        print("%s: %s: %s, last at %s" % (out, s["label"], s["note"], fmt_seconds(pts[-1][0])))


def main(argv):
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "fastpath":
            cmd_fastpath(rest)
        elif cmd == "storm":
            cmd_storm(rest)
        elif cmd == "selftest":
            return selftest(rest)
        else:
            raise UserError("unknown command %r\n%s" % (cmd, USAGE))
    except UserError as e:
        print("plot.py: error: %s" % e, file=sys.stderr)
        return 2
    return 0


# --------------------------------------------------------------------------------------------
# Self-test

def selftest(argv):
    import unittest
    suite = unittest.defaultTestLoader.loadTestsFromTestCase(PlotTest)
    verbosity = 2 if "-v" in argv else 1
    ok = unittest.TextTestRunner(verbosity=verbosity).run(suite).wasSuccessful()
    return 0 if ok else 1


def _run(eps, path, **extra):
    r = {"path": path, "sent": int(eps * 3), "received": int(eps * 3), "echoes_per_sec": eps,
         "rtt_p50_us": 1500, "rtt_p99_us": 17000, "rtt_p999_us": 22000}
    r.update(extra)
    return r


class PlotTest(__import__("unittest").TestCase):
    def setUp(self):
        import tempfile
        self.tmp = tempfile.mkdtemp(prefix="plot-selftest-")

    def tearDown(self):
        import shutil
        shutil.rmtree(self.tmp, ignore_errors=True)

    def put(self, name, content):
        p = os.path.join(self.tmp, name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            f.write(content if isinstance(content, str) else json.dumps(content))
        return p

    def parse(self, path):
        import xml.dom.minidom
        return xml.dom.minidom.parse(path)

    def series(self, dom):
        return [g for g in dom.getElementsByTagName("g") if g.getAttribute("class") == "series"]

    def texts(self, dom):
        return [t.firstChild.data if t.firstChild else ""
                for t in dom.getElementsByTagName("text")]

    def run_main(self, *argv):
        import contextlib
        import io
        err, outb = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(outb):
            rc = main(list(argv))
        return rc, err.getvalue()

    def test_fastpath_backends_nginx_cpu(self):
        runs = []
        for k in range(3):
            runs += [_run(50000 + k, "bare-relay", core_busy=[0.9, 0.5],
                          echoes_per_forwarder_core_s=75000.0),
                     _run(48000 + k, "gateway", echoes_per_forwarder_core_s=57600.0),
                     _run(40000 + k, "gateway/mmsg", echoes_per_forwarder_core_s=44000.0),
                     _run(41000 + k, "bare-relay/mmsg", echoes_per_forwarder_core_s=45000.0),
                     _run(90000 + k, "gateway/xdp", echoes_per_forwarder_core_s=95000.0),
                     _run(30000 + k, "nginx", echoes_per_forwarder_core_s=31000.0)]
        rep = {"saturating": runs, "backends": [{"io": "uring"}, {"io": "mmsg"}],
               "half_load_rate": 25000, "half_load": [], "gateway_added_p99_us": 12}
        src = self.put("fp.json", rep)
        out = os.path.join(self.tmp, "out", "fp.svg")
        rc, err = self.run_main("fastpath", src, "-o", out)
        self.assertEqual(rc, 0, err)
        dom = self.parse(out)
        paths = [g.getAttribute("data-path") for g in self.series(dom)]
        # Two panels (CPU fields present), gateway backends first, then relays, then nginx.
        order = ["gateway", "gateway/mmsg", "gateway/xdp", "bare-relay", "bare-relay/mmsg",
                 "nginx"]
        self.assertEqual(paths, order + order)
        g0 = self.series(dom)[0]
        self.assertEqual(g0.getAttribute("data-median"), "48001.0")
        self.assertEqual(len([c for c in g0.getElementsByTagName("circle")]), 3)
        texts = self.texts(dom)
        self.assertIn("rebindgw bench fastpath: fp.json", texts)
        self.assertIn("%.2f× bare relay" % (48001 / 50001.0), texts)
        self.assertIn("%.2f× nginx" % (48001 / 30001.0), texts)
        self.assertIn("uring", texts)
        self.assertTrue(any("CPU efficiency" in t for t in texts))

    def test_fastpath_old_format_no_cpu(self):
        runs = [_run(21000.0, "bare-relay"), _run(20000.0, "gateway"),
                _run(22000.0, "gateway"), _run(21500.0, "bare-relay")]
        src = self.put("old.json", {"saturating": runs, "ratio": 0.97})
        out = os.path.join(self.tmp, "old.svg")
        rc, err = self.run_main("fastpath", src, "-o", out)
        self.assertEqual(rc, 0, err)
        dom = self.parse(out)
        self.assertEqual([g.getAttribute("data-path") for g in self.series(dom)],
                         ["gateway", "bare-relay"])
        texts = self.texts(dom)
        self.assertFalse(any("CPU efficiency" in t for t in texts))
        self.assertIn("%.2f× bare relay" % (21000 / 21250.0), texts)

    def test_storm_report_log_and_cluster_dir(self):
        pct = {"count": 100, "mean_ms": 40.0, "p50_ms": 20.0, "p90_ms": 120.0,
               "p99_ms": 145.0, "p999_ms": 152.0, "max_ms": 152.0}
        rep = {"settings": {"clients": 100}, "clients": {"connected": 100},
               "rebinds": {"moves": 100, "outages": 100, "recovery": pct,
                           "traffic_recovery": dict(pct, p50_ms=30.0)}}
        storm_dir = os.path.dirname(self.put("storm-100/report.json", rep))
        # A rebound log whose move was at 5e9 ns; a rebound before it is ignored.
        t0 = 5_000_000_000
        lines = ["7 4000000000"] + ["%d %d" % (c, t0 + (c + 1) * 1_000_000) for c in range(50)]
        lines += ["3 %d" % (t0 + 999_000_000)]  # a second acknowledgement: not the first
        log = self.put("nat/rebound.log", "\n".join(lines) + "\n")
        # A cluster-test work directory: the move is derived from figures.json.
        cl = ["%d %d" % (c, t0 + (c + 1) * 2_000_000) for c in range(10)]
        cdir = os.path.dirname(self.put("cluster/rebound.log", "\n".join(cl) + "\n"))
        self.put("cluster/figures.json", {"storm": {"all": {"n": 10, "p50_ms": 10.0,
                                                            "p99_ms": 20.0, "max_ms": 20.0}}})
        self.put("cluster/loadgen.json", {"clients": {"connected": 10},
                                          "rebinds": {"moves": 0, "recovery": {"count": 0}}})
        out = os.path.join(self.tmp, "storm.svg")
        rc, err = self.run_main("storm", "--label", "16,384", storm_dir,
                                "--label", "nat", "--move-ns", str(t0), "--clients", "60", log,
                                "--label", "cluster", cdir, "-o", out)
        self.assertEqual(rc, 0, err)
        dom = self.parse(out)
        ss = self.series(dom)
        self.assertEqual([(g.getAttribute("data-label"), g.getAttribute("data-kind"),
                           g.getAttribute("data-n")) for g in ss],
                         [("16,384", "percentiles", "100"), ("nat", "samples", "50"),
                          ("cluster", "samples", "10")])
        self.assertEqual(len(ss[0].getElementsByTagName("circle")), 5)
        texts = self.texts(dom)
        self.assertIn("50 of 60 clients, from the move (--move-ns)", texts)
        self.assertIn("10 of 10 clients, from the move (derived from figures.json)", texts)
        self.assertIn("100 of 100 outages; percentiles only (p50/p90/p99/p99.9/max): "
                      "step = lower bound", texts)
        # The nat series tops out at 50/60 of the clients, the last point at 50 ms.
        s = series_from_input(log, "nat", move_ns=t0, clients=60)
        self.assertEqual(cdf_points(s)[-1], (0.05, 50 / 60.0))
        s = series_from_input(cdir)
        self.assertAlmostEqual(cdf_points(s)[0][0], 0.002)
        # Linear scale and traffic recovery from the report.
        out2 = os.path.join(self.tmp, "storm-lin.svg")
        rc, err = self.run_main("storm", "--linear", "--metric", "traffic", storm_dir,
                                "-o", out2)
        self.assertEqual(rc, 0, err)
        self.parse(out2)
        # No move time: x from the first acknowledgement, said in the legend and on stderr.
        rc, err = self.run_main("storm", log, "-o", os.path.join(self.tmp, "nomove.svg"))
        self.assertEqual(rc, 0, err)
        self.assertIn("no move time", err)

    def test_user_errors(self):
        bad = self.put("bad.json", "{not json")
        empty = self.put("empty.log", "")
        garbage = self.put("garbage.log", "1 2\nhello\n")
        notfast = self.put("nf.json", {"saturating": [{"path": "gateway"}]})
        nomoves = self.put("nomoves.json", {"rebinds": {"moves": 0, "recovery": {"count": 0}}})
        out = os.path.join(self.tmp, "x.svg")
        cases = [
            (("fastpath", os.path.join(self.tmp, "missing.json"), "-o", out), "no such file"),
            (("fastpath", bad, "-o", out), "not valid JSON"),
            (("fastpath", notfast, "-o", out), "echoes_per_sec"),
            (("fastpath", "-o"), "needs a value"),
            (("storm", empty, "-o", out), "empty rebound log"),
            (("storm", garbage, "-o", out), "garbage.log:2"),
            (("storm", nomoves, "-o", out), "no recovery samples"),
            (("storm", self.tmp, "-o", out), "no rebound.log"),
            (("storm", "--xscale", "cubic", nomoves), "log or linear"),
            (("storm", "-o", out, "--label", "x"), "after the last input"),
            (("bogus",), "unknown command"),
            (("storm", "--clients", "1", garbage, "-o", out), "garbage.log:2"),
            (("storm", "--clients", "0", self.put("two.log", "1 5\n2 6\n"), "-o", out),
             "fewer than the 2 clients"),
        ]
        for argv, msg in cases:
            rc, err = self.run_main(*argv)
            self.assertEqual(rc, 2, argv)
            self.assertIn(msg, err, argv)
            self.assertNotIn("Traceback", err)
        self.assertFalse(os.path.exists(out))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
