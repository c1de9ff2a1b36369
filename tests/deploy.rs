//! The deployment files keep the promises of `deploy/README.md`: every Kubernetes
//! manifest parses, the ConfigMap's `streams.toml` is a valid config equal in streams
//! and consumers to the repository's, probes and scrape annotations hit the ops port
//! the config listens on, the grace periods leave room for a graceful shutdown, the
//! KEDA triggers are exactly the config's consumers, the PodDisruptionBudget selects
//! the Deployment's pods, every referenced Secret and ConfigMap exists; and the
//! systemd unit is a hardened `Type=notify` service with a watchdog.
//!
//! No cluster and no systemd needed: the files are parsed and compared.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jetworker::Config;
use serde::Deserialize;
use serde_norway::Value;

/// What `Running::wait` may take past `worker.shutdown_grace`: up to 5s for handlers
/// cut short to hand their messages back, 5s to flush acks, 5s to drain the connection.
/// The orchestrator's kill timeout must be longer than grace + this.
const SHUTDOWN_OVERHEAD: Duration = Duration::from_secs(15);

/// What to do when the ConfigMap's config drifts from the repository's.
const SYNC_HINT: &str = "copy everything below [worker] of streams.toml into data.streams.toml of deploy/k8s/configmap.yaml (indented 4 spaces)";

/// Where the Deployment mounts the config, and where the systemd unit reads it.
const CONFIG_PATH: &str = "/etc/workers/streams.toml";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One YAML document of one manifest file.
struct Doc {
    file: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }

    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }
}

fn k8s_files() -> Vec<PathBuf> {
    let dir = repo().join("deploy/k8s");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    files
}

/// Every document of every `deploy/k8s/*.yaml`, empty documents skipped.
fn manifests() -> Vec<Doc> {
    let mut docs = Vec::new();
    for path in k8s_files() {
        let file = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let text = std::fs::read_to_string(&path).expect("read manifest");
        for (i, de) in serde_norway::Deserializer::from_str(&text).enumerate() {
            let value = Value::deserialize(de)
                .unwrap_or_else(|e| panic!("{file}: document {i} is not valid YAML: {e}"));
            if !value.is_null() {
                docs.push(Doc {
                    file: file.clone(),
                    value,
                });
            }
        }
    }
    docs
}

/// The one document of `kind`; fails when there is none or more than one.
fn only<'a>(docs: &'a [Doc], kind: &str) -> &'a Doc {
    let found: Vec<&Doc> = docs.iter().filter(|d| d.kind() == kind).collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind} in deploy/k8s, found {}",
        found.len()
    );
    found[0]
}

fn str_map(v: &Value) -> BTreeMap<String, String> {
    v.as_mapping()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

/// The workers container of the Deployment.
fn container(deployment: &Doc) -> &Value {
    let containers = seq(&deployment.value["spec"]["template"]["spec"]["containers"]);
    assert_eq!(
        containers.len(),
        1,
        "{}: one container expected",
        deployment.file
    );
    &containers[0]
}

/// The ConfigMap's `streams.toml`, parsed and validated as the worker would.
fn pod_config(docs: &[Doc], env: Vec<(String, String)>) -> Config {
    let cm = only(docs, "ConfigMap");
    let text = cm.value["data"]["streams.toml"]
        .as_str()
        .unwrap_or_else(|| panic!("{}: data.streams.toml missing", cm.file));
    Config::from_toml_with_env(text, Path::new("configmap.yaml:streams.toml"), env)
        .unwrap_or_else(|e| panic!("the ConfigMap's streams.toml is not a valid config:\n{e}"))
}

fn repo_config() -> Config {
    let path = repo().join("streams.toml");
    let text = std::fs::read_to_string(&path).expect("read streams.toml");
    Config::from_toml_with_env(&text, &path, std::iter::empty())
        .unwrap_or_else(|e| panic!("streams.toml is not a valid config:\n{e}"))
}

/// The container port a probe or annotation names (a port name or a number).
fn resolve_port(container: &Value, port: &Value) -> Option<u64> {
    if let Some(n) = port.as_u64() {
        return Some(n);
    }
    let name = port.as_str()?;
    if let Ok(n) = name.parse() {
        return Some(n);
    }
    seq(&container["ports"])
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .and_then(|p| p["containerPort"].as_u64())
}

#[test]
fn every_manifest_parses_and_the_kustomization_lists_them_all() {
    let docs = manifests();
    for d in &docs {
        assert!(
            d.value["apiVersion"].as_str().is_some() && !d.kind().is_empty(),
            "{}: a document without apiVersion/kind",
            d.file
        );
        if d.kind() != "Kustomization" {
            assert!(
                !d.name().is_empty(),
                "{}: {} without a name",
                d.file,
                d.kind()
            );
            assert!(
                d.value["metadata"]["namespace"].is_null(),
                "{}: {} sets its own namespace; set it once in kustomization.yaml",
                d.file,
                d.kind()
            );
        }
    }
    let kinds: BTreeSet<&str> = docs.iter().map(Doc::kind).collect();
    for kind in [
        "ConfigMap",
        "Secret",
        "Deployment",
        "PodDisruptionBudget",
        "ScaledObject",
    ] {
        assert!(kinds.contains(kind), "no {kind} in deploy/k8s");
    }

    let kustomization = only(&docs, "Kustomization");
    let listed: BTreeSet<String> = seq(&kustomization.value["resources"])
        .iter()
        .filter_map(|r| r.as_str().map(str::to_string))
        .collect();
    let files: BTreeSet<String> = docs
        .iter()
        .filter(|d| d.kind() != "Kustomization")
        .map(|d| d.file.clone())
        .collect();
    assert_eq!(
        listed, files,
        "kustomization.yaml resources must list every manifest"
    );
}

#[test]
fn configmap_streams_toml_is_valid_and_matches_the_repository() {
    let docs = manifests();
    let pod = pod_config(&docs, Vec::new());
    let repo = repo_config();
    assert_eq!(
        format!("{:?}", pod.streams),
        format!("{:?}", repo.streams),
        "the ConfigMap's streams differ from streams.toml: {SYNC_HINT}"
    );
    assert_eq!(
        format!("{:?}", pod.consumers),
        format!("{:?}", repo.consumers),
        "the ConfigMap's consumers differ from streams.toml: {SYNC_HINT}"
    );
    assert_eq!(
        format!("{:?}", pod.kv_buckets),
        format!("{:?}", repo.kv_buckets),
        "the ConfigMap's kv_buckets differ from streams.toml: {SYNC_HINT}"
    );
    let c = &pod.connection;
    assert!(
        c.password.is_none() && c.token.is_none() && c.user.is_none(),
        "credentials belong in the Secret, not in the ConfigMap"
    );
    let ops: SocketAddr = pod
        .worker
        .ops_listen
        .parse()
        .expect("worker.ops_listen must be set in the pod config (the probes need it)");
    assert!(
        ops.ip().is_unspecified(),
        "worker.ops_listen {ops} must listen on all interfaces (0.0.0.0) for the kubelet and Prometheus"
    );
}

/// `workers --config <the ConfigMap's streams.toml> check` passes: the config loads and
/// validates, and every consumer's handler is registered in the `workers` app.
#[test]
fn configmap_streams_toml_passes_workers_check() {
    let docs = manifests();
    let cm = only(&docs, "ConfigMap");
    let text = cm.value["data"]["streams.toml"]
        .as_str()
        .unwrap_or_else(|| panic!("{}: data.streams.toml missing", cm.file));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("streams.toml");
    std::fs::write(&path, text).expect("write streams.toml");
    let global = jetworker_cli::GlobalArgs {
        config: path,
        log_format: jetworker_cli::LogFormat::Human,
    };
    let app = workers::handlers::app(workers::handlers::Analytics::new());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let code = runtime.block_on(jetworker_cli::execute(
        &global,
        jetworker_cli::Command::Check,
        app,
    ));
    assert_eq!(
        code,
        std::process::ExitCode::SUCCESS,
        "`workers check` fails on the ConfigMap's streams.toml (its problems are printed above)"
    );
}

#[test]
fn probes_and_scrape_annotations_reach_the_ops_port() {
    let docs = manifests();
    let pod = pod_config(&docs, Vec::new());
    let ops_port = u64::from(
        pod.worker
            .ops_listen
            .parse::<SocketAddr>()
            .expect("ops_listen")
            .port(),
    );
    let deployment = only(&docs, "Deployment");
    let c = container(deployment);

    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe} must GET {path}");
        assert_eq!(
            resolve_port(c, &get["port"]),
            Some(ops_port),
            "{probe} must hit the ops port {ops_port} (worker.ops_listen)"
        );
    }
    if !c["startupProbe"].is_null() {
        let get = &c["startupProbe"]["httpGet"];
        assert_eq!(get["path"].as_str(), Some("/healthz"));
        assert_eq!(resolve_port(c, &get["port"]), Some(ops_port));
    }

    let annotations = str_map(&deployment.value["spec"]["template"]["metadata"]["annotations"]);
    assert_eq!(
        annotations.get("prometheus.io/scrape").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        annotations.get("prometheus.io/path").map(String::as_str),
        Some("/metrics")
    );
    assert_eq!(
        annotations.get("prometheus.io/port"),
        Some(&ops_port.to_string()),
        "the scrape port must be the ops port"
    );
}

#[test]
fn the_deployment_runs_the_mounted_config() {
    let docs = manifests();
    let deployment = only(&docs, "Deployment");
    let configmap = only(&docs, "ConfigMap");
    let c = container(deployment);
    let argv: Vec<&str> = seq(&c["command"])
        .iter()
        .chain(seq(&c["args"]))
        .filter_map(Value::as_str)
        .collect();
    let at = argv
        .iter()
        .position(|a| *a == "--config")
        .unwrap_or_else(|| panic!("no --config in {argv:?}"));
    assert_eq!(argv.get(at + 1), Some(&CONFIG_PATH), "{argv:?}");
    assert_eq!(
        argv.last(),
        Some(&"run"),
        "the command must be `run`: {argv:?}"
    );

    // CONFIG_PATH must be a file of a ConfigMap volume holding the ConfigMap's key.
    let volumes = seq(&deployment.value["spec"]["template"]["spec"]["volumes"]);
    let mounted = seq(&c["volumeMounts"]).iter().any(|m| {
        let (Some(dir), Some(volume)) = (m["mountPath"].as_str(), m["name"].as_str()) else {
            return false;
        };
        let Some(file) = CONFIG_PATH.strip_prefix(&format!("{}/", dir.trim_end_matches('/')))
        else {
            return false;
        };
        let Some(v) = volumes.iter().find(|v| v["name"].as_str() == Some(volume)) else {
            return false;
        };
        if v["configMap"]["name"].as_str() != Some(configmap.name()) {
            return false;
        }
        let items = seq(&v["configMap"]["items"]);
        let key = if items.is_empty() {
            Some(file)
        } else {
            items
                .iter()
                .find(|i| i["path"].as_str() == Some(file))
                .and_then(|i| i["key"].as_str())
        };
        m["readOnly"].as_bool() == Some(true) && key == Some("streams.toml")
    });
    assert!(
        mounted,
        "{CONFIG_PATH} must be the ConfigMap {:?}'s streams.toml, mounted read-only",
        configmap.name()
    );
}

#[test]
fn the_kubelet_waits_longer_than_the_shutdown_grace() {
    let docs = manifests();
    let pod = pod_config(&docs, Vec::new());
    let deployment = only(&docs, "Deployment");
    let termination = deployment.value["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds must be set");
    let needed = pod.worker.shutdown_grace + SHUTDOWN_OVERHEAD;
    assert!(
        Duration::from_secs(termination) > needed,
        "terminationGracePeriodSeconds {termination} must exceed shutdown_grace {:?} + {:?}",
        pod.worker.shutdown_grace,
        SHUTDOWN_OVERHEAD
    );
}

#[test]
fn the_pod_is_locked_down_and_sized() {
    let docs = manifests();
    let deployment = only(&docs, "Deployment");
    let pod_sc = &deployment.value["spec"]["template"]["spec"]["securityContext"];
    let c = container(deployment);
    let sc = &c["securityContext"];
    assert!(
        pod_sc["runAsNonRoot"].as_bool() == Some(true)
            || sc["runAsNonRoot"].as_bool() == Some(true),
        "runAsNonRoot must be true"
    );
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    let drops: Vec<&str> = seq(&sc["capabilities"]["drop"])
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(drops.contains(&"ALL"), "capabilities.drop must contain ALL");
    assert!(
        seq(&sc["capabilities"]["add"]).is_empty(),
        "no capabilities may be added"
    );
    for key in ["cpu", "memory"] {
        assert!(
            !c["resources"]["requests"][key].is_null(),
            "resources.requests.{key} must be set"
        );
    }
    assert!(
        !c["resources"]["limits"]["memory"].is_null(),
        "resources.limits.memory must be set"
    );
}

#[test]
fn referenced_secrets_and_configmaps_exist_and_complete_the_config() {
    let docs = manifests();
    let deployment = only(&docs, "Deployment");
    let names = |kind: &str| -> BTreeSet<String> {
        docs.iter()
            .filter(|d| d.kind() == kind)
            .map(|d| d.name().to_string())
            .collect()
    };
    let secrets = names("Secret");
    let configmaps = names("ConfigMap");
    let c = container(deployment);

    let mut secret_refs = Vec::new();
    let mut configmap_refs = Vec::new();
    for from in seq(&c["envFrom"]) {
        secret_refs.extend(from["secretRef"]["name"].as_str());
        configmap_refs.extend(from["configMapRef"]["name"].as_str());
    }
    for e in seq(&c["env"]) {
        secret_refs.extend(e["valueFrom"]["secretKeyRef"]["name"].as_str());
        configmap_refs.extend(e["valueFrom"]["configMapKeyRef"]["name"].as_str());
    }
    for v in seq(&deployment.value["spec"]["template"]["spec"]["volumes"]) {
        secret_refs.extend(v["secret"]["secretName"].as_str());
        configmap_refs.extend(v["configMap"]["name"].as_str());
    }
    assert!(!secret_refs.is_empty(), "the Deployment uses no Secret");
    for name in &secret_refs {
        assert!(
            secrets.contains(*name),
            "Secret {name:?} is referenced but not defined"
        );
    }
    for name in &configmap_refs {
        assert!(
            configmaps.contains(*name),
            "ConfigMap {name:?} is referenced but not defined"
        );
    }

    // The Secret's variables, given as the Deployment gives them, keep the config valid
    // and fill its credentials.
    let secret = only(&docs, "Secret");
    let data = str_map(&secret.value["stringData"]);
    assert!(
        !data.is_empty(),
        "{}: stringData holds the credentials",
        secret.file
    );
    for key in data.keys() {
        assert!(
            key.starts_with("JETWORKER__") || key == "NATS_URL",
            "{}: {key} is no variable jetworker reads",
            secret.file
        );
    }
    let with_secret = pod_config(&docs, data.into_iter().collect());
    assert!(
        with_secret.connection.password.is_some() || with_secret.connection.token.is_some(),
        "the Secret must supply the connection's password or token"
    );
}

#[test]
fn the_disruption_budget_selects_the_deployment_and_allows_drains() {
    let docs = manifests();
    let deployment = only(&docs, "Deployment");
    let pdb = only(&docs, "PodDisruptionBudget");
    let selector = str_map(&deployment.value["spec"]["selector"]["matchLabels"]);
    let labels = str_map(&deployment.value["spec"]["template"]["metadata"]["labels"]);
    let pdb_selector = str_map(&pdb.value["spec"]["selector"]["matchLabels"]);
    assert!(!selector.is_empty() && !pdb_selector.is_empty());
    for (k, v) in selector.iter().chain(&pdb_selector) {
        assert_eq!(
            labels.get(k),
            Some(v),
            "selector label {k}={v} is not on the Deployment's pods"
        );
    }
    assert_eq!(
        pdb_selector, selector,
        "the PDB must select exactly the Deployment's pods"
    );

    let min_replicas = only(&docs, "ScaledObject").value["spec"]["minReplicaCount"]
        .as_u64()
        .unwrap_or(0);
    let spec = &pdb.value["spec"];
    if let Some(max_unavailable) = spec["maxUnavailable"].as_u64() {
        assert!(max_unavailable >= 1, "maxUnavailable 0 blocks every drain");
    } else if let Some(min_available) = spec["minAvailable"].as_u64() {
        assert!(
            min_available < min_replicas,
            "minAvailable {min_available} with {min_replicas} replicas blocks drains"
        );
    } else {
        panic!("the PDB needs maxUnavailable or minAvailable");
    }
    // Every worker is unready while NATS is down; that must not block node drains.
    assert_eq!(
        spec["unhealthyPodEvictionPolicy"].as_str(),
        Some("AlwaysAllow"),
        "unready workers must stay evictable"
    );
}

#[test]
fn keda_scales_the_deployment_on_every_consumer_lag() {
    let docs = manifests();
    let pod = pod_config(&docs, Vec::new());
    let deployment = only(&docs, "Deployment");
    let so = only(&docs, "ScaledObject");
    let spec = &so.value["spec"];
    assert_eq!(
        spec["scaleTargetRef"]["name"].as_str(),
        Some(deployment.name())
    );
    assert!(matches!(
        spec["scaleTargetRef"]["kind"].as_str(),
        None | Some("Deployment")
    ));
    assert!(
        deployment.value["spec"]["replicas"].is_null(),
        "with KEDA the Deployment must not pin `replicas` (every apply would reset the HPA's count)"
    );

    let mut triggered = BTreeSet::new();
    for t in seq(&spec["triggers"]) {
        assert_eq!(t["type"].as_str(), Some("nats-jetstream"));
        let meta = t["metadata"].as_mapping().expect("trigger metadata");
        for (k, v) in meta {
            assert!(
                v.as_str().is_some(),
                "KEDA metadata values are strings: {k:?} is {v:?}"
            );
        }
        let m = str_map(&t["metadata"]);
        let endpoint = m
            .get("natsServerMonitoringEndpoint")
            .expect("natsServerMonitoringEndpoint");
        assert!(
            !endpoint.contains("://") && endpoint.rsplit_once(':').is_some(),
            "natsServerMonitoringEndpoint is host:port without a scheme: {endpoint}"
        );
        assert!(m.get("account").is_some_and(|a| !a.is_empty()), "account");
        let lag: u64 = m
            .get("lagThreshold")
            .and_then(|l| l.parse().ok())
            .expect("lagThreshold is a whole number");
        assert!(lag > 0);
        let (stream, consumer) = (
            m.get("stream").cloned().unwrap_or_default(),
            m.get("consumer").cloned().unwrap_or_default(),
        );
        assert!(
            triggered.insert((stream.clone(), consumer.clone())),
            "two triggers for {stream}/{consumer}"
        );
    }
    let consumers: BTreeSet<(String, String)> = pod
        .consumers
        .iter()
        .map(|c| (c.stream.clone(), c.name.clone()))
        .collect();
    assert_eq!(
        triggered, consumers,
        "one KEDA trigger per consumer of streams.toml"
    );

    let min = spec["minReplicaCount"].as_u64().expect("minReplicaCount");
    let max = spec["maxReplicaCount"].as_u64().expect("maxReplicaCount");
    assert!(
        1 <= min && min <= max,
        "1 <= minReplicaCount <= maxReplicaCount"
    );
    for c in &pod.consumers {
        let total = max as i64 * c.concurrency;
        assert!(
            total <= c.max_ack_pending,
            "consumer {}: {max} replicas x concurrency {} = {total} exceeds max_ack_pending {}: the extra replicas would idle",
            c.name,
            c.concurrency,
            c.max_ack_pending
        );
    }
}

/// A systemd unit file: section -> key -> every value given (keys may repeat).
type Unit = BTreeMap<String, BTreeMap<String, Vec<String>>>;

fn parse_unit(text: &str) -> Unit {
    let mut unit = Unit::new();
    let mut section = String::new();
    let mut pending = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';'))
        {
            continue;
        }
        if let Some(cont) = line.strip_suffix('\\') {
            pending.push_str(cont);
            pending.push(' ');
            continue;
        }
        let line = std::mem::take(&mut pending) + line;
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not a unit line: {line:?}"));
        unit.entry(section.clone())
            .or_default()
            .entry(key.trim().to_string())
            .or_default()
            .push(value.trim().to_string());
    }
    unit
}

/// A systemd time span: "45s", "1min 30s", or plain seconds.
fn unit_duration(value: &str) -> Duration {
    if let Ok(secs) = value.parse::<u64>() {
        return Duration::from_secs(secs);
    }
    humantime::parse_duration(value)
        .unwrap_or_else(|e| panic!("not a finite time span: {value:?}: {e}"))
}

#[test]
fn the_systemd_unit_is_a_hardened_notify_service() {
    let path = repo().join("deploy/systemd/workers.service");
    let text = std::fs::read_to_string(&path).expect("read the unit");
    let unit = parse_unit(&text);
    let service = unit.get("Service").expect("[Service] section");
    let last = |key: &str| -> &str {
        service
            .get(key)
            .and_then(|v| v.last())
            .map(String::as_str)
            .unwrap_or_else(|| panic!("{key}= missing from [Service]"))
    };

    assert_eq!(last("Type"), "notify");
    assert_eq!(last("NotifyAccess"), "main");
    assert_eq!(last("Restart"), "on-failure");
    assert_eq!(last("KillSignal"), "SIGTERM");
    assert_eq!(
        last("ExecStart"),
        format!("/usr/local/bin/workers --config {CONFIG_PATH} run")
    );
    assert_eq!(last("EnvironmentFile"), "-/etc/workers/env");

    let watchdog = unit_duration(last("WatchdogSec"));
    assert!(
        watchdog >= Duration::from_secs(2),
        "WatchdogSec {watchdog:?} too short to ping at half of it reliably"
    );

    // The unit reads the repository's streams.toml, installed as CONFIG_PATH.
    let grace = repo_config().worker.shutdown_grace;
    let stop = unit_duration(last("TimeoutStopSec"));
    assert!(
        stop > grace + SHUTDOWN_OVERHEAD,
        "TimeoutStopSec {stop:?} must exceed shutdown_grace {grace:?} + {SHUTDOWN_OVERHEAD:?}"
    );

    let hardening = [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("CapabilityBoundingSet", ""),
    ];
    for (key, want) in hardening {
        assert_eq!(last(key), want, "{key}");
    }
    assert!(
        last("DynamicUser") == "yes" || service.contains_key("User"),
        "run as DynamicUser=yes or a dedicated User="
    );
    if let Some(user) = service.get("User").and_then(|v| v.last()) {
        assert!(user != "root" && user != "0", "User={user}: not root");
    }
    let families: BTreeSet<&str> = last("RestrictAddressFamilies").split_whitespace().collect();
    assert_eq!(
        families,
        BTreeSet::from(["AF_UNIX", "AF_INET", "AF_INET6"]),
        "AF_UNIX for sd_notify, AF_INET/AF_INET6 for NATS and the ops endpoint; nothing else"
    );
    assert!(
        service
            .get("SystemCallFilter")
            .is_some_and(|v| v.iter().any(|f| f == "@system-service")),
        "SystemCallFilter=@system-service"
    );
    assert!(
        !service.contains_key("TimeoutSec"),
        "TimeoutSec= would override TimeoutStopSec="
    );

    let install = unit.get("Install").expect("[Install] section");
    assert!(
        install.contains_key("WantedBy"),
        "WantedBy= so `enable` works"
    );
}

#[test]
fn the_readme_describes_every_deployment_file() {
    let readme =
        std::fs::read_to_string(repo().join("deploy/README.md")).expect("deploy/README.md");
    let mut files: Vec<String> = k8s_files()
        .iter()
        .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
        .collect();
    files.push("workers.service".to_string());
    for file in files {
        assert!(
            readme.contains(&file),
            "deploy/README.md does not mention {file}"
        );
    }
}

/// `promtool`, from Debian's `prometheus` package (scripts/install-deps installs it).
fn promtool(args: &[&str]) -> std::process::Output {
    std::process::Command::new("promtool")
        .args(args)
        .current_dir(repo().join("deploy/prometheus"))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): run scripts/install-deps (Debian package prometheus)"
            )
        })
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let out = promtool(&args);
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every alert the rules file defines has a unit test.
    let rules =
        std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).expect("rules");
    let tests =
        std::fs::read_to_string(repo().join("deploy/prometheus/alerts.test.yml")).expect("tests");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 5, "{alerts:?}");
    for alert in alerts {
        assert!(
            tests.contains(&format!(
                "alertname: {alert}\n        exp_alerts:\n          - "
            )),
            "alerts.test.yml never expects {alert} to fire"
        );
    }
}

#[test]
fn the_dashboard_is_grafana_json_with_queries() {
    let text = std::fs::read_to_string(repo().join("deploy/grafana/jetworker.json"))
        .expect("deploy/grafana/jetworker.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "jetworker");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8);
    for panel in panels {
        let targets = panel["targets"]
            .as_array()
            .expect("every panel has targets");
        assert!(!targets.is_empty(), "{panel}");
        assert!(
            targets
                .iter()
                .all(|t| t["expr"].as_str().is_some_and(|e| !e.is_empty())),
            "{panel}"
        );
    }
}

#[test]
fn the_readme_describes_the_dashboard_and_the_alerts() {
    let readme =
        std::fs::read_to_string(repo().join("deploy/README.md")).expect("deploy/README.md");
    for file in [
        "grafana/jetworker.json",
        "prometheus/alerts.yml",
        "prometheus/alerts.test.yml",
    ] {
        assert!(
            readme.contains(file),
            "deploy/README.md does not mention {file}"
        );
    }
}
