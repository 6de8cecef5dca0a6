//! `spine bench` as its users run it: a benchmark beside its baseline in
//! one run, JSON on stdout, plots and report.json in the folder. The idle
//! benchmark here runs end to end at a tiny size (a real `spine serve` on
//! its own etcd and the raw server, each in its own process, plain and
//! TLS): the figures are not the point, the wiring is.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_spine");

#[test]
fn quick_run_writes_json_table_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["bench", "--quick", "--only", "sframe,idle", "--idle-devices", "20,40", "--idle-window", "1", "--json"])
        .arg("--out")
        .arg(dir.path())
        .output()
        .expect("run spine bench");
    assert!(out.status.success(), "spine bench: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let sections = report["sections"].as_array().unwrap();
    let ids: Vec<&str> = sections.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["sframe", "idle"], "{report}");

    // SFrame: each size's encrypt and decrypt beside the raw AEAD.
    let sframe = &sections[0]["rows"];
    for size in ["160", "1200", "12000"] {
        let enc = sframe.as_array().unwrap().iter().find(|r| r["name"] == format!("{size} B: SFrame encrypt")).unwrap();
        assert_eq!(enc["ratio_of"], "p50");
        assert!(enc["ratio"].as_f64().unwrap() > 0.0);
    }

    // Idle: Spine and raw tonic, plain and TLS, at both steps, each with
    // memory and CPU per device; and an aim for each transport.
    let idle = sections[1]["rows"].as_array().unwrap();
    for kind in ["raw tonic", "Spine"] {
        for tls in ["plain", "TLS"] {
            for n in [20, 40] {
                let name = format!("{kind}, {tls}, {n} devices");
                let row = idle.iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("no row {name}: {report}"));
                assert!(row["value"].as_f64().unwrap() >= 0.0, "{row}");
                assert_eq!(row["value_unit"], "KiB/device");
                assert!(row["rate"].as_f64().unwrap() >= 0.0, "{row}");
            }
        }
    }
    assert_eq!(sections[1]["aims"].as_array().unwrap().len(), 2);

    for f in ["report.json", "idle-memory.svg"] {
        assert!(dir.path().join(f).exists(), "{f} not written");
    }
    let svg = std::fs::read_to_string(dir.path().join("idle-memory.svg")).unwrap();
    assert!(svg.contains("spine, TLS") && svg.contains("raw tonic, plain"), "every series in the plot");

    // Without --json: the table.
    let out =
        Command::new(BIN).args(["bench", "--quick", "--only", "sframe"]).arg("--out").arg(dir.path()).output().unwrap();
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("SFrame per media frame") && table.contains("160 B: raw AEAD seal"), "{table}");

    // A benchmark that does not exist is refused, naming those that do.
    let out = Command::new(BIN).args(["bench", "--only", "nope"]).arg("--out").arg(dir.path()).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("there are: mls, sframe"));
}
