//! Small bar charts as inline SVG, drawn on the server: no script, no inline style
//! (presentation attributes only, which the Content-Security-Policy allows).

use maud::{Markup, html};

const WIDTH: f64 = 320.0;
const HEIGHT: f64 = 72.0;

/// A duration in seconds for people: 45 s, 12 min, 3.5 h, 2.1 d.
pub fn duration(seconds: f64) -> String {
    if seconds < 90.0 {
        format!("{seconds:.0} s")
    } else if seconds < 5400.0 {
        format!("{:.0} min", seconds / 60.0)
    } else if seconds < 172_800.0 {
        format!("{:.1} h", seconds / 3600.0)
    } else {
        format!("{:.1} d", seconds / 86_400.0)
    }
}

/// Bars for `values` (label, value), oldest first; `format` renders a value. An empty
/// series says so instead of drawing nothing.
pub fn bars(title: &str, values: &[(String, f64)], format: fn(f64) -> String) -> Markup {
    let max = values.iter().map(|(_, v)| *v).fold(0.0_f64, f64::max);
    let count = values.len().max(1) as f64;
    let slot = WIDTH / count;
    let bar = (slot * 0.8).max(1.0);
    html! {
        figure class="chart" {
            figcaption { (title) @if max > 0.0 { span class="max" { " (max " (format(max)) ")" } } }
            @if values.is_empty() {
                p class="empty" { "no data yet" }
            } @else {
                svg xmlns="http://www.w3.org/2000/svg" viewBox={ "0 0 " (WIDTH) " " (HEIGHT) } width=(WIDTH) height=(HEIGHT) role="img" aria-label=(title) {
                    line x1="0" y1=(HEIGHT - 0.5) x2=(WIDTH) y2=(HEIGHT - 0.5) stroke="#9aa5b1" stroke-width="1" {}
                    @for (i, (label, value)) in values.iter().enumerate() {
                        @let h = if max > 0.0 { (value / max) * (HEIGHT - 4.0) } else { 0.0 };
                        rect x=(format!("{:.1}", i as f64 * slot + (slot - bar) / 2.0)) y=(format!("{:.1}", HEIGHT - 1.0 - h)) width=(format!("{bar:.1}")) height=(format!("{:.1}", h.max(0.0))) fill="#3b82f6" {
                            title { (label) ": " (format(*value)) }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(45.0), "45 s");
        assert_eq!(duration(720.0), "12 min");
        assert_eq!(duration(3.5 * 3600.0), "3.5 h");
        assert_eq!(duration(3.0 * 86_400.0), "3.0 d");
    }

    #[test]
    fn labels_are_escaped_and_bars_scale() {
        let svg = bars(
            "lead time",
            &[("<b>1</b>".into(), 60.0), ("2".into(), 120.0)],
            duration,
        )
        .into_string();
        assert!(svg.contains("&lt;b&gt;1&lt;/b&gt;: 60 s"), "{svg}");
        assert!(!svg.contains("<b>"));
        assert!(
            svg.contains(r#"height="68.0""#),
            "the largest bar is full height: {svg}"
        );
        assert!(svg.contains(r#"height="34.0""#), "{svg}");
        assert!(
            bars("x", &[], duration)
                .into_string()
                .contains("no data yet")
        );
    }
}
