//! The results table and its plots: rows with a median and spread per
//! figure, and CDFs as SVG.

pub struct Row {
    pub what: String,
    pub reaper: String,
    pub baseline: String,
    pub ratio: String,
    pub goal: String,
    pub pass: Verdict,
}

/// A row's verdict against its goal.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Verdict {
    Pass,
    Fail,
    /// Paired runs whose spread holds both sides of the goal: the machine's
    /// noise is larger than the difference, so the row neither passes nor
    /// fails (see `paired`).
    WithinNoise,
    /// Shown against its floor, no goal of its own.
    NoGoal,
}

impl From<bool> for Verdict {
    fn from(pass: bool) -> Verdict {
        if pass {
            Verdict::Pass
        } else {
            Verdict::Fail
        }
    }
}

impl Verdict {
    pub fn from_goal(pass: Option<bool>) -> Verdict {
        pass.map_or(Verdict::NoGoal, Verdict::from)
    }

    /// The verdict on paired runs (each a figure against its own baseline
    /// of the same turn) where `meets` says whether one pair meets the
    /// goal: passed when the median pair does and failed when it does
    /// not, unless the middle half of the pairs (the quartiles) falls on
    /// both sides of the goal, when the difference is within the noise.
    pub fn paired(pairs: &Runs, meets: impl Fn(f64) -> bool) -> Verdict {
        let mut v = pairs.0.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        let (low, high) = (percentile(&v, 0.25), percentile(&v, 0.75));
        if meets(low) != meets(high) {
            Verdict::WithinNoise
        } else {
            meets(pairs.median()).into()
        }
    }

    pub fn cell(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "**FAIL**",
            Verdict::WithinNoise => "within noise",
            Verdict::NoGoal => "—",
        }
    }
}

/// Median and spread of a set of runs.
pub struct Runs(pub Vec<f64>);

impl Runs {
    pub fn median(&self) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    }
    pub fn show(&self, unit: &str, digits: usize) -> String {
        let (min, max) = self
            .0
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
        // A unit-less figure (one of several sharing a unit) has no space
        // before its spread.
        let unit = if unit.is_empty() {
            String::new()
        } else {
            format!(" {unit}")
        };
        format!(
            "{:.*}{unit} (n={}, {:.*}–{:.*})",
            digits,
            self.median(),
            self.0.len(),
            digits,
            min,
            digits,
            max
        )
    }
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// A CDF plot of latency series, as SVG.
pub fn cdf_svg(title: &str, unit: &str, series: &[(String, Vec<f64>)]) -> String {
    let (w, h, m) = (640.0, 400.0, 50.0);
    let max = series
        .iter()
        .filter_map(|(_, v)| v.last().copied())
        .fold(1.0f64, f64::max)
        .max(1.0);
    let colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{m}\" y=\"20\" font-size=\"14\">{title}</text>\n\
         <line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{max:.0} {unit} (log scale from 1)</text><text x=\"10\" y=\"{m}\">100%</text>\n",
        h - m, w - m, h - m, h - m, w - m, h - m + 20.0
    );
    let x = |v: f64| m + (v.max(1.0).ln() / max.ln().max(1e-9)) * (w - 2.0 * m);
    for (i, (label, values)) in series.iter().enumerate() {
        let n = values.len().max(1) as f64;
        let step = (values.len() / 400).max(1);
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .step_by(step)
            .map(|(k, v)| {
                format!(
                    "{:.1},{:.1}",
                    x(*v),
                    (h - m) - (k as f64 + 1.0) / n * (h - 2.0 * m)
                )
            })
            .collect();
        let color = colors[i % colors.len()];
        out += &format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n<text x=\"{}\" y=\"{}\" fill=\"{color}\">{label}</text>\n",
            points.join(" "),
            w - m - 120.0,
            m + 20.0 + 16.0 * i as f64
        );
    }
    out + "</svg>\n"
}
