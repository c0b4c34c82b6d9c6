//! `GET /metrics`: the active KV policy's numbers and the paged KV pool, in Prometheus text format.

use std::fmt::Write;

use crate::policy::ServedPolicy;

/// The exposition text for `policy` (`None` without paged attention) and the KV pool's free blocks.
pub fn render(policy: Option<&dyn ServedPolicy>, free_kv_blocks: Option<usize>) -> String {
    let mut text = String::new();
    let mut family = |name: &str, help: &str, kind: &str, value: f64| {
        let _ = writeln!(text, "# HELP mistralrs_kv_{name} {help}\n# TYPE mistralrs_kv_{name} {kind}\nmistralrs_kv_{name} {value}");
    };
    if let Some(free) = free_kv_blocks {
        family("blocks_free", "Free blocks in the paged KV pool (prefix-cache entries count as free)", "gauge", free as f64);
    }
    if let Some(policy) = policy {
        for m in policy.metrics() {
            family(m.name, m.help, m.kind, m.value);
        }
        let _ = writeln!(
            text,
            "# HELP mistralrs_kv_policy_info The active KV policy\n# TYPE mistralrs_kv_policy_info gauge\nmistralrs_kv_policy_info{{policy=\"{}\"}} 1",
            policy.name()
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PolicyConfig;
    use crate::policy::PolicyKind;

    #[test]
    fn every_sample_has_help_and_type_and_parses_as_a_number() {
        let policy = PolicyConfig::new(PolicyKind::Retro).build();
        let text = render(Some(policy.as_ref()), Some(12));
        assert!(text.contains("mistralrs_kv_blocks_free 12\n"), "{text}");
        assert!(text.contains("mistralrs_kv_retro_output_cache_blocks_in_use 0\n"), "{text}");
        assert!(text.contains("mistralrs_kv_policy_info{policy=\"retro\"} 1"), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').expect("name value");
            let bare = name.split('{').next().unwrap();
            assert!(text.contains(&format!("# TYPE {bare} ")), "no TYPE for {bare}");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
