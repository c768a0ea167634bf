//! Pictures without a plotting stack: a figure is a list of shapes drawn
//! once, then written as SVG text or rasterised to PNG with the built-in
//! bitmap font (no system font needed).

use std::path::Path;

use super::font::{glyph, ADVANCE, ASCENT, GLYPH_H, GLYPH_W};
use super::result::{write_file, Grid, TraceResult};
use super::trace::Kind;
use crate::{Error, Result};

/// An sRGB colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rgb(pub u8, pub u8, pub u8);

impl Rgb {
    /// White.
    pub const WHITE: Rgb = Rgb(255, 255, 255);
    /// Black.
    pub const BLACK: Rgb = Rgb(0, 0, 0);
    /// Mid grey for axes and grid lines.
    pub const GREY: Rgb = Rgb(150, 150, 150);

    /// `#rrggbb`.
    pub fn hex(self) -> String {
        format!("#{:02x}{:02x}{:02x}", self.0, self.1, self.2)
    }

    /// Linear interpolation from `self` (t = 0) to `other` (t = 1).
    pub fn lerp(self, other: Rgb, t: f64) -> Rgb {
        let t = t.clamp(0.0, 1.0);
        let mix = |a: u8, b: u8| (f64::from(a) + (f64::from(b) - f64::from(a)) * t).round() as u8;
        Rgb(
            mix(self.0, other.0),
            mix(self.1, other.1),
            mix(self.2, other.2),
        )
    }
}

/// Horizontal alignment of a text relative to its x coordinate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    /// Text starts at x.
    Start,
    /// Text is centred on x.
    Middle,
    /// Text ends at x.
    End,
}

/// One drawing primitive, in figure units (SVG pixels).
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// A filled rectangle, optionally outlined.
    Rect {
        /// Left.
        x: f64,
        /// Top.
        y: f64,
        /// Width.
        w: f64,
        /// Height.
        h: f64,
        /// Fill colour.
        fill: Rgb,
        /// Outline colour.
        stroke: Option<Rgb>,
    },
    /// A connected line through points.
    Polyline {
        /// The points, in order.
        points: Vec<(f64, f64)>,
        /// Line width.
        width: f64,
        /// Colour.
        color: Rgb,
    },
    /// A line of text.
    Text {
        /// Anchor x.
        x: f64,
        /// Baseline y.
        y: f64,
        /// The text (ASCII renders everywhere; other characters become `?` in PNG).
        text: String,
        /// Font size (em height).
        size: f64,
        /// Alignment.
        anchor: Anchor,
        /// Colour.
        color: Rgb,
        /// Bold face.
        bold: bool,
    },
}

/// A picture: a canvas size and shapes drawn in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// Width in figure units.
    pub width: f64,
    /// Height in figure units.
    pub height: f64,
    /// Shapes, back to front.
    pub shapes: Vec<Shape>,
}

/// Width of `text` at `size`, generous enough for both the SVG monospace
/// font and the PNG bitmap font.
pub fn text_width(text: &str, size: f64) -> f64 {
    text.chars().count() as f64 * size * 0.64
}

impl Figure {
    /// An empty white figure.
    pub fn new(width: f64, height: f64) -> Self {
        Self {
            width,
            height,
            shapes: Vec::new(),
        }
    }

    /// Adds a filled rectangle.
    pub fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: Rgb, stroke: Option<Rgb>) {
        self.shapes.push(Shape::Rect {
            x,
            y,
            w,
            h,
            fill,
            stroke,
        });
    }

    /// Adds a straight line.
    pub fn line(&mut self, from: (f64, f64), to: (f64, f64), width: f64, color: Rgb) {
        self.polyline(vec![from, to], width, color);
    }

    /// Adds a polyline.
    pub fn polyline(&mut self, points: Vec<(f64, f64)>, width: f64, color: Rgb) {
        self.shapes.push(Shape::Polyline {
            points,
            width,
            color,
        });
    }

    /// Adds a line of text with its baseline at `y`.
    pub fn text(&mut self, x: f64, y: f64, text: &str, size: f64, anchor: Anchor, bold: bool) {
        self.shapes.push(Shape::Text {
            x,
            y,
            text: text.to_string(),
            size,
            anchor,
            color: Rgb::BLACK,
            bold,
        });
    }

    /// The figure as an SVG document.
    pub fn to_svg(&self) -> String {
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">\n\
             <rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\" fill=\"#ffffff\"/>\n",
            w = fmt_num(self.width),
            h = fmt_num(self.height)
        );
        for shape in &self.shapes {
            match shape {
                Shape::Rect {
                    x,
                    y,
                    w,
                    h,
                    fill,
                    stroke,
                } => {
                    let stroke = stroke.map_or(String::new(), |c| {
                        format!(" stroke=\"{}\" stroke-width=\"1\"", c.hex())
                    });
                    s.push_str(&format!(
                        "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{}\" shape-rendering=\"crispEdges\"{stroke}/>\n",
                        fmt_num(*x),
                        fmt_num(*y),
                        fmt_num(*w),
                        fmt_num(*h),
                        fill.hex()
                    ));
                }
                Shape::Polyline {
                    points,
                    width,
                    color,
                } => {
                    let pts: Vec<String> = points
                        .iter()
                        .map(|(x, y)| format!("{},{}", fmt_num(*x), fmt_num(*y)))
                        .collect();
                    s.push_str(&format!(
                        "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"{}\" stroke-linejoin=\"round\" stroke-linecap=\"round\"/>\n",
                        pts.join(" "),
                        color.hex(),
                        fmt_num(*width)
                    ));
                }
                Shape::Text {
                    x,
                    y,
                    text,
                    size,
                    anchor,
                    color,
                    bold,
                } => {
                    let anchor = match anchor {
                        Anchor::Start => "start",
                        Anchor::Middle => "middle",
                        Anchor::End => "end",
                    };
                    let weight = if *bold { " font-weight=\"bold\"" } else { "" };
                    s.push_str(&format!(
                        "<text x=\"{}\" y=\"{}\" font-family=\"DejaVu Sans Mono, Menlo, Consolas, monospace\" font-size=\"{}\" text-anchor=\"{anchor}\" fill=\"{}\"{weight} xml:space=\"preserve\">{}</text>\n",
                        fmt_num(*x),
                        fmt_num(*y),
                        fmt_num(*size),
                        color.hex(),
                        xml_escape(text)
                    ));
                }
            }
        }
        s.push_str("</svg>\n");
        s
    }

    /// Rasterises the figure at `scale` pixels per unit: `(width, height,
    /// RGB bytes row by row)`.
    pub fn raster(&self, scale: u32) -> (usize, usize, Vec<u8>) {
        let s = f64::from(scale.max(1));
        let w = (self.width * s).ceil().max(1.0) as usize;
        let h = (self.height * s).ceil().max(1.0) as usize;
        let mut canvas = Canvas {
            w,
            h,
            data: vec![255; w * h * 3],
        };
        for shape in &self.shapes {
            match shape {
                Shape::Rect {
                    x,
                    y,
                    w: rw,
                    h: rh,
                    fill,
                    stroke,
                } => {
                    let (x0, y0) = ((x * s).round(), (y * s).round());
                    let (x1, y1) = (((x + rw) * s).round(), ((y + rh) * s).round());
                    canvas.fill(x0, y0, x1, y1, *fill);
                    if let Some(c) = stroke {
                        let t = s.max(1.0).floor();
                        canvas.fill(x0, y0, x1, y0 + t, *c);
                        canvas.fill(x0, y1 - t, x1, y1, *c);
                        canvas.fill(x0, y0, x0 + t, y1, *c);
                        canvas.fill(x1 - t, y0, x1, y1, *c);
                    }
                }
                Shape::Polyline {
                    points,
                    width,
                    color,
                } => {
                    let thickness = (width * s).max(1.0);
                    for pair in points.windows(2) {
                        canvas.segment(
                            (pair[0].0 * s, pair[0].1 * s),
                            (pair[1].0 * s, pair[1].1 * s),
                            thickness,
                            *color,
                        );
                    }
                }
                Shape::Text {
                    x,
                    y,
                    text,
                    size,
                    anchor,
                    color,
                    bold,
                } => {
                    let k = ((size * s) / 10.0).round().max(1.0) as usize;
                    let n = text.chars().count();
                    let width_px = (n * ADVANCE * k).saturating_sub(k) as f64;
                    let left = match anchor {
                        Anchor::Start => x * s,
                        Anchor::Middle => x * s - width_px / 2.0,
                        Anchor::End => x * s - width_px,
                    }
                    .round() as i64;
                    let top = (y * s).round() as i64 - (ASCENT * k) as i64;
                    for (i, c) in text.chars().enumerate() {
                        let gx = left + (i * ADVANCE * k) as i64;
                        canvas.glyph(gx, top, c, k, *color);
                        if *bold {
                            canvas.glyph(gx + (k as i64 + 1) / 2, top, c, k, *color);
                        }
                    }
                }
            }
        }
        (w, h, canvas.data)
    }

    /// The figure as PNG bytes at `scale` pixels per unit.
    pub fn to_png(&self, scale: u32) -> Result<Vec<u8>> {
        let (w, h, data) = self.raster(scale);
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, w as u32, h as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let png_err = |e: png::EncodingError| Error::invalid("PNG image", e.to_string());
            let mut writer = enc.write_header().map_err(png_err)?;
            writer.write_image_data(&data).map_err(png_err)?;
            writer.finish().map_err(png_err)?;
        }
        Ok(out)
    }

    /// Writes [`Figure::to_svg`] to `path`.
    pub fn save_svg(&self, path: &Path) -> Result<()> {
        write_file(path, self.to_svg().as_bytes())
    }

    /// Writes [`Figure::to_png`] to `path`.
    pub fn save_png(&self, path: &Path, scale: u32) -> Result<()> {
        write_file(path, &self.to_png(scale)?)
    }
}

struct Canvas {
    w: usize,
    h: usize,
    data: Vec<u8>,
}

impl Canvas {
    fn put(&mut self, x: i64, y: i64, c: Rgb) {
        if x < 0 || y < 0 || x as usize >= self.w || y as usize >= self.h {
            return;
        }
        let i = (y as usize * self.w + x as usize) * 3;
        self.data[i] = c.0;
        self.data[i + 1] = c.1;
        self.data[i + 2] = c.2;
    }

    /// Fills pixels `[x0, x1) × [y0, y1)`.
    fn fill(&mut self, x0: f64, y0: f64, x1: f64, y1: f64, c: Rgb) {
        let (x0, x1) = (x0.max(0.0) as i64, x1.min(self.w as f64) as i64);
        let (y0, y1) = (y0.max(0.0) as i64, y1.min(self.h as f64) as i64);
        for y in y0..y1 {
            for x in x0..x1 {
                self.put(x, y, c);
            }
        }
    }

    /// A thick segment: discs stamped every half pixel.
    fn segment(&mut self, a: (f64, f64), b: (f64, f64), thickness: f64, c: Rgb) {
        let len = ((b.0 - a.0).powi(2) + (b.1 - a.1).powi(2)).sqrt();
        let steps = (len * 2.0).ceil().max(1.0) as usize;
        let r = thickness / 2.0;
        let r2 = (r + 0.15) * (r + 0.15);
        for i in 0..=steps {
            let t = i as f64 / steps as f64;
            let (cx, cy) = (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t);
            let (xa, xb) = ((cx - r).floor() as i64, (cx + r).ceil() as i64);
            let (ya, yb) = ((cy - r).floor() as i64, (cy + r).ceil() as i64);
            for y in ya..=yb {
                for x in xa..=xb {
                    let (dx, dy) = (x as f64 + 0.5 - cx, y as f64 + 0.5 - cy);
                    if dx * dx + dy * dy <= r2 {
                        self.put(x, y, c);
                    }
                }
            }
        }
    }

    /// Draws `c` with its top-left at `(x, y)`, each font pixel `k × k`.
    fn glyph(&mut self, x: i64, y: i64, c: char, k: usize, color: Rgb) {
        let rows = glyph(c);
        for (r, bits) in rows.iter().enumerate().take(GLYPH_H) {
            for col in 0..GLYPH_W {
                if bits & (1 << (GLYPH_W - 1 - col)) != 0 {
                    for dy in 0..k {
                        for dx in 0..k {
                            self.put(x + (col * k + dx) as i64, y + (r * k + dy) as i64, color);
                        }
                    }
                }
            }
        }
    }
}

fn fmt_num(v: f64) -> String {
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-" {
        "0".into()
    } else {
        s.to_string()
    }
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

/// The colour ramp of a kind (white → mid → dark): purple for the residual
/// stream, green for MLP, red for attention.
pub fn ramp(kind: Kind) -> [Rgb; 3] {
    match kind {
        Kind::Residual => [Rgb(252, 251, 253), Rgb(158, 154, 200), Rgb(63, 0, 125)],
        Kind::Mlp => [Rgb(247, 252, 245), Rgb(116, 196, 118), Rgb(0, 68, 27)],
        Kind::Attn => [Rgb(255, 245, 240), Rgb(251, 106, 74), Rgb(103, 0, 13)],
    }
}

fn ramp_at(stops: &[Rgb; 3], t: f64) -> Rgb {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    if t < 0.5 {
        stops[0].lerp(stops[1], t * 2.0)
    } else {
        stops[1].lerp(stops[2], (t - 0.5) * 2.0)
    }
}

/// A token as a label: quoted, control characters escaped.
pub fn token_label(token: &str) -> String {
    let mut s = String::from("\"");
    for c in token.chars() {
        match c {
            '\n' => s.push_str("\\n"),
            '\t' => s.push_str("\\t"),
            c if c.is_control() => s.push('?'),
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

/// Step between layer ticks so that labels `cell` units apart do not collide.
fn tick_step(cell: f64, label_chars: usize) -> usize {
    let need = label_chars.max(1) as f64 * 11.0 * 0.64 + 8.0;
    [1usize, 2, 5, 10, 20, 50, 100]
        .into_iter()
        .find(|&s| s as f64 * cell >= need)
        .unwrap_or(100)
}

/// A "nice" tick spacing (1, 2 or 5 × 10^k) for about `n` ticks over `span`.
fn nice_step(span: f64, n: usize) -> f64 {
    if !(span.is_finite() && span > 0.0) {
        return 1.0;
    }
    let raw = span / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let m = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

/// Decimals enough to tell ticks `step` apart.
fn decimals(step: f64) -> usize {
    if step >= 1.0 {
        0
    } else {
        (-step.log10()).ceil().clamp(0.0, 6.0) as usize
    }
}

/// The heatmap of one grid of a trace.
pub(crate) fn heatmap(result: &TraceResult, grid: &Grid) -> Figure {
    let n_t = grid.n_tokens();
    let n_l = grid.n_layers().max(1);
    let (title_size, label_size, tick_size) = (14.0, 12.0, 11.0);
    let labels: Vec<String> = (0..n_t)
        .map(|t| {
            let tok = result.tokens.get(t).map_or("", String::as_str);
            let mark = if result.is_subject(t) { "*" } else { " " };
            format!("{}{mark}", token_label(tok))
        })
        .collect();
    let label_w = labels
        .iter()
        .map(|l| text_width(l, label_size))
        .fold(0.0, f64::max);
    let cell_w = (560.0 / n_l as f64).clamp(10.0, 28.0);
    let cell_h = 22.0;
    let left = 20.0 + label_w + 14.0;
    let top = 92.0;
    let grid_w = n_l as f64 * cell_w;
    let grid_h = n_t as f64 * cell_h;

    let (lo, hi) = grid.range();
    let vmin = f64::from(lo.min(result.corrupted_prob));
    let mut vmax = f64::from(hi);
    if vmax.partial_cmp(&vmin) != Some(std::cmp::Ordering::Greater) {
        vmax = vmin + 1e-6;
    }
    let stops = ramp(grid.kind);
    let colour = |v: f32| ramp_at(&stops, (f64::from(v) - vmin) / (vmax - vmin));

    let bar_x = left + grid_w + 24.0;
    let bar_w = 16.0;
    let bar_h = grid_h.max(120.0);
    let bar_ticks: Vec<f64> = (0..5)
        .map(|i| vmin + (vmax - vmin) * i as f64 / 4.0)
        .collect();
    let bar_dec = decimals((vmax - vmin) / 4.0).max(2) + 1;
    let tick_w = bar_ticks
        .iter()
        .map(|v| text_width(&format!("{v:.bar_dec$}"), tick_size))
        .fold(0.0, f64::max);
    let answer = token_label(&result.answer);
    let bar_title = format!("p({answer})");

    let title1 = match grid.kind {
        Kind::Residual => "Restoring the residual stream after corrupting the subject".to_string(),
        k => format!(
            "Restoring {} (window of {} layers) after corrupting the subject",
            k.describe(),
            grid.window
        ),
    };
    let title2 = format!(
        "Answer {answer}: p = {:.4} clean, {:.4} corrupted (noise {:.3}, {} samples)",
        result.clean_prob, result.corrupted_prob, result.noise_std, result.samples
    );
    let title3 = format!("Prompt: {}", token_label(&result.prompt));
    let width = (bar_x + bar_w + 8.0 + tick_w + 20.0)
        .max(bar_x + text_width(&bar_title, tick_size) + 20.0)
        .max(20.0 + text_width(&title1, title_size) + 20.0)
        .max(20.0 + text_width(&title2, label_size) + 20.0)
        .max(20.0 + text_width(&title3, label_size) + 20.0);
    let height = top + grid_h.max(bar_h) + 64.0;
    let mut fig = Figure::new(width.ceil(), height.ceil());

    fig.text(20.0, 26.0, &title1, title_size, Anchor::Start, true);
    fig.text(20.0, 48.0, &title2, label_size, Anchor::Start, false);
    fig.text(20.0, 68.0, &title3, label_size, Anchor::Start, false);

    // Cells.
    for (t, row) in grid.probs.iter().enumerate() {
        for (l, &p) in row.iter().enumerate() {
            fig.rect(
                left + l as f64 * cell_w,
                top + t as f64 * cell_h,
                cell_w,
                cell_h,
                colour(p),
                None,
            );
        }
    }
    let frame = vec![
        (left, top),
        (left + grid_w, top),
        (left + grid_w, top + grid_h),
        (left, top + grid_h),
        (left, top),
    ];
    fig.polyline(frame, 1.0, Rgb::GREY);

    // Token labels, subject marked with a bar and an asterisk.
    for (t, label) in labels.iter().enumerate() {
        let y = top + t as f64 * cell_h + cell_h * 0.5 + label_size * 0.35;
        let subject = result.is_subject(t);
        fig.text(left - 8.0, y, label, label_size, Anchor::End, subject);
        if subject {
            fig.rect(
                12.0,
                top + t as f64 * cell_h + 2.0,
                4.0,
                cell_h - 4.0,
                stops[2],
                None,
            );
        }
    }

    // Layer ticks and axis title.
    let step = tick_step(cell_w, n_l.to_string().len());
    for l in (0..n_l).step_by(step) {
        let x = left + (l as f64 + 0.5) * cell_w;
        fig.line((x, top + grid_h), (x, top + grid_h + 4.0), 1.0, Rgb::GREY);
        fig.text(
            x,
            top + grid_h + 18.0,
            &l.to_string(),
            tick_size,
            Anchor::Middle,
            false,
        );
    }
    let x_title = match grid.kind {
        Kind::Residual => "single restored layer".to_string(),
        k => format!(
            "centre of the window of {} restored {} layers",
            grid.window,
            if k == Kind::Mlp { "MLP" } else { "attention" }
        ),
    };
    fig.text(
        left + grid_w / 2.0,
        top + grid_h + 40.0,
        &x_title,
        label_size,
        Anchor::Middle,
        false,
    );

    // Colour bar.
    let steps = 64;
    for i in 0..steps {
        let t0 = i as f64 / steps as f64;
        let y = top + bar_h * (1.0 - (i + 1) as f64 / steps as f64);
        fig.rect(
            bar_x,
            y,
            bar_w,
            bar_h / steps as f64 + 0.5,
            ramp_at(&stops, t0 + 0.5 / steps as f64),
            None,
        );
    }
    fig.polyline(
        vec![
            (bar_x, top),
            (bar_x + bar_w, top),
            (bar_x + bar_w, top + bar_h),
            (bar_x, top + bar_h),
            (bar_x, top),
        ],
        1.0,
        Rgb::GREY,
    );
    for (i, v) in bar_ticks.iter().enumerate() {
        let y = top + bar_h * (1.0 - i as f64 / 4.0);
        fig.line((bar_x + bar_w, y), (bar_x + bar_w + 4.0, y), 1.0, Rgb::GREY);
        fig.text(
            bar_x + bar_w + 7.0,
            y + tick_size * 0.35,
            &format!("{v:.bar_dec$}"),
            tick_size,
            Anchor::Start,
            false,
        );
    }
    fig.text(
        bar_x,
        top - 8.0,
        &bar_title,
        tick_size,
        Anchor::Start,
        false,
    );
    fig
}

/// One line of a line plot.
#[derive(Debug, Clone)]
pub(crate) struct Series {
    pub label: String,
    pub color: Rgb,
    pub width: f64,
    pub values: Vec<f32>,
}

/// A line plot of series over `0..n` (ticks labelled with the index, or
/// with `x_labels` when given), with a legend on the right.
pub(crate) fn line_plot(
    titles: &[String],
    x_title: &str,
    y_title: &str,
    series: &[Series],
    x_labels: Option<&[String]>,
) -> Figure {
    let (title_size, label_size, tick_size) = (14.0, 12.0, 11.0);
    let n = series
        .iter()
        .map(|s| s.values.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let finite = || {
        series
            .iter()
            .flat_map(|s| s.values.iter())
            .map(|&v| f64::from(v))
            .filter(|v| v.is_finite())
    };
    let lo = finite().fold(0.0, f64::min);
    let hi = finite().fold(0.0, f64::max);
    let step = nice_step(hi - lo, 5);
    let y_lo = (lo / step).floor() * step;
    let mut y_hi = (hi / step).ceil() * step;
    if y_hi <= y_lo {
        y_hi = y_lo + step;
    }
    let dec = decimals(step);

    let plot_w = 560.0;
    let plot_h = 300.0;
    let left = 80.0;
    let top = 30.0 + 22.0 * titles.len() as f64 + 20.0;
    let legend_x = left + plot_w + 24.0;
    let legend_w = series
        .iter()
        .map(|s| text_width(&s.label, label_size))
        .fold(0.0, f64::max)
        + 40.0;
    let width = (legend_x + legend_w + 20.0).max(
        titles
            .iter()
            .map(|t| 20.0 + text_width(t, title_size) + 20.0)
            .fold(0.0, f64::max),
    );
    let height = top + plot_h + 60.0;
    let mut fig = Figure::new(width.ceil(), height.ceil());
    for (i, t) in titles.iter().enumerate() {
        let (size, bold) = if i == 0 {
            (title_size, true)
        } else {
            (label_size, false)
        };
        fig.text(20.0, 26.0 + 22.0 * i as f64, t, size, Anchor::Start, bold);
    }
    let x_of = |l: f64| left + plot_w * (l + 0.5) / n as f64;
    let y_of = |v: f64| top + plot_h * (1.0 - (v - y_lo) / (y_hi - y_lo));

    // Horizontal grid and y ticks.
    let mut v = y_lo;
    while v <= y_hi + step * 1e-6 {
        let y = y_of(v);
        let colour = if v.abs() < step * 1e-6 {
            Rgb::GREY
        } else {
            Rgb(225, 225, 225)
        };
        fig.line((left, y), (left + plot_w, y), 1.0, colour);
        fig.text(
            left - 6.0,
            y + tick_size * 0.35,
            &format!("{v:.dec$}"),
            tick_size,
            Anchor::End,
            false,
        );
        v += step;
    }
    fig.text(left, top - 10.0, y_title, label_size, Anchor::Start, false);
    // Frame and x ticks.
    fig.polyline(
        vec![
            (left, top),
            (left, top + plot_h),
            (left + plot_w, top + plot_h),
        ],
        1.0,
        Rgb::BLACK,
    );
    let label = |l: usize| {
        x_labels
            .and_then(|labels| labels.get(l).cloned())
            .unwrap_or_else(|| l.to_string())
    };
    let widest = (0..n).map(|l| label(l).len()).max().unwrap_or(1);
    let tstep = tick_step(plot_w / n as f64, widest);
    for l in (0..n).step_by(tstep) {
        let x = x_of(l as f64);
        fig.line((x, top + plot_h), (x, top + plot_h + 4.0), 1.0, Rgb::BLACK);
        fig.text(
            x,
            top + plot_h + 18.0,
            &label(l),
            tick_size,
            Anchor::Middle,
            false,
        );
    }
    fig.text(
        left + plot_w / 2.0,
        top + plot_h + 42.0,
        x_title,
        label_size,
        Anchor::Middle,
        false,
    );
    // Lines and legend.
    for (i, s) in series.iter().enumerate() {
        let pts: Vec<(f64, f64)> = s
            .values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(l, &v)| (x_of(l as f64), y_of(f64::from(v))))
            .collect();
        if pts.len() > 1 {
            fig.polyline(pts, s.width, s.color);
        }
        let y = top + 10.0 + 22.0 * i as f64;
        fig.line(
            (legend_x, y),
            (legend_x + 24.0, y),
            s.width.max(2.0),
            s.color,
        );
        fig.text(
            legend_x + 30.0,
            y + label_size * 0.35,
            &s.label,
            label_size,
            Anchor::Start,
            false,
        );
    }
    fig
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_escapes_text_and_png_has_signature() {
        let mut f = Figure::new(40.0, 20.0);
        f.text(2.0, 12.0, "a<b & \"c\" é", 10.0, Anchor::Start, false);
        f.rect(0.0, 0.0, 5.0, 5.0, Rgb(10, 20, 30), Some(Rgb::BLACK));
        f.line((0.0, 0.0), (40.0, 20.0), 1.0, Rgb::GREY);
        let svg = f.to_svg();
        assert!(svg.contains("a&lt;b &amp; &quot;c&quot; é"));
        assert!(svg.contains("#0a141e"));
        let png = f.to_png(2).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let (w, h, data) = f.raster(2);
        assert_eq!((w, h, data.len()), (80, 40, 80 * 40 * 3));
    }

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(1.0, 5), 0.2);
        assert_eq!(nice_step(0.07, 5), 0.02);
        assert_eq!(decimals(0.02), 2);
        assert_eq!(decimals(5.0), 0);
        assert_eq!(fmt_num(3.0), "3");
        assert_eq!(fmt_num(2.50), "2.5");
    }
}
