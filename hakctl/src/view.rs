//! The full-screen live view of `watch` and `run` on a terminal, drawn with
//! ratatui on crossterm: it fits 80x24 (one pane at a time, switched with
//! Tab or the digits) and shows every pane at once on a terminal of 160x48 or
//! more; it follows resizes. Keys: q (or Esc, Ctrl-C) quits, p or space
//! pauses the display, i switches between counts since attach and the last
//! interval, s sorts the probes (catalogue, count, rate), h picks the
//! histogram drawn as bars.
//!
//! The terminal is always given back: `Screen`'s drop leaves raw mode and the
//! alternate screen and shows the cursor on every way out of the loop (an
//! error's early return included), a panic hook does the same before the
//! panic message, and SIGTERM, SIGHUP and SIGINT end the loop like `q`
//! (`commands::Stop`).

use crate::report::{self, Report, HISTOGRAM_ROWS};
use anyhow::{Context, Result};
use hakmem_common::codes::*;
use hakmem_common::hist::{bucket_high, HIST_BUCKETS};
use hakmem_common::{Tally, PROBES};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::crossterm::{cursor, execute, terminal};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style, Stylize};
use ratatui::text::{Line, Span, Text};
use ratatui::widgets::{Block, Paragraph, Tabs, Wrap};
use ratatui::{DefaultTerminal, Frame};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Whether the terminal is in full-screen mode (for the panic hook).
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// The smallest terminal on which every pane is shown at once.
const WIDE: (u16, u16) = (160, 48);

/// The terminal in full-screen mode; dropping it gives the terminal back.
pub struct Screen {
    term: DefaultTerminal,
}

impl Screen {
    pub fn enter() -> Result<Screen> {
        install_panic_hook();
        terminal::enable_raw_mode().context("cannot put the terminal in raw mode")?;
        ACTIVE.store(true, Ordering::SeqCst);
        let entered = execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            cursor::Hide
        );
        let term = entered
            .and_then(|()| {
                ratatui::Terminal::new(ratatui::backend::CrosstermBackend::new(std::io::stdout()))
            })
            .map_err(|e| {
                restore();
                anyhow::anyhow!("cannot draw on the terminal: {e}")
            })?;
        Ok(Screen { term })
    }

    pub fn draw(&mut self, view: &View, r: &Report) -> Result<()> {
        self.draw_with(|f| view.render(f, r))
    }

    pub fn draw_with(&mut self, render: impl FnOnce(&mut Frame)) -> Result<()> {
        self.term
            .draw(render)
            .context("cannot draw on the terminal")?;
        Ok(())
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore();
    }
}

/// Leaves raw mode and the alternate screen and shows the cursor, once.
fn restore() {
    if ACTIVE.swap(false, Ordering::SeqCst) {
        let _ = terminal::disable_raw_mode();
        let _ = execute!(
            std::io::stdout(),
            cursor::Show,
            terminal::LeaveAlternateScreen
        );
    }
}

fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
    });
}

/// The keys that quit every full-screen view: q, Esc, Ctrl-C.
pub fn is_quit(key: &ratatui::crossterm::event::KeyEvent) -> bool {
    match key.code {
        KeyCode::Char('c') => key.modifiers.contains(KeyModifiers::CONTROL),
        KeyCode::Char('q') | KeyCode::Esc => true,
        _ => false,
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pane {
    Stages,
    Probes,
    Funnel,
    Memory,
    Histograms,
}

const PANES: [Pane; 5] = [
    Pane::Stages,
    Pane::Probes,
    Pane::Funnel,
    Pane::Memory,
    Pane::Histograms,
];

impl Pane {
    fn title(self) -> &'static str {
        match self {
            Pane::Stages => "Stages",
            Pane::Probes => "Probes",
            Pane::Funnel => "Funnel & failures",
            Pane::Memory => "Memory",
            Pane::Histograms => "Histograms",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Sort {
    Catalogue,
    Count,
    Rate,
}

/// What the person at the terminal chose: the pane, paused or not, since
/// attach or the last interval, the probes' order, the histogram drawn.
#[derive(Debug)]
pub struct View {
    pane: Pane,
    pub paused: bool,
    recent: bool,
    sort: Sort,
    histogram: usize,
}

impl Default for View {
    fn default() -> View {
        View {
            pane: Pane::Stages,
            paused: false,
            recent: false,
            sort: Sort::Catalogue,
            // Stage 1's acquire latency: the first row that fills without --drains.
            histogram: 2,
        }
    }
}

/// What a key asked for.
#[derive(PartialEq, Eq, Debug)]
pub enum Asked {
    Nothing,
    Redraw,
    Quit,
}

impl View {
    /// Reads every pending terminal event without waiting.
    pub fn read_keys(&mut self) -> Result<Asked> {
        let mut asked = Asked::Nothing;
        while event::poll(Duration::ZERO).context("reading the terminal")? {
            match self.on(event::read().context("reading the terminal")?) {
                Asked::Quit => return Ok(Asked::Quit),
                Asked::Redraw => asked = Asked::Redraw,
                Asked::Nothing => {}
            }
        }
        Ok(asked)
    }

    fn on(&mut self, ev: Event) -> Asked {
        let key = match ev {
            Event::Resize(..) => return Asked::Redraw,
            Event::Key(k) if k.kind != KeyEventKind::Release => k,
            _ => return Asked::Nothing,
        };
        let at = PANES.iter().position(|&p| p == self.pane).unwrap_or(0);
        if is_quit(&key) {
            return Asked::Quit;
        }
        match key.code {
            KeyCode::Char('p') | KeyCode::Char(' ') => self.paused = !self.paused,
            KeyCode::Char('i') => self.recent = !self.recent,
            KeyCode::Tab | KeyCode::Right => self.pane = PANES[(at + 1) % PANES.len()],
            KeyCode::BackTab | KeyCode::Left => {
                self.pane = PANES[(at + PANES.len() - 1) % PANES.len()]
            }
            KeyCode::Char(d @ '1'..='5') => self.pane = PANES[d as usize - '1' as usize],
            KeyCode::Char('s') => {
                self.sort = match self.sort {
                    Sort::Catalogue => Sort::Count,
                    Sort::Count => Sort::Rate,
                    Sort::Rate => Sort::Catalogue,
                }
            }
            KeyCode::Char('h') => self.histogram = (self.histogram + 1) % HISTOGRAM_ROWS.len(),
            _ => return Asked::Nothing,
        }
        Asked::Redraw
    }

    fn render(&self, f: &mut Frame, r: &Report) {
        let area = f.area();
        let [header, body, footer] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Min(0),
            Constraint::Length(1),
        ])
        .areas(area);
        let shown = Shown::of(self, r);
        f.render_widget(Paragraph::new(self.header(r, &shown)), header);
        f.render_widget(Paragraph::new(self.footer()).dim(), footer);
        if area.width >= WIDE.0 && area.height >= WIDE.1 {
            self.render_all(f, body, r, &shown);
        } else {
            let [tabs, pane] =
                Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).areas(body);
            let titles = PANES
                .iter()
                .enumerate()
                .map(|(i, p)| format!("{} {}", i + 1, p.title()));
            let at = PANES.iter().position(|&p| p == self.pane).unwrap_or(0);
            f.render_widget(
                Tabs::new(titles)
                    .select(at)
                    .highlight_style(Style::new().reversed())
                    .divider("|")
                    .padding("", ""),
                tabs,
            );
            self.render_pane(f, pane, self.pane, r, &shown);
        }
    }

    /// Every pane at once: stages and probes, funnel and histograms, memory.
    fn render_all(&self, f: &mut Frame, body: Rect, r: &Report, shown: &Shown) {
        let [top, middle, bottom] = Layout::vertical([
            Constraint::Length(PROBES.len() as u16 + 3),
            Constraint::Length(TINY_CLASSES as u16 + 8),
            Constraint::Min(0),
        ])
        .areas(body);
        let halves = |row: Rect| {
            Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)])
                .areas::<2>(row)
        };
        let [a, b] = halves(top);
        let [c, d] = halves(middle);
        self.render_pane(f, a, Pane::Stages, r, shown);
        self.render_pane(f, b, Pane::Probes, r, shown);
        self.render_pane(f, c, Pane::Funnel, r, shown);
        self.render_pane(f, d, Pane::Histograms, r, shown);
        self.render_pane(f, bottom, Pane::Memory, r, shown);
    }

    fn render_pane(&self, f: &mut Frame, area: Rect, pane: Pane, r: &Report, shown: &Shown) {
        let text = match pane {
            Pane::Stages => stages(shown.tally),
            Pane::Probes => self.probes(r, shown),
            Pane::Funnel => funnel(shown.tally),
            Pane::Memory => memory(r, shown.tally),
            Pane::Histograms => self.histograms(r, shown),
        };
        let mut block = Block::bordered().title(format!(" {} ", pane.title()));
        if pane == self.pane {
            block = block.border_style(Style::new().bold());
        }
        f.render_widget(
            Paragraph::new(text).block(block).wrap(Wrap { trim: false }),
            area,
        );
    }

    fn header(&self, r: &Report, shown: &Shown) -> Line<'static> {
        let mut spans = vec![
            Span::from(format!("hakctl {} ", r.kind)).bold(),
            Span::from(format!("pid {} ({})  {}", r.pid, r.process, shown.span)),
        ];
        if self.paused {
            spans.push(Span::from("  PAUSED").reversed());
        }
        if r.target_exited {
            spans.push(Span::from("  target exited").reversed());
        }
        Line::from(spans)
    }

    fn footer(&self) -> Line<'static> {
        let counts = if self.recent {
            "since attach"
        } else {
            "last interval"
        };
        Line::from(format!(
            "q quit  p pause  i {counts}  Tab pane  s sort ({})  h histogram",
            match self.sort {
                Sort::Catalogue => "by probe",
                Sort::Count => "by count",
                Sort::Rate => "by rate",
            }
        ))
    }

    fn probes(&self, r: &Report, shown: &Shown) -> Text<'static> {
        let rate = |id| {
            r.interval
                .as_ref()
                .map(|(d, secs)| d.tally.probe(id) as f64 / secs)
        };
        let mut probes: Vec<_> = PROBES.iter().collect();
        match self.sort {
            Sort::Catalogue => {}
            Sort::Count => probes.sort_by_key(|p| std::cmp::Reverse(shown.tally.probe(p.id))),
            Sort::Rate => probes.sort_by(|a, b| {
                rate(b.id)
                    .unwrap_or(0.0)
                    .total_cmp(&rate(a.id).unwrap_or(0.0))
            }),
        }
        let mut lines = vec![header_line(format!(
            "{:<18} {:>12} {:>12}",
            "PROBE", "COUNT", "RATE/s"
        ))];
        for p in probes {
            let row = if !r.attached(p.id) {
                format!("{:<18} {:>12} {:>12}", p.name, "off", "--drains")
            } else {
                let rate = rate(p.id).map_or("-".into(), |v| format!("{v:.0}"));
                format!("{:<18} {:>12} {rate:>12}", p.name, shown.tally.probe(p.id))
            };
            lines.push(Line::from(row));
        }
        Text::from(lines)
    }

    fn histograms(&self, r: &Report, shown: &Shown) -> Text<'static> {
        let mut lines = vec![header_line(format!(
            "{:<19} {:>8} {:>7} {:>7} {:>7} {:>8}",
            "HISTOGRAM", "COUNT", "P50", "P90", "P99", "MAX"
        ))];
        for (i, (name, row, probe)) in HISTOGRAM_ROWS.iter().enumerate() {
            let mark = if i == self.histogram { ">" } else { " " };
            if !r.attached(*probe) {
                lines.push(Line::from(format!("{mark}{name:<18} {:>8}", "off")));
                continue;
            }
            let p = report::percentiles(&shown.hists[*row as usize]);
            lines.push(Line::from(format!(
                "{mark}{name:<18} {:>8} {:>7} {:>7} {:>7} {:>8}",
                p.count, p.p50, p.p90, p.p99, p.max
            )));
        }
        let (name, row, _) = HISTOGRAM_ROWS[self.histogram];
        lines.push(Line::from(format!("{name}, values up to (h: next):")).bold());
        lines.extend(
            histogram_bars(&shown.hists[row as usize], 36)
                .into_iter()
                .map(Line::from),
        );
        Text::from(lines)
    }
}

/// The counts and histograms on screen: since attach, or of the last interval.
struct Shown<'a> {
    tally: &'a Tally,
    hists: &'a [[u64; HIST_BUCKETS]],
    span: String,
}

impl<'a> Shown<'a> {
    fn of(view: &View, r: &'a Report) -> Shown<'a> {
        match (&r.interval, view.recent) {
            (Some((d, secs)), true) => Shown {
                tally: &d.tally,
                hists: &d.hists,
                span: format!("last {secs:.1}s of {:.1}s", r.elapsed),
            },
            _ => Shown {
                tally: &r.total.tally,
                hists: &r.total.hists,
                span: format!("since attach, {:.1}s", r.elapsed),
            },
        }
    }
}

fn header_line(s: String) -> Line<'static> {
    Line::from(s).add_modifier(Modifier::BOLD)
}

fn stages(t: &Tally) -> Text<'static> {
    let mut lines = vec![header_line(format!(
        "{:>5} {:>5} {:>8} {:>8} {:>7} {:>6} {:>6}  STAGE1",
        "CLASS", "SIZE", "STAGE1", "STAGE2", "STAGE3", "LEGACY", "%"
    ))];
    let (mut all, mut s1) = (0, 0);
    for (c, size) in TINY_CLASS_SIZES.iter().enumerate() {
        let (s, fails) = report::stage_counts(t, c);
        let requests = s.iter().sum::<u64>() + fails;
        (all, s1) = (all + requests, s1 + s[0]);
        let share = report::ratio(s[0], requests);
        lines.push(Line::from(format!(
            "{c:>5} {size:>5} {:>8} {:>8} {:>7} {fails:>6} {:>5.1}%  {}",
            s[0],
            s[1],
            s[2],
            share * 100.0,
            report::bar(share, 12)
        )));
    }
    lines.push(Line::from(format!(
        "  all: {s1} of {all} slab requests from Stage 1 ({:.1}%)",
        report::ratio(s1, all) * 100.0
    )));
    Text::from(lines)
}

fn funnel(t: &Tally) -> Text<'static> {
    let mut lines = vec![header_line(format!(
        "{:>5} {:>8} {:>9} {:>11} {:>13} {:>7}",
        "CLASS", "EMPTY", "RELEASED", "SKIP_ACTIVE", "SKIP_DISABLED", "REUSED"
    ))];
    let mut sums = [0u64; 3];
    for c in 0..TINY_CLASSES {
        let row = [
            t.recycle(c, RecycleOutcome::Empty),
            t.recycle(c, RecycleOutcome::Released),
            t.acquire(c, 1),
        ];
        sums.iter_mut().zip(row).for_each(|(s, v)| *s += v);
        lines.push(Line::from(format!(
            "{c:>5} {:>8} {:>9} {:>11} {:>13} {:>7}",
            row[0],
            row[1],
            t.recycle(c, RecycleOutcome::SkipActive),
            t.recycle(c, RecycleOutcome::SkipDisabled),
            row[2]
        )));
    }
    lines.push(Line::from(report::funnel_line(sums[0], sums[1], sums[2])));
    let fails: Vec<String> = (0..TINY_CLASSES)
        .filter(|&c| (0..REASONS).any(|r| t.shared_fail(c, r) > 0))
        .map(|c| format!("c{c} {}/{}", t.shared_fail(c, 0), t.shared_fail(c, 1)))
        .collect();
    lines.push(Line::from(format!(
        "shared_fail -> legacy (map_failed/budget): {}",
        if fails.is_empty() {
            "none".to_string()
        } else {
            fails.join(" ")
        }
    )));
    lines.push(Line::from(format!(
        "ace_fail: threshold {}  exhaustion {}  map_fail {}",
        t.ace_fail(AceFailKind::Threshold),
        t.ace_fail(AceFailKind::Exhaustion),
        t.ace_fail(AceFailKind::MapFail)
    )));
    Text::from(lines)
}

fn memory(r: &Report, t: &Tally) -> Text<'static> {
    let levels = match &r.memory {
        Some(m) => m.summary(),
        None => "MEMORY  not readable now\n".to_string(),
    };
    Text::from(format!("{levels}{}", report::os_memory(t).trim_start()))
}

/// A histogram's counts by power of two, as bars `width` cells long at most:
/// one line per range from the lowest to the highest holding a value.
fn histogram_bars(buckets: &[u64; HIST_BUCKETS], width: usize) -> Vec<String> {
    let mut ranges: Vec<(u64, u64)> = Vec::new(); // (upper bound, count)
    for (b, &n) in buckets.iter().enumerate() {
        let high = bucket_high(b);
        let top = if high == u64::MAX {
            u64::MAX
        } else {
            (high + 1).next_power_of_two() - 1
        };
        match ranges.last_mut() {
            Some(last) if last.0 == top => last.1 += n,
            _ => ranges.push((top, n)),
        }
    }
    let first = ranges.iter().position(|r| r.1 > 0);
    let last = ranges.iter().rposition(|r| r.1 > 0);
    let (Some(first), Some(last)) = (first, last) else {
        return vec!["  (no values yet)".into()];
    };
    let most = ranges[first..=last].iter().map(|r| r.1).max().unwrap_or(1);
    ranges[first..=last]
        .iter()
        .map(|&(top, n)| {
            let cells = ((n as f64 / most as f64) * width as f64).ceil() as usize;
            let top = if top == u64::MAX {
                "more".to_string()
            } else {
                top.to_string()
            };
            format!("{top:>12} {:<width$} {n}", "█".repeat(cells))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::crossterm::event::{KeyEvent, KeyEventState};

    fn key(code: KeyCode) -> Event {
        Event::Key(KeyEvent {
            code,
            modifiers: KeyModifiers::NONE,
            kind: KeyEventKind::Press,
            state: KeyEventState::NONE,
        })
    }

    #[test]
    fn keys_switch_panes_pause_sort_and_quit() {
        let mut v = View::default();
        assert_eq!(v.on(key(KeyCode::Tab)), Asked::Redraw);
        assert_eq!(v.pane, Pane::Probes);
        v.on(key(KeyCode::BackTab));
        v.on(key(KeyCode::BackTab));
        assert_eq!(v.pane, Pane::Histograms);
        v.on(key(KeyCode::Char('3')));
        assert_eq!(v.pane, Pane::Funnel);
        v.on(key(KeyCode::Char('p')));
        assert!(v.paused);
        v.on(key(KeyCode::Char(' ')));
        assert!(!v.paused);
        v.on(key(KeyCode::Char('s')));
        assert_eq!(v.sort, Sort::Count);
        assert_eq!(v.on(key(KeyCode::Char('x'))), Asked::Nothing);
        assert_eq!(v.on(Event::Resize(80, 24)), Asked::Redraw);
        assert_eq!(v.on(key(KeyCode::Char('q'))), Asked::Quit);
        let mut ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        ctrl_c.kind = KeyEventKind::Press;
        assert_eq!(v.on(Event::Key(ctrl_c)), Asked::Quit);
    }

    #[test]
    fn bars_cover_the_occupied_powers_of_two() {
        use hakmem_common::hist::bucket_of;
        let mut b = [0u64; HIST_BUCKETS];
        b[bucket_of(40)] += 10;
        b[bucket_of(50)] += 10; // same range as 40: 32..63
        b[bucket_of(300)] += 5;
        let bars = histogram_bars(&b, 20);
        // 63 (20 values), 127, 255 (empty), 511 (5 values).
        assert_eq!(bars.len(), 4, "{bars:?}");
        assert!(bars[0].trim_start().starts_with("63 ") && bars[0].ends_with(" 20"));
        assert_eq!(bars[0].matches('█').count(), 20);
        assert!(bars[1].ends_with(" 0") && !bars[1].contains('█'));
        assert_eq!(bars[3].matches('█').count(), 5);
        assert_eq!(histogram_bars(&[0; HIST_BUCKETS], 20).len(), 1);
    }
}
