//! The HTML. Every value goes through maud's escaping (`(value)`), attributes included;
//! links are rendered only for web addresses ([`crate::view::web_link`]).

use chrono::{DateTime, Duration, Utc};
use maud::{DOCTYPE, Markup, html};
use pipeline_core::insights::{EnvironmentInsights, PipelineInsights};
use pipeline_core::{Phase, PipelineRef, PromotionRecord};

use crate::charts::{bars, duration};
use crate::view::{Filter, Row, web_link};

/// A whole page around `main`, whose content `fragment` (a URL) serves alone for live
/// updates.
pub fn layout(title: &str, fragment: &str, version: u64, main: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · pipeline-controller" }
                link rel="stylesheet" href=(crate::CSS_PATH);
                script src=(crate::JS_PATH) defer {}
                // Without JavaScript the page reloads itself now and then instead.
                noscript { meta http-equiv="refresh" content="30"; }
            }
            body {
                header class="top" {
                    a href="/" class="brand" { "pipeline-controller" }
                    span class="live-indicator" title="live updates" { }
                }
                main id="live" data-fragment=(fragment) data-version=(version) {
                    (main)
                }
            }
        }
    }
}

fn ago(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let seconds = (now - at).num_seconds().max(0) as f64;
    format!("{} ago", duration(seconds))
}

fn phase_class(phase: Phase) -> &'static str {
    match phase {
        Phase::Succeeded => "ok",
        Phase::Failed | Phase::Rejected => "bad",
        Phase::WaitingApproval => "wait",
        Phase::Pending | Phase::Running => "busy",
        Phase::Superseded => "unknown",
    }
}

pub fn pipeline_href(pipeline: &PipelineRef) -> String {
    format!(
        "/ui/pipelines/{}/{}",
        crate::path_segment(&pipeline.namespace),
        crate::path_segment(&pipeline.name)
    )
}

/// The overview's content: the filter form and one row of lanes per pipeline.
pub fn overview(rows: &[Row], filter: &Filter, total: usize, now: DateTime<Utc>) -> Markup {
    html! {
        form class="filter" method="get" action="/" {
            label { "namespace " input type="text" name="namespace" value=(filter.namespace); }
            label { "name " input type="text" name="name" value=(filter.name); }
            button type="submit" { "filter" }
            @if !filter.namespace.is_empty() || !filter.name.is_empty() {
                a href="/" { "clear" }
            }
        }
        p class="summary" { (rows.len()) " of " (total) " pipelines, most recent activity first" }
        @if rows.is_empty() { p class="empty" { "No pipeline matches." } }
        @for row in rows {
            section class="pipeline" data-pipeline=(row.pipeline.to_string()) {
                h2 {
                    a href=(pipeline_href(&row.pipeline)) { (row.pipeline.namespace) "/" strong { (row.pipeline.name) } }
                    @if let Some(at) = row.last_activity { span class="activity" { "last activity " (ago(at, now)) } }
                }
                div class="lanes" {
                    @for lane in &row.lanes {
                        div class="lane" data-environment=(lane.environment) {
                            h3 { (lane.environment) }
                            p class="running" {
                                @if let Some((revision, evidence)) = &lane.running {
                                    code class="revision" title=(evidence.describe()) { (revision) }
                                } @else {
                                    span class="none" { "no revision known" }
                                }
                            }
                            p class={ "health " (lane.health.class()) } title=[lane.health.detail()] {
                                (lane.health.label())
                                @if let Some(detail) = lane.health.detail() { span class="detail" { ": " (detail) } }
                            }
                            @if let Some((revision, phase)) = &lane.in_flight {
                                p class="inflight busy" { "promoting " code { (revision) } " (" (phase) ")" }
                            }
                            @if let Some((link, revision)) = &lane.pull_request {
                                p class="pr" { a href=(link) rel="noreferrer" { "pull request" } " for " code { (revision) } }
                            }
                            @for waiting in &lane.waiting {
                                div class="waiting wait" data-revision=(waiting.revision) {
                                    p { "waiting for approval: " code { (waiting.revision) } " since " (ago(waiting.since, now)) }
                                    pre class="command" { code { (waiting.command) } }
                                    button type="button" class="copy" data-copy=(waiting.command) { "copy" }
                                }
                            }
                            @if let Some((_, revision, message)) = &lane.failed {
                                div class="failed bad" {
                                    p { "promotion of " code { (revision) } " failed" }
                                    p class="message" { (message) }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Records of one page of the timeline, newest first.
pub struct Timeline<'a> {
    pub records: &'a [PromotionRecord],
    pub page: usize,
    pub pages: usize,
    pub total: usize,
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    })
}

fn last<T: Clone>(items: &[T], n: usize) -> &[T] {
    &items[items.len().saturating_sub(n)..]
}

fn figures(env: &EnvironmentInsights, now: DateTime<Utc>) -> Markup {
    let per_day = env.deployments_per_day(now, Duration::days(7));
    html! {
        tr data-environment=(env.environment) {
            th { (env.environment) }
            td { (format!("{per_day:.2}")) }
            td { (env.deployments.iter().filter(|(at, _)| *at > now - Duration::days(30)).count()) }
            td { @if let Some(rate) = env.failure_rate() { (format!("{:.0} %", rate * 100.0)) " (" (env.failed) "/" (env.failed + env.succeeded) ")" } @else { "–" } }
            td { @if let Some(m) = median(env.approval_waits.iter().map(|(_, s)| *s).collect()) { (duration(m)) } @else { "–" } }
            td { @if let Some(m) = median(env.recoveries.iter().map(|(_, s)| *s).collect()) { (duration(m)) } @else { "–" } }
            td { @if let Some(since) = env.waiting_since { (ago(since, now)) } @else { "–" } }
        }
    }
}

fn insights_section(insights: &PipelineInsights, now: DateTime<Utc>) -> Markup {
    let days = 14;
    html! {
        section class="insights" {
            h2 { "Delivery insights" }
            table class="figures" {
                thead { tr {
                    th { "environment" } th { "deployments / day (7 d)" } th { "deployments (30 d)" }
                    th { "failure rate" } th { "median approval wait" } th { "median time to recover" } th { "waiting now" }
                } }
                tbody { @for env in &insights.environments { (figures(env, now)) } }
            }
            @let leads: Vec<(String, f64)> = last(&insights.lead_times, 20).iter().map(|l| (l.revision.clone(), l.seconds)).collect();
            div class="charts" {
                (bars("lead time, first to last environment (last 20 revisions)", &leads, duration))
                @for env in &insights.environments {
                    @let daily: Vec<(String, f64)> = env.daily_deployments(now, days).iter().enumerate().map(|(i, n)| {
                        let day = (now - Duration::days((days - 1 - i) as i64)).format("%Y-%m-%d").to_string();
                        (day, *n as f64)
                    }).collect();
                    (bars(&format!("{}: deployments per day (14 d)", env.environment), &daily, |n| format!("{n:.0}")))
                    @if !env.approval_waits.is_empty() {
                        @let waits: Vec<(String, f64)> = last(&env.approval_waits, 20).iter().map(|(at, s)| (at.format("%Y-%m-%d %H:%M").to_string(), *s)).collect();
                        (bars(&format!("{}: approval wait", env.environment), &waits, duration))
                    }
                    @if !env.recoveries.is_empty() {
                        @let recoveries: Vec<(String, f64)> = last(&env.recoveries, 20).iter().map(|(at, s)| (at.format("%Y-%m-%d %H:%M").to_string(), *s)).collect();
                        (bars(&format!("{}: time to recover", env.environment), &recoveries, duration))
                    }
                }
            }
        }
    }
}

fn record_item(record: &PromotionRecord, now: DateTime<Utc>) -> Markup {
    html! {
        li class="record" id=(record.id) data-revision=(record.revision) {
            div class="record-head" {
                span class={ "phase " (phase_class(record.phase)) } { (record.phase) }
                " " code class="revision" { (record.revision) }
                " " (record.source_environment) " → " (record.target_environment)
                span class="when" title=(record.created_at.to_rfc3339()) { " recorded " (ago(record.created_at, now)) }
            }
            dl {
                dt { "attempts" } dd { (record.attempts) }
                dt { "trigger" } dd {
                    (record.trigger.source)
                    @if !record.trigger.reason.is_empty() { " · " (record.trigger.reason) }
                    @if !record.trigger.reporting_controller.is_empty() { " · " (record.trigger.reporting_controller) }
                    @if !record.trigger.object.is_empty() { " · " (record.trigger.object) }
                    @if !record.trigger.cluster.is_empty() { " · cluster " (record.trigger.cluster) }
                }
                @if let Some(result) = &record.result {
                    dt { "result" } dd {
                        @if let Some(link) = web_link(result) { a href=(link) rel="noreferrer" { (result) } } @else { (result) }
                    }
                }
                @if let Some(by) = &record.decided_by { dt { "decided by" } dd { (by) } }
                @if !record.message.is_empty() { dt { "message" } dd class="message" { (record.message) } }
                dt { "id" } dd { code { (record.id) } }
            }
            details {
                summary { "phase history (" (record.history.len()) ")" }
                ol class="history" {
                    @for change in &record.history {
                        li {
                            span class={ "phase " (phase_class(change.phase)) } { (change.phase) }
                            " " time datetime=(change.at.to_rfc3339()) { (change.at.format("%Y-%m-%d %H:%M:%S UTC")) }
                            " " (change.reason) ": " (change.message)
                        }
                    }
                }
            }
        }
    }
}

/// The pipeline page's content: insights, then the timeline page.
pub fn pipeline(
    reference: &PipelineRef,
    insights: &PipelineInsights,
    timeline: &Timeline<'_>,
    now: DateTime<Utc>,
) -> Markup {
    let href = pipeline_href(reference);
    html! {
        nav class="crumbs" { a href="/" { "all pipelines" } " / " (reference.namespace) " / " strong { (reference.name) } }
        (insights_section(insights, now))
        section class="timeline" {
            h2 { "Promotions (" (timeline.total) "), newest first" }
            @if timeline.records.is_empty() { p class="empty" { "No promotion recorded yet." } }
            ol class="records" {
                @for record in timeline.records { (record_item(record, now)) }
            }
            @if timeline.pages > 1 {
                nav class="pages" {
                    @if timeline.page > 1 { a rel="prev" href={ (href) "?page=" (timeline.page - 1) } { "← newer" } }
                    " page " (timeline.page) " of " (timeline.pages) " "
                    @if timeline.page < timeline.pages { a rel="next" href={ (href) "?page=" (timeline.page + 1) } { "older →" } }
                }
            }
        }
    }
}

/// A page for something that is not there, or could not be read.
pub fn message(text: &str) -> Markup {
    html! { p class="empty" { (text) } }
}
