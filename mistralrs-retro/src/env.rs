//! Every environment variable mistralrs-retro reads or sets, declared in this one module (as
//! vLLM's `envs.py`) and read once, at start-up. Behaviour a user may want is a flag and a
//! policy-file key (`crate::config`); what is left here is upstream's own variable and two
//! diagnostics:
//!
//! | variable | what |
//! |---|---|
//! | `RING_CONFIG` | upstream's: the tensor-parallel rank's ring file (`server::tp`, docs/tp.md) |
//! | `RETRO_TRACE_DECODE=N` | for the first N decode steps, a line per layer and row with the sum and norm of the keys written, the query and the attention output (`policy::trace`) |
//! | `RETRO_STEP_TIMING=1` | where a decode step's time goes, averaged every 64 steps (`policy::step_timing`) |
//! | `HF_HUB_OFFLINE` | set to 1 by the engine: models are local paths, never fetched |

use std::ffi::OsString;
use std::sync::LazyLock;

pub const RING_CONFIG: &str = "RING_CONFIG";
pub const TRACE_DECODE: &str = "RETRO_TRACE_DECODE";
pub const STEP_TIMING: &str = "RETRO_STEP_TIMING";
pub const HF_HUB_OFFLINE: &str = "HF_HUB_OFFLINE";

/// The diagnostics the environment turns on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Diagnostics {
    /// Decode steps to trace (0: none).
    pub trace_decode_steps: usize,
    pub step_timing: bool,
    /// Values that could not be read, as `NAME=value: why`.
    pub ignored: Vec<String>,
}

impl Diagnostics {
    fn read(get: impl Fn(&str) -> Option<String>) -> Self {
        let mut d = Diagnostics::default();
        if let Some(v) = get(TRACE_DECODE) {
            match v.parse() {
                Ok(n) => d.trace_decode_steps = n,
                Err(_) => d.ignored.push(format!("{TRACE_DECODE}={v:?}: expected a number of decode steps")),
            }
        }
        match get(STEP_TIMING).as_deref() {
            None | Some("0") | Some("") => {}
            Some("1") => d.step_timing = true,
            Some(v) => d.ignored.push(format!("{STEP_TIMING}={v:?}: expected 1 (on) or 0")),
        }
        d
    }
}

static DIAGNOSTICS: LazyLock<Diagnostics> = LazyLock::new(|| Diagnostics::read(|name| std::env::var(name).ok()));

pub fn diagnostics() -> &'static Diagnostics {
    &DIAGNOSTICS
}

/// Read the diagnostics now and say which are on (and which values were ignored) in the log.
pub fn log_diagnostics() {
    let d = diagnostics();
    if d.trace_decode_steps > 0 {
        tracing::info!("{TRACE_DECODE}={}: tracing the first decode steps on stderr", d.trace_decode_steps);
    }
    if d.step_timing {
        tracing::info!("{STEP_TIMING}=1: decode step timing in the log every 64 steps (synchronizes the device twice a step)");
    }
    for why in &d.ignored {
        tracing::warn!("ignored {why}");
    }
}

/// The ring file upstream reads, if set.
pub fn ring_config() -> Option<OsString> {
    std::env::var_os(RING_CONFIG)
}

/// Keep upstream's loader off the network.
pub fn set_hub_offline() {
    std::env::set_var(HF_HUB_OFFLINE, "1");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diagnostics_parse_and_name_what_they_ignore() {
        let read = |pairs: &[(&str, &str)]| {
            let pairs: Vec<(String, String)> = pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
            Diagnostics::read(move |name| pairs.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()))
        };
        assert_eq!(read(&[]), Diagnostics::default());
        let on = read(&[(TRACE_DECODE, "3"), (STEP_TIMING, "1")]);
        assert_eq!((on.trace_decode_steps, on.step_timing, on.ignored.len()), (3, true, 0));
        let bad = read(&[(TRACE_DECODE, "all"), (STEP_TIMING, "yes")]);
        assert_eq!((bad.trace_decode_steps, bad.step_timing), (0, false));
        assert!(bad.ignored[0].contains("RETRO_TRACE_DECODE=\"all\""), "{:?}", bad.ignored);
        assert!(bad.ignored[1].contains("RETRO_STEP_TIMING=\"yes\""), "{:?}", bad.ignored);
    }
}
