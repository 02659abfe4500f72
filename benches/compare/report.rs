//! The results table: one row per figure, one column per balancer (plus the
//! backend measured directly, as the ceiling), and amslb's ratio to the best peer.

use crate::peers::Kind;
use std::fmt::Write as _;

/// Which direction is good for a figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    /// More is better (req/s, MB/s).
    Higher,
    /// Less is better (latency, memory).
    Lower,
}

/// A column of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    /// wrk straight to a backend node, no balancer: the ceiling.
    Direct,
    /// Through a balancer.
    Peer(Kind),
}

/// The column order of the table (the baseline's only when it was run).
pub const COLUMNS: [Column; 5] = [
    Column::Direct,
    Column::Peer(Kind::Haproxy),
    Column::Peer(Kind::Nginx),
    Column::Peer(Kind::Amslb),
    Column::Peer(Kind::Baseline),
];

/// One cell of the table.
#[derive(Debug, Clone)]
pub enum Cell {
    /// A measured value.
    Value(f64),
    /// The balancer lacks the feature (yet); the reason goes in the notes.
    NotAvailable(String),
    /// The run failed; the reason goes in the notes.
    Error(String),
    /// Not measured for this column.
    Blank,
}

/// One row: a figure across columns.
pub struct Figure {
    /// Scenario number (the list in `benches/compare/scenarios.rs`).
    pub scenario: u8,
    /// Scenario number and what is measured, with the unit.
    pub label: String,
    /// Direction that is better.
    pub better: Better,
    /// Decimals to print.
    pub decimals: usize,
    /// Cells by column.
    pub cells: Vec<(Column, Cell)>,
}

impl Figure {
    fn cell(&self, column: Column) -> Option<&Cell> {
        self.cells
            .iter()
            .find(|(c, _)| *c == column)
            .map(|(_, c)| c)
    }

    fn value(&self, column: Column) -> Option<f64> {
        match self.cell(column) {
            Some(Cell::Value(v)) if v.is_finite() => Some(*v),
            _ => None,
        }
    }

    /// amslb's value divided by the best peer's (HAProxy or nginx).
    pub fn ratio(&self) -> Option<f64> {
        let amslb = self.value(Column::Peer(Kind::Amslb))?;
        let peers = [Kind::Haproxy, Kind::Nginx]
            .into_iter()
            .filter_map(|k| self.value(Column::Peer(k)));
        let best = match self.better {
            Better::Higher => peers.fold(None, |b: Option<f64>, v| Some(b.map_or(v, |b| b.max(v)))),
            Better::Lower => peers.fold(None, |b: Option<f64>, v| Some(b.map_or(v, |b| b.min(v)))),
        }?;
        (best > 0.0).then(|| amslb / best)
    }

    /// amslb's value divided by the baseline build's.
    pub fn before_after(&self) -> Option<f64> {
        let amslb = self.value(Column::Peer(Kind::Amslb))?;
        let before = self.value(Column::Peer(Kind::Baseline))?;
        (before > 0.0).then(|| amslb / before)
    }
}

/// The whole report.
#[derive(Default)]
pub struct Report {
    /// Rows in scenario order.
    pub figures: Vec<Figure>,
    /// Free-form remarks (threads, checks, warnings).
    pub notes: Vec<String>,
}

impl Report {
    /// Renders the table and, below it, the reasons of every n/a and error cell.
    pub fn markdown(&self) -> String {
        let baseline = Column::Peer(Kind::Baseline);
        let with_baseline = self.figures.iter().any(|f| f.cell(baseline).is_some());
        let columns: Vec<Column> = COLUMNS
            .into_iter()
            .filter(|c| *c != baseline || with_baseline)
            .collect();
        let mut out = String::from("| figure |");
        for &column in &columns {
            let _ = write!(out, " {} |", name(column));
        }
        out += " amslb ÷ best peer |";
        if with_baseline {
            out += " amslb ÷ before |";
        }
        out += "\n|---|";
        out += &"---:|".repeat(columns.len() + 1 + usize::from(with_baseline));
        out += "\n";
        let mut reasons = Vec::new();
        for figure in &self.figures {
            let arrow = match figure.better {
                Better::Higher => "↑",
                Better::Lower => "↓",
            };
            let _ = write!(out, "| {} {arrow} |", figure.label);
            for &column in &columns {
                let (text, reason) = match figure.cell(column) {
                    Some(Cell::Value(v)) if v.is_finite() => {
                        (format!("{v:.*}", figure.decimals), None)
                    }
                    Some(Cell::NotAvailable(why)) => {
                        ("n/a".to_string(), Some(format!("n/a ({why})")))
                    }
                    Some(Cell::Error(why)) => ("error".to_string(), Some(format!("error: {why}"))),
                    _ => ("–".to_string(), None),
                };
                if let Some(reason) = reason {
                    let line = format!("{}, scenario {}: {reason}", name(column), figure.scenario);
                    if !reasons.contains(&line) {
                        reasons.push(line);
                    }
                }
                let _ = write!(out, " {text} |");
            }
            let mut ratios = vec![figure.ratio()];
            if with_baseline {
                ratios.push(figure.before_after());
            }
            for ratio in ratios {
                match ratio {
                    Some(r) => {
                        let _ = write!(out, " {r:.2} |");
                    }
                    None => out += " – |",
                }
            }
            out += "\n";
        }
        out += "\n↑ higher is better, ↓ lower is better; the ratio is amslb's figure \
                divided by the best of HAProxy and nginx (so for ↓ rows, below 1 is better); \
                \"amslb ÷ before\", when an older build ran as \"amslb before\" \
                (`AMSLB_BASELINE`), is amslb's figure divided by that build's. \
                \"balancer CPU\" rows: user + system CPU time of the balancer (all its threads \
                and processes, `/proc/<pid>/stat`) during the measured run above them, divided \
                by the requests answered or the GB (10^9 bytes) delivered in it; on a shared \
                machine the balancer that needs less CPU per request leaves more to the rest.\n";
        for line in reasons.iter().chain(&self.notes) {
            let _ = writeln!(out, "- {line}");
        }
        out
    }
}

fn name(column: Column) -> &'static str {
    match column {
        Column::Direct => "backend direct",
        Column::Peer(kind) => kind.name(),
    }
}
