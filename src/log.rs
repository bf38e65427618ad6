//! Logging: `tracing` events, printed only when `TESSERA_LOG` is set (an
//! env-filter string such as `info` or `tessera=debug`). Off by default, and
//! a host process's own subscriber, if any, is never replaced.

use std::sync::OnceLock;

pub const LOG_ENV: &str = "TESSERA_LOG";

/// Installs a stderr subscriber once if `TESSERA_LOG` asks for one and none
/// is installed yet. Cheap to call again.
pub fn init() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let Ok(filter) = std::env::var(LOG_ENV) else { return };
        if filter.trim().is_empty() {
            return;
        }
        let filter = tracing_subscriber::EnvFilter::try_new(&filter)
            .unwrap_or_else(|e| {
                eprintln!("tessera: bad {LOG_ENV} '{filter}': {e}; using 'info'");
                tracing_subscriber::EnvFilter::new("info")
            });
        // try_init fails harmlessly when the host already set a global subscriber.
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    });
}
