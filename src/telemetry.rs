//! Telemetry: logs (`tracing` to stderr, filtered by `RUST_LOG`, default `info`; human lines on
//! a terminal, JSON lines otherwise or as `[telemetry] log_format` says) and OpenTelemetry
//! traces exported over OTLP/HTTP when `[telemetry] otlp_endpoint` is set.
//!
//! Traces: each source event gets a span whose trace and span ids are the ones its records
//! carry (`traceparent`), so a trace the SynapTask server started (`trace_id` of an ack) is
//! continued; each record gets a child span from its receipt to the last broker's
//! acknowledgement, and its messages' `traceparent` names that span, so a consumer that
//! continues the trace hangs its spans under it.

use std::io::IsTerminal;

use serde::Deserialize;
use tracing_subscriber::EnvFilter;

/// `[telemetry]`: where logs and traces go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/HTTP (protobuf) collector base URL, e.g. `http://otel-collector:4318`; spans are
    /// posted to `<url>/v1/traces`. Unset = no traces leave the process.
    pub otlp_endpoint: Option<String>,
    /// Fraction of traces exported (0.0..=1.0), decided by trace id so a trace is kept whole.
    pub sample_ratio: f64,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Log line format: `auto` (human on a terminal, JSON lines otherwise), `json` or `text`.
    pub log_format: LogFormat,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sample_ratio: 1.0,
            service_name: "taskstream".into(),
            log_format: LogFormat::Auto,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable on a terminal, JSON lines otherwise.
    #[default]
    Auto,
    /// JSON lines.
    Json,
    /// Human-readable.
    Text,
}

/// Crates whose debug and trace output includes raw handshakes or packets: the
/// `Authorization` header, the CONNECT auth payload, a `?token=` URL, broker credentials.
/// They are capped at `info` whatever `RUST_LOG` asks, so a secret can never reach a log line.
const SECRET_BEARING: &[&str] = &[
    "tungstenite",
    "tokio_tungstenite",
    "rust_socketio",
    "rust_engineio",
    "reqwest",
    "hyper",
    "hyper_util",
    "async_nats",
    "rdkafka",
];

/// The filter: `RUST_LOG` (default `info`) with the secret-bearing crates capped.
pub fn filter() -> EnvFilter {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    for target in SECRET_BEARING {
        // A static, well-formed directive; parsing cannot fail.
        if let Ok(d) = format!("{target}=info").parse() {
            filter = filter.add_directive(d);
        }
    }
    filter
}

/// Installs the global log subscriber once with the default format (`auto`, or
/// `TASKSTREAM_LOG_FORMAT=json|text`); later calls are no-ops.
pub fn init() {
    init_logs(LogFormat::Auto);
}

/// Installs the log subscriber in `format` (`auto`: JSON lines unless stderr is a terminal;
/// the variable `TASKSTREAM_LOG_FORMAT` decides `auto` where set). A no-op once installed.
pub fn init_logs(format: LogFormat) {
    let terminal = std::io::stderr().is_terminal();
    let format = match (format, std::env::var("TASKSTREAM_LOG_FORMAT").as_deref()) {
        (LogFormat::Auto, Ok("json")) => LogFormat::Json,
        (LogFormat::Auto, Ok("text")) => LogFormat::Text,
        (LogFormat::Auto, _) if terminal => LogFormat::Text,
        (LogFormat::Auto, _) => LogFormat::Json,
        (f, _) => f,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        // Colour codes only help a person at a terminal; in files and collectors they are noise.
        .with_ansi(terminal);
    let _ = if format == LogFormat::Json {
        // The current span's fields (the source name) on every line, flattened for log search.
        builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init()
    } else {
        builder.try_init()
    };
}

/// Installs logs and, when an OTLP endpoint is configured, the trace exporter.
pub fn init_with(cfg: &TelemetryConfig) -> Result<(), String> {
    init_logs(cfg.log_format);
    let Some(endpoint) = cfg.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) else {
        return Ok(());
    };
    if !(0.0..=1.0).contains(&cfg.sample_ratio) {
        return Err(format!(
            "telemetry.sample_ratio must be within 0.0..=1.0, not {}",
            cfg.sample_ratio
        ));
    }
    traces::install(endpoint, cfg)?;
    tracing::info!(
        endpoint = %crate::secret::redact_url(endpoint),
        sample_ratio = cfg.sample_ratio,
        "exporting traces over OTLP/HTTP"
    );
    Ok(())
}

/// Exports what the trace exporter still holds (at exit).
pub fn shutdown() {
    traces::shutdown();
}

pub use traces::{EventSpan, RecordSpan};

/// OpenTelemetry spans for source events and records (see the module docs).
pub mod traces {
    use std::sync::OnceLock;
    use std::time::SystemTime;

    use opentelemetry::trace::{
        Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags,
        TraceId, TraceState, Tracer as _, TracerProvider as _,
    };
    use opentelemetry::{Context, KeyValue};
    use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, Span};

    use super::TelemetryConfig;
    use crate::record::TraceContext;

    thread_local! {
        /// Ids the next span started on this thread takes (see [`Ids`]).
        static NEXT_IDS: std::cell::Cell<Option<(TraceId, SpanId)>> = const { std::cell::Cell::new(None) };
    }

    /// The SDK's random ids, except for an event span, which takes the ids its records'
    /// `traceparent` already carries (the SDK's span builder has no other way to set them).
    #[derive(Debug, Default)]
    struct Ids(opentelemetry_sdk::trace::RandomIdGenerator);

    impl opentelemetry_sdk::trace::IdGenerator for Ids {
        fn new_trace_id(&self) -> TraceId {
            NEXT_IDS
                .with(|n| n.get().map(|(t, _)| t))
                .unwrap_or_else(|| self.0.new_trace_id())
        }

        fn new_span_id(&self) -> SpanId {
            NEXT_IDS
                .with(|n| n.get().map(|(_, s)| s))
                .unwrap_or_else(|| self.0.new_span_id())
        }
    }

    static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();
    static TRACER: OnceLock<SdkTracer> = OnceLock::new();

    pub(super) fn install(endpoint: &str, cfg: &TelemetryConfig) -> Result<(), String> {
        use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
        let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(url)
            .with_timeout(std::time::Duration::from_secs(10))
            .with_headers(Default::default())
            .build()
            .map_err(|e| format!("OTLP exporter: {e}"))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_id_generator(Ids::default())
            // Decided by trace id, so a sampled trace keeps all its spans.
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                cfg.sample_ratio,
            ))))
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(cfg.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("taskstream");
        let _ = TRACER.set(tracer);
        let _ = PROVIDER.set(provider);
        Ok(())
    }

    pub(super) fn shutdown() {
        if let Some(p) = PROVIDER.get() {
            let _ = p.force_flush();
            let _ = p.shutdown();
        }
    }

    /// Whether spans are exported at all (checked before any span work on the hot path).
    pub fn enabled() -> bool {
        TRACER.get().is_some()
    }

    /// The trace and span ids of a `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
    fn ids(traceparent: &str) -> Option<(TraceId, SpanId)> {
        let mut parts = traceparent.split('-');
        let (_version, trace, span) = (parts.next()?, parts.next()?, parts.next()?);
        let trace = TraceId::from_hex(trace).ok()?;
        let span = SpanId::from_hex(span).ok()?;
        (trace != TraceId::INVALID && span != SpanId::INVALID).then_some((trace, span))
    }

    /// The span of one source event: its ids are those of the records' shared
    /// `traceparent`, so the records' spans hang under it.
    pub struct EventSpan {
        traceparent: String,
        span: Span,
    }

    impl std::fmt::Debug for EventSpan {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("EventSpan")
                .field("traceparent", &self.traceparent)
                .finish_non_exhaustive()
        }
    }

    impl EventSpan {
        /// Starts the span of an event whose records carry `trace`; `None` when tracing is
        /// off or the trace context is unusable.
        pub fn start(trace: &TraceContext, name: &'static str, source: &str) -> Option<Self> {
            let tracer = TRACER.get()?;
            let (trace_id, span_id) = ids(&trace.traceparent)?;
            // Starting a span is synchronous: the ids set here are taken by this span only.
            NEXT_IDS.with(|n| n.set(Some((trace_id, span_id))));
            let span = tracer
                .span_builder(name)
                .with_kind(SpanKind::Consumer)
                .with_attributes([
                    KeyValue::new("taskstream.source", source.to_string()),
                    KeyValue::new("taskstream.source_trace_id", trace.trace_id.clone()),
                ])
                .start_with_context(tracer, &Context::new());
            NEXT_IDS.with(|n| n.set(None));
            Some(Self {
                traceparent: trace.traceparent.clone(),
                span,
            })
        }

        /// Whether this span is the one of records carrying `trace`.
        pub fn is_for(&self, trace: &TraceContext) -> bool {
            self.traceparent == trace.traceparent
        }

        /// Starts the span of one record of this event, from `received` to its ack.
        pub fn record(&self, id: &str, kind: &str, received: SystemTime) -> Option<RecordSpan> {
            let tracer = TRACER.get()?;
            let parent = self.span.span_context();
            if !parent.is_sampled() {
                return None;
            }
            let cx = Context::new().with_remote_span_context(SpanContext::new(
                parent.trace_id(),
                parent.span_id(),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ));
            let span = tracer
                .span_builder("publish")
                .with_kind(SpanKind::Producer)
                .with_start_time(received)
                .with_attributes([
                    KeyValue::new("taskstream.record_id", id.to_string()),
                    KeyValue::new("taskstream.record_type", kind.to_string()),
                ])
                .start_with_context(tracer, &cx);
            let sc = span.span_context();
            let traceparent = format!("00-{}-{}-01", sc.trace_id(), sc.span_id());
            Some(RecordSpan { span, traceparent })
        }
    }

    impl Drop for EventSpan {
        fn drop(&mut self) {
            self.span.end();
        }
    }

    /// A record's span, from its receipt to the last broker's acknowledgement.
    pub struct RecordSpan {
        span: Span,
        /// The `traceparent` its messages carry: the trace, and this span as the parent.
        pub traceparent: String,
    }

    impl std::fmt::Debug for RecordSpan {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("RecordSpan")
                .field("traceparent", &self.traceparent)
                .finish_non_exhaustive()
        }
    }

    impl RecordSpan {
        /// Every sink acknowledged the record.
        pub fn acked(mut self) {
            self.span.set_status(Status::Ok);
            self.span.end();
        }

        /// A sink refused the record.
        pub fn failed(mut self, why: &str) {
            self.span.set_status(Status::error(why.to_string()));
            self.span.end();
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn traceparent_ids_parse_and_invalid_ones_are_refused() {
            let t = TraceContext::from_source("f3a12bc9e1d4");
            let (trace, _) = ids(&t.traceparent).unwrap();
            assert_eq!(trace.to_string(), "00000000000000000000f3a12bc9e1d4");
            assert!(ids("00-00000000000000000000000000000000-0000000000000001-01").is_none());
            assert!(ids("garbage").is_none());
        }
    }
}
