//! Operational logs (`tracing`, on stderr): text or JSON lines
//! (`log_format`), and under systemd the level as a syslog priority prefix
//! (`<3>` error ... `<7>` debug) that the journal files each line under,
//! without a timestamp of our own (the journal adds its own). The audit
//! trail is not a log: it goes to stdout and its file (`daemon::audit`).

#![forbid(unsafe_code)]

use std::fmt;

use tracing::level_filters::LevelFilter;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

/// Whether stderr is the journal: systemd names the stream it connected
/// in JOURNAL_STREAM as `device:inode`.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    stream == format!("{}:{}", meta.dev(), meta.ino())
}

/// The syslog priority of a level, as sd-daemon(3) prefixes it.
fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

struct Prioritized<F>(F);

impl<S, N, F> FormatEvent<S, N> for Prioritized<F>
where
    F: FormatEvent<S, N>,
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// Installs the logger: `REAPER_LOG` (a level) over `default`.
pub fn init(default: LevelFilter, format: LogFormat) {
    let level = std::env::var("REAPER_LOG")
        .ok()
        .and_then(|v| v.parse::<LevelFilter>().ok())
        .unwrap_or(default);
    let journal = stderr_is_journal();
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_target(false)
        .with_ansi(!journal && std::io::IsTerminal::is_terminal(&std::io::stderr()));
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // The etcd client's HTTP/2 and gRPC layers log every frame at debug:
    // they get info at most, whatever REAPER_LOG says.
    let quiet = |level: LevelFilter| {
        let deps = level.min(LevelFilter::INFO);
        tracing_subscriber::filter::Targets::new()
            .with_default(level)
            .with_targets(
                ["h2", "hyper", "hyper_util", "tonic", "tower", "rustls"].map(|t| (t, deps)),
            )
    };
    match (format, journal) {
        (LogFormat::Json, _) => builder.json().finish().with(quiet(level)).init(),
        (LogFormat::Text, true) => {
            let format = tracing_subscriber::fmt::format()
                .with_target(false)
                .without_time();
            builder
                .event_format(Prioritized(format))
                .finish()
                .with(quiet(level))
                .init()
        }
        (LogFormat::Text, false) => builder.finish().with(quiet(level)).init(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn levels_map_to_syslog_priorities() {
        use tracing::Level;
        assert_eq!(super::priority(&Level::ERROR), 3);
        assert_eq!(super::priority(&Level::WARN), 4);
        assert_eq!(super::priority(&Level::INFO), 6);
        assert_eq!(super::priority(&Level::DEBUG), 7);
    }
}
