//! The allocator's own view of the heap, on `/metrics`: RSS alone cannot tell data the
//! controller holds (`allocated`) from pages the allocator keeps around it (`active`,
//! `resident`), which is what a "does memory grow with history?" question needs.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use tikv_jemalloc_ctl::{epoch, stats};

/// `pipeline_controller_heap_bytes{kind=...}` from jemalloc's statistics.
#[derive(Debug, Default)]
pub(crate) struct HeapStats;

impl Collector for HeapStats {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // The statistics are a snapshot taken at the last epoch advance.
        if epoch::advance().is_err() {
            return Ok(());
        }
        let readings = [
            ("allocated", stats::allocated::read()),
            ("active", stats::active::read()),
            ("resident", stats::resident::read()),
            ("metadata", stats::metadata::read()),
            ("retained", stats::retained::read()),
        ];
        let mut family = encoder.encode_descriptor(
            "heap_bytes",
            "The allocator's statistics: allocated (live data), active (the pages holding it), resident (all the heap's resident pages), metadata, retained (unmapped, kept for reuse)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (kind, reading) in readings {
            let Ok(bytes) = reading else { continue };
            let labels = [("kind", kind)];
            let gauge = ConstGauge::new(i64::try_from(bytes).unwrap_or(i64::MAX));
            gauge.encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::HeapStats;

    #[test]
    fn the_heap_statistics_are_rendered_with_live_data_below_the_pages_holding_it() {
        let kept: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 64 * 1024]).collect();
        let text = pipeline_core::Metrics::new()
            .with_collector(HeapStats)
            .render();
        let value = |kind: &str| -> u64 {
            let prefix = format!("pipeline_controller_heap_bytes{{kind=\"{kind}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .unwrap_or_else(|| panic!("no {kind} in:\n{text}"))
                .trim()
                .parse()
                .unwrap()
        };
        assert!(value("allocated") >= 4 * 1024 * 1024, "{text}");
        assert!(value("active") >= value("allocated"));
        assert!(value("resident") >= value("active"));
        drop(kept);
    }
}
