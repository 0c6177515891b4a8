//! The fleet view ships tested: the alert rules' unit tests (`promtool test rules`, synthetic
//! series for each alert firing and staying silent), and a real Prometheus (Debian's binary, on
//! loopback, its own temp folder and config) scraping a real agent (emulator over mTLS) answers
//! every expression of the Grafana dashboard with series, loads every rule, and evaluates each
//! without error over series that exist. Without the binaries the tests print "skipped: …".

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::util::{EICAR, World, wait_for};

fn packaging(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("packaging")
        .join(rel)
}

fn installed(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn alert_rules_pass_their_promtool_unit_tests() {
    if !installed("promtool") {
        println!("skipped: promtool not installed");
        return;
    }
    let dir = packaging("prometheus");
    for args in [
        &["check", "rules", "dropscan-alerts.yml"][..],
        &["test", "rules", "dropscan-alerts.test.yml"][..],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The `expr` of every rule in a Prometheus rules file (one-line or `|` block).
fn rule_exprs(yaml: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest != "|" {
            out.push(rest.to_string());
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let mut block = Vec::new();
        while let Some(next) = lines.peek() {
            if !next.trim().is_empty() && next.len() - next.trim_start().len() <= indent {
                break;
            }
            block.push(next.trim());
            lines.next();
        }
        out.push(block.join(" ").trim().to_string());
    }
    out
}

/// The metric names an expression reads.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
            i += 1;
        }
        let word = &expr[start..i];
        let is_metric =
            word.starts_with("dropscan_") || word.starts_with("process_") || word == "up";
        if is_metric && bytes.get(i) == Some(&b'{') && !names.iter().any(|n| n == word) {
            names.push(word.to_string());
        }
        if i == start {
            i += 1;
        }
    }
    names
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `GET path` on Prometheus' API → its JSON (HTTP/1.0: a plain body, closed at the end).
fn api(port: u16, path: &str) -> Option<Value> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (_, body) = out.split_once("\r\n\r\n")?;
    serde_json::from_str(body).ok()
}

/// An instant query: (status, result vector, error); None when Prometheus does not answer.
fn try_query(port: u16, expr: &str) -> Option<(String, Vec<Value>, String)> {
    let v = api(port, &format!("/api/v1/query?query={}", encode(expr)))?;
    let status = v["status"].as_str().unwrap_or("?").to_string();
    let result = v["data"]["result"].as_array().cloned().unwrap_or_default();
    let error = v["error"].as_str().unwrap_or("").to_string();
    Some((status, result, error))
}

fn query(port: u16, expr: &str) -> (String, Vec<Value>, String) {
    try_query(port, expr).unwrap_or_else(|| panic!("Prometheus did not answer the query {expr}"))
}

/// The Prometheus this test started; killed (by its own PID) when dropped.
struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scraping_an_agent_answers_every_dashboard_and_rule_expression() {
    if !installed("prometheus") {
        println!("skipped: prometheus not installed");
        return;
    }
    let mut w = World::quick().await;
    let agent_port = free_port();
    w.more_watches = format!("\n[metrics]\nlisten = \"127.0.0.1:{agent_port}\"\n");
    let agent = w.start_agent();
    w.drop_file("a.txt", b"clean");
    w.drop_file("b.com", EICAR);
    w.wait_placed(2, Duration::from_secs(30)).await;

    let prom_dir = w.dir.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let config = prom_dir.join("prometheus.yml");
    let rules = packaging("prometheus/dropscan-alerts.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: dropscan\n    static_configs:\n      - targets: ['127.0.0.1:{agent_port}']\n",
            rules = rules.display()
        ),
    )
    .unwrap();
    let prom_port = free_port();
    let log = std::fs::File::create(prom_dir.join("log")).unwrap();
    let _prometheus = Prometheus(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                prom_dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    // Enough scrapes for rates over 30 s (bounded: Prometheus starts in a second or two).
    let scraped = wait_for(Duration::from_secs(60), || {
        let (_, r, _) = try_query(prom_port, "count_over_time(up{job=\"dropscan\"}[1m]) >= 6")?;
        (!r.is_empty()).then_some(())
    })
    .await;
    assert!(
        scraped.is_some(),
        "Prometheus never scraped the agent: {:?}\n{}",
        api(prom_port, "/api/v1/targets"),
        std::fs::read_to_string(prom_dir.join("log")).unwrap_or_default()
    );

    // Every dashboard expression, with Grafana's variables as "all": series, no error.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(packaging("grafana/dropscan-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut exprs: Vec<String> = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["query"]["query"].as_str() {
            // label_values(SELECTOR, label) is Grafana's: its selector must find series.
            let inner = q.strip_prefix("label_values(").unwrap();
            exprs.push(inner[..inner.rfind(',').unwrap()].to_string());
        }
    }
    assert!(exprs.len() > 20, "{exprs:?}");
    let mut empty = Vec::new();
    for e in &exprs {
        let concrete = e
            .replace("$__rate_interval", "30s")
            .replace("$instance", ".+")
            .replace("$watch", ".+");
        let (status, result, error) = query(prom_port, &concrete);
        assert_eq!(status, "success", "{concrete}: {error}");
        if result.is_empty() {
            empty.push(concrete);
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard expressions without series: {empty:#?}"
    );

    // Every rule: its expression parses, each series it reads exists, and Prometheus evaluates
    // it without error.
    let rule_text = std::fs::read_to_string(&rules).unwrap();
    let rule_exprs = rule_exprs(&rule_text);
    assert_eq!(rule_exprs.len(), rule_text.matches("- alert:").count());
    for e in &rule_exprs {
        let (status, _, error) = query(prom_port, e);
        assert_eq!(status, "success", "{e}: {error}");
        for name in metric_names(e) {
            let (_, result, _) = query(prom_port, &format!("{name}{{job=\"dropscan\"}}"));
            assert!(!result.is_empty(), "{name} (read by {e}) has no series");
        }
    }
    let evaluated = wait_for(Duration::from_secs(30), || {
        let v = api(prom_port, "/api/v1/rules")?;
        let rules: Vec<Value> = v["data"]["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let all_ok = rules.len() == rule_exprs.len() && rules.iter().all(|r| r["health"] == "ok");
        all_ok.then_some(rules)
    })
    .await;
    assert!(
        evaluated.is_some(),
        "not every rule evaluated ok: {:#?}",
        api(prom_port, "/api/v1/rules")
    );
    // A healthy agent fires nothing.
    let (_, firing, _) = query(prom_port, "ALERTS{alertstate=\"firing\"}");
    assert!(firing.is_empty(), "{firing:#?}");
    agent.stop().await.0.unwrap();
}

#[test]
fn the_package_ships_the_rules_and_the_dashboard_under_usr_share_dropscan() {
    let manifest: toml::Table = include_str!("../Cargo.toml").parse().unwrap();
    let assets = manifest["package"]["metadata"]["deb"]["assets"]
        .as_array()
        .unwrap();
    for (source, dest) in [
        (
            "packaging/prometheus/dropscan-alerts.yml",
            "usr/share/dropscan/prometheus/",
        ),
        (
            "packaging/grafana/dropscan-dashboard.json",
            "usr/share/dropscan/grafana/",
        ),
    ] {
        assert!(
            assets
                .iter()
                .any(|a| a[0].as_str() == Some(source) && a[1].as_str() == Some(dest)),
            "{source} is not shipped in /{dest}: {assets:?}"
        );
        assert!(packaging("").parent().unwrap().join(source).is_file());
    }
}
