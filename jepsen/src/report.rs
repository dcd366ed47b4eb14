//! The report directory of a run: summary (text and JSON), SVG plots of latency over time
//! (nemesis windows shaded) and throughput, and an index.html linking everything.
//!
//! The SVG is written directly (a few hundred lines of markup need no plotting crate).

use std::fmt::Write as _;
use std::path::Path;

use crate::history::{F, History, Op, OpType, Outcome, Process};

/// A nemesis window: `[start, end)` seconds since the run started and its label.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Window {
    pub start_s: f64,
    pub end_s: f64,
    pub label: String,
}

/// Fault windows from the history's nemesis ops: each `start_partition`, `kill`, `pause` or
/// `clock_skew` until its repair (or the end of the run); `rules` flips as zero-width marks.
pub fn nemesis_windows(history: &History) -> Vec<Window> {
    let end = history.ops().last().map_or(0.0, |o| secs(o.time_ns));
    let mut open: Vec<(&'static str, f64, String)> = Vec::new();
    let mut windows = Vec::new();
    for op in history
        .ops()
        .iter()
        .filter(|o| o.process == Process::Nemesis)
    {
        let t = secs(op.time_ns);
        let f = op.f.as_str();
        let starts = match f {
            "start_partition" => Some("stop_partition"),
            "kill" => Some("restart"),
            "pause" => Some("resume"),
            "clock_skew" => Some("clock_reset"),
            _ => None,
        };
        if let Some(closer) = starts {
            let label = match op.value.get("kind").and_then(|k| k.as_str()) {
                Some(kind) => format!("partition {kind}"),
                None => match op.value.get("node").and_then(|n| n.as_str()) {
                    Some(n) => format!("{f} {n}"),
                    None => f.to_string(),
                },
            };
            open.push((closer, t, label));
        } else if let Some(pos) = open.iter().position(|(closer, ..)| *closer == f) {
            let (_, start, label) = open.remove(pos);
            windows.push(Window {
                start_s: start,
                end_s: t,
                label,
            });
        } else if f == "rules" || f == "rules_failed" {
            let mode = op.value.get("mode").and_then(|m| m.as_str()).unwrap_or("?");
            windows.push(Window {
                start_s: t,
                end_s: t,
                label: format!("{f} → {mode}"),
            });
        }
    }
    for (_, start, label) in open {
        windows.push(Window {
            start_s: start,
            end_s: end,
            label,
        });
    }
    windows
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// One completed client op for the plots.
struct Point {
    t: f64,
    latency_ms: f64,
    outcome: Outcome,
    f: F,
}

fn points(history: &History) -> Vec<Point> {
    history
        .pairs()
        .filter_map(|p| {
            let c = p.completion?;
            Some(Point {
                t: secs(p.invoke.time_ns),
                latency_ms: (c.time_ns - p.invoke.time_ns) as f64 / 1e6,
                outcome: p.outcome(),
                f: p.f().clone(),
            })
        })
        .collect()
}

const W: f64 = 900.0;
const H: f64 = 360.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 40.0;
/// Most `ok` ops drawn on the latency plot.
const MAX_OK_POINTS: usize = 20_000;

fn color(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Ok => "#1f77b4",
        Outcome::Fail => "#ff7f0e",
        Outcome::Indeterminate => "#d62728",
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// SVG frame: shaded nemesis windows, axes, title; `y_ticks` as (value label, y pixel).
fn frame(
    title: &str,
    t_max: f64,
    windows: &[Window],
    y_ticks: &[(String, f64)],
    y_label: &str,
) -> String {
    let x = |t: f64| LEFT + t / t_max * (W - LEFT - RIGHT);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="18" font-size="14" text-anchor="middle">{}</text>
"#,
        W / 2.0,
        esc(title)
    );
    for (i, w) in windows.iter().enumerate() {
        let (x0, x1) = (x(w.start_s), x(w.end_s).max(x(w.start_s) + 1.5));
        let fill = if w.end_s > w.start_s {
            "#999"
        } else {
            "#2ca02c"
        };
        let _ = writeln!(
            s,
            r##"<rect x="{x0:.1}" y="{TOP}" width="{:.1}" height="{:.1}" fill="{fill}" fill-opacity="0.18"><title>{}</title></rect>
<text x="{:.1}" y="{:.1}" fill="#555" font-size="9">{}</text>"##,
            x1 - x0,
            H - TOP - BOTTOM,
            esc(&w.label),
            x0 + 2.0,
            TOP + 10.0 + (i % 3) as f64 * 10.0,
            esc(&w.label)
        );
    }
    let _ = writeln!(
        s,
        r##"<line x1="{LEFT}" y1="{}" x2="{}" y2="{}" stroke="#000"/>
<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{}" stroke="#000"/>
<text x="{}" y="{}" text-anchor="middle">time since start (s)</text>
<text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">{}</text>"##,
        H - BOTTOM,
        W - RIGHT,
        H - BOTTOM,
        H - BOTTOM,
        (LEFT + W - RIGHT) / 2.0,
        H - 6.0,
        H / 2.0,
        H / 2.0,
        esc(y_label)
    );
    let step = nice_step(t_max / 10.0);
    let mut t = 0.0;
    while t <= t_max + 1e-9 {
        let _ = writeln!(
            s,
            r##"<line x1="{0:.1}" y1="{1}" x2="{0:.1}" y2="{2}" stroke="#000"/><text x="{0:.1}" y="{3}" text-anchor="middle">{4}</text>"##,
            x(t),
            H - BOTTOM,
            H - BOTTOM + 4.0,
            H - BOTTOM + 15.0,
            t
        );
        t += step;
    }
    for (label, y) in y_ticks {
        let _ = writeln!(
            s,
            r##"<line x1="{0}" y1="{1:.1}" x2="{2}" y2="{1:.1}" stroke="#eee"/><text x="{3}" y="{4:.1}" text-anchor="end">{5}</text>"##,
            LEFT,
            y,
            W - RIGHT,
            LEFT - 4.0,
            y + 3.0,
            esc(label)
        );
    }
    s
}

fn nice_step(raw: f64) -> f64 {
    let raw = raw.max(1e-3);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
}

fn legend(s: &mut String, items: &[(&str, &str)]) {
    for (i, (label, color)) in items.iter().enumerate() {
        let x = W - RIGHT - 110.0;
        let y = TOP + 12.0 + i as f64 * 13.0;
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="{}" width="9" height="9" fill="{color}"/><text x="{}" y="{y}">{}</text>"#,
            y - 8.0,
            x + 13.0,
            esc(label)
        );
    }
}

/// Latency of every completed op over time, log scale, coloured by outcome.
pub fn latency_svg(history: &History, title: &str) -> String {
    let pts = points(history);
    let windows = nemesis_windows(history);
    let t_max = history
        .ops()
        .last()
        .map_or(1.0, |o| secs(o.time_ns))
        .max(1.0);
    let lo = 0.1f64;
    let hi = pts
        .iter()
        .map(|p| p.latency_ms)
        .fold(10.0f64, f64::max)
        .max(10.0);
    let (llo, lhi) = (lo.log10(), hi.log10().ceil());
    let y = |ms: f64| H - BOTTOM - (ms.max(lo).log10() - llo) / (lhi - llo) * (H - TOP - BOTTOM);
    let ticks: Vec<(String, f64)> = (llo as i32..=lhi as i32)
        .map(|e| {
            let v = 10f64.powi(e);
            (format!("{v} ms"), y(v))
        })
        .collect();
    let mut s = frame(title, t_max, &windows, &ticks, "latency (ms, log)");
    let x = |t: f64| LEFT + t / t_max * (W - LEFT - RIGHT);
    // Long runs have 100k+ ops: draw every fail and info but only a sample of the ok ops,
    // so the file stays a few MB.
    let ok = pts.iter().filter(|p| p.outcome == Outcome::Ok).count();
    let every = ok.div_ceil(MAX_OK_POINTS).max(1);
    let mut nth_ok = 0usize;
    for p in &pts {
        if p.outcome == Outcome::Ok {
            nth_ok += 1;
            if !nth_ok.is_multiple_of(every) {
                continue;
            }
        }
        let shape = if matches!(p.f, F::Read | F::ReadSet | F::ReadAll | F::Watch) {
            "circle"
        } else {
            "rect"
        };
        if shape == "circle" {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="1.6" fill="{}" fill-opacity="0.6"/>"#,
                x(p.t),
                y(p.latency_ms),
                color(p.outcome)
            );
        } else {
            let _ = writeln!(
                s,
                r#"<rect x="{:.1}" y="{:.1}" width="3" height="3" fill="{}" fill-opacity="0.6"/>"#,
                x(p.t) - 1.5,
                y(p.latency_ms) - 1.5,
                color(p.outcome)
            );
        }
    }
    legend(
        &mut s,
        &[
            ("ok", color(Outcome::Ok)),
            ("fail", color(Outcome::Fail)),
            ("info", color(Outcome::Indeterminate)),
            ("(circle: read)", "#fff"),
        ],
    );
    s.push_str("</svg>\n");
    s
}

/// Completed ops per second (by invocation time), one line per outcome.
pub fn throughput_svg(history: &History, title: &str) -> String {
    let pts = points(history);
    let windows = nemesis_windows(history);
    let t_max = history
        .ops()
        .last()
        .map_or(1.0, |o| secs(o.time_ns))
        .max(1.0);
    let buckets = t_max.ceil() as usize + 1;
    let mut counts = vec![[0u64; 3]; buckets];
    for p in &pts {
        let i = (p.t as usize).min(buckets - 1);
        let k = match p.outcome {
            Outcome::Ok => 0,
            Outcome::Fail => 1,
            Outcome::Indeterminate => 2,
        };
        counts[i][k] += 1;
    }
    let max = counts.iter().flatten().copied().max().unwrap_or(1).max(1) as f64;
    let top = nice_step(max / 4.0) * 4.0;
    let y = |v: f64| H - BOTTOM - v / top * (H - TOP - BOTTOM);
    let ticks: Vec<(String, f64)> = (0..=4)
        .map(|i| {
            let v = top / 4.0 * i as f64;
            (format!("{v}"), y(v))
        })
        .collect();
    let mut s = frame(title, t_max, &windows, &ticks, "ops/s");
    let x = |t: f64| LEFT + t / t_max * (W - LEFT - RIGHT);
    for (k, outcome) in [Outcome::Ok, Outcome::Fail, Outcome::Indeterminate]
        .into_iter()
        .enumerate()
    {
        let path: Vec<String> = counts
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:.1},{:.1}", x(i as f64 + 0.5), y(c[k] as f64)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"#,
            color(outcome),
            path.join(" ")
        );
    }
    legend(
        &mut s,
        &[
            ("ok", color(Outcome::Ok)),
            ("fail", color(Outcome::Fail)),
            ("info", color(Outcome::Indeterminate)),
        ],
    );
    s.push_str("</svg>\n");
    s
}

/// Op counts by completion type.
pub fn op_counts(history: &History) -> serde_json::Value {
    let (mut ok, mut fail, mut info) = (0u64, 0u64, 0u64);
    for p in history.pairs() {
        match p.outcome() {
            Outcome::Ok => ok += 1,
            Outcome::Fail => fail += 1,
            Outcome::Indeterminate => info += 1,
        }
    }
    let nemesis = history
        .ops()
        .iter()
        .filter(|o: &&Op| o.process == Process::Nemesis && o.kind == OpType::Info)
        .count();
    serde_json::json!({"ok": ok, "fail": fail, "info": info, "nemesis": nemesis})
}

/// index.html linking the run's files.
pub fn write_index(dir: &Path, title: &str, summary_text: &str) -> std::io::Result<()> {
    let mut files: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "index.html")
        .collect();
    files.sort();
    let mut html = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title>\n<style>body{{font-family:sans-serif;margin:2em}} pre{{background:#f6f6f6;padding:1em}}</style></head><body>\n<h1>{t}</h1>\n<pre>{}</pre>\n<h2>Latency</h2><img src=\"latency.svg\">\n<h2>Throughput</h2><img src=\"throughput.svg\">\n<h2>Files</h2><ul>\n",
        esc(summary_text),
        t = esc(title)
    );
    for f in files {
        let _ = writeln!(html, "<li><a href=\"{0}\">{0}</a></li>", esc(&f));
    }
    html.push_str("</ul></body></html>\n");
    std::fs::write(dir.join("index.html"), html)
}
