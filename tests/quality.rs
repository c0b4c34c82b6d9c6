//! `retro-eval --quick` end to end (issue 5): the quality harness runs full, quest and retro on the
//! embedded SmolLM2 (teacher forcing over the long text, free generation, exposure) and writes a
//! JSON file whose shape and values are checked here. The default grid is `retro-eval` without
//! `--quick` (docs/quality.md).

mod common;

use std::process::Command;

use common::workspace_root;
use serde_json::Value;

#[test]
fn quick_grid_writes_sane_results() {
    let root = workspace_root();
    let model = common::smollm2_dir();
    assert!(root.join("models/text/in_the_year_2889.txt").is_file(), "run scripts/setup.sh (fetch-text)");
    let dir = std::env::temp_dir().join(format!("retro-eval-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("quality.json");
    let curves = dir.join("curves.json");
    let start = std::time::Instant::now();
    let status = Command::new(env!("CARGO_BIN_EXE_retro-eval"))
        .current_dir(&root)
        .args(["--quick", "--refresh-every", "8", "--model", model.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .args(["--curves", curves.to_str().unwrap()])
        .status()
        .expect("run retro-eval");
    assert!(status.success(), "retro-eval --quick failed");
    let secs = start.elapsed().as_secs_f64();
    assert!(secs < 300.0, "--quick must finish within 5 minutes, took {secs:.0} s");

    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["retro_w1_equals_quest"], Value::Bool(true), "retro with w = 1 must equal quest");
    let records = v["records"].as_array().expect("records");
    let find = |policy: &str, window: u64| {
        records
            .iter()
            .find(|r| r["policy"] == policy && r["window"] == window)
            .unwrap_or_else(|| panic!("no record for {policy} w={window}"))
    };
    assert_eq!(records.len(), 5, "full, quest, retro w=2, and both with refreshes every 8 steps, at 10%: {records:?}");
    for r in records {
        for field in ["policy", "budget", "window", "kl_mean", "ppl", "agree_tokens", "agree_answers", "exposure"] {
            assert!(r.get(field).is_some_and(|x| !x.is_null()), "{field} missing in {r}");
        }
        let kl = r["kl_mean"].as_f64().unwrap();
        let ppl = r["ppl"].as_f64().unwrap();
        assert!(kl.is_finite() && kl >= 0.0, "kl {kl}");
        assert!(ppl.is_finite() && ppl > 1.0 && ppl < 1000.0, "perplexity {ppl}");
        assert!(r["exposure"].as_f64().unwrap() >= 1.0, "exposure {r}");
        let agree = r["agree_answers"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&agree));
        assert_eq!(r["kl_segments"].as_array().unwrap().len(), 4);
        assert!(r["agree_tokens"].as_u64().unwrap() <= 64);
    }
    let full = find("full", 1);
    assert_eq!(full["kl_mean"].as_f64().unwrap(), 0.0, "full against itself");
    assert_eq!(full["agree_tokens"].as_u64().unwrap(), 64, "full agrees with itself");
    assert_eq!(full["agree_answers"].as_f64().unwrap(), 1.0);
    let quest = find("quest", 1);
    let retro = find("retro", 2);
    assert!(quest["kl_mean"].as_f64().unwrap() > 0.0, "a 10% budget must change something");
    assert!(retro["kl_mean"].as_f64().unwrap() > 0.0);
    assert!(retro["exposure"].as_f64().unwrap() > 1.0, "retro's rows see more than their own pages");
    // Refresh steps read every page once every 8 steps: at 10% that is about twice Quest's reads,
    // and they repair the decoded tokens' K/V, which must show in the KL.
    assert_eq!(quest["reads_vs_quest"].as_f64(), Some(1.0));
    for window in [1, 2] {
        let refresh = find("retro-refresh", window);
        assert_eq!(refresh["refresh_every"].as_u64(), Some(8));
        let reads = refresh["reads_vs_quest"].as_f64().unwrap();
        assert!(reads > 1.3 && reads < 3.0, "w={window}: refresh reads {reads}x quest's");
        let kl = refresh["kl_mean"].as_f64().unwrap();
        assert!(kl > 0.0 && kl < quest["kl_mean"].as_f64().unwrap(), "w={window}: refresh kl {kl} vs quest {}", quest["kl_mean"]);
    }
    // The same forced text for every policy: a sparse policy is not much better than full.
    let (pf, pq) = (full["ppl"].as_f64().unwrap(), quest["ppl"].as_f64().unwrap());
    assert!(pq >= pf * 0.9 && pq < pf * 20.0, "quest ppl {pq} vs full {pf}");

    let c: Value = serde_json::from_str(&std::fs::read_to_string(&curves).unwrap()).unwrap();
    let series = c["series"].as_array().unwrap();
    assert_eq!(series.len(), 5);
    assert!(series.iter().all(|s| s["kl"].as_array().unwrap().len() == 128));
    std::fs::remove_dir_all(&dir).ok();
}
